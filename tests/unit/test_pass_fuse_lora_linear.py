"""fuse_lora_linear: each complete LoRA branch becomes one ``graphlora::lora_linear`` (branches reading the same x
share a ``lora_linear_group``), fused nodes keep the site's labels, GraphMeta.fusion lists every site with the
reason where one is left as it is, and the program computes what the unfused one did."""

import operator
from collections import defaultdict

import pytest
import torch
from torch.testing import FileCheck

from graphlora.labels import (FUSED_STEP, LORA_STEPS, clear_site_step, get_base_node, get_decision, get_fusion_group,
                              get_labels, get_site_step, graph_meta)
from graphlora.pass_manager import PassManager
from graphlora.passes.fuse_lora_linear_pass import FuseLoraLinearPass, collect_branches
from toy import LINEAR, aten, count, prepare_transform, transform_passes

POLICY = {"finetune_projector": True}
SINGLE = torch.ops.graphlora.lora_linear.default
GROUP = torch.ops.graphlora.lora_linear_group.default


def _inserted(toy, policy=POLICY, training=False):
    """The toy's graph after the analysis and insert_lora_branches; returns (branches, fuse pass)."""
    branches = prepare_transform(toy, policy)
    insert, fuse = transform_passes(toy, branches, policy, training=training, fuse=True)
    PassManager([insert])(toy.gm)
    return branches, fuse


def _groups_by_input(gm):
    """site lists of the branches, grouped by the node their base linear reads (what the pass should group)."""
    by_x = defaultdict(list)
    for steps in collect_branches(gm.graph).values():
        by_x[steps["base"].args[0]].append(get_site_step(steps["base"])[0])
    return list(by_x.values())


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if ".lora_" in n or n.startswith("lora_")}


def _forward_backward(toy):
    for p in _lora_params(toy.model).values():
        p.grad = None
    out = toy.run()
    out["loss"].backward()
    return out["logits"].detach(), {n: p.grad.clone() for n, p in _lora_params(toy.model).items()}


def test_branches_become_single_and_grouped_ops(toy):
    _, fuse = _inserted(toy)
    groups = _groups_by_input(toy.gm)
    singles = [g for g in groups if len(g) == 1]
    grouped = [g for g in groups if len(g) > 1]
    # the toy's wiring: q/k/v and gate/up read one input in every block
    assert len(grouped) == 2 * (toy.cfg.vision_layers + toy.cfg.language_layers)
    sites = sum(len(g) for g in groups)
    untargeted_linears = count(toy.gm, LINEAR) - 3 * sites  # base + lora_a + lora_b per branch

    [record] = PassManager([fuse])(toy.gm)

    assert record.modified
    assert count(toy.gm, SINGLE) == len(singles)
    assert count(toy.gm, GROUP) == len(grouped)
    assert count(toy.gm, operator.getitem) >= sum(len(g) for g in grouped)
    assert count(toy.gm, LINEAR) == untargeted_linears  # the head
    assert count(toy.gm, aten.dropout.default) == 0
    (FileCheck().check_count("torch.ops.graphlora.lora_linear_group.default(", len(grouped), exactly=True)
     .run(toy.gm.code))
    FileCheck().check_count("torch.ops.graphlora.lora_linear.default(", len(singles), exactly=True).run(toy.gm.code)
    FileCheck().check_not("aten.dropout").check_not("aten.randint").run(toy.gm.code)  # eval program: no seed

    report = graph_meta(toy.gm).fusion
    assert set(report) == {site for g in groups for site in g}
    for g in grouped:
        for site in g:
            assert report[site] == {"fused": True, "reason": f"grouped with {len(g) - 1} site(s) reading the same input"}
    for [site] in singles:
        assert report[site] == {"fused": True, "reason": "fused"}


def test_fused_nodes_keep_labels_and_decisions(toy):
    _, fuse = _inserted(toy)
    before = {get_site_step(steps["base"])[0]: (get_labels(steps["base"]), get_decision(steps["base"]), name)
              for name, steps in collect_branches(toy.gm.graph).items()}
    groups = {tuple(g) for g in _groups_by_input(toy.gm) if len(g) > 1}
    PassManager([fuse])(toy.gm)

    fused = [n for n in toy.gm.graph.nodes if get_site_step(n)]
    assert all(get_site_step(n)[1] == FUSED_STEP for n in fused)
    assert {get_site_step(n)[0] for n in fused} == set(before)
    for node in fused:
        site = get_site_step(node)[0]
        labels, decision, base_name = before[site]
        assert (get_labels(node), get_decision(node), get_base_node(node)) == (labels, decision, base_name)
    group_nodes = [n for n in toy.gm.graph.nodes if n.target == GROUP]
    assert {tuple(get_fusion_group(n)) for n in group_nodes} == groups
    for n in group_nodes:  # each output of a group is read by the getitem of the site at that index
        for user in n.users:
            assert get_site_step(user)[0] == get_fusion_group(n)[user.args[1]]


def test_fused_program_matches_the_unfused_one_forward_and_backward(toy):
    branches, fuse = _inserted(toy)
    for p in _lora_params(toy.model).values():
        assert p.requires_grad
    logits, grads = _forward_backward(toy)
    PassManager([fuse])(toy.gm)
    fused_logits, fused_grads = _forward_backward(toy)
    torch.testing.assert_close(fused_logits, logits)
    assert fused_grads.keys() == grads.keys() and len(grads) == 2 * len(branches)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], msg=name)
        assert grads[name].abs().sum() > 0, name


def test_training_with_dropout_draws_a_seed_per_fused_call(toy):
    policy = {**POLICY, "lora_dropout": 0.25}
    _, fuse = _inserted(toy, policy, training=True)
    PassManager([fuse])(toy.gm)
    calls = count(toy.gm, SINGLE) + count(toy.gm, GROUP)
    assert count(toy.gm, aten.randint.low) == calls
    FileCheck().check("aten.randint.low").check("graphlora.lora_linear").run(toy.gm.code)
    for n in toy.gm.graph.nodes:
        if n.target in (SINGLE, GROUP):
            assert n.args[6] == 0.25 and n.args[7].target == aten.randint.low
    torch.manual_seed(0)
    a = toy.run()["logits"]
    torch.manual_seed(0)
    b = toy.run()["logits"]
    torch.manual_seed(1)
    c = toy.run()["logits"]
    torch.testing.assert_close(a, b)  # the masks are a function of the drawn seeds
    assert (a - c).abs().max() > 1e-5


def test_a_raw_parameter_matmul_is_left_unfused_with_its_reason(make_toy):
    toy = make_toy(projector="matmul")
    _, fuse = _inserted(toy)
    PassManager([fuse])(toy.gm)
    entry = graph_meta(toy.gm).fusion["mm_input_projection_weight"]
    assert entry == {"fused": False, "reason": "its base op is aten.matmul.default (a raw parameter matmul), not a linear"}
    steps = [get_site_step(n)[1] for n in toy.gm.graph.nodes if get_site_step(n)
             and get_site_step(n)[0] == "mm_input_projection_weight"]
    assert steps == list(LORA_STEPS)  # its branch is still there, whole
    assert all(e["fused"] for site, e in graph_meta(toy.gm).fusion.items() if site != "mm_input_projection_weight")


def _branch_of(toy, site):
    [steps] = [s for s in collect_branches(toy.gm.graph).values() if get_site_step(s["base"])[0] == site]
    return steps


def test_an_incomplete_branch_is_not_fused_and_its_group_shrinks(toy):
    """An earlier pass left q_proj's branch without its dropout tag: q is reported, k and v still share an op."""
    _, fuse = _inserted(toy)
    site = "language_model.layers.0.self_attn.q_proj"
    clear_site_step(_branch_of(toy, site)["dropout"])
    fuse(toy.gm)  # alone: the pass manager's invariant check would (rightly) reject the broken branch itself
    report = graph_meta(toy.gm).fusion
    assert report[site] == {"fused": False, "reason": "the branch is incomplete (an earlier pass changed it)"}
    for sibling in ("k_proj", "v_proj"):
        assert report[f"language_model.layers.0.self_attn.{sibling}"] == \
            {"fused": True, "reason": "grouped with 1 site(s) reading the same input"}
    assert sum(1 for n in toy.gm.graph.nodes if get_site_step(n) and get_site_step(n)[0] == site) == len(LORA_STEPS) - 1


def test_a_rewired_branch_is_not_fused(toy):
    _, fuse = _inserted(toy)
    site = "language_model.layers.1.mlp.down_proj"
    steps = _branch_of(toy, site)
    with toy.gm.graph.inserting_after(steps["lora_a"]):
        relu = toy.gm.graph.call_function(aten.relu.default, (steps["lora_a"],))
    steps["lora_b"].replace_input_with(steps["lora_a"], relu)
    PassManager([fuse])(toy.gm)
    assert graph_meta(toy.gm).fusion[site] == {"fused": False, "reason": "the branch was rewired by an earlier pass"}
    assert count(toy.gm, aten.relu.default) == 1


@pytest.mark.parametrize("setting", ["autocast", "fuse=auto on cpu"])
def test_settings_that_fuse_nothing_leave_the_graph_unchanged(toy, setting):
    branches = prepare_transform(toy, POLICY)
    passes = transform_passes(toy, branches, POLICY, fuse="auto" if setting != "autocast" else True,
                              autocast=setting == "autocast")
    PassManager(passes[:1])(toy.gm)
    code = toy.gm.code
    [record] = PassManager(passes[1:])(toy.gm)
    assert not record.modified and toy.gm.code == code
    report = graph_meta(toy.gm).fusion
    assert set(report) == set(branches) and not any(e["fused"] for e in report.values())
    expected = "autocast is on" if setting == "autocast" else "fuse='auto' on cpu"
    assert all(e["reason"].startswith(expected) for e in report.values())
    assert isinstance(passes[1], FuseLoraLinearPass)


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "meta"])
def test_fuse_auto_leaves_branches_unfused_on_every_device_with_the_measured_reason(device_type):
    """``fuse="auto"`` fuses nowhere (the op was measured slower on CPU and on an H200); True fuses
    everywhere, False nowhere; the glue LoRA and the pipeline read the same rule."""
    from graphlora.fusion_default import fusion_skip_reason

    reason = fusion_skip_reason("auto", device_type)
    assert reason is not None and "fuse=True" in reason
    assert ("host cost" in reason) == (device_type != "cpu")
    assert fusion_skip_reason(True, device_type) is None
    assert fusion_skip_reason(False, device_type) == "fuse=False"


def test_glue_lora_on_meta_follows_fuse_auto():
    """Module-level LoRA of eager glue on the meta device: unfused under "auto", fused under True."""
    from graphlora.lora import AdapterSwitch, GlueLoraForward

    with torch.device("meta"):
        base = torch.nn.Linear(8, 6)
        base.lora_A = torch.nn.Linear(8, 2, bias=False)
        base.lora_B = torch.nn.Linear(2, 6, bias=False)
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    results = {}
    for fuse in ("auto", True):
        forward = GlueLoraForward(base, scale=1.0, dropout=0.0, switch=AdapterSwitch(), fuse=fuse)
        out = forward(torch.empty(3, 8, device="meta"))
        assert out.shape == (3, 6)
        results[fuse] = forward.last
    assert results["auto"]["fused"] is False and "host cost" in results["auto"]["reason"]
    assert results[True]["fused"] is True
