"""A small pass manager: named passes in order, a graph check after each, errors that say where.

Passes follow torch.fx's ``passes.infra`` convention: a ``PassBase`` subclass whose ``call(gm)``
returns a ``PassResult(graph_module, modified)``. The manager runs them in order, runs
``graph.lint()`` and graphlora's label invariants after each one, and wraps any failure in a
:class:`~graphlora.errors.PassError` naming the pass and the passes that ran before it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graphlora.errors import GraphLoraError, PassError
from graphlora.labels import FUSED_STEP, LORA_STEPS, PARAM_STEP, get_base_node, get_labels, get_site_step


def check_label_invariants(gm: torch.fx.GraphModule) -> None:
    """Labels are well formed and every LoRA branch has each step exactly once (fused ones aside)."""
    steps: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        labels = get_labels(node)
        if labels is not None and labels.layer is not None and (not isinstance(labels.layer, int) or labels.layer < 0):
            raise AssertionError(f"node {node.name}: layer label {labels.layer!r} is not a non-negative int")
        site_step = get_site_step(node)
        if site_step is not None:
            steps.setdefault(site_step[0] + "@" + _base_of(node), []).append(site_step[1])
    for site, found in steps.items():
        if FUSED_STEP in found or PARAM_STEP in found:  # one fused node; a parameter's LoRA has no fixed branch shape
            continue
        for step in LORA_STEPS:
            if found.count(step) != 1:
                raise AssertionError(f"LoRA branch of {site.split('@')[0]} has step {step!r} {found.count(step)} times")


def _base_of(node: torch.fx.Node) -> str:
    """Group branch nodes by the base linear they hang off (one site may be called several times)."""
    return get_base_node(node)


@dataclasses.dataclass
class PassRecord:
    name: str
    modified: bool


class PassManager:
    """Runs ``passes`` in order on a GraphModule; see the module docstring."""

    def __init__(
        self,
        passes: Sequence[PassBase],
        checks: Sequence[Callable[[torch.fx.GraphModule], None]] = (check_label_invariants,),
        after_each: Callable[[str, torch.fx.GraphModule], None] | None = None,
    ):
        self.passes = list(passes)
        self.checks = list(checks)
        self.after_each = after_each

    @staticmethod
    def pass_name(p: PassBase) -> str:
        return getattr(p, "name", None) or type(p).__name__

    def __call__(self, gm: torch.fx.GraphModule) -> list[PassRecord]:
        records: list[PassRecord] = []
        for p in self.passes:
            name = self.pass_name(p)
            before = ", ".join(r.name for r in records) or "none"
            try:
                result = p(gm)
                if result is not None and result.graph_module is not gm:
                    raise PassError(f"pass {name} returned a new GraphModule; passes must edit in place")
                gm.graph.lint()
                for check in self.checks:
                    check(gm)
            except GraphLoraError:
                # Errors meant for the user (a policy selecting nothing ...) keep their type and text.
                raise
            except Exception as e:  # noqa: BLE001
                raise PassError(f"graph pass {name!r} failed (passes run before it: {before}): {type(e).__name__}: {e}") from e
            gm.recompile()
            records.append(PassRecord(name, bool(result.modified) if result is not None else True))
            if self.after_each is not None:
                self.after_each(name, gm)
        return records


__all__ = ["PassBase", "PassResult", "PassManager", "PassRecord", "check_label_invariants"]
