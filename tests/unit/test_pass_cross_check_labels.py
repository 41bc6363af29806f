"""cross_check_labels: writes the module-name labels of every labelled node and GraphMeta.label_check, and
never changes the structural labels."""

from graphlora.labels import Component, get_name_labels, graph_meta, labelled_nodes
from toy import BLOCK_ROLES, labels_by_site, run_analysis


def _structural(gm):
    return [(node.name, labels) for node, labels in labelled_nodes(gm.graph)]


def test_names_agree_with_structure_on_the_toy(toy):
    run_analysis(toy, ["label_by_structure"])
    before = _structural(toy.gm)
    [record] = run_analysis(toy, ["cross_check_labels"])
    assert not record.modified
    check = graph_meta(toy.gm).label_check
    assert check == {"checked": len(labels_by_site(toy.gm)), "disagreements": []}
    for node, labels in labelled_nodes(toy.gm.graph):
        assert get_name_labels(node) == (labels.component, labels.role), node.name
    assert _structural(toy.gm) == before


def test_neutral_tower_names_are_reported_not_applied(make_toy):
    """A vision tower called ``encoder`` (class ``Encoder``): the names place its blocks in the language model;
    every such site is listed once, the labels stay the structure's."""
    toy = make_toy(vision_name="encoder", vision_class="Encoder")
    run_analysis(toy, ["label_by_structure"])
    before = _structural(toy.gm)
    run_analysis(toy, ["cross_check_labels"])

    labels = labels_by_site(toy.gm)
    vision_sites = [site for site, lab in labels.items() if lab.component == Component.VISION]
    assert len(vision_sites) == len(BLOCK_ROLES) * toy.cfg.vision_layers
    disagreements = graph_meta(toy.gm).label_check["disagreements"]
    assert [d["site"] for d in disagreements] == vision_sites
    for d in disagreements:
        assert d["structure"] == ["vision", str(labels[d["site"]].role)]
        assert d["names"] == ["language", str(labels[d["site"]].role)]
    assert graph_meta(toy.gm).label_check["checked"] == len(labels)
    assert _structural(toy.gm) == before


def test_a_raw_parameter_is_checked_by_its_parameter_name(make_toy):
    """``x @ mm_input_projection_weight`` on the model itself: no tower or projector word in the path, so the names
    say ``other`` where the dataflow says projector."""
    toy = make_toy(projector="matmul")
    run_analysis(toy, ["label_by_structure", "cross_check_labels"])
    [entry] = graph_meta(toy.gm).label_check["disagreements"]
    assert entry == {"site": "mm_input_projection_weight", "structure": ["projector", "other"],
                     "names": ["other", "other"]}
