"""Decide, for every labelled matmul, whether it gets LoRA and with which r / alpha / dropout.

Reads: the labels (component, role, layer, module) and ``GraphMeta.towers``;
the :class:`graphlora.policy.Policy`. Writes: a :class:`graphlora.labels.SiteDecision` on every
labelled node, whose ``reason`` names the flag, key or rule that decided. Guarantees: at least one
node is targeted (else :class:`NoSitesSelectedError` naming the flags that excluded everything);
every rule matched at least one LoRA site (a rule with ``target`` set: at least one linear) unless
it says ``allow_unmatched`` (else :class:`PolicyError` with the rule's key path). Semantics: see the docstring of graphlora/policy/schema.py.
"""

from __future__ import annotations

import collections
import re

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graphlora.adapters.peft_compat import matches_module_suffix
from graphlora.errors import NoSitesSelectedError, PolicyError
from graphlora.labels import TOWER_OF_COMPONENT, Component, NodeLabels, SiteDecision, graph_meta, labelled_nodes, set_decision
from graphlora.policy import Policy, Rule, resolve_layers


def _layers_of(selection, tower: str | None, towers: dict[str, int]) -> set[int] | None:
    if selection is None or tower is None:
        return None
    return set(resolve_layers(selection, towers.get(tower, 0)))


def _target_modules_keep(policy: Policy, module: str) -> bool:
    tm = policy.target_modules
    if tm == "all-linear":
        return True
    if isinstance(tm, list):
        return any(matches_module_suffix(module, name) for name in tm)
    return re.fullmatch(tm, module) is not None


def _flags_decide(policy: Policy, labels: NodeLabels) -> tuple[bool, str]:
    """(chosen, reason) from the component/role flags alone."""
    comp, role = labels.component, labels.role
    if comp == Component.PROJECTOR:
        return policy.finetune_projector, f"finetune_projector={policy.finetune_projector}"
    if comp == Component.HEAD:
        return False, "the output head is never chosen by flags (add a rule with target: true)"
    if comp == Component.OTHER:
        return False, "outside the vision tower, projector and language model (component other)"
    if comp == Component.CROSS_ATTENTION:
        if policy.finetune_cross_attention is not None:
            return policy.finetune_cross_attention, f"finetune_cross_attention={policy.finetune_cross_attention}"
        if not policy.finetune_language_layers:
            return False, "finetune_language_layers=False (cross-attention follows it)"
        if not policy.finetune_attention_modules:
            return False, "finetune_attention_modules=False (cross-attention follows it)"
        return True, "finetune_language_layers and finetune_attention_modules (cross-attention)"
    tower_flag = "finetune_vision_layers" if comp == Component.VISION else "finetune_language_layers"
    if not getattr(policy, tower_flag):
        return False, f"{tower_flag}=False"
    if role.is_attention:
        if not policy.finetune_attention_modules:
            return False, "finetune_attention_modules=False"
        return True, f"{tower_flag} and finetune_attention_modules"
    if role.is_mlp:
        if not policy.finetune_mlp_modules:
            return False, "finetune_mlp_modules=False"
        return True, f"{tower_flag} and finetune_mlp_modules"
    return False, f"role other: neither an attention nor an MLP linear of the {comp} tower"


def _rule_matches(rule: Rule, labels: NodeLabels, towers: dict[str, int]) -> bool:
    m = rule.match
    if m.component is not None:
        wanted = [m.component] if isinstance(m.component, str) else m.component
        if str(labels.component) not in wanted:
            return False
    if m.role is not None:
        wanted = [m.role] if isinstance(m.role, str) else m.role
        if str(labels.role) not in wanted:
            return False
    if m.layers is not None:
        tower = TOWER_OF_COMPONENT.get(labels.component)
        if tower is None or labels.layer is None:
            return False
        if labels.layer not in set(resolve_layers(m.layers, towers.get(tower, 0))):
            return False
    if m.name is not None and re.fullmatch(m.name, labels.module) is None:
        return False
    return True


def decide_site(policy: Policy, labels: NodeLabels, towers: dict[str, int]) -> tuple[SiteDecision, list[int]]:
    """The decision for one labelled node and the indices of the rules that matched it."""
    chosen, reason = _flags_decide(policy, labels)
    if chosen:
        tower = TOWER_OF_COMPONENT.get(labels.component)
        key = {"vision": "vision_layers", "language": "language_layers"}.get(tower or "")
        keep = _layers_of(getattr(policy, key) if key else None, tower, towers)
        if keep is not None and labels.layer not in keep:
            chosen, reason = False, f"{key}={getattr(policy, key)!r} excludes layer {labels.layer}"
    if chosen and not _target_modules_keep(policy, labels.module):
        chosen, reason = False, f"target_modules={policy.target_modules!r} does not select {labels.module}"
    r, alpha, dropout = policy.r, policy.lora_alpha, policy.lora_dropout
    matched = []
    for i, rule in enumerate(policy.rules):
        if not _rule_matches(rule, labels, towers):
            continue
        matched.append(i)
        if rule.target is not None:
            chosen, reason = rule.target, f"rules[{i}] (target: {str(rule.target).lower()})"
        r = rule.r if rule.r is not None else r
        alpha = rule.alpha if rule.alpha is not None else alpha
        dropout = rule.dropout if rule.dropout is not None else dropout
    if not chosen:
        return SiteDecision(False, reason), matched
    return SiteDecision(True, reason, r=r, alpha=alpha, dropout=dropout), matched


def decide_sites(policy: Policy, items: list[NodeLabels], towers: dict[str, int]) -> list[SiteDecision]:
    """Decisions for ``items`` (in order), checking the policy against the whole set.

    Raises :class:`PolicyError` for a rule that affects no site (unless ``allow_unmatched``) and
    :class:`NoSitesSelectedError` naming the flags that excluded everything.
    """
    rule_hits = collections.Counter()  # rule index -> LoRA sites it affected
    rule_seen = collections.Counter()  # rule index -> linears it matched at all
    excluded = collections.Counter()
    decisions = []
    for labels in items:
        decision, matched = decide_site(policy, labels, towers)
        rule_seen.update(matched)
        # A rule that only sets r/alpha/dropout counts where the site ends up adapted.
        rule_hits.update(i for i in matched if policy.rules[i].target is not None or decision.targeted)
        decisions.append(decision)
        if not decision.targeted:
            excluded[(str(labels.component), decision.reason)] += 1
    for i, rule in enumerate(policy.rules):
        if rule_hits[i] == 0 and not rule.allow_unmatched:
            what = (f"it matches {rule_seen[i]} linear(s), none of which gets LoRA" if rule_seen[i]
                    else "it matches no linear of this model")
            raise PolicyError(
                f"rules[{i}]: matches no LoRA site: {what} (match: {rule.match.model_dump(exclude_none=True)}); "
                "fix the rule or set allow_unmatched: true",
                key_path=f"rules[{i}]",
            )
    if not any(d.targeted for d in decisions):
        detail = "; ".join(f"{n} {comp} linear(s): {why}" for (comp, why), n in sorted(excluded.items()))
        raise NoSitesSelectedError(
            f"the policy selects no LoRA site among {len(items)} linears. Excluded: {detail or 'no linears found'}"
        )
    return decisions


class SelectLoraSitesPass(PassBase):
    name = "select_lora_sites"

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        towers = graph_meta(graph_module).towers
        nodes = labelled_nodes(graph_module.graph)
        decisions = decide_sites(self.policy, [labels for _, labels in nodes], towers)
        for (node, _), decision in zip(nodes, decisions):
            set_decision(node, decision)
        return PassResult(graph_module, True)
