"""Per-component learning rates: optimizer groups hold exactly the intended parameters."""

from __future__ import annotations

import pytest
import torch

import graphlora
from graphlora.param_groups import ParamGroupError

FULL = dict(finetune_vision_layers=True, finetune_language_layers=True, finetune_projector=True)


@pytest.fixture
def llava(tiny):
    model, inputs = tiny("llava")
    return graphlora.rewrite(model, dict(FULL, modules_to_save=["lm_head"]), inputs), inputs


def _expected(lora_model) -> dict[str, set[int]]:
    """Per component, the ids of its sites' LoRA matrices (from the sites, independently of param_groups)."""
    out: dict[str, set[int]] = {}
    for site in lora_model.sites:
        module = lora_model.get_submodule(site.module)
        out.setdefault(site.component, set()).update({id(module.lora_A.weight), id(module.lora_B.weight)})
    return out


def test_groups_hold_exactly_each_components_lora_and_the_modules_to_save_copies(llava):
    lora_model, _ = llava
    groups = lora_model.param_groups(lr=2e-4, vision_lr=2e-5, projector_lr=1e-4)
    by_name = {g["name"]: g for g in groups}
    expected = _expected(lora_model)
    assert set(by_name) == set(expected) | {"modules_to_save"}
    assert {"vision", "projector", "language"} <= set(expected)
    for component, ids in expected.items():
        assert {id(p) for p in by_name[component]["params"]} == ids, component
    head_copy = {id(p) for p in lora_model.get_submodule("lm_head").parameters()}
    assert {id(p) for p in by_name["modules_to_save"]["params"]} == head_copy
    assert by_name["vision"]["lr"] == 2e-5 and by_name["projector"]["lr"] == 1e-4
    assert by_name["language"]["lr"] == 2e-4 and by_name["modules_to_save"]["lr"] == 2e-4
    every = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in lora_model.parameters() if p.requires_grad}
    assert len(every) == len(set(every)) and set(every) == trainable


def test_an_optimizer_over_the_groups_steps_each_component_at_its_rate(llava):
    lora_model, inputs = llava
    optimizer = torch.optim.SGD(lora_model.param_groups(lr=1e-2, vision_lr=0.0), lr=1e-2)
    vision = [p for g in optimizer.param_groups if g["name"] == "vision" for p in g["params"]]
    language = [p for g in optimizer.param_groups if g["name"] == "language" for p in g["params"]]
    before = [p.detach().clone() for p in vision + language]
    lora_model.train()
    lora_model(**inputs).loss.backward()
    optimizer.step()
    moved = [not torch.equal(b, p) for b, p in zip(before, vision + language)]
    assert not any(moved[:len(vision)]), "vision_lr=0 must leave the vision LoRA unchanged"
    assert any(moved[len(vision):]), "the language LoRA must move"


def test_rates_for_missing_or_unknown_groups_are_errors(tiny):
    model, inputs = tiny("llava")
    language_only = graphlora.rewrite(model, dict(finetune_vision_layers=False, finetune_language_layers=True), inputs)
    with pytest.raises(ParamGroupError, match=r"vision, which has no trainable parameters.*groups with parameters: "
                                              r"language"):
        language_only.param_groups(lr=1e-4, vision_lr=1e-5)
    with pytest.raises(ParamGroupError, match=r"unknown groups \['vison'\]; the groups are vision, "):
        language_only.param_groups(lr=1e-4, vison_lr=1e-5)
    with pytest.raises(TypeError, match="'vision_rate'"):
        language_only.param_groups(lr=1e-4, vision_rate=1e-5)


def test_graphlora_trainer_builds_its_optimizer_from_the_component_rates(llava, tmp_path):
    from transformers import TrainingArguments

    from graphlora.integrations import GraphLoraTrainer

    lora_model, _ = llava
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, weight_decay=0.01, report_to=[],
                             use_cpu=True)
    trainer = GraphLoraTrainer(model=lora_model, args=args,
                               component_learning_rates={"vision": 3e-5, "projector": 1e-4})
    optimizer = trainer.create_optimizer()
    groups = {g["name"]: g for g in optimizer.param_groups}
    expected = _expected(lora_model)
    for component, ids in expected.items():
        held = {id(p) for name, g in groups.items() if name.split("/")[0] == component for p in g["params"]}
        assert held == ids, component
    assert groups["vision"]["lr"] == 3e-5 and groups["projector"]["lr"] == 1e-4 and groups["language"]["lr"] == 3e-4
    assert groups["vision"]["weight_decay"] == 0.01
    # lm_head's copy: a weight, decayed (Trainer's rule: no decay for biases and norms)
    assert "modules_to_save" in groups and groups["modules_to_save"]["weight_decay"] == 0.01
    every = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(every) == len(set(every)) == sum(1 for p in lora_model.parameters() if p.requires_grad)
