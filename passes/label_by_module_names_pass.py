"""Label every ``aten.linear`` with component, role and layer, from module paths and classes.

Reads: ``node.meta["nn_module_stack"]`` of each ``aten.linear`` node (present in non-strict export and
correct for every linear that came from an ``nn.Linear``), and the module paths of the model's output
head. Writes: :class:`graphlora.labels.NodeLabels` on every ``aten.linear`` node, and
``graph_module.meta["graphlora.towers"]`` = number of blocks per tower (vision, language).
Guarantees: every ``aten.linear`` node carries labels; ``layer`` is the position of the node's block
among its tower's blocks in execution (graph) order, so Mllama's local then global vision stacks
count as one sequence.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graphlora.labels import TOWER_OF_COMPONENT, NodeLabels, set_labels
from graphlora.name_rules import block_path, component_by_name, module_stack, role_by_name

LINEAR_TARGETS = (torch.ops.aten.linear.default,)


class LabelByModuleNamesPass(PassBase):
    name = "label_by_module_names"

    def __init__(self, head_paths: frozenset[str], stack_prefix: str = "m."):
        super().__init__()
        self.head_paths = head_paths
        self.stack_prefix = stack_prefix

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        block_order: dict[str, dict[str, int]] = {"vision": {}, "language": {}}
        pending = []
        for node in graph_module.graph.nodes:
            if node.op != "call_function" or node.target not in LINEAR_TARGETS:
                continue
            stack = module_stack(node.meta, self.stack_prefix)
            component = component_by_name(stack, self.head_paths)
            role = role_by_name(stack, component)
            module = stack[-1].path if stack else ""
            tower = TOWER_OF_COMPONENT.get(component)
            block = block_path(stack) if tower else None
            if block is not None:
                block_order[tower].setdefault(block, len(block_order[tower]))
            pending.append((node, component, role, module, tower, block))
        for node, component, role, module, tower, block in pending:
            layer = block_order[tower][block] if block is not None else None
            set_labels(node, NodeLabels(component, role, layer, module))
        graph_module.meta["graphlora.towers"] = {t: len(b) for t, b in block_order.items()}
        return PassResult(graph_module, bool(pending))
