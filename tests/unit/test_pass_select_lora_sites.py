"""select_lora_sites: a decision on every labelled node from the policy's flags, layer selections, target_modules
and rules; an error, and no decision written, when the policy selects nothing or a rule matches nothing."""

import pytest

from graphlora.errors import NoSitesSelectedError, PolicyError
from graphlora.labels import Component, get_decision, labelled_nodes
from toy import BLOCK_ROLES, run_analysis, run_before

SELECT = ["select_lora_sites"]


def _decisions(toy):
    return {labels.module: (labels, get_decision(node)) for node, labels in labelled_nodes(toy.gm.graph)}


def _targeted(toy):
    return {site for site, (_, d) in _decisions(toy).items() if d.targeted}


def _select(toy, policy):
    run_before(toy, "select_lora_sites", policy)
    return run_analysis(toy, SELECT, policy)


def test_default_policy_targets_every_block_linear(toy):
    [record] = _select(toy, {})
    assert record.modified
    decisions = _decisions(toy)
    assert all(d is not None for _, d in decisions.values())
    in_blocks = {site for site, (lab, _) in decisions.items() if lab.layer is not None}
    assert len(in_blocks) == len(BLOCK_ROLES) * (toy.cfg.vision_layers + toy.cfg.language_layers)
    assert _targeted(toy) == in_blocks
    for site in in_blocks:
        d = decisions[site][1]
        assert (d.r, d.alpha, d.dropout) == (16, 16.0, 0.0)
        assert not d.skipped and d.cause is None
    projector, head = decisions["multi_modal_projector"][1], decisions["lm_head"][1]
    assert projector.reason == "finetune_projector=False"
    assert not head.targeted and "head" in head.reason


def test_flags_and_layer_selections(toy):
    _select(toy, {"finetune_vision_layers": False, "finetune_projector": True, "language_layers": "-1:",
                  "finetune_mlp_modules": False})
    decisions = _decisions(toy)
    last = toy.cfg.language_layers - 1
    expected = {site for site, (lab, _) in decisions.items()
                if lab.component == Component.PROJECTOR
                or (lab.component == Component.LANGUAGE and lab.layer == last and lab.role.is_attention)}
    assert _targeted(toy) == expected
    for lab, d in decisions.values():
        if lab.component == Component.VISION:
            assert d.reason == "finetune_vision_layers=False"
        elif lab.component == Component.LANGUAGE and lab.role.is_mlp:  # flags decide before layer selections
            assert d.reason == "finetune_mlp_modules=False"
        elif lab.component == Component.LANGUAGE and lab.layer != last:
            assert d.reason == f"language_layers='-1:' excludes layer {lab.layer}"


def test_rules_override_flags_in_order(toy):
    _select(toy, {"rules": [
        {"match": {"role": "attn.v"}, "r": 4, "alpha": 8.0},
        {"match": {"component": "head"}, "target": True, "dropout": 0.1},
        {"match": {"component": "vision", "layers": [0]}, "target": False},
    ]})
    decisions = _decisions(toy)
    for site, (lab, d) in decisions.items():
        if lab.component == Component.VISION and lab.layer == 0:
            assert not d.targeted and d.reason == "rules[2] (target: false)", site
            continue
        if lab.component == Component.HEAD:
            assert d.targeted and d.reason == "rules[1] (target: true)" and d.dropout == 0.1
        if d.targeted and lab.role == "attn.v":
            assert (d.r, d.alpha) == (4, 8.0), site
        elif d.targeted:
            assert (d.r, d.alpha) == (16, 16.0), site


def test_target_modules_narrows_the_flags(toy):
    _select(toy, {"target_modules": ["q_proj"]})
    decisions = _decisions(toy)
    assert _targeted(toy) == {site for site in decisions if site.endswith(".q_proj")}
    assert decisions["language_model.layers.0.self_attn.k_proj"][1].reason == \
        "target_modules=['q_proj'] does not select language_model.layers.0.self_attn.k_proj"


def test_a_policy_that_selects_nothing_raises_and_writes_nothing(toy):
    run_before(toy, "select_lora_sites")
    code = toy.gm.code
    with pytest.raises(NoSitesSelectedError, match="selects no LoRA site") as info:
        run_analysis(toy, SELECT, {"finetune_vision_layers": False, "finetune_language_layers": False})
    assert "finetune_vision_layers=False" in str(info.value) and "finetune_language_layers=False" in str(info.value)
    assert all(get_decision(node) is None for node, _ in labelled_nodes(toy.gm.graph))
    assert toy.gm.code == code


def test_a_rule_that_matches_no_site_is_an_error(toy):
    run_before(toy, "select_lora_sites")
    with pytest.raises(PolicyError, match=r"rules\[0\]: matches no LoRA site") as info:
        run_analysis(toy, SELECT, {"rules": [{"match": {"component": "cross_attention"}, "target": True}]})
    assert info.value.key_path == "rules[0]"
    assert all(get_decision(node) is None for node, _ in labelled_nodes(toy.gm.graph))
    # ... unless it says so
    [record] = run_analysis(toy, SELECT, {"rules": [{"match": {"component": "cross_attention"}, "target": True,
                                                      "allow_unmatched": True}]})
    assert record.modified and _targeted(toy)
