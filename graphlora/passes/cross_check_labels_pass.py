"""Cross-check the structural labels against module-name rules; record where they disagree.

Reads: the labels written by ``label_by_structure``, each node's module stack (names and classes) and
the model's output-embedding paths. Writes: the name-rule labels of every labelled node
(:func:`graphlora.labels.set_name_labels`), and
``GraphMeta.label_check`` = ``{"checked": n, "disagreements": [{site, structure,
names}, ...]}``. Guarantees: labels are unchanged — structure decides; disagreements are reported
(renamed or unseen architectures make name rules fail; a report says so instead of mis-targeting).
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graphlora.labels import graph_meta, labelled_nodes, set_name_labels
from graphlora.name_rules import WRAPPER_PREFIX, StackEntry, component_by_name, module_stack, role_by_name


class CrossCheckLabelsPass(PassBase):
    name = "cross_check_labels"

    def __init__(self, head_paths: frozenset[str], stack_prefix: str = WRAPPER_PREFIX):
        super().__init__()
        self.head_paths = head_paths
        self.stack_prefix = stack_prefix

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        disagreements = []
        seen = set()
        nodes = labelled_nodes(graph_module.graph)
        for node, labels in nodes:
            stack = module_stack(node.meta, self.stack_prefix)
            if labels.kind != "linear":
                # A parameter matmul: the parameter's name is the leaf name; a Linear's weight used by F.linear
                # (nn.MultiheadAttention's out_proj): the Linear's.
                leaf = StackEntry(labels.weight, "Parameter") if labels.module == labels.weight else \
                    StackEntry(labels.module, "Linear")
                stack = stack + [leaf]
            by_name_component = component_by_name(stack, self.head_paths)
            by_name_role = role_by_name(stack, by_name_component)
            set_name_labels(node, by_name_component, by_name_role)
            if (by_name_component, by_name_role) != (labels.component, labels.role) and labels.module not in seen:
                seen.add(labels.module)
                disagreements.append({
                    "site": labels.module,
                    "structure": [str(labels.component), str(labels.role)],
                    "names": [str(by_name_component), str(by_name_role)],
                })
        graph_meta(graph_module).label_check = {
            "checked": len({labels.module for _, labels in nodes}),
            "disagreements": disagreements,
        }
        return PassResult(graph_module, False)
