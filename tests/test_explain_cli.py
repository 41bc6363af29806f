"""``graphlora explain MODEL --policy FILE`` and docs/explain.md.

The command runs in-process (``graphlora.cli.main``) on the built-in tiny LLaVA with the policy shown in
docs/explain.md; the table it prints is checked (header, some rows exactly, a reason on every row) and
must equal the output block of the doc, so the doc shows real output.
"""

from __future__ import annotations

import re
from pathlib import Path

from graphlora.cli import main

DOC = Path(__file__).resolve().parent.parent / "docs" / "explain.md"
HEADER = ["module", "component", "role", "layer", "lora", "r", "alpha", "reason"]


def doc_block(kind: str, name: str) -> str:
    """The fenced block preceded by ``<!-- kind: name -->`` in docs/explain.md."""
    m = re.search(rf"<!-- {kind}: {re.escape(name)} -->\s*```\w+\n(.*?)```", DOC.read_text(), flags=re.S)
    assert m, f"docs/explain.md lost its {kind} block {name!r}"
    return m.group(1)


def cells(line: str) -> list[str]:
    """A table line split into its 8 columns (columns are separated by two or more spaces)."""
    return re.split(r"\s{2,}", line.rstrip(), maxsplit=len(HEADER) - 1)


def test_explain_command_prints_the_documented_table(tmp_path, capsys):
    policy = tmp_path / "explain-example.yaml"
    policy.write_text(doc_block("policy", "explain-example"))
    assert main(["explain", "llava", "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    lines = out.rstrip("\n").splitlines()

    assert cells(lines[0]) == HEADER
    rows = {c[0]: c for c in map(cells, lines[1:])}
    assert len(rows) == len(lines) - 1 == 29  # every linear of the tiny LLaVA, once
    assert all(len(c) == len(HEADER) and c[-1].strip() for c in rows.values()), "a row without a reason"

    v = "model.vision_tower.encoder.layers"
    assert rows[f"{v}.0.self_attn.q_proj"] == [
        f"{v}.0.self_attn.q_proj", "vision", "attn.q", "0", "no", "-", "-", "vision_layers='-1:' excludes layer 0"]
    assert rows[f"{v}.1.mlp.fc2"] == [
        f"{v}.1.mlp.fc2", "vision", "mlp.down", "1", "skipped", "-", "-",
        "its output never reaches `loss`, so it can receive no gradient "
        "(chosen by: finetune_vision_layers and finetune_mlp_modules)"]
    assert rows["model.multi_modal_projector.linear_1"] == [
        "model.multi_modal_projector.linear_1", "projector", "other", "-", "yes", "8", "16", "finetune_projector=True"]
    assert rows["model.language_model.layers.1.self_attn.v_proj"] == [
        "model.language_model.layers.1.self_attn.v_proj", "language", "attn.v", "1", "yes", "16", "16",
        "finetune_language_layers and finetune_attention_modules"]
    assert rows["model.language_model.layers.0.mlp.up_proj"] == [
        "model.language_model.layers.0.mlp.up_proj", "language", "mlp.up", "0", "no", "-", "-", "rules[0] (target: false)"]
    assert rows["lm_head"] == [
        "lm_head", "head", "other", "-", "no", "-", "-",
        "the output head is never chosen by flags (add a rule with target: true)"]

    documented = doc_block("output", "explain-llava")
    assert out.rstrip() == documented.rstrip(), (
        "docs/explain.md shows another output: rerun `python -m graphlora explain llava --policy FILE` with the "
        "doc's policy and paste the table")
