"""plan_lora_sites: GraphMeta.site_plan has one entry per targeted or skipped site, in graph order, with the
shapes, owner and layout of its LoRA matrices, or why the site is refused; the graph is unchanged."""

from graphlora.labels import get_decision, graph_meta, labelled_nodes
from toy import BLOCK_ROLES, linear_modules, run_analysis, run_before

PLAN = ["plan_lora_sites"]


def _plan(toy, policy=None):
    run_before(toy, "plan_lora_sites", policy)
    code = toy.gm.code
    [record] = run_analysis(toy, PLAN, policy)
    assert not record.modified and toy.gm.code == code  # planning never rewrites
    return graph_meta(toy.gm).site_plan


def test_one_entry_per_targeted_site_in_graph_order(toy):
    plan = _plan(toy)
    targeted = [(labels, get_decision(node)) for node, labels in labelled_nodes(toy.gm.graph)
                if get_decision(node).targeted]
    assert [(e.labels, e.decision) for e in plan] == targeted
    linears = linear_modules(toy.model)
    for entry in plan:
        module = linears[entry.labels.module]
        assert (entry.in_features, entry.out_features) == (module.in_features, module.out_features)
        assert (entry.owner, entry.layout, entry.refusal) == (entry.labels.module, "out_in", None)


def test_skipped_sites_are_planned_without_an_owner(make_toy):
    toy = make_toy(feature_layer=-2)
    plan = _plan(toy)
    skipped = [e for e in plan if e.decision.skipped]
    assert len(skipped) == len(BLOCK_ROLES)
    assert all(e.owner == "" and e.refusal is None and not e.decision.targeted for e in skipped)
    assert len(plan) == sum(1 for node, _ in labelled_nodes(toy.gm.graph)
                            if get_decision(node).targeted or get_decision(node).skipped)


def test_a_raw_parameter_matmul_is_planned_on_its_owner(make_toy):
    """``x @ W`` with W [in, out] on the model itself: the root holds lora_A / lora_B, layout ``in_out``."""
    toy = make_toy(projector="matmul")
    [entry] = [e for e in _plan(toy, {"finetune_projector": True}) if e.labels.module == "mm_input_projection_weight"]
    in_features, out_features = toy.model.mm_input_projection_weight.shape
    assert (entry.in_features, entry.out_features) == (in_features, out_features)
    assert (entry.owner, entry.layout, entry.refusal) == ("", "in_out", None)


def test_f_linear_on_a_raw_parameter_is_refused_with_its_reason(make_toy):
    toy = make_toy(projector="functional")
    [entry] = [e for e in _plan(toy, {"finetune_projector": True}) if e.labels.module == "mm_projector_weight"]
    assert entry.decision.targeted
    assert entry.refusal == ("F.linear on parameter mm_projector_weight inside a ToyVLM (e.g. nn.MultiheadAttention's "
                             "packed in-projection): not supported yet")
    assert entry.owner == ""


def test_untargeted_sites_have_no_entry(toy):
    plan = _plan(toy, {"finetune_vision_layers": False})
    assert plan and not any(e.labels.module.startswith("vision_tower.") for e in plan)
    assert "lm_head" not in {e.labels.module for e in plan}
