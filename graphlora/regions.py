"""Regional tracing: when the whole forward cannot be exported (or its trace disagrees with eager),
export the largest submodules that can, and keep the glue between them eager.

* :func:`capture_calls` runs the eager model once and records, for every module, its first call's
  arguments and the order in which modules were first called;
* :func:`name_labels` labels every ``nn.Linear`` that ran from module names and classes
  (graphlora/name_rules.py) and numbers the blocks of each tower in execution order — without a
  whole-model graph there is no structure to read beyond each region;
* a :class:`RegionRunner` replaces a region module's ``forward`` on the mirror: calls are served by
  traced programs (cached like the whole model's), or run eagerly with module-level LoRA when the
  arguments cannot be traced (a KV-cache object during generation).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

from graphlora.labels import TOWER_OF_COMPONENT, Component, NodeLabels, Role
from graphlora.name_rules import StackEntry, block_path, component_by_name, role_by_name


@dataclasses.dataclass
class CapturedCall:
    """The first call of a module during the capture run."""

    args: tuple
    kwargs: dict
    order: int  # position of the module's first call among all module calls


def capture_calls(root: torch.nn.Module, call: dict[str, Any], only=None) -> dict[str, CapturedCall]:
    """Run ``root(**call)`` eagerly (no grad) and record each module's first call (of the modules in
    ``only``, when given)."""
    captured: dict[str, CapturedCall] = {}
    wanted = set(only) if only is not None else None
    handles = []

    def hook(path):
        def record(module, args, kwargs):
            if path not in captured:
                captured[path] = CapturedCall(args, dict(kwargs), len(captured))
        return record

    for path, module in root.named_modules():
        if path and (wanted is None or path in wanted):
            handles.append(module.register_forward_pre_hook(hook(path), with_kwargs=True))
    try:
        with torch.no_grad():
            root(**call)
    finally:
        for h in handles:
            h.remove()
    return captured


_SIGNATURES: dict[type, inspect.Signature] = {}


def forward_signature(cls: type) -> inspect.Signature:
    """``inspect.signature(cls.forward)``, computed once per class (it is on every call's path)."""
    sig = _SIGNATURES.get(cls)
    if sig is None:
        sig = _SIGNATURES[cls] = inspect.signature(cls.forward)
    return sig


def call_as_kwargs(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Bind a call's positional arguments to the names of the module's (class) forward."""
    cls = type(module)
    sig = forward_signature(cls)
    if not args:
        if not any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()):
            return dict(kwargs)
    bound = sig.bind_partial(module, *args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:  # drop self
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{cls.__name__}.forward takes *args; cannot trace it as a region")
        else:
            out[name] = value
    return out


def module_stack_of(root: torch.nn.Module, path: str) -> list[StackEntry]:
    parts = path.split(".")
    stack = []
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        stack.append(StackEntry(sub, type(root.get_submodule(sub)).__name__))
    return stack


def name_labels(root: torch.nn.Module, captured: dict[str, CapturedCall], head_paths: frozenset[str]) -> tuple[dict[str, NodeLabels], dict[str, int]]:
    """Labels of every ``nn.Linear`` that ran, from names; and the number of blocks per tower."""
    linears = sorted((c.order, path) for path, c in captured.items()
                     if isinstance(root.get_submodule(path), torch.nn.Linear))
    order: dict[str, dict[str, int]] = {"vision": {}, "language": {}}
    table: dict[str, NodeLabels] = {}
    pending = []
    for _, path in linears:
        stack = module_stack_of(root, path)
        component = component_by_name(stack, head_paths)
        role = role_by_name(stack, component)
        tower = TOWER_OF_COMPONENT.get(component)
        block = block_path(stack) if tower else None
        if block is not None:
            order[tower].setdefault(block, len(order[tower]))
        pending.append((path, component, role, tower, block))
    for path, component, role, tower, block in pending:
        layer = order[tower][block] if block is not None else None
        table[path] = NodeLabels(component, role, layer, path, "linear", f"{path}.weight")
    return table, {t: len(b) for t, b in order.items()}


def name_label_for_linear(root: torch.nn.Module, site: str, head_paths: frozenset[str]) -> NodeLabels:
    """Labels of a linear module found inside a region graph, by the names on its module stack (the role
    comes from the module's own name, ``down_proj`` -> ``mlp.down``)."""
    stack = module_stack_of(root, site)
    component = component_by_name(stack, head_paths)
    return NodeLabels(component, role_by_name(stack, component), None, site, "linear", f"{site}.weight")


def name_label_for_param(root: torch.nn.Module, weight_fqn: str, kind: str, head_paths: frozenset[str]) -> NodeLabels:
    """Labels of a parameter matmul found inside a region graph (names of its owner and parameter)."""
    owner = weight_fqn.rpartition(".")[0]
    stack = (module_stack_of(root, owner) if owner else []) + [StackEntry(weight_fqn, "Parameter")]
    component = component_by_name(stack, head_paths)
    return NodeLabels(component, role_by_name(stack, component), None, weight_fqn, kind, weight_fqn)


def unreachable_modules(root: torch.nn.Module, call: dict[str, Any], paths: list[str]) -> set[str]:
    """Modules among ``paths`` whose output cannot reach the loss (or the logits), found by probing.

    Each module's output gets ``+ 0 * probe`` for a scalar probe that requires grad; a probe with no
    gradient after backward means no path from that module to the loss. (Regional tracing has no
    whole-model graph to read this from.)
    """
    probes: dict[str, torch.Tensor] = {}
    handles = []

    def hook(probe):
        def add_probe(module, args, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                return output + probe.to(output.dtype) * 0
            return output
        return add_probe

    for path in paths:
        probe = torch.zeros((), requires_grad=True)
        probes[path] = probe
        handles.append(root.get_submodule(path).register_forward_hook(hook(probe)))
    try:
        with torch.enable_grad():
            out = root(**call)
    finally:
        for h in handles:
            h.remove()
    loss = getattr(out, "loss", None)
    if loss is None:
        logits = getattr(out, "logits", None)
        if logits is None:
            return set()
        loss = logits.float().sum()
    grads = torch.autograd.grad(loss, list(probes.values()), allow_unused=True)
    return {path for path, g in zip(probes, grads) if g is None}


__all__ = ["CapturedCall", "capture_calls", "call_as_kwargs", "name_labels", "Component", "Role"]
