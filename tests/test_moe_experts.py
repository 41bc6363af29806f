"""LoRA on MoE experts: the expert weights are 3-D parameters that grouped or batched matmuls read.

``finetune_mlp_modules`` selects them (roles ``mlp.gate_up`` / ``mlp.down`` from the wiring, like dense MLPs);
the LoRA is added to the parameter as PEFT's ``target_parameters`` (``lora.ParamWrapper``) does: per expert
``W_e + s B_e A_e`` with ``A [r E, in]`` and ``B [out, r E]``. Checked per MoE family: equal to the model at
initialisation, equal to an independent eager reference with random B (all trace modes), training lowers
the loss, PEFT loads the saved adapter with equal outputs, merge and unmerge are exact.
"""

from __future__ import annotations

import json
import re
import warnings

import peft
import pytest
import torch

import graphlora
from graphlora.errors import PeftConversionWarning
from graphlora.testing import zoo
from helpers import EagerLoraReference, set_random_lora

MOE_FAMILIES = [name for name in ("llama4", "qwen3_vl_moe", "glm4v_moe") if name in zoo.tiny_model_names()]
MLP_ONLY = dict(finetune_vision_layers=False, finetune_language_layers=True, finetune_attention_modules=False,
                finetune_mlp_modules=True, r=4, lora_alpha=8)


def experts_of(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.ndim == 3 and "expert" in name]


def rewritten(family, **kw):
    model = zoo.build_tiny_model(family)
    batch = zoo.tiny_example_inputs(family, model)
    return model, batch, graphlora.rewrite(model, MLP_ONLY, batch, **kw)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_mlp_flag_selects_every_expert_parameter(family):
    model, batch, lora_model = rewritten(family)
    experts = experts_of(model)
    assert experts
    sites = {s.name: s for s in lora_model.sites}
    assert set(experts) <= set(sites), sorted(set(experts) - set(sites))
    assert all(sites[n].kind == "expert_matmul" and sites[n].role.startswith("mlp.") for n in experts)
    if family != "llama4":  # Llama 4's MoE layer does not export (it runs eagerly, its LoRA on the parameter too)
        # The grouped_mm MoE blocks run as programs (their expert LoRA is in the graph), not eagerly after a failed check.
        moe_blocks = {re.match(r"(.*?\.layers\.\d+)\.", n)[1] for n in experts}
        graphs = {r.path for r in lora_model.regions if r.mode == "graph"}
        assert moe_blocks <= graphs, (sorted(moe_blocks - graphs), lora_model.regions)
    with torch.no_grad():  # B = 0: the rewritten model is the model
        torch.testing.assert_close(lora_model(**batch).logits, model(**batch, use_cache=False).logits)


#: Llama 4's experts are one bmm per tensor, so the whole model exports too; grouped_mm experts (Qwen3-VL-MoE,
#: GLM-4.5V) split tokens by data-dependent offsets and run in block programs (the default).
MODES = [(f, "blocks") for f in MOE_FAMILIES] + [("llama4", "whole")]


@pytest.mark.parametrize(("family", "trace_mode"), MODES)
def test_expert_lora_equals_the_eager_reference_and_trains(family, trace_mode):
    model, batch, lora_model = rewritten(family, trace_mode=trace_mode)
    set_random_lora(lora_model, std=0.1)
    with torch.no_grad(), EagerLoraReference(model, lora_model):
        ref = model(**batch, use_cache=False).logits
    with torch.no_grad():
        torch.testing.assert_close(lora_model(**batch).logits, ref, atol=1e-5, rtol=1e-4)
    lora_model.train()
    experts = [s for s in lora_model.sites if s.kind == "expert_matmul"]
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = lora_model(**batch).loss
        loss.backward()
        grads = [lora_model.get_submodule(s.module).lora_B.weight.grad for s in experts]
        assert all(g is not None and bool(g.ne(0).any()) for g in grads)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


#: PEFT 0.21.2's transformers-v5 MoE conversion (convert_peft_config_for_transformers, huggingface/peft#3711) rewrites a
#: GLM-MoE config whose target_modules name gate_proj / up_proj linears (GLM's dense layer 0 and shared expert) as if they
#: were v4 experts: they would become expert parameters, and experts.gate_up_proj would get rank 2 r. graphlora writes
#: those linears as target parameters (<path>.weight), which the conversion leaves alone.
PEFT_REWRITES = {"glm4v_moe": ["model.language_model.layers.0.mlp.gate_proj", "model.language_model.layers.1.mlp.shared_experts.up_proj"]}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_peft_loads_the_expert_adapter_with_equal_outputs(family, tmp_path):
    model, batch, lora_model = rewritten(family)
    set_random_lora(lora_model, std=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftConversionWarning)
        lora_model.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config["target_parameters"]) >= set(experts_of(model))
    for linear in PEFT_REWRITES.get(family, []):
        assert f"{linear}.weight" in config["target_parameters"] and linear not in config["target_modules"]
    with torch.no_grad():
        ours = lora_model(**batch).logits
        theirs = peft.PeftModel.from_pretrained(zoo.build_tiny_model(family), tmp_path)(**batch, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_saving_warns_when_peft_would_still_rewrite_the_adapter(tmp_path):
    """With dropout, the dense GLM linears cannot become target parameters (PEFT's ParamWrapper refuses dropout):
    the file keeps them as target modules and save_adapter says that PEFT will misread it."""
    model = zoo.build_tiny_model("glm4v_moe")
    lora_model = graphlora.rewrite(model, dict(MLP_ONLY, lora_dropout=0.1, rules=[
        {"match": {"name": r".*\.experts\..*"}, "target": False}]), zoo.tiny_example_inputs("glm4v_moe", model))
    assert not [s for s in lora_model.sites if s.kind == "expert_matmul"]
    with pytest.warns(PeftConversionWarning, match=r"target_modules.*peft#3711") as caught:
        lora_model.save_adapter(tmp_path)
    assert "rank_pattern" in str(caught[0].message)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_expert_adapter_reloads_and_merge_is_exact(family, tmp_path):
    model, batch, lora_model = rewritten(family)
    set_random_lora(lora_model, std=0.1)
    lora_model.save_adapter(tmp_path)
    with torch.no_grad():
        ours = lora_model(**batch).logits
    reloaded = graphlora.load_adapter(zoo.build_tiny_model(family), tmp_path, batch)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, ours, atol=1e-6, rtol=1e-5)
    weights = {n: lora_model.get_parameter(n).detach().clone() for n in experts_of(model)}
    lora_model.merge()
    with torch.no_grad():
        torch.testing.assert_close(lora_model(**batch).logits, ours, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(lora_model.get_parameter(n), w) for n, w in weights.items())
    lora_model.unmerge()
    assert all(torch.equal(lora_model.get_parameter(n), w) for n, w in weights.items())


def test_expert_sites_refuse_lora_dropout_with_the_reason():
    model = zoo.build_tiny_model("llama4")
    lora_model = graphlora.rewrite(model, dict(MLP_ONLY, lora_dropout=0.1), zoo.tiny_example_inputs("llama4", model))
    skipped = {s.name: s.reason for s in lora_model.skipped_sites}
    for name in experts_of(model):
        assert "dropout" in skipped[name] and "rule" in skipped[name]
