"""insert_lora_branches: after each targeted linear, the fixed node sequence of docs/graph-format.md (cast_in,
dropout, lora_a, lora_b, scale, add, cast_out), tagged step by step, with placeholders for the LoRA matrices; the
program then computes the eager ``W + s B A``."""

import pytest
import torch
from torch.testing import FileCheck

from graphlora.errors import GraphLoraError
from graphlora.labels import (LORA_STEPS, PlaceholderKind, SiteDecision, get_base_node, get_decision, get_site_step,
                              graph_meta, labelled_nodes, set_decision)
from graphlora.pass_manager import PassManager
from toy import LINEAR, aten, count, merged_model, prepare_transform, transform_passes

POLICY = {"finetune_projector": True}


def _insert(toy, branches, policy=POLICY, training=False, refused=frozenset()):
    return PassManager(transform_passes(toy, branches, policy, training=training, fuse=False, refused=refused))(toy.gm)


def _targets(toy):
    return [(node, labels) for node, labels in labelled_nodes(toy.gm.graph) if get_decision(node).targeted]


def _counts(gm):
    return {op: count(gm, op) for op in (LINEAR, aten.to.dtype, aten.dropout.default, aten.mul.Tensor,
                                         aten.add.Tensor)}


def test_each_targeted_linear_gets_the_fixed_sequence(toy):
    branches = prepare_transform(toy, POLICY)
    targets = _targets(toy)
    assert {labels.module for _, labels in targets} == set(branches)
    before = _counts(toy.gm)

    [record] = _insert(toy, branches)

    assert record.modified
    t = len(targets)
    after = _counts(toy.gm)
    assert after[LINEAR] == before[LINEAR] + 2 * t
    assert after[aten.to.dtype] == before[aten.to.dtype] + 2 * t
    assert after[aten.dropout.default] == before[aten.dropout.default] + t
    assert after[aten.mul.Tensor] == before[aten.mul.Tensor] + t
    assert after[aten.add.Tensor] == before[aten.add.Tensor] + t
    FileCheck().check_count("torch.ops.aten.dropout.default", t, exactly=True).run(toy.gm.code)

    nodes = list(toy.gm.graph.nodes)
    for base, labels in targets:
        i = nodes.index(base)
        branch = nodes[i:i + len(LORA_STEPS)]  # right after the base linear, in order
        assert [get_site_step(n) for n in branch] == [(labels.module, step) for step in LORA_STEPS]
        assert {get_base_node(n) for n in branch} == {base.name}
        cast_in, dropout, _lora_a, _lora_b, scale, add, cast_out = branch[1:]
        assert cast_in.args[0] is base.args[0] and add.args == (base, scale)
        assert set(base.users) == {add}
        assert dropout.args[1:] == (0.0, False)
        assert scale.args[1] == branches[labels.module].scale
        for n in branch[1:]:
            assert isinstance(n.meta.get("val"), torch.Tensor), n.name
            assert n.meta["nn_module_stack"] == base.meta["nn_module_stack"]
        assert cast_out.meta["val"].shape == base.meta["val"].shape


def test_the_code_reads_in_step_order(toy):
    branches = prepare_transform(toy, POLICY)
    _insert(toy, branches)
    base = next(node for node, labels in _targets(toy) if labels.module == "language_model.layers.0.self_attn.q_proj")
    (FileCheck().check(f"{base.name} = torch.ops.aten.linear.default(")
     .check("torch.ops.aten.to.dtype(").check("torch.ops.aten.dropout.default(")
     .check("torch.ops.aten.linear.default(").check("p_language_model_layers_0_self_attn_q_proj_lora_a_weight")
     .check("torch.ops.aten.linear.default(").check("p_language_model_layers_0_self_attn_q_proj_lora_b_weight")
     .check("torch.ops.aten.mul.Tensor(").check(f"torch.ops.aten.add.Tensor({base.name},")
     .check("torch.ops.aten.to.dtype(").run(toy.gm.code))


def test_lora_matrices_become_parameter_placeholders_before_the_user_inputs(toy):
    branches = prepare_transform(toy, POLICY)
    _insert(toy, branches)
    meta = graph_meta(toy.gm)
    params = set(meta.param_placeholders(toy.gm.graph).values())
    for spec in branches.values():
        assert {spec.a_fqn, spec.b_fqn} <= params
    kinds = [meta.placeholders[n.name][0] for n in toy.gm.graph.nodes if n.op == "placeholder"]
    first_user = kinds.index(PlaceholderKind.USER)
    assert all(kind == PlaceholderKind.USER for kind in kinds[first_user:])
    assert len(toy.program.slots) == len(kinds)


def test_the_program_computes_w_plus_s_b_a(toy):
    branches = prepare_transform(toy, POLICY)
    base_out = toy.run()
    _insert(toy, branches)
    out = toy.run()
    with torch.no_grad():
        expected = merged_model(toy, branches)(**toy.inputs)
    torch.testing.assert_close(out["logits"], expected["logits"])
    torch.testing.assert_close(out["loss"], expected["loss"])
    assert (out["logits"] - base_out["logits"]).abs().max() > 1e-3  # the branches do change the output


def test_a_raw_parameter_matmul_gets_the_branch_too(make_toy):
    toy = make_toy(projector="matmul")
    branches = prepare_transform(toy, POLICY)
    assert branches["mm_input_projection_weight"].layout == "in_out"
    _insert(toy, branches)
    [base] = [n for n, lab in _targets(toy) if lab.module == "mm_input_projection_weight"]
    assert base.target == aten.matmul.default and get_site_step(base) == ("mm_input_projection_weight", "base")
    with torch.no_grad():
        expected = merged_model(toy, branches)(**toy.inputs)
    torch.testing.assert_close(toy.run()["logits"], expected["logits"], rtol=1e-4, atol=1e-4)


def test_training_programs_keep_the_sites_dropout(toy):
    policy = {**POLICY, "lora_dropout": 0.25}
    branches = prepare_transform(toy, policy)
    _insert(toy, branches, policy, training=True)
    dropouts = [n for n in toy.gm.graph.nodes if get_site_step(n) and get_site_step(n)[1] == "dropout"]
    assert len(dropouts) == len(branches)
    assert all(n.args[1:] == (0.25, True) for n in dropouts)


def test_nothing_targeted_leaves_the_graph_unchanged(toy):
    branches = prepare_transform(toy, POLICY)
    for node, _ in labelled_nodes(toy.gm.graph):
        set_decision(node, SiteDecision(False, "no site is targeted in this test"))
    code, placeholders = toy.gm.code, dict(graph_meta(toy.gm).placeholders)
    [record] = _insert(toy, branches)
    assert not record.modified
    assert toy.gm.code == code and graph_meta(toy.gm).placeholders == placeholders
    assert not any(get_site_step(n) for n in toy.gm.graph.nodes)


def test_a_refused_site_gets_no_branch(toy):
    """A site the policy chose but the rewrite refused (listed in skipped_sites) is passed over."""
    branches = prepare_transform(toy, POLICY)
    site = "multi_modal_projector"
    without = {name: spec for name, spec in branches.items() if name != site}
    _insert(toy, without, refused=frozenset({site}))
    sites = {get_site_step(n)[0] for n in toy.gm.graph.nodes if get_site_step(n)}
    assert sites == set(without)


def test_a_targeted_site_without_lora_parameters_is_an_error(toy):
    branches = prepare_transform(toy, POLICY)
    site = "multi_modal_projector"
    without = {name: spec for name, spec in branches.items() if name != site}
    with pytest.raises(GraphLoraError, match=f"this trace selects {site}, which got no LoRA parameters"):
        _insert(toy, without)
