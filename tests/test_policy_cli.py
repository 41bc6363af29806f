"""Policy files applied to models: `graphlora policy check/diff/schema`, located rule errors, the
recorded policy, and the "last 4 vision layers" recipe on two families."""

import json
import textwrap

import pytest
import torch

import graphlora
from graphlora.cli import main
from graphlora.errors import PolicyError
from graphlora.testing import zoo


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_check_good_and_bad_files(tmp_path, capsys):
    good = write(tmp_path, "good.yaml", "extends: language-only\nr: 8\n")
    bad = write(tmp_path, "bad.toml", 'r = 8\nfinetune_vison_layers = false\n')
    assert main(["policy", "check", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["policy", "check", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "bad.toml:2: finetune_vison_layers" in err and "did you mean" in err


def test_check_with_model_finds_rule_matching_no_site(tmp_path, capsys):
    policy = write(tmp_path, "p.yaml", """
        finetune_vision_layers: false
        rules:
          - match: {component: language, role: attn.q}
            r: 8
          - match: {component: vision, layers: [0]}
            r: 4
    """)
    assert main(["policy", "check", str(policy), "--model", "llava"]) != 0
    err = capsys.readouterr().err
    assert "p.yaml:5: rules[1]: matches no LoRA site: it matches 6 linear(s), none of which gets LoRA" in err

    fixed = write(tmp_path, "fixed.yaml", policy.read_text().replace("r: 4", "r: 4\n    allow_unmatched: true"))
    assert main(["policy", "check", str(fixed), "--model", "llava"]) == 0
    assert "14 LoRA sites on llava" in capsys.readouterr().out


def test_diff_lists_added_removed_and_changed(tmp_path, capsys):
    a = write(tmp_path, "a.yaml", "extends: language-only\nfinetune_mlp_modules: false\n")
    b = write(tmp_path, "b.yaml", """
        extends: language-only
        finetune_attention_modules: false
        rules:
          - match: {component: language, role: mlp.down, layers: "-1:"}
            r: 32
    """)
    assert main(["policy", "diff", str(a), str(b), "--model", "llava"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"--- {a}: 8 sites" and out[1] == f"+++ {b}: 6 sites"
    body = [" ".join(line.split()) for line in out[2:]]
    assert "+ model.language_model.layers.1.mlp.down_proj language mlp.down layer 1 r=32 alpha=16" in body
    assert "- model.language_model.layers.0.self_attn.q_proj language attn.q layer 0 r=16 alpha=16" in body
    assert body[-1] == "6 added, 8 removed, 0 changed"
    assert main(["policy", "diff", str(a), str(a), "--model", "llava"]) == 0
    assert "select the same sites" in capsys.readouterr().out


def test_schema_command_prints_the_shipped_schema(capsys):
    from graphlora.policy import policy_json_schema

    assert main(["policy", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == policy_json_schema()


def test_rewritten_model_records_its_policy(tiny, tmp_path):
    path = write(tmp_path, "p.yaml", "extends: language-only\nr: 8\n")
    model, inputs = tiny("llava")
    lora_model = graphlora.rewrite(model, path, inputs)
    assert lora_model.policy == graphlora.Policy(finetune_vision_layers=False, r=8)
    assert lora_model.policy_digest == lora_model.policy.digest() and len(lora_model.policy_digest) == 64


def test_rule_errors_point_at_the_file_line(tiny, tmp_path):
    path = write(tmp_path, "p.yaml", """
        extends: full-vlm
        rules:
          - match: {name: 'no\\.such\\.module'}
            target: true
    """)
    model, inputs = tiny("llava")
    with pytest.raises(PolicyError, match=r"p\.yaml:3: rules\[0\]: matches no LoRA site: it matches no linear"):
        graphlora.rewrite(model, path, inputs)


RECIPE = """
vision_layers: "-4:"
finetune_mlp_modules: false
r: 16
rules:
  - match: {component: vision}
    r: 32
"""


@pytest.mark.parametrize("family, vision_prefix, language_prefix", [
    ("idefics3", "model.vision_model.encoder.layers", "model.text_model.layers"),
    ("gemma3", "model.vision_tower.encoder.layers", "model.language_model.layers"),
])
def test_last_four_vision_layers_attention_only(tmp_path, family, vision_prefix, language_prefix):
    """'Last 4 vision layers and all language layers, attention only, r=32 for vision and 16 for language'."""
    config = zoo.build_tiny_config(family)
    config.vision_config.num_hidden_layers = 6
    model = type(zoo.build_tiny_model(family))(config).eval()
    inputs = zoo.tiny_example_inputs(family, model)
    lora_model = graphlora.rewrite(model, write(tmp_path, "p.yaml", RECIPE), inputs)
    got = {(s.name, s.r) for s in lora_model.sites}
    vision = {(f"{vision_prefix}.{i}.self_attn.{p}_proj", 32) for i in range(2, 6) for p in ("q", "k", "v", "out")}
    language = {(f"{language_prefix}.{i}.self_attn.{p}_proj", 16) for i in range(2) for p in ("q", "k", "v", "o")}
    assert got == vision | language
    with torch.no_grad():
        torch.testing.assert_close(lora_model(**inputs).logits, model(**inputs, use_cache=False).logits)
