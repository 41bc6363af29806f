"""Activation checkpointing and mixed precision in training.

* ``activation_checkpointing_enable()`` (blocks mode + transformers' per-layer checkpointing, which graphlora
  applies around each layer's program): same outputs and LoRA gradients as the whole-model program, and fewer
  bytes of saved activations, on LLaVA with a 96-token text so that layer activations dominate.
* bf16 base weights with fp32 LoRA (``lora_dtype="float32"``) train; so do fp32 weights under CPU autocast.
"""

from __future__ import annotations

import copy

import pytest
import torch

import graphlora
from graphlora.testing import synthetic, zoo

from helpers import set_random_lora

POLICY = dict(finetune_vision_layers=True, finetune_language_layers=True, r=8, lora_alpha=16, lora_dropout=0.0)


def saved_activation_bytes(lora_model, batch):
    """(output, LoRA gradients, bytes) of one forward + backward; bytes = sum of numel * element_size of the
    tensors autograd packs for backward (torch.autograd.graph.saved_tensors_hooks), parameters excluded
    (saving a weight costs no memory) and repeated saves of the same tensor counted once."""
    param_storages = {p.untyped_storage().data_ptr() for p in lora_model.parameters()}
    saved: dict = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_storages:
            saved[(t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lora_model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in lora_model.named_parameters() if p.grad is not None}
    lora_model.zero_grad(set_to_none=True)
    return out, grads, sum(saved.values())


@pytest.fixture(scope="module")
def long_text():
    model = zoo.build_tiny_model("llava")
    batch = zoo.tiny_example_inputs("llava", model, text_len=96)
    # Whole-model tracing: activation_checkpointing_enable() switches it to block programs (the default mode).
    lora_model = graphlora.rewrite(model, POLICY, example_inputs=batch, trace_mode="whole")
    set_random_lora(lora_model)  # B != 0: every LoRA matrix gets a gradient
    return lora_model, batch


def _warm(lora_model, batch):
    """Trace the training program(s) outside the measuring hooks (export must not run under them)."""
    lora_model.train()
    lora_model(**batch).loss.backward()
    lora_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("reentrant", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["non-reentrant", "reentrant"])
def test_checkpointing_same_numbers_fewer_saved_bytes(long_text, reentrant):
    plain, batch = copy.deepcopy(long_text[0]), long_text[1]
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable({"use_reentrant": reentrant})
    assert checkpointed.trace_mode == "blocks" and checkpointed.is_activation_checkpointing
    assert plain.trace_mode == "whole"
    for model in (plain, checkpointed):
        _warm(model, batch)
    out_plain, grads_plain, bytes_plain = saved_activation_bytes(plain, batch)
    out_ckpt, grads_ckpt, bytes_ckpt = saved_activation_bytes(checkpointed, batch)
    torch.testing.assert_close(out_ckpt.loss, out_plain.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_ckpt.logits, out_plain.logits, rtol=1e-5, atol=1e-5)
    lora_names = {n for n, _ in plain.named_parameters() if ".lora_" in n}
    assert set(grads_plain) == set(grads_ckpt) == lora_names  # no LoRA is created on dead sites
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Layer activations are recomputed in backward instead of stored: far fewer saved bytes.
    assert bytes_ckpt < 0.5 * bytes_plain, (bytes_ckpt, bytes_plain)


@pytest.mark.slow
def test_checkpointing_with_lora_dropout_recomputes_the_same_mask():
    """Checkpointing restores the RNG state for the recompute: the fused op's dropout seed is drawn again
    identically, so gradients equal the run without checkpointing (same seed)."""
    model = zoo.build_tiny_model("llava")
    batch = zoo.tiny_example_inputs("llava", model, text_len=32)
    plain = graphlora.rewrite(model, {**POLICY, "lora_dropout": 0.2}, example_inputs=batch, fuse=True)
    set_random_lora(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    results = []
    for m in (plain, checkpointed):
        m.train()
        torch.manual_seed(7)
        loss = m(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert set(grads_a) == set(grads_b) and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def _train(lora_model, batches, autocast_dtype=None) -> list[float]:
    lora_model.train()
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for batch in batches:
        if autocast_dtype is not None:
            with torch.autocast("cpu", dtype=autocast_dtype):
                loss = lora_model(**batch).loss
        else:
            loss = lora_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _falls(losses: list[float]) -> bool:
    k = len(losses) // 3
    return sum(losses[-k:]) / k < sum(losses[:k]) / k - 0.3


def test_bf16_base_weights_with_fp32_lora_train():
    model = zoo.build_tiny_model("llava").to(torch.bfloat16)  # cast BEFORE rewrite
    batches = list(synthetic.caption_batches(model, 12, batch_size=2, num_pairs=4))
    lora_model = graphlora.rewrite(model, {**POLICY, "lora_dtype": "float32"}, example_inputs=batches[0])
    lora = {n: p for n, p in lora_model.named_parameters() if ".lora_" in n}
    base = {n: p for n, p in lora_model.named_parameters() if ".lora_" not in n}
    assert lora and {p.dtype for p in lora.values()} == {torch.float32}
    assert {p.dtype for p in base.values()} == {torch.bfloat16}
    assert all(p.requires_grad for p in lora.values()) and not any(p.requires_grad for p in base.values())
    losses = _train(lora_model, batches)
    assert all(torch.isfinite(torch.tensor(losses))) and _falls(losses), losses
    assert all(p.grad is None and p.dtype == torch.float32 for p in lora.values())
    # .to(dtype) AFTER rewrite casts every floating parameter, the LoRA matrices included (documented).
    cast = copy.deepcopy(lora_model).to(torch.bfloat16)
    assert {p.dtype for n, p in cast.named_parameters() if ".lora_" in n} == {torch.bfloat16}


def test_fp32_weights_train_under_cpu_autocast():
    model = zoo.build_tiny_model("llava")
    batches = list(synthetic.caption_batches(model, 12, batch_size=2, num_pairs=4))
    lora_model = graphlora.rewrite(model, POLICY, example_inputs=batches[0])
    losses = _train(lora_model, batches, autocast_dtype=torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(losses))) and _falls(losses), losses
    autocast_keys = [k for k, _ in lora_model.runtime.keyed_programs() if any(enabled for _, enabled, _ in k.autocast)]
    assert autocast_keys, "the autocast call has its own program"
    assert {p.dtype for p in lora_model.parameters()} == {torch.float32}
