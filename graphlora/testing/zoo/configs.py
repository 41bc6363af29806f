"""The zoo's tiny configs: one transformers config per supported family, as one data table.

Reads: transformers' config classes, by name. Writes: nothing shared: :func:`build_tiny_config` returns a
fresh config object on every call (every list and dict in it is a copy of the table's).

Guarantees: every config has ~32-wide hidden states, 2 layers per tower (``layers=`` or
:func:`deepen_config` for more, keeping each family's layer pattern), 4 heads (2 KV heads), a 256-token
vocabulary and 16-32 px images; sdpa attention (eager for :data:`EAGER_ONLY`); weight init std
:data:`TINY_INIT_STD`. Special token ids are fixed per family (the processor's structural tokens are kept
as extra config fields, so the synthesised layouts use them).

A table row (:class:`TinyFamily`) names the model class and the config class; its fields go to the config
class as keyword arguments, a :class:`Sub` value built first as the config class it names (a plain dict
goes in as a dict, as transformers' Qwen and GLM configs take their sub-configs).

Deliberate quirk kept from the real configs: LLaVA reads vision features from layer -2, so its last CLIP
layer never reaches the loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import transformers

DEFAULT_TINY_MODEL = "llava"

__all__ = [
    "DEFAULT_TINY_MODEL",
    "EAGER_ONLY",
    "HIDDEN",
    "TINY_INIT_STD",
    "VOCAB",
    "Sub",
    "TinyFamily",
    "build_tiny_config",
    "deepen_config",
    "tiny_family",
    "tiny_model_names",
]

# --------------------------------------------------------------------------------------------
# shared tiny sizes
# --------------------------------------------------------------------------------------------

VOCAB = 256
HIDDEN = 32
ATTN = "sdpa"
#: Families whose transformers classes refuse sdpa (GOT-OCR2: ``_supports_sdpa = False``): eager attention.
EAGER_ONLY = {"got_ocr2"}

#: Weight init std of the tiny models. transformers' usual 0.02 suits hidden sizes in the thousands;
#: at hidden size 32 it makes logits nearly flat (|logit| ~ 0.1), so a frozen head leaves LoRA almost
#: nothing to learn and losses barely move. 0.2 gives logits of order 1.
TINY_INIT_STD = 0.2

#: Field sets of the three tower shapes: a Llama-style decoder (2 layers, 4 heads, 2 KV heads, head_dim 8);
#: a ViT with CLIP/SigLIP-style field names (16 px images, 4 px patches -> 4x4 grid); a Qwen-style vision
#: tower (4 px patches, 2x2 merge -> a 16 px image is 4 tokens).
_TOWER_FIELDS = {
    "text": dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "vision": dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=16, patch_size=4),
    "qwen_vision": dict(depth=2, hidden_size=HIDDEN, intermediate_size=64, num_heads=4, out_hidden_size=HIDDEN,
                        patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
}


def _tower(kind: str, overrides: dict, drop: tuple[str, ...] = ()) -> dict:
    """The fields of a tower of ``kind`` with ``overrides`` applied and the keys in ``drop`` removed."""
    fields = {**_TOWER_FIELDS[kind], **overrides}
    for key in drop:
        fields.pop(key)
    return fields


def _text(**overrides) -> dict:
    """A tiny Llama-style decoder (2 layers, 4 heads, 2 KV heads, head_dim 8)."""
    return _tower("text", overrides)


def _vision(**overrides) -> dict:
    """A tiny ViT (CLIP/SigLIP-style field names): 16 px images, 4 px patches -> 4x4 grid."""
    return _tower("vision", overrides)


@dataclass(frozen=True)
class Sub:
    """A sub-config in a table row: built as ``transformers.<cls>(**fields)``."""

    cls: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class TinyFamily:
    """One zoo entry: ``transformers.<config_class>(**fields)`` builds its config (a :class:`Sub` value
    first built as its own config class), ``model_class`` its model (a transformers class, or a fixture
    class of graphlora.testing.zoo.models)."""

    model_class: str
    config_class: str
    fields: dict[str, Any]

    def config(self):
        """A fresh config (no list or dict shared with the table)."""
        return getattr(transformers, self.config_class)(**_built(self.fields))


def _built(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: getattr(transformers, value.cls)(**_built(value.fields)) if isinstance(value, Sub)
            else copy.deepcopy(value) for key, value in fields.items()}


def _tiny(model_class: str, config_class: str, **fields) -> TinyFamily:
    return TinyFamily(model_class, config_class, fields)


# --------------------------------------------------------------------------------------------
# towers that several families share
# --------------------------------------------------------------------------------------------

_CLIP = Sub("CLIPVisionConfig", _vision(projection_dim=HIDDEN))
_PIXTRAL = Sub("PixtralVisionConfig", _vision(image_size=32, head_dim=8))
_SIGLIP = Sub("SiglipVisionConfig", _vision(vision_use_head=False))  # no pooling head, as released
_LLAMA = Sub("LlamaConfig", _text())
_MISTRAL = Sub("MistralConfig", _text(head_dim=8))
_QWEN2 = Sub("Qwen2Config", _text())
_COHERE2 = Sub("Cohere2Config",
                _text(head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"]))
_PINPOINTS = [[16, 32], [32, 16], [32, 32]]

_IDEFICS3_TOKENS = dict(
    scale_factor=2,  # 4x4 patches -> 4 image tokens per crop
    image_token_id=255,
    # Structural tokens the processor adds (not config fields of transformers): kept here so the
    # tiny layout uses fixed ids. ``<fake_token_around_image>`` is image_token_id - 1 as in the
    # released checkpoints.
    fake_image_token_id=254, global_image_token_id=253, newline_token_id=10,
    row_col_token_ids=list(range(200, 236)),
)

_MROPE = {"rope_type": "default", "mrope_section": [2, 1, 1]}  # (t, h, w) sections: sum = head_dim / 2
_MROPE_INTERLEAVED = {**_MROPE, "mrope_interleaved": True}
# Qwen-style special ids: <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>
_QWEN_IDS = dict(vision_start_token_id=251, vision_end_token_id=252, image_token_id=255, video_token_id=254)
_QWEN3_VISION = _tower("qwen_vision", dict(
    num_position_embeddings=16,  # 4x4 learned grid, interpolated to any image grid
    deepstack_visual_indexes=[0],  # block 0 output is also added into decoder layer 0
))

_GLM_IDS = dict(
    image_start_token_id=250,  # <|begin_of_image|>
    image_end_token_id=251,  # <|end_of_image|>
    video_start_token_id=252, video_end_token_id=253, image_token_id=255, video_token_id=254,
)
# GLM rotates half of each head (partial_rotary_factor 0.5): head_dim 16 -> 4 rotary pairs
_GLM_TEXT = dict(
    head_dim=16, num_attention_heads=2, num_key_value_heads=1, rope_parameters={**_MROPE, "partial_rotary_factor": 0.5}
)
_GLM_VISION = _tower("qwen_vision", dict(image_size=16))

# --------------------------------------------------------------------------------------------
# the table: name -> model class, config class and fields
# --------------------------------------------------------------------------------------------

_ZOO: dict[str, TinyFamily] = {
    "llava": _tiny(
        "LlavaForConditionalGeneration", "LlavaConfig", vision_config=_CLIP, text_config=_LLAMA,
        image_token_index=255, image_seq_length=16,
        vision_feature_layer=-2,  # the default: the last CLIP layer is dead (a deliberate test case)
        vision_feature_select_strategy="default",
    ),
    "llava_next": _tiny(
        "LlavaNextForConditionalGeneration", "LlavaNextConfig", vision_config=_CLIP, text_config=_LLAMA,
        image_token_index=255, image_grid_pinpoints=_PINPOINTS, vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    ),
    "pixtral": _tiny(  # LLaVA with a Pixtral tower
        "LlavaForConditionalGeneration", "LlavaConfig", vision_config=_PIXTRAL, text_config=_MISTRAL,
        image_token_index=10,  # Mistral tokenizer: [IMG]=10, [IMG_BREAK]=12, [IMG_END]=13
        vision_feature_layer=-1, vision_feature_select_strategy="full", multimodal_projector_bias=True,
    ),
    "mistral3": _tiny(
        "Mistral3ForConditionalGeneration", "Mistral3Config", vision_config=_PIXTRAL, text_config=_MISTRAL,
        image_token_index=10, spatial_merge_size=2, vision_feature_layer=-1,
    ),
    "aya_vision": _tiny(
        "AyaVisionForConditionalGeneration", "AyaVisionConfig", vision_config=_SIGLIP, text_config=_COHERE2,
        downsample_factor=2,  # 4x4 patches -> 4 <|IMG_PATCH|> per tile
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_token_index=255,
        # processor tokens (not transformers config fields)
        start_of_img_token_id=250, end_of_img_token_id=251, tile_global_token_id=252,
        tile_token_ids=list(range(240, 250)),
    ),
    "llava_onevision": _tiny(
        "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionConfig", vision_config=_SIGLIP,
        text_config=_QWEN2, image_token_index=255, video_token_index=254, image_grid_pinpoints=_PINPOINTS,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    ),
    "cohere2_vision": _tiny(
        "Cohere2VisionForConditionalGeneration", "Cohere2VisionConfig", vision_config=_SIGLIP,  # as aya_vision
        text_config=_COHERE2,
        downsample_factor=2,  # 4x4 patches -> 4 <|IMG_PATCH|> per tile
        alignment_intermediate_size=64,  # SwiGLU: chunked into two halves of 32
        image_token_id=255,
        # processor tokens (not transformers config fields)
        boi_token_id=252, eoi_token_id=253, img_line_break_token_id=254,
    ),
    "deepseek_vl": _tiny(
        "DeepseekVLForConditionalGeneration", "DeepseekVLConfig",
        # SigLIP's pooling head stays on as in the released checkpoint: it runs, but the aligner reads
        # last_hidden_state, so the head never reaches the loss
        vision_config=Sub("SiglipVisionConfig", _vision()), text_config=_LLAMA, image_token_id=255,
    ),
    "internvl": _tiny(
        "InternVLForConditionalGeneration", "InternVLConfig",
        vision_config=Sub("InternVLVisionConfig",
                          _vision(image_size=[16, 16], patch_size=[4, 4], layer_scale_init_value=0.1)),
        text_config=_QWEN2,
        image_token_id=255,  # <IMG_CONTEXT>; <img>=253, </img>=254 as in the released tokenizers
        image_seq_length=4,
        downsample_ratio=0.5,  # 4x4 patches -> 4 tokens per tile
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    ),
    "paligemma": _tiny(
        "PaliGemmaForConditionalGeneration", "PaliGemmaConfig", vision_config=_SIGLIP,
        text_config=Sub("GemmaConfig", _text(head_dim=8, bos_token_id=2, eos_token_id=1)),
        image_token_index=255, projection_dim=HIDDEN, hidden_size=HIDDEN, vocab_size=VOCAB,
    ),
    "gemma3": _tiny(
        "Gemma3ForConditionalGeneration", "Gemma3Config", vision_config=_SIGLIP,
        text_config=Sub("Gemma3TextConfig", _text(
            head_dim=8, query_pre_attn_scalar=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
            bos_token_id=2, eos_token_id=1,
        )),
        mm_tokens_per_image=4,  # 4x4 patches avg-pooled to 2x2
        boi_token_index=253, eoi_token_index=254, image_token_index=255,
    ),
    "idefics3": _tiny("Idefics3ForConditionalGeneration", "Idefics3Config",
                      vision_config=Sub("Idefics3VisionConfig", _vision()), text_config=_LLAMA,
                      **_IDEFICS3_TOKENS),
    "smolvlm": _tiny("SmolVLMForConditionalGeneration", "SmolVLMConfig",
                     vision_config=Sub("SmolVLMVisionConfig", _vision()), text_config=_LLAMA, **_IDEFICS3_TOKENS),
    "idefics2": _tiny(
        "Idefics2ForConditionalGeneration", "Idefics2Config", vision_config=Sub("Idefics2VisionConfig", _vision()),
        perceiver_config=Sub("Idefics2PerceiverConfig", dict(
            hidden_size=HIDDEN,  # the text width: the resampler runs after modality_projection
            resampler_n_latents=4,  # = the processor's image_seq_len (64 released)
            resampler_depth=2, resampler_n_heads=4, resampler_head_dim=8, num_key_value_heads=2,
        )),
        text_config=_MISTRAL,
        image_token_id=255,  # <image>; <fake_token_around_image> is the id below it, as released
        fake_image_token_id=254,  # processor token (not a transformers config field)
    ),
    "got_ocr2": _tiny(
        "GotOcr2ForConditionalGeneration", "GotOcr2Config",
        # 8x8 patches; the projector's two stride-2 convs -> 2x2 = 4 tokens. The MLP width is mlp_dim.
        vision_config=Sub("GotOcr2VisionConfig", _tower("vision", dict(
            image_size=32,
            mlp_dim=64,
            output_channels=HIDDEN,  # the neck's width
            window_size=4,  # 2x2 windows of 4x4 patches
            global_attn_indexes=[1],  # layer 0 windowed, layer 1 global
        ), drop=("intermediate_size",))),
        text_config=_QWEN2,
        image_token_index=255,  # <imgpad>; <img>=253, </img>=254 as in the released tokenizer
        image_seq_length=4,
        img_start_token_id=253, img_end_token_id=254,  # processor tokens (not transformers config fields)
    ),
    "ovis2": _tiny(
        "Ovis2ForConditionalGeneration", "Ovis2Config",
        vision_config=Sub("Ovis2VisionConfig", _vision(
            vocab_size=64,  # the visual vocabulary (16384 released); its last 5 rows embed the indicators
            hidden_stride=2,  # as released: 2x2 patches per visual token -> 4 tokens per image
        )),
        text_config=_QWEN2,
        hidden_size=HIDDEN,  # the visual embedding table's width (= the text's)
        vocab_size=VOCAB,
        image_token_id=255,  # <IMG_ATOM>
        visual_indicator_token_ids=[250, 251, 252, 253, 254],  # <IMG_START>, <IMG_GRID>, <IMG_COL>, <IMG_ROW>, <IMG_END>
    ),
    # Qwen2-VL names the tower width `embed_dim` (mlp_ratio * embed_dim MLP); `hidden_size` is the merger output.
    "qwen2_vl": _tiny(
        "Qwen2VLForConditionalGeneration", "Qwen2VLConfig",
        vision_config=_tower("qwen_vision", dict(embed_dim=HIDDEN, mlp_ratio=2),
                             drop=("intermediate_size", "out_hidden_size")),
        text_config=_text(head_dim=8, rope_parameters=_MROPE), **_QWEN_IDS,
    ),
    "qwen2_5_vl": _tiny(
        "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
        vision_config=_tower("qwen_vision", dict(
            window_size=16,  # 2x2 merged tokens per attention window (real: 112 px with patch 14)
            fullatt_block_indexes=[1],  # block 0 windowed, block 1 full attention
        )),
        text_config=_text(head_dim=8, rope_parameters=_MROPE), **_QWEN_IDS,
    ),
    "qwen3_vl": _tiny("Qwen3VLForConditionalGeneration", "Qwen3VLConfig", vision_config=_QWEN3_VISION,
                      text_config=_text(head_dim=8, rope_parameters=_MROPE_INTERLEAVED), **_QWEN_IDS),
    # Qwen3-VL-30B-A3B: every decoder layer is MoE (decoder_sparse_step 1, no mlp_only_layers), no shared
    # expert; softmax top-k router, renormalised. Tiny: 4 experts of width 16, top-2.
    "qwen3_vl_moe": _tiny(
        "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig", vision_config=_QWEN3_VISION,
        text_config=_text(head_dim=8, rope_parameters=_MROPE_INTERLEAVED, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[]),
        **_QWEN_IDS,
    ),
    "glm4v": _tiny("Glm4vForConditionalGeneration", "Glm4vConfig", vision_config=_GLM_VISION,
                   text_config=_text(**_GLM_TEXT), **_GLM_IDS),
    # GLM-4.5V: layer 0 dense (first_k_dense_replace 1), later layers MoE with one shared expert next to the
    # routed ones (sigmoid router with a score-correction bias, one group, renormalised top-k). Tiny: 4
    # routed experts of width 16, top-2.
    "glm4v_moe": _tiny(
        "Glm4vMoeForConditionalGeneration", "Glm4vMoeConfig", vision_config=_GLM_VISION,
        text_config=_text(**_GLM_TEXT, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                          n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1),
        **_GLM_IDS,
    ),
    "mllama": _tiny(
        "MllamaForConditionalGeneration", "MllamaConfig",
        vision_config=Sub("MllamaVisionConfig", dict(
            hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
            image_size=16, patch_size=4, max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
            intermediate_layers_indices=[1],
            vision_output_dim=HIDDEN * 2,  # final state + 1 intermediate layer
        )),
        text_config=Sub("MllamaTextConfig", _text(num_hidden_layers=3, cross_attention_layers=[1])),
        image_token_index=VOCAB,  # == text vocab_size, as in the real model (embedding has vocab + 8 rows)
    ),
    "llama4": _tiny(
        "TinyLlama4ForConditionalGeneration",  # mends a 5.24 bug, see the class
        "Llama4Config",
        vision_config=Sub("Llama4VisionConfig", dict(
            hidden_size=HIDDEN,
            intermediate_size=128,  # = hidden / pixel_shuffle_ratio**2: also the pixel-shuffle MLP input
            num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4,
            pixel_shuffle_ratio=0.5,  # 4x4 patches -> 4 <|patch|> per tile
            projector_input_dim=HIDDEN, projector_output_dim=HIDDEN, vision_output_dim=HIDDEN,
        )),
        text_config=Sub("Llama4TextConfig", _text(
            head_dim=8, intermediate_size_mlp=64, num_local_experts=2, num_experts_per_tok=1,
            interleave_moe_layer_step=2,  # layer 0 dense, layer 1 MoE
            attention_chunk_size=16,
        )),
        boi_token_index=250,  # <|image_start|>
        eoi_token_index=251,  # <|image_end|>
        image_token_index=255,  # <|patch|>
        image_separator_token_id=252,  # <|image|> (processor token, not a config field)
        tile_x_separator_token_id=253, tile_y_separator_token_id=254,
    ),
    "phi4_multimodal": _tiny(
        "Phi4MultimodalForCausalLM", "Phi4MultimodalConfig", **_text(),  # the decoder's fields are top-level
        vision_config=Sub("Phi4MultimodalVisionConfig", _vision(crop_size=16, image_token_id=255, feature_layer=-2)),
        # audio tower is required by the architecture; keep it minimal (never fed)
        audio_config=Sub("Phi4MultimodalAudioConfig", dict(
            hidden_size=HIDDEN, intermediate_size=64, num_blocks=1, num_attention_heads=4, ext_pw_out_channel=HIDDEN,
            depthwise_separable_out_channel=HIDDEN, nemo_conv_channels=HIDDEN, input_size=16, audio_token_id=254,
        )),
    ),
    "lfm2_vl": _tiny(
        "Lfm2VlForConditionalGeneration", "Lfm2VlConfig",
        vision_config=Sub("Siglip2VisionConfig", _vision(
            num_patches=16, vision_use_head=False)),  # 4x4 learned position grid, resized per image
        text_config=Sub("Lfm2Config", _text(
            layer_types=["conv", "full_attention"],  # layer 0 a gated short convolution, layer 1 attention
            block_auto_adjust_ff_dim=False,  # else the MLP width is rounded up to a multiple of 256
        )),
        image_token_id=255, projector_hidden_size=64,
        downsample_factor=2,  # 2x2 patches unshuffled into one token: a 16 px image is 4 <image>
        image_start_token_id=253, image_end_token_id=254,  # processor tokens (not transformers config fields)
    ),
    "janus": _tiny(
        "JanusForConditionalGeneration", "JanusConfig",
        # Janus sizes its MLP by mlp_ratio; the aligner is fc1 + 1 hidden (depth 2)
        vision_config=Sub("JanusVisionConfig", _tower("vision", dict(
            mlp_ratio=2, projection_dim=HIDDEN, depth=2, num_image_tokens=16), drop=("intermediate_size",))),
        text_config=_LLAMA,
        # image generation only (never on the understanding forward); GroupNorm needs 32-channel multiples
        vq_config=Sub("JanusVQVAEConfig", dict(
            embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
            num_res_blocks=1, projection_dim=HIDDEN, image_token_embed_dim=HIDDEN,
        )),
        image_token_id=255,  # <image_placeholder>
        # processor tokens (not transformers config fields): <begin_of_image>, <end_of_image>
        image_start_token_id=253, image_end_token_id=254,
    ),
}

# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def tiny_model_names() -> list[str]:
    """Names of the built-in tiny models (one per family; "pixtral" is LLaVA with a Pixtral tower)."""
    return list(_ZOO)


def tiny_family(name: str) -> TinyFamily:
    """The table row of a tiny model; ValueError naming the known ones for an unknown ``name``."""
    try:
        return _ZOO[name]
    except KeyError:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(_ZOO)}") from None


def _set_init_std(config, std: float) -> None:
    if hasattr(config, "initializer_range"):
        config.initializer_range = std
    for key in ("text_config", "vision_config"):
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _set_init_std(sub, std)


def _repeat_pattern(values: list, n: int) -> list:
    return [values[i % len(values)] for i in range(n)]


def deepen_config(config, layers: int) -> None:
    """Give a tiny config ``layers`` layers per tower, keeping each family's layer pattern.

    Decoder: ``num_hidden_layers`` (Gemma 3 / Cohere 2 ``layer_types`` repeated, Mllama a cross-attention
    layer every fourth layer, Llama 4 every second layer MoE, GLM-4.5V's leading dense layers kept but at
    least one layer MoE; Qwen3-VL-MoE is MoE in every layer). Vision tower: ``num_hidden_layers`` or
    ``depth`` (Qwen2.5-VL full attention every fourth block, Qwen3-VL deepstack taps every third, Mllama a
    global layer per four local ones and an intermediate tap every fourth).
    """
    if layers < 1:
        raise ValueError("layers must be >= 1")
    text = getattr(config, "text_config", None)
    vision = getattr(config, "vision_config", None)
    if text is not None:
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):
            text.layer_types = _repeat_pattern(list(text.layer_types), layers)
        if getattr(text, "cross_attention_layers", None) is not None:
            text.cross_attention_layers = list(range(min(1, layers - 1), layers, 4))
        if getattr(text, "no_rope_layers", None):
            text.no_rope_layers = _repeat_pattern(list(text.no_rope_layers), layers)
        if getattr(text, "moe_layers", None) is not None:
            text.moe_layers = [i for i in range(layers) if i % 2 == 1]
        if getattr(text, "first_k_dense_replace", None) is not None:  # GLM-4.5V: leading dense layers, then MoE
            text.first_k_dense_replace = min(text.first_k_dense_replace, layers - 1)
    if vision is not None:
        for key in ("num_hidden_layers", "depth"):
            if hasattr(vision, key):
                setattr(vision, key, layers)
        if getattr(vision, "fullatt_block_indexes", None) is not None:
            vision.fullatt_block_indexes = list(range(3, layers, 4)) or [layers - 1]
        if getattr(vision, "deepstack_visual_indexes", None) is not None:
            vision.deepstack_visual_indexes = list(range(0, layers, 3))
        if getattr(vision, "num_global_layers", None) is not None:
            vision.num_global_layers = max(1, layers // 4)
        if getattr(vision, "intermediate_layers_indices", None) is not None:
            vision.intermediate_layers_indices = list(range(min(1, layers - 1), layers, 4))
            vision.vision_output_dim = vision.hidden_size * (1 + len(vision.intermediate_layers_indices))


def build_tiny_config(name: str, *, layers: int | None = None):
    """The transformers config of a tiny model (fresh object; sdpa attention, eager for EAGER_ONLY); ``layers``: layers per
    tower instead of the default 2 (see :func:`deepen_config`)."""
    config = tiny_family(name).config()
    if layers is not None:
        deepen_config(config, layers)
    config._attn_implementation = "eager" if name in EAGER_ONLY else ATTN
    _set_init_std(config, TINY_INIT_STD)
    return config
