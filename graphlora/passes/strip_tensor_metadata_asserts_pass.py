"""Remove ``aten._assert_tensor_metadata`` nodes.

Reads: the graph. Writes: removes every ``_assert_tensor_metadata`` call (export's training IR records
the dtype and device each ``.to()`` saw while tracing; they would make a program fail after
``model.to(torch.bfloat16)`` or under autocast although the ops themselves are dtype-generic).
Guarantees: no node of the graph asserts a dtype or device.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult


class StripTensorMetadataAssertsPass(PassBase):
    name = "strip_tensor_metadata_asserts"

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        target = torch.ops.aten._assert_tensor_metadata.default
        removed = 0
        for node in list(graph_module.graph.nodes):
            if node.op == "call_function" and node.target == target and not node.users:
                graph_module.graph.erase_node(node)
                removed += 1
        return PassResult(graph_module, removed > 0)
