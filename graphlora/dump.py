"""``graphlora dump``: write the graph at every stage of a rewrite, and a map of what gets LoRA.

``dump(model_or_spec, policy, out_dir)`` runs :func:`graphlora.rewrite` with an observer that takes a
snapshot of the graph after export and after every pass, then writes (docs/dump.md):

* ``text``: ``NN_<stage>.txt`` per stage (``00_export``, then one per pass in pass order) in
  ``print_readable`` style with each node's labels, decision, LoRA step and fusion status as
  ``# graphlora:`` comment lines, and ``NN_<stage>.diff``, the unified diff from the previous stage;
* ``dot``: ``component_map.dot`` (and ``component_map.svg`` when Graphviz's ``dot`` is installed):
  the graph collapsed by component and layer;
* ``json``: ``component_map.json`` (networkx node-link), ``nodes.json`` (the node table) and
  ``summary.json``;
* ``html``: ``dump.html``, one self-contained page (no network): the component map and a searchable,
  filterable node table (``dump.html#component=vision`` opens it filtered);
* always ``summary.txt``: per component the linears, LoRA sites, fused sites and trainable
  parameters, and the skipped sites with their reasons.

A MODEL SPEC naming a config directory is built on the meta device and traced with meta tensors: no
weight is allocated, so a 72B model's targeting can be inspected on a laptop (the comparison with
eager outputs is then skipped). Progress goes to stderr, one line per stage.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import difflib
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TextIO

import torch
import torch.fx

from graphlora.errors import GraphLoraError
from graphlora.labels import (COMPONENTS, FUSED_STEP, LORA_STEPS, ROLES, TOWER_OF_COMPONENT, MatmulKind, NodeLabels,
                              PlaceholderKind, get_base_node, get_decision, get_fusion_group, get_labels, get_site_step,
                              graph_meta, has_metadata, node_metadata)
from graphlora.name_rules import WRAPPER_ATTR, WRAPPER_PREFIX
from graphlora.pipeline import EXPORT_STAGE, RECORD_STAGE, STAGES

__all__ = [
    "FORMATS",
    "DumpError",
    "DumpResult",
    "NodeFilter",
    "Stage",
    "add_dump_parser",
    "available_stages",
    "build_component_map",
    "dump",
]

#: Output formats, in the order they are written. ``summary.txt`` is written whatever the formats.
FORMATS: tuple[str, ...] = ("text", "dot", "json", "html")
#: Keys ``--only`` filters on.
FILTER_KEYS: tuple[str, ...] = ("component", "role", "layer", "module")
META_NOTE = "verification against eager skipped on the meta device"
#: Node-meta fields rendered specifically; other graphlora fields are shown generically.
_RENDERED_FIELDS = frozenset({"component", "role", "layer", "module", "kind", "weight", "decision", "site", "lora_step",
                              "base_node"})
#: The file that lists what the previous dump into a directory wrote (removed before a new dump).
_MANIFEST = ".graphlora-dump-files"


class DumpError(GraphLoraError, ValueError):
    """A dump request that cannot be served (unknown format, pass, filter key ...)."""


# =============================================================================================
# Node filter (--only)
# =============================================================================================
@dataclasses.dataclass(frozen=True)
class NodeFilter:
    """Which labelled nodes to show: every given key must match (``--only component=vision,layer=0-3``).

    A value may list alternatives separated by ``|`` (``role=attn.q|attn.v``); ``layer`` takes numbers
    and inclusive ranges (``layer=0-3|30``); ``module`` takes shell-style patterns (``*.q_proj``).
    """

    component: frozenset[str] | None = None
    role: frozenset[str] | None = None
    layer: tuple[tuple[int, int], ...] | None = None
    module: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, spec: "NodeFilter | str | Mapping[str, Any] | Sequence[str] | None") -> "NodeFilter | None":
        """A filter from ``"component=vision,layer=3"``, a dict, a list of such strings, or None."""
        if spec is None or isinstance(spec, NodeFilter):
            return spec
        items: list[tuple[str, Any]] = []
        if isinstance(spec, str):
            spec = [spec]
        if isinstance(spec, Mapping):
            items = list(spec.items())
        else:
            for text in spec:
                for part in str(text).replace("&", ",").split(","):
                    part = part.strip()
                    if not part:
                        continue
                    key, sep, value = part.partition("=")
                    if not sep or not value.strip():
                        raise DumpError(f"--only {part!r}: expected KEY=VALUE with KEY one of {', '.join(FILTER_KEYS)}")
                    items.append((key.strip(), value.strip()))
        fields: dict[str, Any] = {}
        for key, value in items:
            if key not in FILTER_KEYS:
                raise DumpError(f"--only: unknown key {key!r}; filter keys are {', '.join(FILTER_KEYS)}")
            values = _alternatives(value)
            if key == "component":
                bad = [v for v in values if v not in COMPONENTS]
                if bad:
                    raise DumpError(f"--only component={bad[0]!r}: components are {', '.join(COMPONENTS)}")
                fields[key] = frozenset(values) if key not in fields else fields[key] & frozenset(values)
            elif key == "role":
                bad = [v for v in values if v not in ROLES]
                if bad:
                    raise DumpError(f"--only role={bad[0]!r}: roles are {', '.join(ROLES)}")
                fields[key] = frozenset(values) if key not in fields else fields[key] & frozenset(values)
            elif key in fields:
                raise DumpError(f"--only: {key} given twice; separate alternatives with '|' ({key}=a|b)")
            elif key == "layer":
                fields[key] = tuple(_layer_range(v) for v in values)
            else:
                fields[key] = tuple(values)
        return cls(**fields) if fields else None

    def matches(self, component: str | None, role: str | None, layer: int | None, module: str | None) -> bool:
        if self.component is not None and component not in self.component:
            return False
        if self.role is not None and role not in self.role:
            return False
        if self.layer is not None and (layer is None or not any(lo <= layer <= hi for lo, hi in self.layer)):
            return False
        if self.module is not None and not any(fnmatch.fnmatchcase(module or "", p) for p in self.module):
            return False
        return True

    def describe(self) -> str:
        """Canonical text form (``component=vision,layer=0-3``)."""
        parts = []
        if self.component is not None:
            parts.append("component=" + "|".join(c for c in COMPONENTS if c in self.component))
        if self.role is not None:
            parts.append("role=" + "|".join(r for r in ROLES if r in self.role))
        if self.layer is not None:
            parts.append("layer=" + "|".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.layer))
        if self.module is not None:
            parts.append("module=" + "|".join(self.module))
        return ",".join(parts)


def _alternatives(value: Any) -> list[str]:
    if isinstance(value, (list, tuple, set, frozenset)):
        return [str(v).strip() for v in value]
    return [v.strip() for v in str(value).split("|") if v.strip()]


def _layer_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise DumpError(f"--only layer={text!r}: expected a layer number or a range like 0-3") from None


# =============================================================================================
# Snapshots of the graph at each stage
# =============================================================================================
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


def _type_str(val: Any) -> str:
    """print_readable's annotation: ``f32[2, s0, 32]``, ``Sym(s0)``."""
    if isinstance(val, torch.Tensor):
        return f"{_dtype_abbr(val.dtype)}[{', '.join(str(d) for d in val.shape)}]"
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return f"Sym({val})"
    if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) or v is None for v in val):
        return ", ".join(_type_str(v) if v is not None else "None" for v in val)
    return ""


def _target_str(target: Any) -> str:
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
    ann = _type_str(node.meta.get("val"))
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
        target = _target_str(node.target)
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


def _fusion_note(entry: Mapping[str, Any] | None) -> str | None:
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
        notes.append("graphlora: fusion " + _fusion_note(fusion[site]))
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


def _filter_includes(stages: list["Stage"], flt: "NodeFilter | None") -> dict[int, set[str]] | None:
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


class _Recorder:
    """The rewrite observer: snapshots each stage and prints ``[graphlora] <stage>: 1.2 s``."""

    def __init__(self, progress: TextIO | None):
        self.progress = progress
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
        _say(self.progress, f"{name}: {seconds:.1f} s ({len(nodes)} nodes)")
        self._last = time.perf_counter()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


class _Stderr:
    """Default ``progress``: whatever ``sys.stderr`` is when a line is printed."""

    def __repr__(self) -> str:
        return "sys.stderr"


STDERR = _Stderr()


def _say(progress: "TextIO | _Stderr | None", text: str) -> None:
    if progress is STDERR:
        progress = sys.stderr
    if progress is not None:
        print(f"[graphlora] {text}", file=progress, flush=True)


# =============================================================================================
# The final graph: node table rows and the component map
# =============================================================================================
@dataclasses.dataclass
class NodeRow:
    """One row of the node table: a labelled matmul, a LoRA-branch node or a fused LoRA node."""

    node: str
    kind: str  # "matmul" (labelled), "lora" (a branch step), "fused"
    op: str
    shape: str
    component: str | None
    role: str | None
    layer: int | None
    module: str | None  # the site name (module path, or parameter path for raw matmuls)
    group: str | None  # component-map node: "vision/3", "projector" ...
    lora: str  # "yes", "no", "skipped" (matmul rows); "branch" / "fused" for LoRA nodes
    step: str | None
    r: int | None
    alpha: float | None
    reason: str
    fusion: str  # "" (no fusion decision recorded), "fused", "not fused: <reason>"
    branch: list[str]  # names of the branch nodes hanging off this matmul

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _group_name(component: str, layer: int | None) -> str:
    return component if layer is None else f"{component}/{layer}"


def _owner_module(labels: NodeLabels) -> str:
    """The module path a labelled matmul lives in (a parameter path's owner for raw matmuls)."""
    if labels.kind != MatmulKind.LINEAR:
        return (labels.weight or labels.module).rpartition(".")[0]
    return labels.module


def _common_prefix(paths: Iterable[str]) -> str:
    split = [p.split(".") for p in paths if p]
    if not split:
        return ""
    prefix = split[0]
    for parts in split[1:]:
        n = 0
        while n < min(len(prefix), len(parts)) and prefix[n] == parts[n]:
            n += 1
        prefix = prefix[:n]
    return ".".join(prefix)


@dataclasses.dataclass
class _Traced:
    """One traced graph the tables and the map describe: ``key`` prefixes its node names when there
    are several (``t2.linear``); ``path`` is the module it traces (``""``: the whole model)."""

    key: str
    path: str
    gm: torch.fx.GraphModule
    trace: int = 1


class _GraphFacts:
    """What the final graph(s) say: rows per node, groups, and the site -> labels map.

    Usually one graph, the whole model. A model run by regions that has no whole-model trace gives
    one graph per region; node names are then prefixed with the trace (``t2.linear``).
    """

    def __init__(self, traced: list[_Traced], lora_model):
        self.traced = traced
        self.fusion: dict[str, Any] = {}
        for t in traced:
            self.fusion.update(graph_meta(t.gm).fusion)
        if str(getattr(lora_model, "trace_mode", "")) == "blocks":
            # The analysis graph has no LoRA branches: each site's fusion is its block program's (or its glue's).
            self.fusion.update(lora_model.fusion_report())
        site_names = {s.name for s in lora_model.sites}
        skipped = {s.name: s.reason for s in lora_model.skipped_sites}
        self.site_labels: dict[str, tuple[str, str, int | None]] = {}
        self.node_group: dict[str, str] = {}
        labelled: set[str] = set()
        branches: dict[str, list[str]] = collections.defaultdict(list)
        group_modules: dict[str, set[str]] = collections.defaultdict(set)
        #: group -> position of its first labelled node (execution order)
        self.group_order: dict[str, int] = {}
        #: (tower, layer) -> groups of that block, e.g. ("language", 3) -> [cross_attention/3, language/3]
        self.block_groups: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
        index = 0
        for t in traced:
            for node in t.gm.graph.nodes:
                index += 1
                labels = get_labels(node)
                if labels is not None:
                    labelled.add(t.key + node.name)
                    comp, layer = str(labels.component), labels.layer
                    self.site_labels.setdefault(labels.module, (comp, str(labels.role), layer))
                    group = _group_name(comp, layer)
                    self.node_group[t.key + node.name] = group
                    group_modules[group].add(_owner_module(labels))
                    if group not in self.group_order:
                        self.group_order[group] = index
                        if layer is not None:
                            tower = TOWER_OF_COMPONENT.get(labels.component, comp)
                            self.block_groups[(tower, layer)].append(group)
                site_step = get_site_step(node)
                if site_step is not None and site_step[1] != LORA_STEPS[0] and get_base_node(node):
                    branches[t.key + get_base_node(node)].append(t.key + node.name)
        for site in lora_model.sites:  # fused nodes may carry only their site name
            self.site_labels.setdefault(site.name, (site.component, site.role, site.layer))
        self.group_prefix = {g: _common_prefix(mods) for g, mods in group_modules.items()}
        #: block path of each (tower, layer): the common prefix of all its groups' modules
        self.block_prefix = {
            key: _common_prefix(m for g in groups for m in group_modules[g])
            for key, groups in self.block_groups.items()
        }

        self.rows: list[NodeRow] = []
        for t in traced:
            for node in t.gm.graph.nodes:
                site, step = get_site_step(node) or (None, None)
                name = t.key + node.name
                if name in labelled:
                    self.rows.append(self._matmul_row(name, node, site_names, skipped, branches))
                elif step is not None and site is not None:
                    comp, role, layer = self.site_labels.get(site, (None, None, None))
                    base = get_base_node(node)
                    group = self.node_group.get(t.key + str(base)) if base else None
                    if group is None and comp is not None:
                        group = _group_name(comp, layer)
                    if group is not None:
                        self.node_group[name] = group
                    kind = "fused" if step == FUSED_STEP else "lora"
                    self.rows.append(NodeRow(
                        name, kind, _target_str(node.target).removeprefix("torch.ops."),
                        _type_str(node.meta.get("val")), comp, role, layer, site, group,
                        "fused" if kind == "fused" else "branch",
                        step, None, None, f"LoRA step {step} of {site}" + (f" (base {base})" if base else ""),
                        (_fusion_note(self.fusion.get(site)) or "") if kind == "fused" else "", [],
                    ))

    def _matmul_row(self, name, node, site_names, skipped, branches) -> NodeRow:
        labels = get_labels(node)
        comp, role, layer, module = str(labels.component), str(labels.role), labels.layer, labels.module
        found = get_decision(node)
        decision = dataclasses.asdict(found) if found is not None else {}
        site_step = get_site_step(node)
        if module in site_names and decision.get("targeted"):
            lora, reason = "yes", str(decision.get("reason", ""))
        elif module in skipped and (decision.get("targeted") or decision.get("skipped")):
            lora, reason = "skipped", skipped[module]
        else:
            lora, reason = "no", str(decision.get("reason", "not decided"))
        targeted = lora == "yes"
        return NodeRow(
            name, "matmul", _target_str(node.target).removeprefix("torch.ops."), _type_str(node.meta.get("val")),
            comp, role, layer, module, _group_name(comp, layer), lora, site_step[1] if site_step else None,
            decision.get("r") if targeted else None, decision.get("alpha") if targeted else None, reason,
            (_fusion_note(self.fusion.get(module)) or "") if targeted else "", list(branches.get(name, ())),
        )


def _stack_target(node: torch.fx.Node, prefixes: dict[str, Any], cache: dict[str, Any], root: str = "") -> Any:
    """Where an unlabelled node belongs: the innermost module on its stack that lies in a group's
    block (a group name) or in a block shared by several groups (a ``(tower, layer)`` key).
    ``root``: the module path of a region's trace (its stack paths are relative to it)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for entry in reversed(list(stack.values())):
        fqn = entry[0] if isinstance(entry, (tuple, list)) else str(entry)
        if fqn == WRAPPER_ATTR:
            fqn = ""
        fqn = fqn.removeprefix(WRAPPER_PREFIX)
        if root:
            fqn = f"{root}.{fqn}" if fqn else root
        if fqn in cache:
            found = cache[fqn]
        else:
            found = None
            path = fqn
            while path:
                if path in prefixes:
                    found = prefixes[path]
                    break
                path = path.rpartition(".")[0]
            cache[fqn] = found
        if found is not None:
            return found
    return None


def build_component_map(facts: _GraphFacts, lora_model) -> "Any":
    """A networkx DiGraph of the graph collapsed by component and layer (see docs/dump.md)."""
    import networkx as nx

    # Module path -> group (or shared block). The walk up a node's dotted path finds the deepest one.
    prefixes: dict[str, Any] = {}
    for group, prefix in facts.group_prefix.items():
        if prefix:
            prefixes.setdefault(prefix, group)
    for key, prefix in facts.block_prefix.items():
        if prefix:
            prefixes.setdefault(prefix, key)
    graph = nx.DiGraph(name="graphlora component map")
    order: dict[str, int] = {}
    edge_count: collections.Counter = collections.Counter()
    empty: frozenset[str] = frozenset()
    index = 0
    for t in facts.traced:
        cache: dict[str, Any] = {}
        sources: dict[torch.fx.Node, frozenset[str]] = {}
        for node in t.gm.graph.nodes:
            index += 1
            if node.op == "output":
                continue
            group = facts.node_group.get(t.key + node.name)
            inputs = node.all_input_nodes
            if group is None and node.op not in ("placeholder", "get_attr"):
                target = _stack_target(node, prefixes, cache, t.path)
                if isinstance(target, tuple):
                    # A node of a block shared by several groups (Mllama's cross-attention decoder
                    # layer: cross_attention/3 + language/3 for its MLP) joins the latest it reads from.
                    members = facts.block_groups[target]
                    seen = [g for i in inputs for g in sources.get(i, empty) if g in members]
                    group = max(seen, key=facts.group_order.__getitem__) if seen else members[0]
                else:
                    group = target
            if group is None:
                if not inputs:
                    sources[node] = empty
                elif len(inputs) == 1:
                    sources[node] = sources.get(inputs[0], empty)
                else:
                    merged: set[str] = set()
                    for i in inputs:
                        merged |= sources.get(i, empty)
                    sources[node] = frozenset(merged)
                continue
            order.setdefault(group, index)
            for i in inputs:
                for s in sources.get(i, empty):
                    if s != group:
                        edge_count[(s, group)] += 1
            sources[node] = frozenset((group,))

    # Per-group numbers.
    linears: dict[str, set[str]] = collections.defaultdict(set)
    for row in facts.rows:
        if row.kind == "matmul" and row.group:
            linears[row.group].add(row.module or "")
    sites: collections.Counter = collections.Counter()
    params: collections.Counter = collections.Counter()
    fused: collections.Counter = collections.Counter()
    skipped: collections.Counter = collections.Counter()
    for site in lora_model.sites:
        group = _group_name(site.component, site.layer)
        sites[group] += 1
        params[group] += _lora_params(lora_model, site)
        if (facts.fusion.get(site.name) or {}).get("fused"):
            fused[group] += 1
    for site in lora_model.skipped_sites:
        skipped[_group_name(site.component, site.layer)] += 1
    groups = sorted(set(order) | set(linears), key=lambda g: (order.get(g, 1 << 60), g))
    for group in groups:
        component, _, layer = group.partition("/")
        graph.add_node(
            group, component=component, layer=int(layer) if layer else None, linears=len(linears[group]),
            sites=sites[group], fused=fused[group], skipped=skipped[group], lora_params=params[group],
            order=order.get(group),
        )
    edges = sorted(edge_count.items(), key=lambda kv: (order.get(kv[0][0], 0), order.get(kv[0][1], 0)))
    for (src, dst), count in edges:
        graph.add_edge(src, dst, tensors=count)
    return graph


def _lora_params(lora_model, site) -> int:
    try:
        module = lora_model.get_submodule(getattr(site, "module", "") or site.name)
        return int(module.lora_A.weight.numel() + module.lora_B.weight.numel())
    except AttributeError:
        return 0


# =============================================================================================
# Writers
# =============================================================================================
def _render_stage(stage: Stage, title: str, include: set[str] | None, flt: NodeFilter | None, total: int) -> str:
    lines = [
        f"# graphlora dump of {title}: stage {stage.index:02d} {stage.name} ({total} stages)",
        f"# {stage.num_nodes} nodes",
    ]
    nodes = stage.nodes if include is None else [n for n in stage.nodes if n.name in include]
    if flt is not None:
        lines.append(f"# filter --only {flt.describe()}: {len(nodes)} of {stage.num_nodes} nodes shown "
                     "(labels of the final stage)")
    lines.append("class GraphModule(torch.nn.Module):")
    placeholders = [n for n in nodes if n.op == "placeholder"]
    lines.append("    def forward(")
    lines.append("        self,")
    for n in placeholders:
        lines.extend(f"        # {note}" for note in n.notes)
        lines.append(f"        {n.code}")
    lines.append("    ):")
    for n in nodes:
        if n.op == "placeholder":
            continue
        lines.extend(f"        # {note}" for note in n.notes)
        lines.append(f"        {n.code}")
    return "\n".join(lines) + "\n"


def _diff(before: str, after: str, before_name: str, after_name: str) -> str:
    a = before.splitlines()
    b = after.splitlines()
    return "\n".join(difflib.unified_diff(a, b, fromfile=before_name, tofile=after_name, lineterm="", n=2)) + "\n"


def _summary_numbers(lora_model, facts: _GraphFacts) -> dict[str, Any]:
    modules: dict[str, str] = {}  # one entry per labelled module (a module called twice counts once)
    for row in facts.rows:
        if row.kind == "matmul" and row.module is not None:
            modules.setdefault(row.module, row.component or "other")
    linears = collections.Counter(modules.values())
    sites = collections.Counter(s.component for s in lora_model.sites)
    skipped = collections.Counter(s.component for s in lora_model.skipped_sites)
    fused: collections.Counter = collections.Counter()
    params: collections.Counter = collections.Counter()
    for site in lora_model.sites:
        params[site.component] += _lora_params(lora_model, site)
        if (facts.fusion.get(site.name) or {}).get("fused"):
            fused[site.component] += 1
    per_component = []
    for comp in COMPONENTS:
        if linears[comp] or sites[comp] or skipped[comp]:
            per_component.append(dict(component=comp, linears=linears[comp], sites=sites[comp], fused=fused[comp],
                                      skipped=skipped[comp], trainable_params=params[comp]))
    trainable, total = lora_model.trainable_parameters()
    return dict(
        components=per_component,
        total=dict(linears=sum(linears.values()), sites=len(lora_model.sites), fused=sum(fused.values()),
                   skipped=len(lora_model.skipped_sites), trainable_params=sum(params.values())),
        trainable_params=trainable,
        total_params=total,
        skipped_sites=[dataclasses.asdict(s) for s in lora_model.skipped_sites],
    )


def _format_summary(head: list[str], numbers: dict[str, Any]) -> str:
    header = ("component", "linears", "lora sites", "fused", "skipped", "trainable params")
    table = [header]
    for c in numbers["components"]:
        table.append((c["component"], str(c["linears"]), str(c["sites"]), str(c["fused"]), str(c["skipped"]),
                      f"{c['trainable_params']:,}"))
    t = numbers["total"]
    table.append(("total", str(t["linears"]), str(t["sites"]), str(t["fused"]), str(t["skipped"]),
                  f"{t['trainable_params']:,}"))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = list(head) + [""]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
              for r in table]
    trainable, total = numbers["trainable_params"], numbers["total_params"]
    lines.append(f"trainable params: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)")
    if trainable != t["trainable_params"]:
        lines.append(f"  (LoRA matrices {t['trainable_params']:,}; modules_to_save copies "
                     f"{trainable - t['trainable_params']:,})")
    skipped = numbers["skipped_sites"]
    lines.append("")
    lines.append(f"skipped sites ({len(skipped)})" + (":" if skipped else ""))
    for s in skipped:
        layer = "-" if s["layer"] is None else s["layer"]
        lines.append(f"  {s['name']} [{s['component']} {s['role']} layer {layer}]: {s['reason']}")
    return "\n".join(lines) + "\n"


def _dot_quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


_COMPONENT_COLOURS = {
    "vision": "#dbe9f6", "projector": "#f3e1f7", "cross_attention": "#fde9d9",
    "language": "#e2f0d9", "head": "#fff2cc", "other": "#eeeeee",
}


def _node_fill(attrs: Mapping[str, Any]) -> str:
    if attrs.get("sites"):
        return "#9fd8a4" if attrs.get("fused", 0) < attrs["sites"] else "#7fc7e8"
    if attrs.get("skipped"):
        return "#f6c28b"
    return "#f2f2f2"


def _node_label(name: str, attrs: Mapping[str, Any]) -> str:
    n = attrs.get("linears", 0)
    text = f"{name}\\n{n} linear{'' if n == 1 else 's'}, {attrs.get('sites', 0)} LoRA"
    if attrs.get("fused"):
        text += f", {attrs['fused']} fused"
    if attrs.get("skipped"):
        text += f"\\n{attrs['skipped']} skipped"
    return text


def component_map_dot(graph, title: str) -> str:
    """Hand-written DOT text for the component map (clusters per component)."""
    lines = [
        "digraph graphlora_component_map {",
        f"  graph [rankdir=TB, newrank=true, fontname=\"Helvetica\", fontsize=12, labelloc=t, "
        f"label={_dot_quote(title)}];",
        "  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\", fontsize=10];",
        "  edge [color=\"#555555\", arrowsize=0.6];",
    ]
    by_component: dict[str, list[str]] = collections.defaultdict(list)
    for name, attrs in graph.nodes(data=True):
        by_component[attrs.get("component", "other")].append(name)
    for comp in [c for c in COMPONENTS if c in by_component] + [c for c in by_component if c not in COMPONENTS]:
        lines.append(f"  subgraph {_dot_quote('cluster_' + comp)} {{")
        colour = _COMPONENT_COLOURS.get(comp, "#eeeeee")
        lines.append(f"    label={_dot_quote(comp)}; style=filled; color={_dot_quote(colour)};")
        for name in by_component[comp]:
            attrs = graph.nodes[name]
            tooltip = (f"{name}: {attrs.get('linears', 0)} linears, {attrs.get('sites', 0)} LoRA sites, "
                       f"{attrs.get('fused', 0)} fused, {attrs.get('skipped', 0)} skipped, "
                       f"{attrs.get('lora_params', 0):,} LoRA params")
            lines.append(f"    {_dot_quote(name)} [label=\"{_node_label(name, attrs)}\", "
                         f"fillcolor={_dot_quote(_node_fill(attrs))}, tooltip={_dot_quote(tooltip)}];")
        lines.append("  }")
    for src, dst, attrs in graph.edges(data=True):
        tooltip = f"{src} -> {dst}: {attrs.get('tensors', 1)} tensor uses"
        lines.append(f"  {_dot_quote(src)} -> {_dot_quote(dst)} [tooltip={_dot_quote(tooltip)}];")
    # Invisible edges keep the reading order vision -> projector -> language (+ cross-attention) -> head:
    # without them the first language layers, which read only the token embeddings, float to the top.
    order = lambda name: graph.nodes[name].get("order") or 0  # noqa: E731
    steps = [["vision"], ["projector"], ["cross_attention", "language"], ["head"]]
    previous = None
    for step in steps:
        names = sorted((n for c in step for n in by_component.get(c, [])), key=order)
        if not names:
            continue
        if previous is not None and not graph.has_edge(previous, names[0]):
            lines.append(f"  {_dot_quote(previous)} -> {_dot_quote(names[0])} [style=invis];")
        previous = names[-1]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _run_graphviz(dot_text: str, timeout: float = 120.0) -> str | None:
    """SVG from Graphviz's ``dot`` (None when it is not installed or fails)."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0 or "<svg" not in done.stdout:
        return None
    return done.stdout


def available_stages() -> list[str]:
    """``record``, ``export`` and the name of every pass of the pipeline, in order (``--after`` accepts these)."""
    return list(STAGES)


# =============================================================================================
# dump()
# =============================================================================================
@dataclasses.dataclass
class DumpResult:
    """What :func:`dump` wrote and found.

    ``files`` are the paths written (in ``out_dir``); ``stages`` the snapshots in order; ``summary``
    the text of ``summary.txt``; ``component_map`` the networkx DiGraph; ``lora_model`` the rewritten
    model; ``meta`` whether it ran on the meta device; ``verification`` the eager-comparison line;
    ``rows`` the node table of the final graph (not filtered by ``only``); ``seconds`` the whole dump.
    """

    out_dir: Path
    files: list[Path]
    stages: list[Stage]
    summary: str
    component_map: Any
    lora_model: Any
    meta: bool
    verification: str
    rows: list[NodeRow]
    seconds: float

    def file(self, name: str) -> Path:
        path = self.out_dir / name
        if path not in self.files:
            raise KeyError(f"{name} was not written by this dump")
        return path


def _traced_graphs(recorder: _Recorder, lora_model) -> list[_Traced]:
    """The graphs the tables and the map describe: the whole-model trace when there is one (a model
    run by regions is traced whole first, for the analysis), else every region's trace."""
    records = list(getattr(lora_model, "traces", []))[: len(recorder.graphs)]
    paths = {i + 1: str(getattr(r, "path", "") or "") for i, r in enumerate(records)}
    whole = [t for t in sorted(recorder.graphs) if paths.get(t, "") == ""]
    if whole:
        return [_Traced("", "", recorder.graphs[whole[0]], whole[0])]
    if len(recorder.graphs) == 1:
        (t, gm), = recorder.graphs.items()
        return [_Traced("", paths.get(t, ""), gm, t)]
    return [_Traced(f"t{t}.", paths.get(t, ""), recorder.graphs[t], t) for t in sorted(recorder.graphs)]


def _parse_formats(formats: str | Iterable[str] | None) -> tuple[str, ...]:
    if formats is None:
        return FORMATS
    if isinstance(formats, str):
        formats = formats.split(",")
    wanted = [f.strip().lower() for f in formats if f.strip()]
    if "all" in wanted:
        return FORMATS
    bad = [f for f in wanted if f not in FORMATS]
    if bad:
        raise DumpError(f"unknown dump format {bad[0]!r}; formats are {', '.join(FORMATS)} (or all)")
    return tuple(f for f in FORMATS if f in wanted)


def _resolve_policy(policy) -> tuple[Any, str]:
    """(policy for rewrite, label for the summary); a preset name stands for its file."""
    if isinstance(policy, str) and not Path(policy).exists():
        from graphlora.policy import preset_names, preset_path

        if policy in preset_names():
            return preset_path(policy), f"preset {policy}"
    if policy is None:
        return None, "the default policy"
    if isinstance(policy, (str, os.PathLike)):
        return policy, str(policy)
    if isinstance(policy, Mapping):
        return policy, "a dict"
    return policy, type(policy).__name__


def _is_meta(model: torch.nn.Module) -> bool:
    for p in model.parameters():
        return p.device.type == "meta"
    for b in model.buffers():
        return b.device.type == "meta"
    return False


def _output_tensors(out: Any) -> dict[str, torch.Tensor]:
    found = {}
    for key in ("loss", "logits"):
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            found[key] = value
    if not found and isinstance(out, torch.Tensor):
        found["output"] = out
    return found


def _verify_against_eager(model: torch.nn.Module, lora_model, inputs: Mapping[str, Any]) -> tuple[str, dict]:
    """Run the rewritten program (LoRA B = 0) and the original model on the same batch and compare."""
    observer = lora_model.observer
    lora_model.observer = None  # a re-trace here is not part of the dump
    try:
        with torch.no_grad():
            graph_out = _output_tensors(lora_model(**inputs))
            eager_out = _output_tensors(model(**inputs))
    except Exception as e:  # noqa: BLE001 - report, do not fail the dump
        return f"verification against eager failed to run: {type(e).__name__}: {_first_line(e)}", {}
    finally:
        lora_model.observer = observer
    details: dict[str, Any] = {}
    ok = True
    for key in eager_out:
        if key not in graph_out:
            continue
        a, b = graph_out[key].float(), eager_out[key].float()
        if a.shape != b.shape:
            ok = False
            details[key] = f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
            continue
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        details[key] = diff
        ok = ok and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4))
    if not details:
        return "verification against eager: no loss or logits to compare", details
    names = " and ".join(details)
    if ok:
        return f"verification against eager: ok ({names} match the original model)", details
    note = " (the model is in training mode: dropout may explain it)" if model.training else ""
    return f"verification against eager: MISMATCH in {names}{note}", details


def _rewrite_checks(lora_model) -> list:
    """The eager comparisons rewrite() made (``lora_model.verification``), when it records them."""
    checks = getattr(lora_model, "verification", None)
    if not isinstance(checks, (list, tuple)) or not checks:
        return []
    if not all(hasattr(c, "passed") and hasattr(c, "describe") for c in checks):
        return []
    if all(getattr(c, "note", "") for c in checks):  # every check was skipped: compare here instead
        return []
    return list(checks)


def _describe_rewrite_checks(checks: list) -> tuple[str, dict]:
    details = {"rewrite": [dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c.describe() for c in checks]}
    compared = [c for c in checks if not getattr(c, "note", "")]
    failed = [c for c in compared if not c.passed]
    units = [getattr(c, "unit", "") for c in compared]
    where = "the whole model" if units == [""] else f"{len(units)} traced unit{'s' if len(units) != 1 else ''}"
    if failed:
        return "verification against eager: MISMATCH (" + "; ".join(c.describe() for c in failed) + ")", details
    return f"verification against eager: ok (outputs and LoRA gradients of {where} match eager)", details


def _clean_previous(out_dir: Path) -> None:
    manifest = out_dir / _MANIFEST
    if not manifest.is_file():
        return
    for name in manifest.read_text().splitlines():
        name = name.strip()
        if name and "/" not in name and "\\" not in name and not name.startswith("."):
            try:
                (out_dir / name).unlink()
            except FileNotFoundError:
                pass


class _Writer:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.files: list[Path] = []

    def write(self, name: str, text: str) -> Path:
        path = self.out_dir / name
        path.write_text(text, encoding="utf-8")
        if path not in self.files:
            self.files.append(path)
        return path

    def finish(self) -> None:
        (self.out_dir / _MANIFEST).write_text("\n".join(p.name for p in self.files) + "\n")


def _write_stage_files(writer: _Writer, stages: list[Stage], title: str, flt: NodeFilter | None,
                       after: str | None) -> None:
    includes = _filter_includes(stages, flt)
    wanted = {s.index for s in stages if after is None or s.name == after}
    texts: dict[int, str] = {}

    def text_of(stage: Stage) -> str:
        if stage.index not in texts:
            include = None if includes is None else includes[stage.index]
            texts[stage.index] = _render_stage(stage, title, include, flt, len(stages))
        return texts[stage.index]

    for stage in stages:
        if stage.index not in wanted:
            continue
        writer.write(f"{stage.stem}.txt", text_of(stage))
        prev = stages[stage.index - 1] if stage.index > 0 else None
        if prev is not None and prev.trace == stage.trace:
            diff = _diff(text_of(prev), text_of(stage), f"{prev.stem}.txt", f"{stage.stem}.txt")
            writer.write(f"{stage.stem}.diff", diff)


def dump(
    model_or_spec: torch.nn.Module | str,
    policy=None,
    out_dir: str | Path = "graphlora-dump",
    formats: str | Iterable[str] | None = FORMATS,
    after: str | None = None,
    only: NodeFilter | str | Mapping[str, Any] | Sequence[str] | None = None,
    example_inputs: dict[str, Any] | None = None,
    *,
    verify: bool = True,
    trace_mode: str = "auto",
    fuse: bool | str = "auto",
    progress: "TextIO | _Stderr | None" = STDERR,
) -> DumpResult:
    """Rewrite ``model_or_spec`` under ``policy`` and write the graph dump into ``out_dir``.

    ``model_or_spec``: an ``nn.Module`` or a MODEL SPEC (a tiny model name, ``module:function``, or a
    config directory, which is built on the meta device). ``formats``: any of ``text``, ``dot``,
    ``json``, ``html`` (``summary.txt`` is always written). ``after``: write the per-stage files of
    that stage only (``export`` or a pass name). ``only``: a :class:`NodeFilter` or its text form
    (``"component=vision,layer=0-3"``) for the stage files and node tables. ``example_inputs``: one
    batch (default: the spec's, else synthesised; meta tensors for a meta model). ``verify``: compare
    the rewritten program with the original model on that batch (not possible on the meta device).
    ``trace_mode``, ``fuse``: as :func:`graphlora.rewrite` (``"regional"`` dumps each region's trace,
    ``"blocks"`` the analysis recording and each block class's trace).
    As with :func:`graphlora.rewrite`, a model passed in has its parameters frozen.
    """
    from graphlora.model_spec import load_model_spec
    from graphlora.rewriter import rewrite

    started = time.perf_counter()
    fmts = _parse_formats(formats)
    flt = NodeFilter.parse(only)
    if after is not None:
        known = available_stages()
        if after not in known:
            raise DumpError(f"--after {after!r}: no such pass; available: {', '.join(known)}")
    out = Path(out_dir)

    if isinstance(model_or_spec, torch.nn.Module):
        model, title = model_or_spec, type(model_or_spec).__name__
        spec_inputs = None
    elif isinstance(model_or_spec, (str, os.PathLike)):
        spec = str(model_or_spec)
        t0 = time.perf_counter()
        model, spec_inputs = load_model_spec(spec, meta=True)
        title = f"{spec} ({type(model).__name__})"
        _say(progress, f"load model: {time.perf_counter() - t0:.1f} s ({type(model).__name__})")
    else:
        raise TypeError(f"dump() takes an nn.Module or a MODEL SPEC string, not {type(model_or_spec).__name__}")
    meta = _is_meta(model)
    inputs = example_inputs if example_inputs is not None else spec_inputs
    if inputs is None:  # a meta model takes CPU inputs (the prologue may need their values)
        from graphlora.families import synthesize_inputs

        inputs = synthesize_inputs(model)

    policy, policy_label = _resolve_policy(policy)
    out.mkdir(parents=True, exist_ok=True)
    _clean_previous(out)
    writer = _Writer(out)
    recorder = _Recorder(progress)
    recorder.restart_clock()
    try:
        lora_model = rewrite(model, policy, inputs, observer=recorder, verify=bool(verify) and not meta,
                             trace_mode=trace_mode, fuse=fuse)
    except BaseException as e:
        # Whatever was traced is worth reading: write those stages and the error, then re-raise.
        if recorder.stages and "text" in fmts:
            _write_stage_files(writer, recorder.stages, title, None, None)
        import traceback

        where = (f"after stage {recorder.stages[-1].stem}" if recorder.stages
                 else "before the first stage (model preparation or export)")
        writer.write("error.txt", f"graphlora dump of {title} failed {where}:\n{type(e).__name__}: {e}\n\n"
                                  + "".join(traceback.format_exception(e)))
        writer.finish()
        _say(progress, f"failed {where}: {type(e).__name__}: {_first_line(e)} (see {out / 'error.txt'})")
        raise

    stage_names = [s.name for s in recorder.stages]
    if after is not None and after not in stage_names:
        raise DumpError(f"--after {after!r}: that pass did not run on this model; stages: {', '.join(stage_names)}")

    if meta:
        verification, verify_details = META_NOTE, {}
        _say(progress, META_NOTE)
    elif verify and _rewrite_checks(lora_model):
        # rewrite() compared its traced program(s) with eager already (outputs and LoRA gradients).
        verification, verify_details = _describe_rewrite_checks(_rewrite_checks(lora_model))
        _say(progress, verification)
    elif verify:
        t0 = time.perf_counter()
        verification, verify_details = _verify_against_eager(model, lora_model, inputs)
        _say(progress, f"{verification} ({time.perf_counter() - t0:.1f} s)")
    else:
        verification, verify_details = "verification against eager: not requested", {}

    t0 = time.perf_counter()
    traced = _traced_graphs(recorder, lora_model)
    finals = {t: max((s for s in recorder.stages if s.trace == t), key=lambda s: s.index) for t in recorder.graphs}
    final = finals[traced[0].trace]
    facts = _GraphFacts(traced, lora_model)
    includes = _filter_includes(recorder.stages, flt)
    include = None
    if includes is not None:
        include = {t.key + name for t in traced for name in includes[finals[t.trace].index]}
    numbers = _summary_numbers(lora_model, facts)
    device = "meta" if meta else str(next(iter(model.parameters()), torch.empty(0)).device)
    head = [
        f"graphlora dump of {title}",
        f"policy: {policy_label} (digest {lora_model.policy.digest()[:12]})",
        f"device: {device}; {verification}",
        "stages: " + ", ".join(f"{s.index:02d} {s.name}" for s in recorder.stages),
    ]
    if flt is not None:
        head.append(f"filter (stage files and node tables): {flt.describe()}")
    summary = _format_summary(head, numbers)
    writer.write("summary.txt", summary)

    graph = build_component_map(facts, lora_model)
    shown_rows = [r for r in facts.rows if include is None or r.node in include]
    map_title = f"{title}: {len(lora_model.sites)} LoRA sites"

    if "text" in fmts:
        _write_stage_files(writer, recorder.stages, title, flt, after)
    dot_text = component_map_dot(graph, map_title)
    svg = None
    if "dot" in fmts or "html" in fmts:
        svg = _run_graphviz(dot_text)
    if "dot" in fmts:
        writer.write("component_map.dot", dot_text)
        if svg is not None:
            writer.write("component_map.svg", svg)
    stage_info = [dict(index=s.index, name=s.name, seconds=round(s.seconds, 3), nodes=s.num_nodes)
                  for s in recorder.stages]
    if "json" in fmts:
        import networkx as nx

        writer.write("component_map.json", json.dumps(nx.node_link_data(graph, edges="edges"), indent=1) + "\n")
        writer.write("nodes.json", json.dumps({
            "model": title, "filter": flt.describe() if flt else None, "stage": final.name,
            "nodes": [r.as_json() for r in shown_rows],
        }, indent=1) + "\n")
        writer.write("summary.json", json.dumps({
            "model": title, "policy": policy_label, "policy_digest": lora_model.policy.digest(),
            "device": device, "meta": meta, "verification": verification, "verification_details": verify_details,
            "stages": stage_info, **numbers,
        }, indent=1, default=str) + "\n")
    if "html" in fmts:
        from graphlora.dump_html import render_html

        writer.write("dump.html", render_html(
            title=title, summary=summary, svg=svg, graph=graph,
            rows=[r.as_json() for r in shown_rows if r.kind != "lora"],
            stages=stage_info, filter_text=flt.describe() if flt else "", meta_note=META_NOTE if meta else "",
        ))
    writer.finish()
    _say(progress, f"write {', '.join(('summary',) + fmts)}: {time.perf_counter() - t0:.1f} s")
    seconds = time.perf_counter() - started
    _say(progress, f"dump written to {out} ({len(writer.files)} files, {seconds:.1f} s in all)")
    return DumpResult(out, list(writer.files), recorder.stages, summary, graph, lora_model, meta, verification,
                      facts.rows, seconds)


# =============================================================================================
# Command line
# =============================================================================================
def _cmd_dump(args: argparse.Namespace) -> int:
    try:
        result = dump(
            args.model, args.policy, args.out, formats=args.format, after=args.after, only=args.only or None,
            verify=not args.no_verify, trace_mode=args.trace_mode, fuse={"auto": "auto", "on": True, "off": False}[args.fuse], progress=None if args.quiet else sys.stderr,
        )
    except GraphLoraError:
        raise
    except Exception as e:  # noqa: BLE001 - an unexpected failure: one clear line, the traceback in a file
        print(f"graphlora: error: dump of {args.model} failed: {type(e).__name__}: {_first_line(e)}\n"
              f"  traceback: {Path(args.out) / 'error.txt'}", file=sys.stderr)
        return 1
    print(result.summary, end="")
    print(f"\nwrote {len(result.files)} files to {result.out_dir}:")
    for path in result.files:
        print(f"  {path.name}")
    return 0


def add_dump_parser(subparsers: "argparse._SubParsersAction", model_spec_help: str = "MODEL SPEC") -> None:
    """Register the ``graphlora dump`` command (``model_spec_help``: the command line's help for a MODEL SPEC)."""
    p = subparsers.add_parser(
        "dump", help="write the graph after every pass, a component map and an HTML report",
        description="Rewrite MODEL under a policy and write the graph at every stage (text + diffs), a map "
                    "of the model collapsed by component and layer (DOT/SVG, JSON) and a self-contained HTML "
                    "page. A config directory is built and traced on the meta device (no weights). "
                    "See docs/dump.md.",
    )
    p.add_argument("model", help=model_spec_help)
    p.add_argument("--policy", default=None,
                   help="policy file (YAML or TOML) or preset name; default: the default policy")
    p.add_argument("--out", default="graphlora-dump", help="output directory (default: ./graphlora-dump)")
    p.add_argument("--format", default=",".join(FORMATS),
                   help=f"comma-separated formats among {', '.join(FORMATS)} (default: all); "
                        "summary.txt is always written")
    p.add_argument("--after", default=None, metavar="PASS",
                   help="write the per-stage files of the stage after PASS only ('export' or a pass name)")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="show only labelled nodes matching (and their LoRA nodes) in the stage files and "
                        "node tables; keys: component, role, layer (N or A-B), module (glob); "
                        "'|' separates alternatives, e.g. --only component=vision,layer=0-3")
    p.add_argument("--no-verify", action="store_true",
                   help="do not compare the rewritten program with the original model")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--trace-mode", default="auto", choices=("auto", "blocks", "whole", "whole_or_regional", "regional"),
                   help="how to trace (see docs/tracing.md); blocks dumps the analysis recording and one trace per "
                        "block class, regional one trace per region")
    p.add_argument("--fuse", default="auto", choices=("auto", "on", "off"),
                   help="fuse LoRA branches into graphlora::lora_linear: auto (on CUDA and meta), on, off")
    p.set_defaults(func=_cmd_dump)
