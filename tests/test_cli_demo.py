"""The main job prints the site table, a falling loss and generated tokens;
MODEL SPEC resolves each of its three forms."""

import re
import subprocess
import sys
import textwrap

import pytest
import torch

from graphlora.model_spec import ModelSpecError, load_model_spec


def test_demo_prints_table_falling_loss_and_tokens():
    result = subprocess.run([sys.executable, "-m", "graphlora", "demo", "--steps", "8"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    table = re.search(r"^component\s+linears\s+lora sites\s+skipped\s+lora params$", out, re.M)
    assert table, out
    assert re.search(r"^language\s+14\s+14\s+0\s+", out, re.M), out  # language-only on the tiny LLaVA
    assert re.search(r"^vision\s+12\s+0\s+0\s+0$", out, re.M), out
    losses = [float(x) for x in re.findall(r"step\s+\d+\s+loss ([0-9.]+)", out)]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    tokens = re.search(r"generated (\d+) tokens: \[([0-9, ]+)\]", out)
    assert tokens and int(tokens.group(1)) > 0, out


def test_model_spec_builtin_name():
    model, inputs = load_model_spec("llava")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert inputs["input_ids"].shape[0] == 2


def test_model_spec_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        from graphlora.testing import zoo
        def make():
            model = zoo.build_tiny_model("idefics3")
            return model, zoo.tiny_example_inputs("idefics3", model)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model, inputs = load_model_spec("my_models:make")
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    model2, _ = load_model_spec(f"{tmp_path / 'my_models.py'}:make")
    assert type(model2).__name__ == "Idefics3ForConditionalGeneration"


def test_model_spec_config_directory(tmp_path):
    from graphlora.testing import zoo

    zoo.build_tiny_config("llava").save_pretrained(tmp_path)
    model, inputs = load_model_spec(str(tmp_path))
    assert type(model).__name__ == "LlavaForConditionalGeneration" and inputs is None
    meta_model, _ = load_model_spec(str(tmp_path), meta=True)
    assert next(meta_model.parameters()).device == torch.device("meta")


@pytest.mark.parametrize("spec, message", [
    ("no_such_tiny_model", "neither a built-in tiny model"),
    ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
    ("json:no_such_function", "has no callable 'no_such_function'"),
])
def test_model_spec_errors(spec, message):
    with pytest.raises(ModelSpecError, match=re.escape(message)):
        load_model_spec(spec)


def test_explain_cli_prints_a_row_per_linear(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("finetune_vision_layers: false\n")
    result = subprocess.run([sys.executable, "-m", "graphlora", "explain", "llava", "--policy", str(policy)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["module", "component", "role", "layer", "lora"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["model.language_model.layers.0.self_attn.q_proj"][1:5] == ["language", "attn.q", "0", "yes"]
    assert rows["model.vision_tower.encoder.layers.0.mlp.fc1"][1:5] == ["vision", "mlp.up", "0", "no"]
    assert "finetune_vision_layers=False" in " ".join(rows["model.vision_tower.encoder.layers.0.mlp.fc1"])
    assert rows["lm_head"][1] == "head"
