"""LoRA parameters and the module-level (eager) form of the LoRA branch.

Parameters live on the mirror's site modules as ``<site>.lora_A`` (``nn.Linear(in, r)``, weight
``[r, in]``) and ``<site>.lora_B`` (``nn.Linear(r, out)``, weight ``[out, r]``), PEFT's shapes and
names, so ``state_dict()`` keys are ``<site>.lora_A.weight`` / ``<site>.lora_B.weight``.

The graph branch (passes/insert_lora_branches_pass.py) is the main path. :class:`EagerLoraHook` is the
same computation as a forward hook, used where the model runs eagerly (``generate()``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator

import torch
import torch.nn.functional as F

LORA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted module: where it is, what it is, and its LoRA hyper-parameters."""

    name: str  # module path, e.g. "model.language_model.layers.0.self_attn.q_proj"
    component: str
    role: str
    layer: int | None
    r: int
    alpha: float
    dropout: float
    scale: float
    reason: str  # the flag or rule that chose it


@dataclasses.dataclass(frozen=True)
class SkippedSite:
    """A module the policy chose but that was not adapted, with the reason."""

    name: str
    component: str
    role: str
    layer: int | None
    reason: str


def site_weight(module: torch.nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise TypeError(f"a LoRA site must hold a 2-D weight; {type(module).__name__} does not")
    return weight


def attach_lora(module: torch.nn.Module, r: int, lora_dtype: torch.dtype, generator: torch.Generator) -> None:
    """Add ``lora_A`` (Kaiming-uniform, as PEFT) and ``lora_B`` (zeros) to a site module."""
    weight = site_weight(module)
    out_features, in_features = weight.shape
    device = weight.device
    lora_a = torch.nn.Linear(in_features, r, bias=False, dtype=lora_dtype, device=device)
    lora_b = torch.nn.Linear(r, out_features, bias=False, dtype=lora_dtype, device=device)
    with torch.no_grad():
        if device.type != "meta":
            a = torch.empty(r, in_features, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            lora_a.weight.copy_(a.to(lora_dtype))
            lora_b.weight.zero_()
    module.add_module("lora_A", lora_a)
    module.add_module("lora_B", lora_b)


class EagerLoraHook:
    """Forward hook adding ``scale * B(A(dropout(x)))`` to a site module's output (module-level LoRA)."""

    def __init__(self, scale: float, dropout: float):
        self.scale = scale
        self.dropout = dropout

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        a, b = module.lora_A, module.lora_B
        h = x.to(a.weight.dtype)
        h = F.dropout(h, self.dropout, module.training)
        delta = F.linear(F.linear(h, a.weight), b.weight) * self.scale
        return output + delta.to(output.dtype)


@contextlib.contextmanager
def eager_lora_hooks(root: torch.nn.Module, sites: list[Site]) -> Iterator[None]:
    """Install :class:`EagerLoraHook` on every site module of ``root`` for the duration of the block."""
    handles = []
    try:
        for site in sites:
            module = root.get_submodule(site.name)
            handles.append(module.register_forward_hook(EagerLoraHook(site.scale, site.dropout)))
        yield
    finally:
        for h in handles:
            h.remove()
