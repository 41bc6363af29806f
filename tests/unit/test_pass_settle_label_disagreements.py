"""settle_label_disagreements: a disagreement between structure and names that changes what the policy selects on
a live linear is an error naming each linear, unless the policy settles it with trust_labels; disagreements that
change nothing, concern a linear that reaches no loss, or come from names that say nothing pass."""

import pytest

from graphlora.errors import LabelDisagreementError
from graphlora.labels import Component, get_decision, graph_meta, labelled_nodes
from toy import BLOCK_ROLES, run_analysis, run_before

NEUTRAL = {"vision_name": "encoder", "vision_class": "Encoder"}
SETTLE = ["settle_label_disagreements"]


def _state(toy):
    return [(node.name, labels, get_decision(node)) for node, labels in labelled_nodes(toy.gm.graph)]


def _settle(toy, policy):
    run_before(toy, "settle_label_disagreements", policy)
    before = _state(toy)
    return before, run_analysis(toy, SETTLE, policy)


def test_no_disagreement_nothing_to_do(toy):
    before, [record] = _settle(toy, {})
    assert not record.modified
    assert _state(toy) == before
    assert "trust_labels" not in graph_meta(toy.gm).label_check


def test_disagreements_that_change_no_selection_pass(make_toy):
    toy = make_toy(**NEUTRAL)
    before, [record] = _settle(toy, {})  # vision and language are both adapted: the names change nothing
    assert not record.modified and _state(toy) == before
    check = graph_meta(toy.gm).label_check
    assert check["trust_labels"] is None
    assert check["disagreements"] and not any(d["changes_selection"] for d in check["disagreements"])


def test_a_disagreement_that_changes_the_selection_is_an_error(make_toy):
    toy = make_toy(**NEUTRAL)
    policy = {"finetune_vision_layers": False}
    run_before(toy, "settle_label_disagreements", policy)
    vision = [lab.module for _, lab in labelled_nodes(toy.gm.graph) if lab.component == Component.VISION]
    with pytest.raises(LabelDisagreementError) as info:
        run_analysis(toy, SETTLE, policy)
    message = str(info.value)
    assert f"label {len(vision)} linear(s) differently" in message
    assert "structure says vision/attn.q, not adapted (finetune_vision_layers=False)" in message
    assert "names say language/attn.q, adapted" in message
    assert info.value.key_path == "trust_labels"
    assert all(d["changes_selection"] for d in graph_meta(toy.gm).label_check["disagreements"])


def test_only_live_linears_count(make_toy):
    """The encoder's last block reaches only an extra output: its disagreements change no gradient, so only the
    first block's linears are listed."""
    toy = make_toy(**NEUTRAL, feature_layer=-2)
    policy = {"finetune_vision_layers": False}
    run_before(toy, "settle_label_disagreements", policy)
    with pytest.raises(LabelDisagreementError) as info:
        run_analysis(toy, SETTLE, policy)
    listed = [line.split(":")[0].strip() for line in str(info.value).splitlines() if line.startswith("  encoder.")]
    assert listed and all(site.startswith("encoder.layers.0.") for site in listed)
    assert len(listed) == len(BLOCK_ROLES)


def test_trust_labels_names_relabels_and_redecides(make_toy):
    toy = make_toy(**NEUTRAL)
    policy = {"finetune_vision_layers": False, "trust_labels": "names"}
    _, [record] = _settle(toy, policy)
    assert record.modified
    assert graph_meta(toy.gm).label_check["trust_labels"] == "names"
    for _, labels, decision in _state(toy):
        if labels.module.startswith("encoder."):
            assert labels.component == Component.LANGUAGE
            assert labels.layer is None  # another tower: the vision layer index means nothing there
            assert decision.targeted and decision.reason.endswith("(labels by module names: trust_labels=names)")


def test_trust_labels_structure_keeps_the_structure(make_toy):
    toy = make_toy(**NEUTRAL)
    policy = {"finetune_vision_layers": False, "trust_labels": "structure"}
    before, [record] = _settle(toy, policy)
    assert not record.modified and _state(toy) == before
    assert all(d["changes_selection"] for d in graph_meta(toy.gm).label_check["disagreements"])


def test_names_that_say_nothing_do_not_conflict(make_toy):
    """The raw projector parameter's names say ``other``: the structure decides, although the choice differs."""
    toy = make_toy(projector="matmul")
    before, [record] = _settle(toy, {"finetune_projector": True})
    assert not record.modified and _state(toy) == before
    [entry] = graph_meta(toy.gm).label_check["disagreements"]
    assert entry["site"] == "mm_input_projection_weight" and entry["changes_selection"] is True
