"""Labels hold on config variants the zoo did not tune for (property-based, hypothesis).

For every zoo family, hypothesis draws variants of its tiny config: 1-3 layers per tower; 1, 2 or 4 heads
and a KV-head count that divides them; an explicit head_dim; MLP widths below, equal to and above the
hidden size; tied and untied embeddings; eager and sdpa attention; the SigLIP pooling head on or off;
patch and image sizes where the family's layout allows. Each variant is rewritten with the full-VLM
policy and every labelled linear's (component, role, layer) must equal the truth written out by hand
from the family's modeling code (tests/label_truth.py, block indices generalised to any depth); every
Linear the truth names must be labelled. The examples are few per family and derandomized (seeded), so
CI runs the same ones every time.

Also the SigLIP case that motivated this: an ``nn.MultiheadAttention`` pooling head whose packed q/k/v
are slices of one parameter used to claim the encoder layers' ``out_proj`` and ``fc2`` as its own
projections (and leave ``fc1`` unlabelled) in the whole-model graph.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphlora
from graphlora.families import synthesize_inputs
from graphlora.testing import zoo
from label_truth import EXPECTED, expected_labels

FULL_VLM = dict(
    r=4, lora_alpha=4, target_modules="all-linear", finetune_vision_layers=True, finetune_language_layers=True,
    finetune_attention_modules=True, finetune_mlp_modules=True, finetune_projector=True,
)
EXAMPLES = 2  # per family: the default run must stay near its time budget (CI=true make test ~19 min on 2 cores)
TOWER = {"vision": "vision", "language": "language", "cross_attention": "language"}

#: Families whose vision tower is SigLIP (``vision_use_head`` is a config field).
SIGLIP = {"gemma3", "paligemma", "llava_onevision", "cohere2_vision", "deepseek_vl"}
#: Families whose image layout follows (image_size / patch_size)^2 with no other field tied to it.
FREE_PATCH = {"llava": "image_seq_length"}
#: Knobs a family's layout pins (changing them breaks the model itself, not graphlora).
PINNED = {
    "llama4": {"vision_intermediate"},  # = hidden / pixel_shuffle_ratio**2: the pixel-shuffle MLP's input
    "glm4v": {"text_heads"},  # head_dim 16 with partial rotary: the rope sections are tied to it
    "glm4v_moe": {"text_heads"},  # the same
    "qwen2_vl": {"text_heads"},  # its text attention ignores head_dim (hidden / heads) while its rope reads it
    "qwen2_5_vl": {"text_heads"},  # the same
    "got_ocr2": {"attn"},  # transformers refuses sdpa for GOT-OCR2 (_supports_sdpa = False): eager only
}


def _set(config, names: tuple[str, ...], value) -> bool:
    for name in names:
        if hasattr(config, name):
            setattr(config, name, value)
            return True
    return False


def variant_config(family: str, v: dict):
    """The family's tiny config with the drawn knobs applied (a fresh config)."""
    config = zoo.build_tiny_config(family, layers=v["layers"])
    text = getattr(config, "text_config", None) or config
    vision = getattr(config, "vision_config", None)
    pinned = PINNED.get(family, set())
    if "text_heads" not in pinned:
        text.num_attention_heads = v["text_heads"]
        text.num_key_value_heads = v["text_kv"]
        text.head_dim = 8  # explicit: the rope sections of the tiny configs are sized for it
    elif text.num_attention_heads % v["text_kv"] == 0:
        text.num_key_value_heads = v["text_kv"]
    text.intermediate_size = v["text_intermediate"]
    if hasattr(text, "intermediate_size_mlp"):
        text.intermediate_size_mlp = v["text_intermediate"]
    for cfg in (config, text):
        cfg.tie_word_embeddings = v["tied"]
    if vision is not None:
        heads = v["vision_heads"]
        _set(vision, ("num_attention_heads", "num_heads", "attention_heads"), heads)
        if getattr(vision, "head_dim", None) is not None:
            vision.head_dim = zoo.HIDDEN // heads
        if "vision_intermediate" not in pinned:
            if hasattr(vision, "mlp_ratio"):  # Qwen2-VL: an integer ratio (no MLP narrower than the tower)
                vision.mlp_ratio = max(1, v["vision_intermediate"] // zoo.HIDDEN)
            else:
                _set(vision, ("intermediate_size",), v["vision_intermediate"])
        if family in SIGLIP:
            vision.vision_use_head = v["siglip_head"]
        if family in FREE_PATCH:
            patch, image = v["patch_image"]
            vision.patch_size, vision.image_size = patch, image
            setattr(config, FREE_PATCH[family], (image // patch) ** 2)
    for cfg in (config, text, vision):
        if cfg is not None and "attn" not in pinned:
            cfg._attn_implementation = v["attn"]
    return config


@st.composite
def variants(draw) -> dict:
    heads = draw(st.sampled_from([1, 2, 4]))
    return dict(
        layers=draw(st.integers(1, 3)),
        text_heads=heads,
        text_kv=draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])),
        text_intermediate=draw(st.sampled_from([16, 32, 64])),
        tied=draw(st.booleans()),
        attn=draw(st.sampled_from(["eager", "sdpa"])),
        vision_heads=draw(st.sampled_from([1, 2, 4])),
        vision_intermediate=draw(st.sampled_from([16, 32, 64])),
        siglip_head=draw(st.booleans()),
        patch_image=draw(st.sampled_from([(4, 16), (8, 32), (4, 32)])),
        trace_mode=draw(st.sampled_from(["auto", "whole_or_regional"])),
    )


def build(family: str, v: dict):
    config = variant_config(family, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = zoo._model_class(family)(config)
    zoo.revive_zero_parameters(model)
    return model.float().eval()


def check_labels(family: str, model, inputs, trace_mode: str = "auto") -> None:
    lora_model = graphlora.rewrite(model, FULL_VLM, inputs, verify=False, trace_mode=trace_mode)
    rows = {row.name: row for row in lora_model.explain_rows()}
    wrong = {}
    for name, row in rows.items():
        want = expected_labels(family, name)
        if want != (str(row.component), str(row.role)):
            wrong[name] = f"graphlora {row.component}/{row.role}, truth {want}"
    missing = [name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and expected_labels(family, name) and name not in rows
               and not any(r.startswith(name + ".") for r in rows)]
    assert not wrong and not missing, (wrong, missing, lora_model.trace_mode)
    # Layers: a block's position in its tower, in the model's order of blocks (Mllama: local then global).
    blocks = {"vision": [], "language": []}
    for name in rows:
        tower = TOWER.get(str(rows[name].component))
        parts = name.split(".")
        index = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
        if tower and index is not None:
            block = ".".join(parts[: index + 1])
            if block not in blocks[tower]:
                blocks[tower].append(block)
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    for tower in blocks:
        blocks[tower].sort(key=order.__getitem__)
    for name, row in rows.items():
        tower = TOWER.get(str(row.component))
        block = next((b for b in blocks.get(tower, []) if name.startswith(b + ".")), None)
        want_layer = blocks[tower].index(block) if block is not None else None
        assert row.layer == want_layer, (name, row.layer, want_layer)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_labels_hold_on_config_variants(family):
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(v=variants())
    def run(v):
        model = build(family, v)
        inputs = synthesize_inputs(model, batch_size=2)
        check_labels(family, model, inputs, v["trace_mode"])

    run()


def _siglip_with_pooling_head():
    """PaliGemma with an ordinary SigLIP config (2 heads, patch 14, 56 px) and its MHA pooling head on."""
    config = transformers.PaliGemmaConfig(
        vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=2, image_size=56, patch_size=14),
        text_config=transformers.GemmaConfig(**zoo._text(head_dim=8, bos_token_id=2, eos_token_id=1)),
        image_token_index=255, projection_dim=32, hidden_size=32, vocab_size=256)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.PaliGemmaForConditionalGeneration(config)
    zoo.revive_zero_parameters(model)
    return model.eval()


@pytest.mark.parametrize("trace_mode", ["whole", "blocks"])
def test_siglip_pooling_head_does_not_claim_the_encoder_layers(trace_mode):
    model = _siglip_with_pooling_head()
    inputs = synthesize_inputs(model)
    check_labels("paligemma", model, inputs, trace_mode)
    lora_model = graphlora.rewrite(model, dict(finetune_vision_layers=True, finetune_language_layers=False), inputs,
                                   verify=False, trace_mode=trace_mode)
    chosen = {s.name for s in lora_model.sites}
    assert {f"model.vision_tower.encoder.layers.{i}.mlp.fc{j}" for i in (0, 1) for j in (1, 2)} <= chosen
    assert lora_model.label_check["disagreements"] == []
    rows = {r.name: r for r in lora_model.explain_rows()}
    head = rows["model.vision_tower.head.attention.in_proj_weight"]
    assert (str(head.component), str(head.role)) == ("vision", "attn.qkv")
