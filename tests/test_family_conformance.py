"""What every newly supported family must show: the three strategies, equality at initialisation,
training, and a PEFT round trip with equal outputs, on one tiny model per family.

The selections are checked against the family's hand-written label truth (tests/label_truth.py): a strategy
adapts exactly the attention and MLP linears of its components (less the sites the loss cannot reach, which
are reported as skipped). The older families have the same checks spread over test_rewrite_families,
test_adapters and test_tracing; this file keeps the per-family cost of a new family to one model build and
four rewrites.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import graphlora
from graphlora.errors import PeftConversionWarning
from graphlora.testing import zoo
from helpers import set_random_lora, train_and_check_grads
from label_truth import EXPECTED

#: Families added after the first zoo (a family added later joins this list); listed before they land.
NEW_FAMILIES = ("llava_onevision", "cohere2_vision", "deepseek_vl", "idefics2", "got_ocr2", "ovis2", "lfm2_vl", "janus")
FAMILIES = [name for name in NEW_FAMILIES if name in zoo.tiny_model_names()]

STRATEGIES = {
    "language-only": (dict(finetune_vision_layers=False, finetune_language_layers=True), {"language", "cross_attention"}),
    "vision-only": (dict(finetune_vision_layers=True, finetune_language_layers=False), {"vision"}),
    "full": (dict(finetune_vision_layers=True, finetune_language_layers=True), {"vision", "language", "cross_attention"}),
}

_MODELS: dict[str, tuple] = {}


def family_model(family: str):
    """(pristine model, batch, reference output) of a family, built once per test process."""
    if family not in _MODELS:
        model = zoo.build_tiny_model(family)
        batch = zoo.tiny_example_inputs(family, model)
        with torch.no_grad():
            reference = model(**batch, use_cache=False)
        _MODELS[family] = (model, batch, reference)
    model, batch, reference = _MODELS[family]
    return copy.deepcopy(model), batch, reference


def strategy_truth(family: str, components: set[str]) -> set[str]:
    """The attention and MLP linears of ``components`` in the family's label truth."""
    return {name for name, (component, role) in EXPECTED[family].items()
            if component in components and role.split(".")[0] in ("attn", "mlp")}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("family", FAMILIES)
def test_strategy_selects_its_components_equals_the_model_and_trains(family, strategy):
    policy, components = STRATEGIES[strategy]
    model, batch, reference = family_model(family)
    model.train()  # the tiny configs have no dropout: train mode computes the same, and one trace serves all steps
    lora_model = graphlora.rewrite(model, policy, batch)

    chosen = {s.name for s in lora_model.sites}
    skipped = {s.name: s.reason for s in lora_model.skipped_sites}
    assert chosen, f"{family} {strategy}: no site"
    assert chosen | set(skipped) == strategy_truth(family, components), (sorted(chosen), skipped)
    assert all(s.component in components for s in lora_model.sites)

    with torch.no_grad():  # B = 0: the rewritten model is the model
        out = lora_model(**batch)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=1e-5)
    traced = lora_model.num_traces
    losses = train_and_check_grads(lora_model, batch, steps=3)
    assert losses[-1] < losses[0], losses
    assert lora_model.num_traces == traced  # the programs of the rewrite served every step


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_the_adapter_with_equal_outputs(family, tmp_path):
    model, batch, _ = family_model(family)
    lora_model = graphlora.rewrite(model, STRATEGIES["full"][0], batch)
    set_random_lora(lora_model, std=0.1)
    lora_model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftConversionWarning)  # PEFT would load the file as written
        lora_model.save_adapter(tmp_path)
    with torch.no_grad():
        ours = lora_model(**batch).logits
        theirs = peft.PeftModel.from_pretrained(family_model(family)[0], tmp_path)(**batch, use_cache=False).logits
        reloaded = graphlora.load_adapter(family_model(family)[0], tmp_path, batch)(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reloaded, ours, atol=1e-6, rtol=1e-5)
