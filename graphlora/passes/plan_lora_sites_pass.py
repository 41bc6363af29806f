"""Plan the LoRA sites: one entry per targeted site, with the shapes and owner of its LoRA matrices.

Reads: the labels and decisions of every labelled matmul (a module called several times has several
nodes: the targeted one decides), the activation and output shapes of its node, and the model the
graph was traced from (parameter owners, for refusal messages). Writes:
``GraphMeta.site_plan``: a list of :class:`SitePlan`, in graph order, one per site
that is targeted or skipped; a site the policy chose that cannot carry LoRA yet (an expert matmul,
``nn.MultiheadAttention``'s packed in-projection ...) has ``refusal`` set. Guarantees: the graph is
unchanged; every targeted site of the graph has exactly one entry.

The planner attaches LoRA parameters from this plan (graphlora/site_attacher.py): sites are decided once,
from the whole-model analysis graph, and every program of the model then reads the same table.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graphlora.labels import NodeLabels, SiteDecision, get_decision, graph_meta, labelled_nodes
from graphlora.lora import EXPERT_HOLDER

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """What LoRA one site gets: labels, the decision, ``in``/``out`` features and where A and B live.

    ``owner``: the module that holds ``lora_A`` / ``lora_B`` (the Linear, or the module owning a raw
    parameter); ``layout``: ``out_in`` (``y = x W^T``) or ``in_out`` (``y = x W``); ``refusal``: why the
    site cannot be adapted (``None`` if it can).
    """

    labels: NodeLabels
    decision: SiteDecision
    in_features: int
    out_features: int
    owner: str = ""
    layout: str = "out_in"
    refusal: str | None = None


def lora_owner(root: torch.nn.Module, node: torch.fx.Node, labels: NodeLabels) -> tuple[str, str, str | None]:
    """(module that holds the LoRA parameters, weight layout, refusal reason or None) for a site."""
    if labels.kind == "linear":
        return labels.module, "out_in", None
    if labels.kind == "expert_matmul":
        # Parameter-level LoRA on the expert tensor (PEFT's target_parameters): A and B live in a holder module
        # next to the parameter, one per expert parameter of the module.
        owner, _, attr = labels.weight.rpartition(".")
        module = root.get_submodule(owner) if owner else root
        layout = "experts_t" if getattr(module, "is_transposed", False) else "experts"
        return f"{owner + '.' if owner else ''}{EXPERT_HOLDER}.{attr}", layout, None
    if labels.kind == "param_slice":
        return "", "", (f"a matmul on a slice of the packed parameter {labels.weight} inside a "
                        f"{_class_of(root, labels.weight)} (e.g. nn.MultiheadAttention's in-projection when query and "
                        "key differ): LoRA on a packed parameter is not supported yet")
    if labels.kind == "param_linear":
        return "", "", (f"F.linear on parameter {labels.weight} inside a {_class_of(root, labels.weight)} "
                        "(e.g. nn.MultiheadAttention's packed in-projection): not supported yet")
    # A raw parameter matmul: y = x @ W (W [in, out]) or x @ W^T.
    weight_arg = node.args[1]
    if weight_arg.op == "placeholder":
        layout = "in_out"
    elif weight_arg.op == "call_function" and weight_arg.target in (aten.t.default, aten.transpose.int) \
            and weight_arg.args[0].op == "placeholder":
        layout = "out_in"
    else:
        return "", "", f"a matmul whose weight {labels.weight} is not the right-hand operand (x @ W): not supported yet"
    return labels.weight.rpartition(".")[0], layout, None


def _class_of(root: torch.nn.Module, param_fqn: str) -> str:
    owner = param_fqn.rpartition(".")[0]
    try:
        return type(root.get_submodule(owner)).__name__ if owner else type(root).__name__
    except AttributeError:
        return "module"


class PlanLoraSitesPass(PassBase):
    name = "plan_lora_sites"

    def __init__(self, root: torch.nn.Module):
        super().__init__()
        self.root = root

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        by_site: dict[str, list] = {}
        for node, labels in labelled_nodes(graph_module.graph):
            by_site.setdefault(labels.module, []).append((node, labels, get_decision(node)))
        plan = []
        for entries in by_site.values():
            node, labels, decision = next(((n, lab, d) for n, lab, d in entries if d is not None and d.targeted),
                                          entries[0])
            if decision is None or not (decision.targeted or decision.skipped):
                continue
            in_features = int(node.args[0].meta["val"].shape[-1])
            out_features = int(node.meta["val"].shape[-1])
            owner, layout, refusal = lora_owner(self.root, node, labels) if decision.targeted else ("", "", None)
            plan.append(SitePlan(labels, decision, in_features, out_features, owner, layout or "out_in", refusal))
        graph_meta(graph_module).site_plan = plan
        return PassResult(graph_module, False)
