"""Label the trainable matmuls of a *region* graph from a site table computed on the whole model.

Regional tracing exports submodules (decoder layers, vision blocks, projector) on their own; a region's
graph cannot tell pixels from tokens or which tower a block belongs to. The labels therefore come
from a table made before tracing (graphlora/regions.py: module names and classes, blocks numbered in
execution order over the whole model).

Reads: the region graph's trainable matmuls (``graphlora.structure.trainable_matmuls``), the table
(site name -> :class:`NodeLabels`), the region's module path (prefix of every site name), and the
tower sizes of the whole model. Writes: labels (site names relative to the whole model) on every
trainable matmul; ``GraphMeta.towers``. Guarantees: every trainable matmul of the
region carries labels; parameter matmuls missing from the table get name-rule labels.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graphlora import structure
from graphlora.labels import NodeLabels, graph_meta, set_labels
from graphlora.name_rules import WRAPPER_PREFIX
from graphlora.regions import name_label_for_linear, name_label_for_param


class LabelFromSiteTablePass(PassBase):
    name = "label_from_site_table"

    def __init__(self, table: dict[str, NodeLabels], prefix: str, towers: dict[str, int],
                 root: torch.nn.Module, head_paths: frozenset[str], stack_prefix: str = WRAPPER_PREFIX):
        super().__init__()
        self.table = table
        self.prefix = prefix
        self.towers = towers
        self.root = root
        self.head_paths = head_paths
        self.stack_prefix = stack_prefix

    def _global(self, relative: str) -> str:
        return f"{self.prefix}.{relative}" if relative else self.prefix

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        region = self.root.get_submodule(self.prefix)
        param_of = graph_meta(graph_module).param_placeholders(graph_module.graph)
        classes = {path: type(m) for path, m in region.named_modules()}
        matmuls = structure.trainable_matmuls(graph_module, param_of, self.stack_prefix, classes)
        for m in matmuls:
            weight = self._global(m.weight)
            if m.kind in ("linear", "param_linear") and m.site != m.weight:
                site = self._global(m.site)
                labels = self.table.get(site) or name_label_for_linear(self.root, site, self.head_paths)
            else:
                labels = name_label_for_param(self.root, weight, m.kind, self.head_paths)
            set_labels(m.node, dataclasses.replace(labels, kind=m.kind, weight=weight))
        graph_meta(graph_module).towers = dict(self.towers)
        graph_meta(graph_module).loss_outputs = None
        return PassResult(graph_module, bool(matmuls))
