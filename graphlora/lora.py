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
    """One adapted matmul: where it is, what it is, and its LoRA hyper-parameters.

    ``name`` is the module path of an ``nn.Linear`` (PEFT's target name), or the parameter path of a
    raw parameter matmul (PEFT's ``target_parameters``). ``module`` is where ``lora_A`` / ``lora_B``
    live: the Linear itself, or the module owning the parameter.
    """

    name: str
    component: str
    role: str
    layer: int | None
    r: int
    alpha: float
    dropout: float
    scale: float
    reason: str  # the flag or rule that chose it
    module: str = ""
    kind: str = "linear"
    weight_layout: str = "out_in"  # "out_in": y = x W^T (nn.Linear); "in_out": y = x W (raw matmul)

    def __post_init__(self):
        if not self.module:
            object.__setattr__(self, "module", self.name)


@dataclasses.dataclass(frozen=True)
class SkippedSite:
    """A module the policy chose but that was not adapted, with the reason."""

    name: str
    component: str
    role: str
    layer: int | None
    reason: str


def attach_lora(module: torch.nn.Module, in_features: int, out_features: int, r: int, lora_dtype: torch.dtype,
                generator: torch.Generator, device: torch.device) -> None:
    """Add ``lora_A`` (Kaiming-uniform, as PEFT) and ``lora_B`` (zeros) to the module holding a site."""
    if hasattr(module, "lora_A"):
        raise ValueError(f"{type(module).__name__} already holds a LoRA adapter (one site per module)")
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


class AdapterSwitch:
    """Shared on/off state of a model's adapters (``disable_adapter()`` turns it off)."""

    def __init__(self) -> None:
        self.enabled = True


class EagerLoraHook:
    """Forward hook adding ``scale * B(A(dropout(x)))`` to a site module's output (module-level LoRA).

    With a ``switch``, the hook does nothing while the switch is off.
    """

    def __init__(self, scale: float, dropout: float, switch: AdapterSwitch | None = None):
        self.scale = scale
        self.dropout = dropout
        self.switch = switch

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.switch is not None and not self.switch.enabled:
            return output
        x = args[0]
        a, b = module.lora_A, module.lora_B
        h = x.to(a.weight.dtype)
        h = F.dropout(h, self.dropout, module.training)
        delta = F.linear(F.linear(h, a.weight), b.weight) * self.scale
        return (output + delta).to(output.dtype)  # add in the promoted dtype, as PEFT


def lora_delta(module: torch.nn.Module, scale: float) -> torch.Tensor:
    """``scale * B @ A`` in fp32: the change LoRA makes to an ``[out, in]`` weight."""
    return scale * (module.lora_B.weight.float() @ module.lora_A.weight.float())


@contextlib.contextmanager
def eager_lora_hooks(root: torch.nn.Module, sites: list[Site]) -> Iterator[None]:
    """Apply every site's LoRA to eager calls of ``root`` for the duration of the block.

    ``nn.Linear`` sites get an :class:`EagerLoraHook`. A raw parameter matmul cannot be hooked: the
    parameter is replaced, for the block, by the tensor ``W + s (B A)^T`` (differentiable in A and B;
    the merged form applies no dropout) and restored afterwards.
    """
    handles = []
    swapped = []
    try:
        for site in sites:
            module = root.get_submodule(site.module)
            if site.kind == "linear":
                handles.append(module.register_forward_hook(EagerLoraHook(site.scale, site.dropout)))
                continue
            owner_path, _, attr = site.name.rpartition(".")
            owner = root.get_submodule(owner_path)
            weight = owner._parameters.pop(attr)
            swapped.append((owner, attr, weight))
            delta = lora_delta(module, site.scale)
            owner.__dict__[attr] = weight + (delta.T if site.weight_layout == "in_out" else delta).to(weight.dtype)
        yield
    finally:
        for h in handles:
            h.remove()
        for owner, attr, weight in reversed(swapped):
            owner.__dict__.pop(attr, None)
            owner._parameters[attr] = weight
