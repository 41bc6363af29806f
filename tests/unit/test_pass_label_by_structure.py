"""label_by_structure: every trainable matmul of the toy gets component, role and layer from the graph's
dataflow (never from module names), and GraphMeta.towers counts each tower's blocks."""

import pytest
from torch.testing import FileCheck

from graphlora.labels import Component, Role, get_labels, graph_meta, labelled_nodes
from toy import BLOCK_ROLES, LINEAR, aten, count, expected_labels, labels_by_site, linear_modules, run_analysis

VARIANTS = {
    "default": {},
    "three vision layers": {"vision_layers": 3},
    "neutral vision names": {"vision_name": "encoder", "vision_class": "Encoder"},
    "x @ W projector": {"projector": "matmul"},
    "F.linear projector": {"projector": "functional"},
    "packed vision attention": {"packed_vision": True},
}


@pytest.mark.parametrize("fields", list(VARIANTS.values()), ids=list(VARIANTS))
def test_labels_follow_the_toys_wiring(make_toy, fields):
    toy = make_toy(**fields)
    assert not labelled_nodes(toy.gm.graph)
    [record] = run_analysis(toy, ["label_by_structure"])
    assert record.modified
    assert labels_by_site(toy.gm) == expected_labels(toy)
    # one labelled node per matmul call, and every nn.Linear of the model is among the sites
    assert len(labelled_nodes(toy.gm.graph)) == count(toy.gm, LINEAR) + count(toy.gm, aten.matmul.default)
    assert set(linear_modules(toy.model)) <= set(labels_by_site(toy.gm))
    assert graph_meta(toy.gm).towers == {"vision": toy.cfg.vision_layers, "language": toy.cfg.language_layers}


def test_only_matmuls_on_parameters_are_labelled(toy):
    """The attention's q k^T and probabilities @ v read no parameter: no labels; every labelled node is a linear."""
    run_analysis(toy, ["label_by_structure"])
    for node in toy.gm.graph.nodes:
        if get_labels(node) is not None:
            assert node.target == LINEAR, node.format_node()
        elif node.op == "call_function" and node.target == LINEAR:
            pytest.fail(f"unlabelled linear {node.format_node()}")


def test_graph_is_not_rewritten(toy):
    code = toy.gm.code
    run_analysis(toy, ["label_by_structure"])
    assert toy.gm.code == code
    FileCheck().check_count("aten.linear.default", len(expected_labels(toy)), exactly=True).run(code)


def test_names_do_not_decide(make_toy):
    """Renaming the vision tower to words the name rules do not know changes no label but the site paths."""
    plain, renamed = make_toy(), make_toy(vision_name="encoder", vision_class="Encoder")
    run_analysis(plain, ["label_by_structure"])
    run_analysis(renamed, ["label_by_structure"])

    def key(labels):
        return labels.component, labels.role, labels.layer, labels.kind

    assert [key(lab) for _, lab in labelled_nodes(plain.gm.graph)] == \
        [key(lab) for _, lab in labelled_nodes(renamed.gm.graph)]


def test_an_unreachable_vision_block_is_still_labelled_vision(make_toy):
    """Reachability is not a label: the last vision block feeds only an extra output and keeps its labels."""
    toy = make_toy(feature_layer=-2)
    run_analysis(toy, ["label_by_structure"])
    last = toy.cfg.vision_layers - 1
    labels = labels_by_site(toy.gm)
    block = {site: lab for site, lab in labels.items() if site.startswith(f"vision_tower.layers.{last}.")}
    assert len(block) == len(BLOCK_ROLES)
    assert {lab.component for lab in block.values()} == {Component.VISION}
    assert {lab.layer for lab in block.values()} == {last}
    assert labels["multi_modal_projector"].component == Component.PROJECTOR


def test_the_head_is_what_produces_the_logits(make_toy):
    """Without a loss output the head is still the matmul nearest the logits output."""
    toy = make_toy(with_loss=False)
    assert graph_meta(toy.gm).logits_outputs == [0]
    run_analysis(toy, ["label_by_structure"])
    heads = [lab.module for _, lab in labelled_nodes(toy.gm.graph) if lab.component == Component.HEAD]
    assert heads == ["lm_head"]
    assert labels_by_site(toy.gm)["lm_head"].role == Role.OTHER
