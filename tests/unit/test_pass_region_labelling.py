"""label_from_site_table and apply_site_decisions: a block exported alone cannot tell towers or layers; its linears
get the whole model's labels (site names relative to the whole model) and the decisions made once for the whole
model, and the policy decides only the sites the tables lack."""

import pytest

from graphlora.labels import Component, Role, get_decision, graph_meta, labelled_nodes
from graphlora.pass_manager import PassManager
from graphlora.pipeline import Pipeline, head_paths
from graphlora.name_rules import component_by_name, role_by_name
from graphlora.regions import module_stack_of
from toy import BLOCK_ROLES, LINEAR, count, export_region, policy_of, prepare_transform, site_tables

BLOCKS = ["language_model.layers.1", "vision_tower.layers.0"]


def _tables(toy, policy=None):
    prepare_transform(toy, policy)
    return site_tables(toy.gm)


def _labelling(region, path, tables, policy=None):
    labels, decisions, towers = tables
    return Pipeline(policy_of(policy)).labelling(region.model, path, labels, decisions, towers)


def _run(passes, region, names):
    return PassManager([p for p in passes if p.name in names])(region.gm)


@pytest.mark.parametrize("path", BLOCKS)
def test_region_linears_get_the_whole_models_labels(toy, path):
    tables = _tables(toy)
    region = export_region(toy, path)
    assert not labelled_nodes(region.gm.graph)
    [record] = _run(_labelling(region, path, tables), region, {"label_from_site_table"})
    assert record.modified
    found = {labels.module: labels for _, labels in labelled_nodes(region.gm.graph)}
    assert len(found) == count(region.gm, LINEAR) == len(BLOCK_ROLES)
    assert found == {site: labels for site, labels in tables[0].items() if site.startswith(path + ".")}
    meta = graph_meta(region.gm)
    assert meta.towers == tables[2]
    assert meta.loss_outputs is None  # a block's output is no loss: every output counts


def _labels_without(toy, path, missing):
    labels, decisions, towers = _tables(toy)
    region = export_region(toy, path)
    passes = _labelling(region, path, ({k: v for k, v in labels.items() if k != missing}, decisions, towers))
    _run(passes, region, {"label_from_site_table"})
    [got] = [lab for _, lab in labelled_nodes(region.gm.graph) if lab.module == missing]
    return got


def test_a_linear_missing_from_the_table_gets_its_component_from_names(toy):
    path = "language_model.layers.1"
    missing = f"{path}.mlp.down_proj"
    got = _labels_without(toy, path, missing)
    assert (got.component, got.layer) == (Component.LANGUAGE, None)  # names know no layer
    assert (got.module, got.weight, got.kind) == (missing, missing + ".weight", "linear")


def test_a_linear_missing_from_the_table_gets_the_role_its_names_give(toy):
    path = "language_model.layers.1"
    missing = f"{path}.mlp.down_proj"
    stack = module_stack_of(toy.model, missing)
    by_names = role_by_name(stack, component_by_name(stack, head_paths(toy.model)))
    assert by_names == BLOCK_ROLES["down_proj"] == Role.MLP_DOWN  # what the name rules say of this Linear
    assert _labels_without(toy, path, missing).role == by_names


def test_decisions_come_from_the_whole_model_not_the_regions_policy(toy):
    path = "language_model.layers.1"
    tables = _tables(toy)  # decided with the default policy: every block linear adapted
    region = export_region(toy, path)
    other_policy = {"finetune_language_layers": False}  # would adapt nothing here
    passes = _labelling(region, path, tables, other_policy)
    [_, record] = _run(passes, region, {"label_from_site_table", "apply_site_decisions"})
    assert record.modified
    for node, labels in labelled_nodes(region.gm.graph):
        assert get_decision(node) == tables[1][labels.module]
        assert get_decision(node).targeted


def test_the_policy_decides_sites_the_decision_table_lacks(toy):
    path = "language_model.layers.1"
    labels, decisions, towers = _tables(toy)
    missing = f"{path}.self_attn.v_proj"
    region = export_region(toy, path)
    policy = {"rules": [{"match": {"name": r".*\.v_proj"}, "r": 4}]}
    passes = _labelling(region, path, (labels, {k: v for k, v in decisions.items() if k != missing}, towers), policy)
    _run(passes, region, {"label_from_site_table", "apply_site_decisions"})
    by_site = {lab.module: get_decision(n) for n, lab in labelled_nodes(region.gm.graph)}
    assert by_site[missing].targeted and by_site[missing].r == 4
    assert by_site[missing].reason == "finetune_language_layers and finetune_attention_modules"
    assert all(d == decisions[site] for site, d in by_site.items() if site != missing)
