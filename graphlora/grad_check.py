"""Dead LoRA sites at run time: sites whose first training backward gave them no gradient, or exactly zero.

No static analysis sees every reason a LoRA site can train nothing: gradient checkpointing (reentrant)
whose inputs do not require grad gives the checkpointed blocks no gradient at all (peft#2880,
unsloth#5039); a gate that is exactly zero (Mllama's cross-attention ``tanh`` gates as released) gives
exactly zero. :class:`DeadSiteMonitor` watches the first training backward(s) of a rewritten model and
reports, once, every site whose ``lora_B`` got no gradient or an all-zero one (``lora_A``'s gradient is
zero at initialisation by design: B starts at zero). Sites of the image path are judged only on a call
that has an image input. After that the monitor removes its hooks: a forward pays one boolean test.

Reads: the model's sites and each call's inputs and output. Writes: ``lora_model.dead_sites`` and one
:class:`~graphlora.errors.DeadLoraSitesWarning` per report.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree

from graphlora.errors import DeadLoraSitesWarning
from graphlora.labels import Component
from graphlora.structure import IMAGE, input_modality

#: Components that only work on a call with an image input.
_IMAGE_PATH = frozenset({Component.VISION.value, Component.PROJECTOR.value, Component.CROSS_ATTENTION.value})


class GradientFault(enum.StrEnum):
    NONE = "no gradient"
    ZERO = "an all-zero gradient"


@dataclasses.dataclass(frozen=True)
class DeadSite:
    """A site whose ``lora_B`` got no gradient (or an all-zero one) in its first training backward."""

    name: str
    component: str
    fault: GradientFault
    cause: str


def likely_cause(fault: GradientFault, checkpointed: bool) -> str:
    if fault is GradientFault.ZERO:
        return ("its gradient is exactly zero: a gate or scale in front of it is zero (e.g. a tanh gate initialised "
                "to 0), so nothing upstream of that gate can learn until it opens")
    if checkpointed:
        return ("gradient checkpointing whose inputs do not require grad (reentrant checkpointing passes no gradient "
                "into a segment whose inputs are all frozen): call model.enable_input_require_grads() before "
                "training, or checkpoint with use_reentrant=False")
    return "no gradient reached it: its output does not reach this call's loss (or the graph was detached before it)"


class DeadSiteMonitor:
    """Watches training backwards until every site was judged once (see the module docstring)."""

    def __init__(self, owner: torch.nn.Module):
        self.owner = owner
        self.pending: set[str] | None = None  # site names not judged yet (None: not started)
        self.dead: list[DeadSite] = []
        self._handles: list = []
        self._alive: set[str] = set()
        self._zero: set[str] = set()
        self._eligible: set[str] = set()

    @property
    def active(self) -> bool:
        return self.pending is None or bool(self.pending)

    def reset(self) -> None:
        """Judge every site again (after new sites, or on request)."""
        self._remove_hooks()
        self.pending, self.dead = None, []

    # -- a watched call -----------------------------------------------------------------------
    def watch(self, call: dict[str, Any], output: Any) -> None:
        """Called after a training forward with grad enabled: hook this call's backward."""
        sites = {s.name: s for s in self.owner.sites}
        if self.pending is None:
            self.pending = set(sites)
        has_image = any(input_modality(k, v) == IMAGE for k, v in call.items() if isinstance(v, torch.Tensor))
        eligible = {n for n in self.pending if n in sites and (has_image or sites[n].component not in _IMAGE_PATH)}
        root = _loss_tensor(output)
        if not eligible or root is None:
            return
        self._remove_hooks()
        self._alive, self._zero, self._eligible = set(), set(), eligible
        for name in eligible:
            module = self.owner.get_submodule(sites[name].module)
            self._handles.append(module.lora_B.weight.register_hook(self._mark(name)))
        self._handles.append(root.register_hook(self._on_backward_start))

    def _mark(self, name: str):
        def hook(grad: torch.Tensor):
            if bool(grad.detach().ne(0).any()):
                self._alive.add(name)
            else:
                self._zero.add(name)
        return hook

    def _on_backward_start(self, grad):
        torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _finish(self) -> None:
        sites = {s.name: s for s in self.owner.sites}
        checkpointed = any(getattr(m, "gradient_checkpointing", False) is True for m in self.owner._eager.modules())
        found = []
        for name in sorted(self._eligible):
            if name in self._alive or name not in sites:
                continue
            fault = GradientFault.ZERO if name in self._zero else GradientFault.NONE
            found.append(DeadSite(name, sites[name].component, fault, likely_cause(fault, checkpointed)))
        self.pending -= self._eligible
        self._remove_hooks()
        if found:
            self.dead.extend(found)
            shown = "; ".join(f"{d.name} ({d.fault})" for d in found[:6]) + (
                f"; ... and {len(found) - 6} more" if len(found) > 6 else "")
            causes = sorted({d.cause for d in found})
            warnings.warn(f"{len(found)} LoRA site(s) got no usable gradient in their first training backward, so they "
                          f"train nothing: {shown}. Likely cause: {' / '.join(causes)}. The list is in "
                          "lora_model.dead_sites.", DeadLoraSitesWarning, stacklevel=2)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _loss_tensor(output: Any) -> torch.Tensor | None:
    """The tensor the training signal flows back through: ``loss`` if the output has one, else the first floating
    output that requires grad."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        return loss
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad and leaf.is_floating_point():
            return leaf
    return None
