"""Each fixture family x each of the seed's three strategies.

Sites equal lists written out here; outputs at initialisation equal the original model's; training
lowers the loss; every site's lora_B receives a gradient; no base parameter requires grad; the programs
traced by rewrite() serve every step.
"""

import pytest
import torch

import graphlora
from helpers import expand, train_and_check_grads

STRATEGIES = {
    # The seed's three strategies in Unsloth's flags.
    "language-only": dict(finetune_vision_layers=False, finetune_language_layers=True),
    "vision-only": dict(r=32, finetune_vision_layers=True, finetune_language_layers=False),
    "full": dict(finetune_vision_layers=True, finetune_language_layers=True),
}

LLAMA_BLOCK = ["self_attn.{q,k,v,o}_proj", "mlp.{gate,up,down}_proj"]
CLIP_BLOCK = ["self_attn.{q,k,v,out}_proj", "mlp.fc{1,2}"]
MLLAMA_VISION_BLOCK = ["self_attn.{q,k,v,o}_proj", "mlp.fc{1,2}"]


def block(prefix: str, layers: str, parts: list[str]) -> list[str]:
    return expand(*[f"{prefix}.{layers}.{p}" for p in parts])


LANGUAGE = {
    "llava": block("model.language_model.layers", "{0,1}", LLAMA_BLOCK),
    "idefics3": block("model.text_model.layers", "{0,1}", LLAMA_BLOCK),
    "gemma3": block("model.language_model.layers", "{0,1}", LLAMA_BLOCK),
    # Mllama: layer 1 is a cross-attention layer (its attention is cross-attention, its MLP language).
    "mllama": block("model.language_model.layers", "{0,2}", LLAMA_BLOCK)
    + expand("model.language_model.layers.1.cross_attn.{q,k,v,o}_proj", "model.language_model.layers.1.mlp.{gate,up,down}_proj"),
}
VISION = {
    # LLaVA reads features from layer -2: its last CLIP layer (1) can get no gradient and is skipped.
    "llava": block("model.vision_tower.encoder.layers", "0", CLIP_BLOCK),
    "idefics3": block("model.vision_model.encoder.layers", "{0,1}", CLIP_BLOCK),
    "gemma3": block("model.vision_tower.encoder.layers", "{0,1}", CLIP_BLOCK),
    "mllama": block("model.vision_model.transformer.layers", "{0,1}", MLLAMA_VISION_BLOCK)
    + block("model.vision_model.global_transformer.layers", "0", MLLAMA_VISION_BLOCK),
}
VISION_SKIPPED = {"llava": block("model.vision_tower.encoder.layers", "1", CLIP_BLOCK)}


def expected_sites(family: str, strategy: str) -> list[str]:
    names = []
    if strategy in ("vision-only", "full"):
        names += VISION[family]
    if strategy in ("language-only", "full"):
        names += LANGUAGE[family]
    return sorted(names)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("family", ["llava", "idefics3", "gemma3", "mllama"])
def test_strategy_on_family(tiny, family, strategy):
    model, inputs = tiny(family)
    model.train()  # the tiny configs have no dropout: train mode is deterministic, and one trace serves all
    with torch.no_grad():
        reference = model(**inputs, use_cache=False)

    lora_model = graphlora.rewrite(model, STRATEGIES[strategy], inputs)
    assert lora_model.training
    traced = lora_model.num_traces  # one program per block class

    assert sorted(s.name for s in lora_model.sites) == expected_sites(family, strategy)
    skipped = VISION_SKIPPED.get(family, []) if strategy != "language-only" else []
    assert sorted(s.name for s in lora_model.skipped_sites) == sorted(skipped)
    assert all(s.r == STRATEGIES[strategy].get("r", 16) for s in lora_model.sites)

    with torch.no_grad():
        out = lora_model(**inputs)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, reference.loss, atol=1e-6, rtol=0)

    assert not any(p.requires_grad for p in model.parameters())
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert trainable == {f"{s.name}.lora_{ab}.weight" for s in lora_model.sites for ab in "AB"}

    losses = train_and_check_grads(lora_model, inputs, steps=10)
    assert losses[-1] < losses[0], losses
    assert lora_model.num_traces == traced  # the same programs served every step
