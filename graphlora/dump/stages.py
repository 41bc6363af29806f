"""Snapshots of the graph at every stage of a rewrite: the observer the dump hands to ``rewrite()``.

:class:`Recorder` is called by the pass manager with each stage's name and graph module (after export
or the recording, then after every pass). For each call it keeps a :class:`Stage`: the node lines in
``print_readable`` style with the ``# graphlora:`` notes (labels, decision, LoRA step, fusion) read
through :mod:`graphlora.labels`'s accessors, timed from the previous call, and it logs one progress
line. It keeps the last graph module of each trace (a model traced by regions or by blocks calls it
once per trace, each from ``export`` or ``record``); stage names stay unique (``export_2``).
:func:`filter_includes` says which nodes of each stage a :class:`~graphlora.dump.options.NodeFilter`
keeps. Nothing here writes a file.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import torch
import torch.fx

from graphlora.dump.options import NodeFilter
from graphlora.dump.progress import say
from graphlora.labels import (FUSED_STEP, LORA_STEPS, MatmulKind, PlaceholderKind, get_base_node, get_decision,
                              get_fusion_group, get_labels, get_site_step, graph_meta, has_metadata, node_metadata)
from graphlora.pipeline import EXPORT_STAGE, RECORD_STAGE

#: Node-meta fields rendered specifically; other graphlora fields are shown generically.
_RENDERED_FIELDS = frozenset({"component", "role", "layer", "module", "kind", "weight", "decision", "site", "lora_step",
                              "base_node"})


@dataclasses.dataclass(frozen=True)
class _NodeText:
    """One node as the stage files show it: ``code`` in print_readable style, ``notes`` above it."""

    name: str
    op: str
    code: str
    notes: tuple[str, ...]
    labels: tuple[str, str, int | None, str] | None = None  # (component, role, layer, site) when labelled
    site: str | None = None  # the LoRA site of a branch / fused node
    group: tuple[str, ...] = ()  # the sites of a grouped fused op (graphlora.group)


@dataclasses.dataclass
class Stage:
    """One snapshot: ``index`` (00 = export), the pass name, seconds the stage took, its node count."""

    index: int
    name: str
    seconds: float
    num_nodes: int
    nodes: list[_NodeText] = dataclasses.field(repr=False, default_factory=list)
    trace: int = 1  # a model traced by regions calls the observer once per region, each from "export"

    @property
    def stem(self) -> str:
        return f"{self.index:02d}_{self.name}"


def _dtype_abbr(dtype: torch.dtype) -> str:
    try:
        from torch.fx.graph import dtype_abbrs
    except ImportError:  # pragma: no cover - older torch
        dtype_abbrs = {}
    return dtype_abbrs.get(dtype, str(dtype).removeprefix("torch."))


def type_str(val: Any) -> str:
    """print_readable's annotation: ``f32[2, s0, 32]``, ``Sym(s0)``."""
    if isinstance(val, torch.Tensor):
        return f"{_dtype_abbr(val.dtype)}[{', '.join(str(d) for d in val.shape)}]"
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return f"Sym({val})"
    if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) or v is None for v in val):
        return ", ".join(type_str(v) if v is not None else "None" for v in val)
    return ""


def target_str(target: Any) -> str:
    """A call target as print_readable names it (``torch.ops.aten.linear.default``)."""
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"torch.ops.{target}"
    try:
        from torch.fx.node import _get_qualified_name

        return _get_qualified_name(target)
    except Exception:  # noqa: BLE001 - a name for display only
        return getattr(target, "__name__", repr(target))


def _fmt_arg(arg: Any) -> str:
    if isinstance(arg, torch.fx.Node):
        return arg.name
    if isinstance(arg, list):
        return "[" + ", ".join(_fmt_arg(a) for a in arg) + "]"
    if isinstance(arg, tuple):
        inner = ", ".join(_fmt_arg(a) for a in arg)
        return f"({inner},)" if len(arg) == 1 else f"({inner})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k!r}: {_fmt_arg(v)}" for k, v in arg.items()) + "}"
    if isinstance(arg, (torch.dtype, torch.layout, torch.memory_format)):
        return str(arg) if str(arg).startswith("torch.") else f"torch.{arg}"
    if isinstance(arg, float):
        return repr(arg)
    return repr(arg) if isinstance(arg, str) else str(arg)


def _node_code(node: torch.fx.Node) -> str:
    ann = type_str(node.meta.get("val"))
    head = f'{node.name}: "{ann}"' if ann else node.name
    if node.op == "placeholder":
        return head
    if node.op == "output":
        return "return " + _fmt_arg(node.args[0] if len(node.args) == 1 else node.args)
    if node.op == "get_attr":
        return f"{head} = self.{node.target}"
    args = list(node.args)
    if node.op == "call_method":
        target = f"{_fmt_arg(args[0])}.{node.target}" if args else str(node.target)
        args = args[1:]
    elif node.op == "call_module":
        target = f"self.{node.target}"
    else:
        target = target_str(node.target)
    parts = [_fmt_arg(a) for a in args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()]
    return f"{head} = {target}({', '.join(parts)})"


def _fmt_decision(decision: Mapping[str, Any]) -> str:
    reason = decision.get("reason", "")
    if decision.get("targeted"):
        alpha = decision.get("alpha")
        dropout = decision.get("dropout")
        alpha_text = f"{alpha:g}" if isinstance(alpha, (int, float)) else str(alpha)
        dropout_text = f"{dropout:g}" if isinstance(dropout, (int, float)) else str(dropout)
        return f"lora r={decision.get('r')} alpha={alpha_text} dropout={dropout_text}: {reason}"
    if decision.get("skipped"):
        return f"skipped: {reason}"
    return f"no lora: {reason}"


def fusion_note(entry: Mapping[str, Any] | None) -> str | None:
    """``fused``, ``fused: <reason>`` or ``not fused: <reason>`` for a fusion record (None for none)."""
    if entry is None:
        return None
    reason = str(entry.get("reason") or "")
    status = "fused" if entry.get("fused") else "not fused"
    return status + (f": {reason}" if reason and reason != status else "")


def _node_notes(node: torch.fx.Node, fusion: Mapping[str, Any]) -> tuple[str, ...]:
    if not has_metadata(node):
        return ()
    notes = []
    labels = get_labels(node)
    if labels is not None:
        layer = labels.layer
        text = (f"graphlora: {labels.component} {labels.role} "
                f"layer={'-' if layer is None else layer} module={labels.module}")
        if labels.kind != MatmulKind.LINEAR:
            text += f" kind={labels.kind} weight={labels.weight}"
        notes.append(text)
    decision = get_decision(node)
    if decision is not None:
        notes.append("graphlora: decision " + _fmt_decision(dataclasses.asdict(decision)))
    site_step = get_site_step(node)
    site, step = site_step if site_step is not None else (None, None)
    if step is not None:
        text = f"graphlora: lora_step={step} site={site}"
        if step != LORA_STEPS[0] and get_base_node(node):
            text += f" base={get_base_node(node)}"
        notes.append(text)
    if step in (LORA_STEPS[0], FUSED_STEP) and site in fusion:
        notes.append("graphlora: fusion " + fusion_note(fusion[site]))
    for field, value in node_metadata(node).items():
        if field not in _RENDERED_FIELDS:
            notes.append(f"graphlora: {field}={value!r}")
    return tuple(notes)


def _snapshot(gm: torch.fx.GraphModule) -> list[_NodeText]:
    fusion = graph_meta(gm).fusion
    placeholders = graph_meta(gm).placeholders
    out = []
    for node in gm.graph.nodes:
        code = _node_code(node)
        notes = _node_notes(node, fusion)
        if node.op == "placeholder":
            source = placeholders.get(node.name)
            if source is not None and source[0] != PlaceholderKind.USER:
                code += f",  # {source[0]} {source[1]}"
            else:
                code += ","
        found = get_labels(node)
        labels = None if found is None else (str(found.component), str(found.role), found.layer, found.module)
        group = tuple(get_fusion_group(node) or ())
        site_step = get_site_step(node)
        site = None if site_step is None else site_step[0]
        out.append(_NodeText(node.name, node.op, code, notes, labels, site, group))
    return out


def filter_includes(stages: list[Stage], flt: NodeFilter | None) -> dict[int, set[str]] | None:
    """Per stage, the nodes ``--only`` keeps: labelled nodes that match and the LoRA nodes (branch
    steps, fused ops) of their sites. Node names are never reused within a trace, so a node's labels
    are taken from any stage that has them: the stages before labelling show the same linears."""
    if flt is None:
        return None
    label_of: dict[str, tuple] = {}
    for stage in stages:
        for n in stage.nodes:
            if n.labels is not None:
                label_of[n.name] = n.labels
    sites = {lab[3] for lab in label_of.values() if flt.matches(*lab)}
    includes = {}
    for stage in stages:
        keep = set()
        for n in stage.nodes:
            lab = label_of.get(n.name)
            if (lab is not None and lab[3] in sites and flt.matches(*lab)) or n.site in sites \
                    or any(g in sites for g in n.group):
                keep.add(n.name)
        includes[stage.index] = keep
    return includes


class Recorder:
    """The rewrite observer: snapshots each stage and logs ``<stage>: 1.2 s (N nodes)``."""

    def __init__(self) -> None:
        self.stages: list[Stage] = []
        #: the graph of each trace as its last stage left it (trace 1: the whole model)
        self.graphs: dict[int, torch.fx.GraphModule] = {}
        self._last = time.perf_counter()

    def restart_clock(self) -> None:
        self._last = time.perf_counter()

    def __call__(self, stage: str, gm: torch.fx.GraphModule) -> None:
        seconds = time.perf_counter() - self._last
        name = str(stage)
        taken = {s.name for s in self.stages}
        if name in taken:  # a further trace (a model run by regions): keep names unique
            k = 2
            while f"{name}_{k}" in taken:
                k += 1
            name = f"{name}_{k}"
        nodes = _snapshot(gm)
        trace = (self.stages[-1].trace if self.stages else 0) + (stage in (EXPORT_STAGE, RECORD_STAGE))
        self.stages.append(Stage(len(self.stages), name, seconds, len(nodes), nodes, max(trace, 1)))
        self.graphs[self.stages[-1].trace] = gm
        say(f"{name}: {seconds:.1f} s ({len(nodes)} nodes)")
        self._last = time.perf_counter()

