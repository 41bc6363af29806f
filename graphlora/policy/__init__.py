"""Policies: the schema (:mod:`graphlora.policy.schema`) and, re-exported here, the public names."""

from graphlora.policy.schema import LayerSelection, Policy, Rule, RuleMatch, parse_layer_selection, resolve_layers

__all__ = [
    "LayerSelection",
    "Policy",
    "Rule",
    "RuleMatch",
    "parse_layer_selection",
    "resolve_layers",
]
