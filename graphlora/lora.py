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
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from graphlora.fusion_default import QUANTIZED_BASE_REASON, fusion_skip_reason
from graphlora.labels import SkipCause

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
    """A module the policy chose but that was not adapted: why (``cause``) and the message (``reason``)."""

    name: str
    component: str
    role: str
    layer: int | None
    reason: str
    cause: SkipCause = SkipCause.REFUSED


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


#: The ModuleDict (on the module owning expert parameters) that holds each expert site's lora_A / lora_B.
EXPERT_HOLDER = "lora_experts"

#: Weight layouts of expert sites (3-D parameters ``[E, d1, d2]``), as PEFT's ``lora.ParamWrapper`` reads them:
#: ``experts``: the delta of expert e is ``B_e A_e`` (``[d1, d2]``); ``experts_t`` (the module says
#: ``is_transposed``): ``(B_e A_e)^T``. A is ``[r E, .]`` (expert-major rows), B is ``[., r E]`` (expert-minor columns).
EXPERT_LAYOUTS = ("experts", "experts_t")


def expert_factors(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``B_e`` as ``[E, out, r]``, ``A_e`` as ``[E, r, in]``) from PEFT-layout ``A [r E, in]`` and ``B [out, r E]``."""
    a3 = a.reshape(experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)
    return b3, a3


def param_delta(module: torch.nn.Module, scale: float, weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The change a parameter site's LoRA makes to ``weight``, in fp32 and in the weight's shape.

    ``out_in``: ``s B A``; ``in_out`` (``y = x W``): its transpose; expert layouts: see :data:`EXPERT_LAYOUTS`."""
    if layout in EXPERT_LAYOUTS:
        b3, a3 = expert_factors(module.lora_A.weight.float(), module.lora_B.weight.float(), weight.shape[0])
        delta = scale * torch.bmm(b3, a3)
        return delta.transpose(1, 2) if layout == "experts_t" else delta
    delta = lora_delta(module, scale)
    return delta.T if layout == "in_out" else delta


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
            owner.__dict__[attr] = weight + param_delta(module, site.scale, weight, site.weight_layout).to(weight.dtype)
        yield
    finally:
        for h in handles:
            h.remove()
        for owner, attr, weight in reversed(swapped):
            owner.__dict__.pop(attr, None)
            owner._parameters[attr] = weight


_FUSABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_SEED_HIGH = 2**31 - 1
_GLUE_FUSED = {"fused": True, "reason": "glue: module-level LoRA with the fused op"}


class GlueLoraForward:
    """``forward`` of an adapted ``nn.Linear`` that runs eagerly (glue between block programs).

    Installed on the mirror's module object (its hooks still run around it). With the adapters on it
    computes ``W x + b + s B A dropout(x)`` with the fused ``graphlora::lora_linear`` op where the fuse
    setting asks for it (the op the programs use: Triton on CUDA), or, where it does not (``fuse="auto"``,
    autocast on, an unsupported dtype, a quantized base layer), the same sum with plain torch ops as PEFT
    does; with the adapters off (``disable_adapter()``, merged) the plain linear. ``base`` is the forward
    a quantized layer's mirror module already has (graphlora/quantized.py): it computes ``W x + b`` then.
    """

    def __init__(self, module: torch.nn.Linear, scale: float, dropout: float, switch: AdapterSwitch,
                 fuse: bool | str = "auto", base: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.module = module
        self.base = base
        self.scale = scale
        self.dropout = dropout
        self.switch = switch
        self.fuse = fuse  # True, False or "auto" (graphlora/fusion_default.py: unfused for now)
        #: How the last call with the adapters on ran: ``{"fused": bool, "reason": str}`` (fusion_report());
        #: before the first call, what the fuse setting and the base layer decide.
        reason = self._skip_reason(module.weight.device.type)
        self.last = _GLUE_FUSED if reason is None else {"fused": False, "reason": reason}

    def _skip_reason(self, device_type: str) -> str | None:
        """Why the setting or the base layer leaves the branch unfused on ``device_type`` (None: they do not)."""
        return QUANTIZED_BASE_REASON if self.base is not None else fusion_skip_reason(self.fuse, device_type)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if not self.switch.enabled:
            return F.linear(x, m.weight, m.bias) if self.base is None else self.base(x)
        a, b = m.lora_A.weight, m.lora_B.weight
        p = self.dropout if m.training else 0.0
        autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)  # meta has no autocast
        not_fused = self._skip_reason(x.device.type)
        if not_fused is None and x.dtype in _FUSABLE_DTYPES and not autocast:
            import graphlora.ops  # noqa: F401 - registers torch.ops.graphlora.*

            seed = torch.randint(0, _SEED_HIGH, [1], dtype=torch.int64, device=x.device) if p > 0 else None
            self.last = _GLUE_FUSED
            return torch.ops.graphlora.lora_linear(x, m.weight, m.bias, a, b, self.scale, p, seed)
        if not_fused is not None:
            reason = not_fused
        elif autocast:
            reason = "autocast is on: the fused op has no autocast rule, so the unfused branch runs"
        else:
            reason = f"x has dtype {x.dtype}"
        if self.last.get("reason") != reason:
            self.last = {"fused": False, "reason": reason}
        result = F.linear(x, m.weight, m.bias) if self.base is None else self.base(x)
        h = F.dropout(x.to(a.dtype), p, m.training)
        return (result + F.linear(F.linear(h, a), b) * self.scale).to(result.dtype)


@dataclasses.dataclass
class SiteTable:
    """The whole-model site table every program of a rewritten model reads.

    ``labels`` / ``decisions``: per labelled matmul (site name) its labels and the policy's decision,
    from the whole-model analysis; ``towers``: blocks per tower; ``branches``: per adapted site, what
    the insertion pass needs (scale, dropout, LoRA parameter names).
    """

    labels: dict = dataclasses.field(default_factory=dict)
    decisions: dict = dataclasses.field(default_factory=dict)
    towers: dict = dataclasses.field(default_factory=dict)
    branches: dict = dataclasses.field(default_factory=dict)
