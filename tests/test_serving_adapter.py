"""Serving adapters for vLLM: one global rank and alpha, exactly equal, checked against vLLM's published rules."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch

import graphlora
from graphlora.adapters.serving import REPORT_NAME, ServingAdapterError
from helpers import set_random_lora

# Mixed ranks and alphas, vision and projector sites, rsLoRA on the language model's MLP.
POLICY = dict(finetune_vision_layers=True, finetune_language_layers=True, finetune_projector=True, r=8,
              lora_alpha=16, rules=[
                  dict(match=dict(component="vision"), r=4, alpha=32),
                  dict(match=dict(component="projector"), r=16, alpha=8),
                  dict(match=dict(component="language", role="mlp.down"), r=2, alpha=3)])


def vllm_rules_violations(directory) -> list[str]:
    """vLLM's loader rules (vllm/lora/peft_helper.py, lora_model.py) the files break; empty when served."""
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = safetensors.torch.load_file(directory / "adapter_model.safetensors")
    out = []
    if config.get("modules_to_save"):
        out.append("modules_to_save must be None")
    if config.get("use_dora"):
        out.append("no DoRA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        out.append("vLLM ignores rank_pattern / alpha_pattern: one global r and lora_alpha")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            out.append(f"missing required field {field}")
    r = config["r"]
    modules = set()
    for key, t in tensors.items():
        if not key.startswith("base_model.model.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            out.append(f"key {key} is not base_model.model.<module>.lora_A|lora_B.weight")
            continue
        module, part = key[len("base_model.model."):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        modules.add(module)
        if (part == "lora_A" and t.shape[0] != r) or (part == "lora_B" and t.shape[1] != r):
            out.append(f"{key} has rank {t.shape} other than r={r}")
    if modules != set(config["target_modules"]):
        out.append("tensors and target_modules name different modules")
    return out


@pytest.fixture
def mixed(tiny):
    model, inputs = tiny("llava")
    pristine = copy.deepcopy(model)
    lora_model = graphlora.rewrite(model, POLICY, inputs)
    set_random_lora(lora_model, std=0.1)
    return lora_model, pristine, inputs


def test_serving_adapter_reloads_in_peft_with_the_original_outputs(mixed, tmp_path):
    from peft import PeftModel

    lora_model, pristine, inputs = mixed
    ranks = {s.r for s in lora_model.sites}
    scales = {round(s.scale, 6) for s in lora_model.sites}
    assert len(ranks) > 2 and len(scales) > 2 and {s.component for s in lora_model.sites} >= {"vision", "projector"}
    report = lora_model.save_adapter(tmp_path / "serve", for_serving="vllm")
    assert vllm_rules_violations(tmp_path / "serve") == []
    config = json.loads((tmp_path / "serve" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == max(ranks) == report.r
    with torch.no_grad():
        ours = lora_model(**inputs).logits
    peft_model = PeftModel.from_pretrained(pristine, tmp_path / "serve").eval()
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # the report: vision and projector sites need the tower/connector flag, the lower ranks were padded
    vision = {s.name for s in lora_model.sites if s.component in ("vision", "projector")}
    assert set(report.tower_connector_sites) == vision and "--enable-tower-connector-lora" in report.server_flags
    assert set(report.padded_sites) == {s.name for s in lora_model.sites if s.r < report.r}
    written = json.loads((tmp_path / "serve" / REPORT_NAME).read_text())
    assert written["tower_connector_sites"] == sorted(vision)


def test_language_only_adapter_needs_no_tower_flag(tiny, tmp_path):
    model, inputs = tiny("llava")
    lora_model = graphlora.rewrite(model, dict(finetune_vision_layers=False, finetune_language_layers=True), inputs)
    report = lora_model.save_adapter(tmp_path, for_serving="vllm")
    assert report.tower_connector_sites == () and report.server_flags == ["--max-lora-rank 16"]
    assert report.padded_sites == () and vllm_rules_violations(tmp_path) == []


def test_what_vllm_cannot_serve_is_refused_with_site_and_reason(tiny, tmp_path):
    model, inputs = tiny("llava")
    lora_model = graphlora.rewrite(model, dict(modules_to_save=["lm_head"]), inputs)
    with pytest.raises(ServingAdapterError, match=r"lm_head: a modules_to_save copy \(vLLM loads adapters with "
                                                  r"modules_to_save None\)"):
        lora_model.save_adapter(tmp_path, for_serving="vllm")
    assert not (tmp_path / "adapter_config.json").exists(), "nothing is written when refused"
    model, inputs = tiny("llama4")
    moe = graphlora.rewrite(model, dict(finetune_vision_layers=False, finetune_attention_modules=False), inputs)
    expert_sites = [s.name for s in moe.sites if s.kind != "linear"]
    if not expert_sites:
        pytest.skip("the llama4 fixture adapts no expert parameter")
    with pytest.raises(ServingAdapterError, match=rf"{expert_sites[0]}: a LoRA on a raw parameter"):
        moe.save_adapter(tmp_path / "moe", for_serving="vllm")
    with pytest.raises(ValueError, match="for_serving='tgi'"):
        moe.save_adapter(tmp_path / "tgi", for_serving="tgi")
