"""The zoo's config table is data: building configs reads it and never changes it."""

import copy

from graphlora.testing import zoo


def test_building_configs_leaves_the_table_unchanged():
    """transformers' configs write defaults into the dicts they are given (``rope_parameters`` gets a
    ``rope_theta``): a row shared with the built config would carry one family's defaults into the
    next family's config, so that a config would depend on which others were built before it."""
    names = zoo.tiny_model_names()
    table = {name: copy.deepcopy(zoo.tiny_family(name)) for name in names}
    for name in names:
        zoo.build_tiny_config(name, layers=3)
    assert {name: zoo.tiny_family(name) for name in names} == table


def test_each_build_is_a_fresh_config():
    a, b = zoo.build_tiny_config("qwen3_vl"), zoo.build_tiny_config("qwen3_vl")
    assert a is not b and a.text_config.rope_parameters is not b.text_config.rope_parameters
    assert a.to_dict() == b.to_dict()
