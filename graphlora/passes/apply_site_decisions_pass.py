"""Write the site decisions made once for the whole model onto a region graph.

Reads: labelled nodes; a table site name -> :class:`SiteDecision` (made by
``select_lora_sites_pass.decide_sites`` over every site of the model, so rules are checked once);
the policy for sites the table lacks (parameter matmuls only visible inside a region graph). Writes: a
decision on every labelled node. Guarantees: a site gets the same decision in every region program.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graphlora.labels import SiteDecision, graph_meta, labelled_nodes, set_decision
from graphlora.passes.select_lora_sites_pass import decide_site
from graphlora.policy import Policy


class ApplySiteDecisionsPass(PassBase):
    name = "apply_site_decisions"

    def __init__(self, decisions: dict[str, SiteDecision], policy: Policy):
        super().__init__()
        self.decisions = decisions
        self.policy = policy

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        towers = graph_meta(graph_module).towers
        for node, labels in labelled_nodes(graph_module.graph):
            decision = self.decisions.get(labels.module)
            if decision is None:
                decision = decide_site(self.policy, labels, towers)[0]
            set_decision(node, decision)
        return PassResult(graph_module, True)
