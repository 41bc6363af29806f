"""The module-name cross-check (graphlora/name_rules.py) on stacks of the families that name things their own way."""

from __future__ import annotations

import pytest

from graphlora.labels import Component, Role
from graphlora.name_rules import StackEntry, component_by_name, role_by_name


def stack(*entries: tuple[str, str]) -> list[StackEntry]:
    return [StackEntry(path, cls) for path, cls in entries]


@pytest.mark.parametrize("leaf", ["model.aligner.fc1", "model.aligner.hidden_layers.0"])
def test_janus_aligner_is_a_projector_although_its_class_says_vision(leaf):
    # JanusVisionAlignerMLP maps the vision features to the text width (an MLP whose layers sit in a ModuleList).
    s = stack(("model", "JanusModel"), ("model.aligner", "JanusVisionAlignerMLP"), (leaf, "Linear"))
    component = component_by_name(s, frozenset())
    assert component == Component.PROJECTOR
    assert role_by_name(s, component) == Role.OTHER
