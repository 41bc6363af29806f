"""Lower ``graphlora::segment_attention`` to eager ops in programs that run eagerly.

Reads: the graph's ``graphlora.segment_attention.default`` calls and their users. Writes: each call whose
log-sum-exp output (index 1) nothing reads gets ``graphlora.ops.segment_attention.segment_attention_eager``
as target: one sdpa per segment, with native autograd. Guarantees: the same outputs and gradients (the op
computes the same attention segment by segment); the op stays where the log-sum-exp is read.

Why: the op exists so that torch.export can trace a data-dependent split (docs/tracing.md, "Packed vision
attention"). Once a program is traced, running it eagerly needs no opaque op, and the op's dispatch and
Python backward cost about 0.4 ms per vision block per step on CPU (measured, docs/benchmarks.md). A
program that ``torch.compile`` compiles keeps the op (the pipeline does not run this pass there), since
the lowered call reads the segment lengths on the host.
"""

from __future__ import annotations

import operator

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

import graphlora.ops.segment_attention as segment_attention_ops

_OP = torch.ops.graphlora.segment_attention.default  # registered by the import above

class LowerSegmentAttentionPass(PassBase):
    name = "lower_segment_attention"

    @staticmethod
    def applies_to(graph_module: torch.fx.GraphModule) -> bool:
        """Whether the graph calls the op (the pipeline runs the pass only then: dumps show no empty stage)."""
        return any(n.op == "call_function" and n.target is _OP for n in graph_module.graph.nodes)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        lowered = 0
        for node in graph_module.graph.nodes:
            if node.op != "call_function" or node.target is not _OP:
                continue
            users = list(node.users)
            if any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in users):
                continue  # the log-sum-exp (or the whole tuple) is read: keep the op
            for unread in (u for u in users if u.args[1] != 0):
                graph_module.graph.erase_node(unread)
            node.target = segment_attention_ops.segment_attention_eager
            lowered += 1
        return PassResult(graph_module, lowered > 0)
