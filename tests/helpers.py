"""Helpers for tests (not code under test)."""

from __future__ import annotations

import itertools
import re

import torch


def expand(*patterns: str) -> list[str]:
    """Shell-style brace expansion: ``"a.{0,1}.{q,k}_proj"`` -> 4 names. Test-side only."""
    out = []
    for pattern in patterns:
        parts = re.split(r"(\{[^}]*\})", pattern)
        choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
        out.extend("".join(c) for c in itertools.product(*choices))
    return out


def set_random_lora(lora_model, seed: int = 1, std: float = 0.2) -> None:
    """Give every LoRA matrix random non-zero values (B is zero at initialisation)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def merged_copy(original: torch.nn.Module, lora_model) -> torch.nn.Module:
    """An eager deep copy of ``original`` whose adapted weights are W + s B A (test-side merge).

    ``nn.Linear`` weights are [out, in]; a raw ``x @ W`` parameter is [in, out] and gets the transpose.
    """
    import copy

    merged = copy.deepcopy(original)
    with torch.no_grad():
        for site in lora_model.sites:
            module = lora_model.get_submodule(site.module)
            delta = site.scale * (module.lora_B.weight.float() @ module.lora_A.weight.float())
            weight = merged.get_parameter(site.name + ".weight" if site.kind == "linear" else site.name)
            weight += (delta.T if site.weight_layout == "in_out" else delta).to(weight.dtype)
    return merged


def train_and_check_grads(lora_model, inputs, steps: int) -> list[float]:
    """AdamW steps on one batch; asserts after the first backward that every site's lora_B got a gradient.

    Returns the losses, one per step.
    """
    lora_model.train()
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        loss = lora_model(**inputs).loss
        loss.backward()
        if step == 0:
            for site in lora_model.sites:
                grad = lora_model.get_submodule(site.module).lora_B.weight.grad
                assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {site.name}.lora_B"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
