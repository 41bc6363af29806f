"""A disagreement between structure and module names is never silent.

A model whose vision MLP is misleadingly named (its ``fc1`` is called ``q_proj`` inside a module called
``attention``) gets the structural labels (``mlp.up``), and the name rules say ``attn.q``. When that changes
what the policy selects (attention only), rewrite() raises naming the linear, both labels and how to
settle it; ``trust_labels`` settles it either way; when the selection is the same, rewrite() warns and
explain shows what the names say.
"""

from __future__ import annotations

import warnings

import pytest

import graphlora
from graphlora.errors import LabelDisagreementError, LabelDisagreementWarning
from graphlora.report import format_explain
from test_obfuscated import NAMED, TinyVLM, example_inputs

MISLEADING = dict(NAMED, mlp="attention", fc1="q_proj")
SITE = "vision_tower.layers.0.attention.q_proj"  # structurally the first MLP linear of vision block 0
ATTENTION_ONLY = dict(finetune_vision_layers=True, finetune_language_layers=True, finetune_mlp_modules=False)
FULL = dict(finetune_vision_layers=True, finetune_language_layers=True)


def model():
    import torch

    torch.manual_seed(0)
    return TinyVLM(MISLEADING).eval()


@pytest.mark.parametrize("trace_mode", ["blocks", "whole"])
def test_a_disagreement_that_changes_the_selection_raises(trace_mode):
    with pytest.raises(LabelDisagreementError) as err:
        graphlora.rewrite(model(), ATTENTION_ONLY, example_inputs(), trace_mode=trace_mode, verify=False)
    message = str(err.value)
    assert SITE in message and "mlp.up" in message and "attn.q" in message
    assert "trust_labels" in message and "rules" in message
    assert err.value.key_path == "trust_labels"


def test_trust_labels_settles_it_either_way():
    with pytest.warns(LabelDisagreementWarning, match="trust_labels=structure"):
        by_structure = graphlora.rewrite(model(), dict(ATTENTION_ONLY, trust_labels="structure"), example_inputs(),
                                         verify=False)
    assert SITE not in {s.name for s in by_structure.sites}
    with pytest.warns(LabelDisagreementWarning, match="trust_labels=names"):
        by_names = graphlora.rewrite(model(), dict(ATTENTION_ONLY, trust_labels="names"), example_inputs(),
                                     verify=False)
    sites = {s.name: s for s in by_names.sites}
    assert SITE in sites and sites[SITE].role == "attn.q" and "trust_labels=names" in sites[SITE].reason


def test_a_disagreement_that_changes_nothing_warns_and_explain_shows_it():
    with pytest.warns(LabelDisagreementWarning, match=SITE.replace(".", r"\.")) as caught:
        lora_model = graphlora.rewrite(model(), FULL, example_inputs(), verify=False)
    assert "selects the same either way" in str(caught[0].message)
    rows = {r.name: r for r in lora_model.explain_rows()}
    assert (rows[SITE].role, rows[SITE].names_say, rows[SITE].targeted) == ("mlp.up", "vision/attn.q", True)
    assert rows["vision_tower.layers.0.self_attn.q_proj"].names_say is None
    table = format_explain(list(rows.values()))
    assert "names say" in table.splitlines()[0] and "vision/attn.q" in table


def test_agreeing_labels_give_no_warning_and_no_column():
    from test_obfuscated import build

    with warnings.catch_warnings():
        warnings.simplefilter("error", LabelDisagreementWarning)
        lora_model = graphlora.rewrite(build(NAMED), FULL, example_inputs(), verify=False)
    assert "names say" not in format_explain(lora_model.explain_rows()).splitlines()[0]
