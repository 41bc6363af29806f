"""``matches_module_suffix``: PEFT's rule for one name of a ``target_modules`` / ``target_parameters`` list,
which graphlora's policy also uses for ``target_modules`` and ``modules_to_save``."""

import pytest
import torch

from graphlora.adapters.peft_compat import (
    matches_module_suffix,
    modules_to_save_paths,
    peft_list_match,
    peft_modules_to_save_hits,
)

Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("path, name", [
    (Q, Q),  # the full path
    ("q_proj", "q_proj"),  # equal, no dot at all
    (Q, "q_proj"),
    (Q, "self_attn.q_proj"),  # several segments
    (Q, "0.self_attn.q_proj"),  # a layer index is a segment like any other
    ("model.experts.gate_up_proj", "experts.gate_up_proj"),  # a parameter path
])
def test_a_path_matches_its_name_or_a_dotted_suffix(path, name):
    assert matches_module_suffix(path, name)


@pytest.mark.parametrize("path, name", [
    ("model.layers.0.self_attn.xq_proj", "q_proj"),  # the name is the tail of a segment, not a segment
    (Q, "proj"),
    (Q, "attn.q_proj"),  # self_attn is not attn
    ("model.layers.10.self_attn.q_proj", "0.self_attn.q_proj"),
    (Q, "self_attn"),  # a prefix or an inner segment is not a suffix
    (Q, "model"),
    ("q_proj", "self_attn.q_proj"),  # longer than the path
    (Q, "layers.*.q_proj"),  # no wildcards: the name is literal
])
def test_a_partial_segment_a_prefix_or_a_pattern_does_not_match(path, name):
    assert not matches_module_suffix(path, name)


def test_list_matching_is_the_rule_for_any_entry():
    assert peft_list_match(Q, ["k_proj", "q_proj"])
    assert not peft_list_match(Q, ["k_proj", "attn.q_proj"])
    assert not peft_list_match(Q, [])


def test_modules_to_save_paths_follow_the_rule_where_peft_matches_any_tail():
    """graphlora copies the modules a name selects by the rule; PEFT's modules_to_save takes every path that
    ends with the name, dot or not (save_adapter refuses an entry where the two differ)."""
    model = torch.nn.Module()
    model.head = torch.nn.Linear(2, 2)
    model.lm_head = torch.nn.Linear(2, 2)
    model.block = torch.nn.Module()
    model.block.head = torch.nn.Linear(2, 2)
    assert modules_to_save_paths(model, ["head"]) == ["block.head", "head"]
    assert modules_to_save_paths(model, ["block.head"]) == ["block.head"]
    assert sorted(peft_modules_to_save_hits(model, "head")) == ["block.head", "head", "lm_head"]
