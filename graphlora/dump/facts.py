"""What the final graph says: the node table, the groups of the component map, the summary's numbers.

Reads the graph module(s) the tables describe (:func:`traced_graphs` picks them from the recorder:
the whole-model trace or the analysis recording when there is one, else every region's trace), their
metadata through :mod:`graphlora.labels`'s accessors only, and the rewritten model's sites, skipped
sites, fusion report and LoRA parameters. :class:`GraphFacts` gives one :class:`NodeRow` per
labelled matmul and per LoRA node (branch step or fused op), the group of every labelled node
(``vision/3``, ``projector``), the module prefix of each group and of each block, and each site's
labels; :func:`summary_numbers` the per-component counts of ``summary.txt`` and ``summary.json``.
Nothing here writes a file or changes the model.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable

import torch
import torch.fx

from graphlora.dump.stages import Recorder, fusion_note, target_str, type_str
from graphlora.labels import (COMPONENTS, FUSED_STEP, LORA_STEPS, TOWER_OF_COMPONENT, MatmulKind, NodeLabels,
                              get_base_node, get_decision, get_labels, get_site_step, graph_meta)


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


def group_name(component: str, layer: int | None) -> str:
    """The component-map node of a component and layer: ``vision/3``, ``projector``."""
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
class Traced:
    """One traced graph the tables and the map describe: ``key`` prefixes its node names when there
    are several (``t2.linear``); ``path`` is the module it traces (``""``: the whole model)."""

    key: str
    path: str
    gm: torch.fx.GraphModule
    trace: int = 1


class GraphFacts:
    """What the final graph(s) say: rows per node, groups, and the site -> labels map.

    Usually one graph, the whole model. A model run by regions that has no whole-model trace gives
    one graph per region; node names are then prefixed with the trace (``t2.linear``).
    """

    def __init__(self, traced: list[Traced], lora_model):
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
                    group = group_name(comp, layer)
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
                        group = group_name(comp, layer)
                    if group is not None:
                        self.node_group[name] = group
                    kind = "fused" if step == FUSED_STEP else "lora"
                    self.rows.append(NodeRow(
                        name, kind, target_str(node.target).removeprefix("torch.ops."),
                        type_str(node.meta.get("val")), comp, role, layer, site, group,
                        "fused" if kind == "fused" else "branch",
                        step, None, None, f"LoRA step {step} of {site}" + (f" (base {base})" if base else ""),
                        (fusion_note(self.fusion.get(site)) or "") if kind == "fused" else "", [],
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
            name, "matmul", target_str(node.target).removeprefix("torch.ops."), type_str(node.meta.get("val")),
            comp, role, layer, module, group_name(comp, layer), lora, site_step[1] if site_step else None,
            decision.get("r") if targeted else None, decision.get("alpha") if targeted else None, reason,
            (fusion_note(self.fusion.get(module)) or "") if targeted else "", list(branches.get(name, ())),
        )



def traced_graphs(recorder: Recorder, lora_model) -> list[Traced]:
    """The graphs the tables and the map describe: the whole-model trace when there is one (a model
    run by regions is traced whole first, for the analysis), else every region's trace."""
    records = list(getattr(lora_model, "traces", []))[: len(recorder.graphs)]
    paths = {i + 1: str(getattr(r, "path", "") or "") for i, r in enumerate(records)}
    whole = [t for t in sorted(recorder.graphs) if paths.get(t, "") == ""]
    if whole:
        return [Traced("", "", recorder.graphs[whole[0]], whole[0])]
    if len(recorder.graphs) == 1:
        (t, gm), = recorder.graphs.items()
        return [Traced("", paths.get(t, ""), gm, t)]
    return [Traced(f"t{t}.", paths.get(t, ""), recorder.graphs[t], t) for t in sorted(recorder.graphs)]


def lora_params(lora_model, site) -> int:
    """The number of LoRA parameters (A and B) of a site (0 when it has no LoRA module)."""
    try:
        module = lora_model.get_submodule(getattr(site, "module", "") or site.name)
        return int(module.lora_A.weight.numel() + module.lora_B.weight.numel())
    except AttributeError:
        return 0



def summary_numbers(lora_model, facts: GraphFacts) -> dict[str, Any]:
    """The numbers of ``summary.txt`` and ``summary.json``: per component and in total, and the skipped sites."""
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
        params[site.component] += lora_params(lora_model, site)
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

