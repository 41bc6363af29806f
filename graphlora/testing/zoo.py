"""Built-in tiny VLMs: one per supported family, random weights, built from a config in milliseconds.

Every model has ~32-wide hidden states, 2 layers per tower, 4 heads (2 KV heads), a 256-token
vocabulary and 16-32 px images, so a forward + backward takes a few milliseconds on CPU. They
exist to exercise tracing and LoRA insertion on the real transformers module structure; the
weights mean nothing.

``build_tiny_model`` re-draws every parameter that transformers initialises to exactly zero and
that would otherwise block the gradient into the vision path (Gemma 3's projector matrix,
Mllama's tanh gates, zero-centred RMSNorm scales...): a random tiny model must prove that the
vision tower is alive. Biases stay zero (they never block a gradient).

Deliberate quirk kept from the real configs: LLaVA reads vision features from layer -2, so its
last CLIP layer never reaches the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import transformers
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.utils import ModelOutput

from graphlora.families import synthesize_inputs

DEFAULT_TINY_MODEL = "llava"

__all__ = [
    "DEFAULT_TINY_MODEL",
    "TinyLlama4ForConditionalGeneration",
    "build_tiny_config",
    "deepen_config",
    "build_tiny_model",
    "revive_zero_parameters",
    "tiny_example_inputs",
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


def _text(**overrides) -> dict:
    """A tiny Llama-style decoder (2 layers, 4 heads, 2 KV heads, head_dim 8)."""
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.update(overrides)
    return cfg


def _vision(**overrides) -> dict:
    """A tiny ViT (CLIP/SigLIP-style field names): 16 px images, 4 px patches -> 4x4 grid."""
    cfg = dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
    )
    cfg.update(overrides)
    return cfg


# --------------------------------------------------------------------------------------------
# per-family configs: name -> (model class name, config factory)
# --------------------------------------------------------------------------------------------


def _llava():
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**_vision(projection_dim=HIDDEN)),
        text_config=transformers.LlamaConfig(**_text()),
        image_token_index=255,
        image_seq_length=16,
        vision_feature_layer=-2,  # the default: the last CLIP layer is dead (a deliberate test case)
        vision_feature_select_strategy="default",
    )


def _llava_next():
    return transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(**_vision(projection_dim=HIDDEN)),
        text_config=transformers.LlamaConfig(**_text()),
        image_token_index=255,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def _pixtral():
    return transformers.LlavaConfig(
        vision_config=transformers.PixtralVisionConfig(**_vision(image_size=32, head_dim=8)),
        text_config=transformers.MistralConfig(**_text(head_dim=8)),
        image_token_index=10,  # Mistral tokenizer: [IMG]=10, [IMG_BREAK]=12, [IMG_END]=13
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
    )


def _mistral3():
    return transformers.Mistral3Config(
        vision_config=transformers.PixtralVisionConfig(**_vision(image_size=32, head_dim=8)),
        text_config=transformers.MistralConfig(**_text(head_dim=8)),
        image_token_index=10,
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )


def _gemma3():
    return transformers.Gemma3Config(
        vision_config=transformers.SiglipVisionConfig(**_vision(vision_use_head=False)),  # as released
        text_config=transformers.Gemma3TextConfig(
            **_text(
                head_dim=8,
                query_pre_attn_scalar=8,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention"],
                bos_token_id=2,
                eos_token_id=1,
            )
        ),
        mm_tokens_per_image=4,  # 4x4 patches avg-pooled to 2x2
        boi_token_index=253,
        eoi_token_index=254,
        image_token_index=255,
    )


def _idefics3_like(config_cls, vision_cls):
    return config_cls(
        vision_config=vision_cls(**_vision()),
        text_config=transformers.LlamaConfig(**_text()),
        scale_factor=2,  # 4x4 patches -> 4 image tokens per crop
        image_token_id=255,
        # Structural tokens the processor adds (not config fields of transformers): kept here so the
        # tiny layout uses fixed ids. ``<fake_token_around_image>`` is image_token_id - 1 as in the
        # released checkpoints.
        fake_image_token_id=254,
        global_image_token_id=253,
        newline_token_id=10,
        row_col_token_ids=list(range(200, 236)),
    )


def _idefics3():
    return _idefics3_like(transformers.Idefics3Config, transformers.Idefics3VisionConfig)


def _smolvlm():
    return _idefics3_like(transformers.SmolVLMConfig, transformers.SmolVLMVisionConfig)


def _idefics2():
    return transformers.Idefics2Config(
        vision_config=transformers.Idefics2VisionConfig(**_vision()),
        perceiver_config=transformers.Idefics2PerceiverConfig(
            hidden_size=HIDDEN,  # the text width: the resampler runs after modality_projection
            resampler_n_latents=4,  # = the processor's image_seq_len (64 released)
            resampler_depth=2,
            resampler_n_heads=4,
            resampler_head_dim=8,
            num_key_value_heads=2,
        ),
        text_config=transformers.MistralConfig(**_text(head_dim=8)),
        image_token_id=255,  # <image>; <fake_token_around_image> is the id below it, as released
        fake_image_token_id=254,  # processor token (not a transformers config field)
    )


def _got_ocr2():
    return transformers.GotOcr2Config(
        vision_config=transformers.GotOcr2VisionConfig(
            **{k: v for k, v in _vision(image_size=32).items() if k != "intermediate_size"},  # the MLP is mlp_dim
            mlp_dim=64,  # 8x8 patches; the projector's two stride-2 convs -> 2x2 = 4 tokens
            output_channels=HIDDEN,  # the neck's width
            window_size=4,  # 2x2 windows of 4x4 patches
            global_attn_indexes=[1],  # layer 0 windowed, layer 1 global
        ),
        text_config=transformers.Qwen2Config(**_text()),
        image_token_index=255,  # <imgpad>; <img>=253, </img>=254 as in the released tokenizer
        image_seq_length=4,
        img_start_token_id=253,  # processor tokens (not transformers config fields)
        img_end_token_id=254,
    )


def _ovis2():
    return transformers.Ovis2Config(
        vision_config=transformers.Ovis2VisionConfig(
            **_vision(),
            vocab_size=64,  # the visual vocabulary (16384 released); its last 5 rows embed the indicators
            hidden_stride=2,  # as released: 2x2 patches per visual token -> 4 tokens per image
        ),
        text_config=transformers.Qwen2Config(**_text()),
        hidden_size=HIDDEN,  # the visual embedding table's width (= the text's)
        vocab_size=VOCAB,
        image_token_id=255,  # <IMG_ATOM>
        visual_indicator_token_ids=[250, 251, 252, 253, 254],  # <IMG_START>, <IMG_GRID>, <IMG_COL>, <IMG_ROW>, <IMG_END>
    )


def _mllama():
    return transformers.MllamaConfig(
        vision_config=transformers.MllamaVisionConfig(
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=4,
            image_size=16,
            patch_size=4,
            max_num_tiles=2,
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
            intermediate_layers_indices=[1],
            vision_output_dim=HIDDEN * 2,  # final state + 1 intermediate layer
        ),
        text_config=transformers.MllamaTextConfig(
            **_text(num_hidden_layers=3, cross_attention_layers=[1])
        ),
        image_token_index=VOCAB,  # == text vocab_size, as in the real model (embedding has vocab + 8 rows)
    )


def _aya_vision():
    return transformers.AyaVisionConfig(
        vision_config=transformers.SiglipVisionConfig(**_vision(vision_use_head=False)),
        text_config=transformers.Cohere2Config(
            **_text(head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
        ),
        downsample_factor=2,  # 4x4 patches -> 4 <|IMG_PATCH|> per tile
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_token_index=255,
        # processor tokens (not transformers config fields)
        start_of_img_token_id=250,
        end_of_img_token_id=251,
        tile_global_token_id=252,
        tile_token_ids=list(range(240, 250)),
    )


def _llava_onevision():
    return transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(**_vision(vision_use_head=False)),  # as released
        text_config=transformers.Qwen2Config(**_text()),
        image_token_index=255,
        video_token_index=254,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )


def _cohere2_vision():
    return transformers.Cohere2VisionConfig(
        vision_config=transformers.SiglipVisionConfig(**_vision(vision_use_head=False)),  # as aya_vision
        text_config=transformers.Cohere2Config(
            **_text(head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
        ),
        downsample_factor=2,  # 4x4 patches -> 4 <|IMG_PATCH|> per tile
        alignment_intermediate_size=64,  # SwiGLU: chunked into two halves of 32
        image_token_id=255,
        # processor tokens (not transformers config fields)
        boi_token_id=252,
        eoi_token_id=253,
        img_line_break_token_id=254,
    )


def _deepseek_vl():
    return transformers.DeepseekVLConfig(
        # SigLIP's pooling head stays on as in the released checkpoint: it runs, but the aligner reads
        # last_hidden_state, so the head never reaches the loss
        vision_config=transformers.SiglipVisionConfig(**_vision()),
        text_config=transformers.LlamaConfig(**_text()),
        image_token_id=255,
    )


def _internvl():
    return transformers.InternVLConfig(
        vision_config=transformers.InternVLVisionConfig(
            **_vision(image_size=[16, 16], patch_size=[4, 4], layer_scale_init_value=0.1)
        ),
        text_config=transformers.Qwen2Config(**_text()),
        image_token_id=255,  # <IMG_CONTEXT>; <img>=253, </img>=254 as in the released tokenizers
        image_seq_length=4,
        downsample_ratio=0.5,  # 4x4 patches -> 4 tokens per tile
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def _paligemma():
    return transformers.PaliGemmaConfig(
        vision_config=transformers.SiglipVisionConfig(**_vision(vision_use_head=False)),
        text_config=transformers.GemmaConfig(**_text(head_dim=8, bos_token_id=2, eos_token_id=1)),
        image_token_index=255,
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
        vocab_size=VOCAB,
    )


_MROPE = {"rope_type": "default", "mrope_section": [2, 1, 1]}  # (t, h, w) sections: sum = head_dim / 2
# Qwen-style special ids: <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>
_QWEN_IDS = dict(vision_start_token_id=251, vision_end_token_id=252, image_token_id=255, video_token_id=254)


def _qwen_vision(**overrides) -> dict:
    """A tiny Qwen-style vision tower: 4 px patches, 2x2 merge -> a 16 px image is 4 tokens."""
    cfg = dict(
        depth=2,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_heads=4,
        out_hidden_size=HIDDEN,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    cfg.update(overrides)
    return cfg


def _qwen2_vl():
    # Qwen2-VL names the tower width `embed_dim` (mlp_ratio * embed_dim MLP); `hidden_size` is the merger output.
    vision = _qwen_vision(embed_dim=HIDDEN, mlp_ratio=2)
    for key in ("intermediate_size", "out_hidden_size"):
        vision.pop(key)
    return transformers.Qwen2VLConfig(
        vision_config=vision, text_config=_text(head_dim=8, rope_parameters=_MROPE), **_QWEN_IDS
    )


def _qwen2_5_vl():
    return transformers.Qwen2_5_VLConfig(
        vision_config=_qwen_vision(
            window_size=16,  # 2x2 merged tokens per attention window (real: 112 px with patch 14)
            fullatt_block_indexes=[1],  # block 0 windowed, block 1 full attention
        ),
        text_config=_text(head_dim=8, rope_parameters=_MROPE),
        **_QWEN_IDS,
    )


def _qwen3_vl():
    return transformers.Qwen3VLConfig(
        vision_config=_qwen_vision(
            num_position_embeddings=16,  # 4x4 learned grid, interpolated to any image grid
            deepstack_visual_indexes=[0],  # block 0 output is also added into decoder layer 0
        ),
        text_config=_text(head_dim=8, rope_parameters={**_MROPE, "mrope_interleaved": True}),
        **_QWEN_IDS,
    )


def _qwen3_vl_moe():
    # Qwen3-VL-30B-A3B: every decoder layer is MoE (decoder_sparse_step 1, no mlp_only_layers), no shared
    # expert; softmax top-k router, renormalised. Tiny: 4 experts of width 16, top-2.
    return transformers.Qwen3VLMoeConfig(
        vision_config=_qwen_vision(num_position_embeddings=16, deepstack_visual_indexes=[0]),
        text_config=_text(
            head_dim=8,
            rope_parameters={**_MROPE, "mrope_interleaved": True},
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        **_QWEN_IDS,
    )


_GLM_IDS = dict(
    image_start_token_id=250,  # <|begin_of_image|>
    image_end_token_id=251,  # <|end_of_image|>
    video_start_token_id=252,
    video_end_token_id=253,
    image_token_id=255,
    video_token_id=254,
)
# GLM rotates half of each head (partial_rotary_factor 0.5): head_dim 16 -> 4 rotary pairs
_GLM_TEXT = dict(
    head_dim=16, num_attention_heads=2, num_key_value_heads=1, rope_parameters={**_MROPE, "partial_rotary_factor": 0.5}
)


def _glm4v():
    return transformers.Glm4vConfig(
        vision_config=_qwen_vision(image_size=16), text_config=_text(**_GLM_TEXT), **_GLM_IDS
    )


def _glm4v_moe():
    # GLM-4.5V: layer 0 dense (first_k_dense_replace 1), later layers MoE with one shared expert next to the
    # routed ones (sigmoid router with a score-correction bias, one group, renormalised top-k). Tiny: 4
    # routed experts of width 16, top-2.
    return transformers.Glm4vMoeConfig(
        vision_config=_qwen_vision(image_size=16),
        text_config=_text(
            **_GLM_TEXT,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
        **_GLM_IDS,
    )


def _llama4():
    return transformers.Llama4Config(
        vision_config=transformers.Llama4VisionConfig(
            hidden_size=HIDDEN,
            intermediate_size=128,  # = hidden / pixel_shuffle_ratio**2: also the pixel-shuffle MLP input
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            pixel_shuffle_ratio=0.5,  # 4x4 patches -> 4 <|patch|> per tile
            projector_input_dim=HIDDEN,
            projector_output_dim=HIDDEN,
            vision_output_dim=HIDDEN,
        ),
        text_config=transformers.Llama4TextConfig(
            **_text(
                head_dim=8,
                intermediate_size_mlp=64,
                num_local_experts=2,
                num_experts_per_tok=1,
                interleave_moe_layer_step=2,  # layer 0 dense, layer 1 MoE
                attention_chunk_size=16,
            )
        ),
        boi_token_index=250,  # <|image_start|>
        eoi_token_index=251,  # <|image_end|>
        image_token_index=255,  # <|patch|>
        image_separator_token_id=252,  # <|image|> (processor token, not a config field)
        tile_x_separator_token_id=253,
        tile_y_separator_token_id=254,
    )


def _lfm2_vl():
    return transformers.Lfm2VlConfig(
        vision_config=transformers.Siglip2VisionConfig(
            **_vision(num_patches=16, vision_use_head=False)  # 4x4 learned position grid, resized per image
        ),
        text_config=transformers.Lfm2Config(
            **_text(
                layer_types=["conv", "full_attention"],  # layer 0 a gated short convolution, layer 1 attention
                block_auto_adjust_ff_dim=False,  # else the MLP width is rounded up to a multiple of 256
            )
        ),
        image_token_id=255,
        projector_hidden_size=64,
        downsample_factor=2,  # 2x2 patches unshuffled into one token: a 16 px image is 4 <image>
        # processor tokens (not transformers config fields)
        image_start_token_id=253,
        image_end_token_id=254,
    )


def _janus():
    vision = _vision(mlp_ratio=2, projection_dim=HIDDEN, depth=2, num_image_tokens=16)  # aligner: fc1 + 1 hidden
    vision.pop("intermediate_size")  # Janus sizes its MLP by mlp_ratio
    return transformers.JanusConfig(
        vision_config=transformers.JanusVisionConfig(**vision),
        text_config=transformers.LlamaConfig(**_text()),
        # image generation only (never on the understanding forward); GroupNorm needs 32-channel multiples
        vq_config=transformers.JanusVQVAEConfig(
            embed_dim=8,
            num_embeddings=64,
            latent_channels=32,
            base_channels=32,
            channel_multiplier=[1, 1],
            num_res_blocks=1,
            projection_dim=HIDDEN,
            image_token_embed_dim=HIDDEN,
        ),
        image_token_id=255,  # <image_placeholder>
        # processor tokens (not transformers config fields): <begin_of_image>, <end_of_image>
        image_start_token_id=253,
        image_end_token_id=254,
    )


def _phi4_multimodal():
    return transformers.Phi4MultimodalConfig(
        **_text(),
        vision_config=transformers.Phi4MultimodalVisionConfig(
            **_vision(), crop_size=16, image_token_id=255, feature_layer=-2
        ),
        # audio tower is required by the architecture; keep it minimal (never fed)
        audio_config=transformers.Phi4MultimodalAudioConfig(
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_blocks=1,
            num_attention_heads=4,
            ext_pw_out_channel=HIDDEN,
            depthwise_separable_out_channel=HIDDEN,
            nemo_conv_channels=HIDDEN,
            input_size=16,
            audio_token_id=254,
        ),
    )


_ZOO: dict[str, tuple[str, Callable[[], object]]] = {
    "llava": ("LlavaForConditionalGeneration", _llava),
    "llava_next": ("LlavaNextForConditionalGeneration", _llava_next),
    "pixtral": ("LlavaForConditionalGeneration", _pixtral),
    "mistral3": ("Mistral3ForConditionalGeneration", _mistral3),
    "aya_vision": ("AyaVisionForConditionalGeneration", _aya_vision),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", _llava_onevision),
    "cohere2_vision": ("Cohere2VisionForConditionalGeneration", _cohere2_vision),
    "deepseek_vl": ("DeepseekVLForConditionalGeneration", _deepseek_vl),
    "internvl": ("InternVLForConditionalGeneration", _internvl),
    "paligemma": ("PaliGemmaForConditionalGeneration", _paligemma),
    "gemma3": ("Gemma3ForConditionalGeneration", _gemma3),
    "idefics3": ("Idefics3ForConditionalGeneration", _idefics3),
    "smolvlm": ("SmolVLMForConditionalGeneration", _smolvlm),
    "idefics2": ("Idefics2ForConditionalGeneration", _idefics2),
    "got_ocr2": ("GotOcr2ForConditionalGeneration", _got_ocr2),
    "ovis2": ("Ovis2ForConditionalGeneration", _ovis2),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", _qwen2_vl),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", _qwen2_5_vl),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", _qwen3_vl),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", _qwen3_vl_moe),
    "glm4v": ("Glm4vForConditionalGeneration", _glm4v),
    "glm4v_moe": ("Glm4vMoeForConditionalGeneration", _glm4v_moe),
    "mllama": ("MllamaForConditionalGeneration", _mllama),
    "llama4": ("TinyLlama4ForConditionalGeneration", _llama4),  # mends a 5.24 bug, see the class
    "phi4_multimodal": ("Phi4MultimodalForCausalLM", _phi4_multimodal),
    "lfm2_vl": ("Lfm2VlForConditionalGeneration", _lfm2_vl),
    "janus": ("JanusForConditionalGeneration", _janus),
}


# --------------------------------------------------------------------------------------------
# fixture classes
# --------------------------------------------------------------------------------------------


@dataclass
class _MoeCausalLMOutputWithImages(MoeCausalLMOutputWithPast):
    """``MoeCausalLMOutputWithPast`` plus the ``image_outputs`` field Llama 4's wrapper reads."""

    image_outputs: Any = None


class _Llama4ForCausalLMWithImageOutputs(transformers.Llama4ForCausalLM):
    """Llama 4's text model, returning an output that has an (empty) ``image_outputs`` field."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        return _MoeCausalLMOutputWithImages(**out) if isinstance(out, ModelOutput) else out


class TinyLlama4ForConditionalGeneration(transformers.Llama4ForConditionalGeneration):
    """``Llama4ForConditionalGeneration`` whose forward does not crash at the end.

    transformers 5.24 ends ``Llama4ForConditionalGeneration.forward`` with
    ``image_outputs=outputs.image_outputs`` where ``outputs`` is the text model's
    ``MoeCausalLMOutputWithPast``, which has no such field (AttributeError after the loss is
    computed). The mend swaps the class of ``language_model`` for a subclass (no new state, same
    parameter names and module classes below it) whose output carries ``image_outputs=None``.
    The returned ``image_outputs`` is therefore ``None``; loss and logits are untouched.
    """

    def __init__(self, config):
        super().__init__(config)
        self.language_model.__class__ = _Llama4ForCausalLMWithImageOutputs


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def tiny_model_names() -> list[str]:
    """Names of the built-in tiny models (one per family; "pixtral" is LLaVA with a Pixtral tower)."""
    return list(_ZOO)


def _entry(name: str):
    try:
        return _ZOO[name]
    except KeyError:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(_ZOO)}") from None


#: Weight init std of the tiny models. transformers' usual 0.02 suits hidden sizes in the thousands;
#: at hidden size 32 it makes logits nearly flat (|logit| ~ 0.1), so a frozen head leaves LoRA almost
#: nothing to learn and losses barely move. 0.2 gives logits of order 1.
TINY_INIT_STD = 0.2


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
    config = _entry(name)[1]()
    if layers is not None:
        deepen_config(config, layers)
    config._attn_implementation = "eager" if name in EAGER_ONLY else ATTN
    _set_init_std(config, TINY_INIT_STD)
    return config


def _model_class(name: str) -> type:
    cls_name = _entry(name)[0]
    return globals().get(cls_name) or getattr(transformers, cls_name)


def build_tiny_model(name: str, *, seed: int = 0, layers: int | None = None) -> torch.nn.Module:
    """A tiny model with random fp32 weights in eval() mode; same seed -> same weights.

    ``layers``: layers per tower (default: the family's tiny config). The global RNG state is left untouched.
    """
    config = build_tiny_config(name, layers=layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(name)(config)
    revive_zero_parameters(model, seed=seed)
    # .float(), not .to(torch.float32): the latter would also cast Llama 4's complex RoPE buffer
    return model.float().eval()


@torch.no_grad()
def revive_zero_parameters(model: torch.nn.Module, *, seed: int = 0) -> list[str]:
    """Re-draw every exactly-all-zero floating parameter that is not a bias; returns their names.

    Small parameters (<= 4 values: tanh gates and the like) get uniform values in [-0.5, 0.5]
    so the gate is clearly open; the rest normal(0, 0.02).
    """
    generator = torch.Generator().manual_seed(seed + 1)
    revived = []
    for name, p in model.named_parameters():
        if not p.is_floating_point() or name.endswith("bias") or p.numel() == 0 or bool(p.any()):
            continue
        if p.numel() <= 4:
            value = torch.rand(p.shape, generator=generator) - 0.5
        else:
            value = torch.randn(p.shape, generator=generator) * 0.02
        p.copy_(value.to(p.dtype))
        revived.append(name)
    return revived


def tiny_example_inputs(name: str, model, *, batch_size: int = 2, **kw) -> dict:
    """:func:`graphlora.families.synthesize_inputs` for a tiny model (``name`` is checked)."""
    _entry(name)
    return synthesize_inputs(model, batch_size=batch_size, **kw)
