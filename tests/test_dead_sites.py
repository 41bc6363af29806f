"""LoRA sites that get no gradient at run time are reported after the first training backward.

Static analysis cannot see every reason a site trains nothing: reentrant gradient checkpointing whose
inputs do not require grad (peft#2880, unsloth#5039) gives the checkpointed vision blocks no gradient;
a gate that is exactly zero gives exactly zero. The first training backward reports such sites once (a
warning naming them and the likely cause; ``lora_model.dead_sites``), and then the check is gone.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import graphlora
from graphlora.errors import DeadLoraSitesWarning
from graphlora.grad_check import GradientFault
from graphlora.testing import zoo

FULL = dict(finetune_vision_layers=True, finetune_language_layers=True)


def step(lora_model, batch):
    lora_model.train()
    lora_model(**batch).loss.backward()
    lora_model.zero_grad(set_to_none=True)


def lora_b_hooks(lora_model) -> int:
    return sum(len(p._backward_hooks or {}) for n, p in lora_model.named_parameters() if "lora_B" in n)


def test_healthy_training_reports_nothing_and_the_check_is_gone_after_the_first_step():
    model = zoo.build_tiny_model("llava")
    batch = zoo.tiny_example_inputs("llava", model)
    lora_model = graphlora.rewrite(model, FULL, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadLoraSitesWarning)
        step(lora_model, batch)
        step(lora_model, batch)
    assert lora_model.dead_sites == [] and not lora_model.dead_site_monitor.active
    assert lora_b_hooks(lora_model) == 0


def test_reentrant_checkpointing_with_frozen_inputs_leaves_vision_lora_without_gradient():
    model = zoo.build_tiny_model("llava")
    batch = zoo.tiny_example_inputs("llava", model)
    lora_model = graphlora.rewrite(model, FULL, batch)
    lora_model.activation_checkpointing_enable({"use_reentrant": True})
    # As PEFT's prepare_model_for_kbit_training does (peft#2880): only the text embeddings' output is made to require
    # grad; the vision blocks' inputs come from the frozen patch embedding.
    lora_model._eager.disable_input_require_grads()
    lora_model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    with pytest.warns(DeadLoraSitesWarning, match="gradient checkpointing") as caught:
        step(lora_model, batch)
    dead = {d.name: d for d in lora_model.dead_sites}
    vision = {s.name for s in lora_model.sites if s.component == "vision"}
    assert vision and vision <= set(dead), sorted(set(vision) - set(dead))
    assert all(d.fault is GradientFault.NONE for d in dead.values())
    message = next(str(w.message) for w in caught if w.category is DeadLoraSitesWarning)
    assert any(name in message for name in dead) and "enable_input_require_grads" in message
    with warnings.catch_warnings():  # reported once
        warnings.simplefilter("error", DeadLoraSitesWarning)
        step(lora_model, batch)
    assert lora_b_hooks(lora_model) == 0


def test_a_zero_gate_gives_exactly_zero_gradient_and_is_reported():
    model = zoo.build_tiny_model("mllama")
    batch = zoo.tiny_example_inputs("mllama", model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("cross_attn_attn_gate"):
                p.zero_()  # as released: the cross-attention branch starts closed
    lora_model = graphlora.rewrite(model, dict(FULL, finetune_cross_attention=True), batch)
    with pytest.warns(DeadLoraSitesWarning, match="exactly zero"):
        step(lora_model, batch)
    dead = {d.name: d for d in lora_model.dead_sites}
    cross = {s.name for s in lora_model.sites if s.component == "cross_attention"}
    assert cross and cross <= set(dead) and all(dead[n].fault is GradientFault.ZERO for n in cross)
    # The decoder's self-attention layers do not sit behind the gate.
    assert not any(".self_attn." in n and n.startswith("model.language_model") for n in dead)


def test_image_path_sites_are_judged_on_a_call_with_an_image():
    model = zoo.build_tiny_model("llava")
    batch = zoo.tiny_example_inputs("llava", model)
    lora_model = graphlora.rewrite(model, FULL, batch)
    text_only = {"input_ids": batch["input_ids"][:, -6:].clamp(max=200), "attention_mask": batch["attention_mask"][:, -6:],
                 "labels": batch["input_ids"][:, -6:].clamp(max=200)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadLoraSitesWarning)
        step(lora_model, text_only)  # no image: the vision sites wait
    pending = lora_model.dead_site_monitor.pending
    assert pending and all(s.component == "vision" for s in lora_model.sites if s.name in pending)
    step(lora_model, batch)
    assert lora_model.dead_sites == [] and not lora_model.dead_site_monitor.active
