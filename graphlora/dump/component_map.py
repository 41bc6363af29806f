"""The component map: the final graph collapsed by component and layer, as a networkx DiGraph.

Reads a :class:`~graphlora.dump.facts.GraphFacts` (groups, their module prefixes, node table) and the
rewritten model's sites. One node per group of labelled matmuls (``vision/0``, ``projector``,
``language/3``, ``head``) with its counts; an edge ``A -> B`` for every value computed in A and used
in B, looking through the nodes that belong to no group. A node outside a labelled matmul is placed
by its ``nn_module_stack`` (the innermost module inside a group's block). docs/dump.md describes the
attributes; the DOT, JSON and HTML outputs all draw this graph.
"""

from __future__ import annotations

import collections
from typing import Any

import torch
import torch.fx

from graphlora.dump.facts import GraphFacts, group_name, lora_params
from graphlora.name_rules import WRAPPER_ATTR, WRAPPER_PREFIX


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


def build_component_map(facts: GraphFacts, lora_model) -> "Any":
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
        group = group_name(site.component, site.layer)
        sites[group] += 1
        params[group] += lora_params(lora_model, site)
        if (facts.fusion.get(site.name) or {}).get("fused"):
            fused[group] += 1
    for site in lora_model.skipped_sites:
        skipped[group_name(site.component, site.layer)] += 1
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

