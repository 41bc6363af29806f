"""Settle the linears on which the graph's structure and the module-name rules disagree: never silently.

Reads: ``GraphMeta.label_check`` and each labelled node's name labels (written by
``cross_check_labels``), the decisions of ``select_lora_sites``, the policy (``trust_labels``, flags,
rules) and ``GraphMeta.towers``. Writes: on every disagreement entry,
``changes_selection`` (whether the policy would choose the linear differently by its name labels), and on the
check ``trust_labels`` (the policy's choice, None when unset); with ``trust_labels: names``, the name labels and the decision they give on the
disagreeing nodes (the layer is kept when the tower is the same). Guarantees: with ``trust_labels`` unset,
no disagreement on a linear that reaches the loss changes what is selected, unless the names place the
linear in no component or give it no role where the graph shows one (neutral names say nothing: the
structure decides, with a warning): else
:class:`~graphlora.errors.LabelDisagreementError` lists each such linear, both labels, both decisions and
how to settle it. The planner warns about the disagreements that remain (they change nothing).
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graphlora.errors import LabelDisagreementError
from graphlora.labels import TOWER_OF_COMPONENT, Component, NodeLabels, Role, get_decision, get_name_labels, graph_meta, labelled_nodes, \
    set_decision, set_labels
from graphlora.passes.mark_unreachable_sites_pass import live_nodes
from graphlora.passes.select_lora_sites_pass import decide_site
from graphlora.policy import Policy

_SHOWN = 10


def name_labels_of(node: torch.fx.Node, labels: NodeLabels) -> NodeLabels | None:
    """The node's labels by module-name rules (``cross_check_labels`` wrote them), or None."""
    found = get_name_labels(node)
    if found is None:
        return None
    component, role = found
    same_tower = TOWER_OF_COMPONENT.get(component) == TOWER_OF_COMPONENT.get(labels.component)
    return dataclasses.replace(labels, component=component, role=role, layer=labels.layer if same_tower else None)


def _names_silent(labels: NodeLabels, by_name: NodeLabels) -> bool:
    """The names recognise nothing of what the linear is (no tower word, or no role where the graph shows one):
    an unseen architecture with neutral names, where the structure decides (with a warning), not a conflict."""
    return by_name.component == Component.OTHER or (by_name.role == Role.OTHER and labels.role != Role.OTHER)


def _verdict(targeted: bool, reason: str) -> str:
    return f"{'adapted' if targeted else 'not adapted'} ({reason})"


class SettleLabelDisagreementsPass(PassBase):
    name = "settle_label_disagreements"

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        check = graph_meta(graph_module).label_check
        entries = {d["site"]: d for d in check.get("disagreements", [])}
        if not entries:
            return PassResult(graph_module, False)
        towers = graph_meta(graph_module).towers
        trust = self.policy.trust_labels
        check["trust_labels"] = trust
        live = live_nodes(graph_module) if trust is None else set()
        live_sites = {labels.module for node, labels in labelled_nodes(graph_module.graph) if node in live}
        conflicts, conflicting, modified = [], set(), False
        for node, labels in labelled_nodes(graph_module.graph):
            entry = entries.get(labels.module)
            by_name = name_labels_of(node, labels) if entry is not None else None
            if by_name is None:
                continue
            decision = get_decision(node)
            by_name_decision, _ = decide_site(self.policy, by_name, towers)
            entry["changes_selection"] = bool(decision and decision.targeted) != by_name_decision.targeted
            if trust == "names":
                set_labels(node, by_name)
                set_decision(node, dataclasses.replace(by_name_decision, reason=f"{by_name_decision.reason} "
                                                       "(labels by module names: trust_labels=names)"))
                modified = True
            elif trust is None and entry["changes_selection"] and labels.module in live_sites \
                    and not _names_silent(labels, by_name) and labels.module not in conflicting:
                conflicting.add(labels.module)
                conflicts.append((labels.module, labels, decision, by_name, by_name_decision))
        if conflicts:
            lines = [f"  {site}: structure says {lab.component}/{lab.role}, {_verdict(bool(d and d.targeted), d.reason if d else 'not decided')}; "
                     f"names say {by.component}/{by.role}, {_verdict(bd.targeted, bd.reason)}"
                     for site, lab, d, by, bd in conflicts[:_SHOWN]]
            more = f"\n  ... and {len(conflicts) - _SHOWN} more" if len(conflicts) > _SHOWN else ""
            example = re.escape(conflicts[0][0])
            raise LabelDisagreementError(
                f"the graph's structure and the module names label {len(conflicts)} linear(s) differently, and it "
                "changes what this policy selects:\n" + "\n".join(lines) + more + "\n"
                "Settle it in the policy: a rule for the linear (e.g. rules: [{match: {name: '" + example + "'}, "
                "target: true}] or target: false), or trust_labels: structure (the dataflow labels, graphlora's "
                "default reading) or trust_labels: names. `graphlora explain` shows both labels.",
                key_path="trust_labels",
            )
        return PassResult(graph_module, modified)
