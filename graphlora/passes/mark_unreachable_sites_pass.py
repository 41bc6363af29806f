"""Mark targeted sites whose output can never reach the loss: they would train nothing.

Reads: the site decisions, the graph's output node and ``GraphMeta.loss_outputs``
(indices of the flat user outputs that carry the training signal: ``loss`` when the call has labels,
else ``logits``; all outputs when neither exists). Writes: ``SiteDecision(targeted=False,
skipped=True, reason=...)`` on targeted sites none of whose nodes is an ancestor of those outputs (for example
LLaVA's last CLIP layer when features are read from layer -2, or a pooling head whose result is
discarded). Guarantees: every site left targeted can receive a gradient through the graph.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graphlora.labels import SiteDecision, SkipCause, get_decision, graph_meta, labelled_nodes, set_decision
from graphlora.structure import ancestors


def live_nodes(graph_module: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes the training signal depends on: ancestors of the loss (or logits, or every) output."""
    output = graph_module.graph.output_node()
    flat = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    wanted = graph_meta(graph_module).loss_outputs
    roots = [flat[i] for i in wanted] if wanted else flat
    return ancestors([r for r in roots if isinstance(r, torch.fx.Node)])


class MarkUnreachableSitesPass(PassBase):
    name = "mark_unreachable_sites"

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        names = graph_meta(graph_module).loss_output_names
        live = live_nodes(graph_module)
        # A module called several times is one site: it is live when any of its calls is.
        nodes = labelled_nodes(graph_module.graph)
        live_sites = {labels.module for node, labels in nodes if node in live}
        modified = False
        for node, labels in nodes:
            decision = get_decision(node)
            if decision is None or not decision.targeted or labels.module in live_sites:
                continue
            set_decision(
                node,
                SiteDecision(
                    False,
                    f"its output never reaches {names}, so it can receive no gradient "
                    f"(chosen by: {decision.reason})",
                    r=decision.r,
                    alpha=decision.alpha,
                    dropout=decision.dropout,
                    skipped=True,
                    cause=SkipCause.UNREACHABLE,
                ),
            )
            modified = True
        return PassResult(graph_module, modified)
