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
    """An eager deep copy of ``original`` whose adapted weights are W + s B A."""
    import copy

    merged = copy.deepcopy(original)
    with torch.no_grad():
        for site in lora_model.sites:
            module = lora_model.get_submodule(site.name)
            delta = site.scale * (module.lora_B.weight.float() @ module.lora_A.weight.float())
            merged.get_submodule(site.name).weight += delta.to(merged.get_submodule(site.name).weight.dtype)
    return merged
