"""graphlora's statement of PEFT's name matching agrees with the installed PEFT's own functions.

graphlora writes adapter_config.json (target_modules, rank_pattern / alpha_pattern, modules_to_save)
and reads PEFT's: its rules must select what PEFT selects. Hypothesis draws module paths and entries
from a small vocabulary (so that suffixes, partial segments and regex metacharacters collide often)
and compares graphlora.adapters.peft_compat with PEFT's ``check_target_module_exists`` and
``get_pattern_key``.
"""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.tuners.tuners_utils import check_target_module_exists  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

from graphlora.adapters.peft_compat import (  # noqa: E402
    matches_module_suffix,
    peft_excluded_by_modules_to_save,
    peft_list_match,
    peft_pattern_value,
)

SEGMENTS = ["model", "layers", "0", "1", "10", "self_attn", "attn", "q_proj", "xq_proj", "proj", "mlp", "blk",
            "blk_q", "q"]
paths = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5).map(".".join)
entries = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map(".".join)


def _peft_targets(key: str, target_modules=None, modules_to_save=None) -> bool:
    config = LoraConfig(target_modules=target_modules, modules_to_save=modules_to_save)
    found = check_target_module_exists(config, key)
    return bool(found) and type(found).__name__ != "_ExcludedModule"


@settings(max_examples=300, deadline=None)
@given(key=paths, names=st.lists(entries, min_size=1, max_size=4))
def test_list_matching_is_peft_s(key, names):
    assert peft_list_match(key, names) == _peft_targets(key, target_modules=names)
    assert any(matches_module_suffix(key, n) for n in names) == _peft_targets(key, target_modules=names)


@settings(max_examples=300, deadline=None)
@given(key=paths, keep=st.lists(entries, min_size=1, max_size=3))
def test_modules_to_save_exclusion_is_peft_s(key, keep):
    """PEFT never adapts a module inside a modules_to_save module; graphlora's rule names the same ones."""
    excluded_by_peft = type(check_target_module_exists(
        LoraConfig(target_modules=[key], modules_to_save=keep), key)).__name__ == "_ExcludedModule"
    assert peft_excluded_by_modules_to_save(key, keep) == excluded_by_peft


@settings(max_examples=300, deadline=None)
@given(key=paths, patterns=st.dictionaries(st.one_of(entries, entries.map(re.escape), entries.map(lambda e: "^" + e)),
                                            st.integers(1, 64), min_size=1, max_size=4))
def test_rank_pattern_lookup_is_peft_s(key, patterns):
    found = get_pattern_key(list(patterns), key)
    expected = patterns[found] if found in patterns else "default"
    assert peft_pattern_value(patterns, key, "default") == expected
