"""The expected labels of every zoo family, written out by hand from each family's modeling code.

The expected component and role of every trainable matmul of every fixture family were derived by
reading each family's transformers modeling code (what the linear computes and where its output
goes), not copied from graphlora's output. Keys are the site names of the tiny configs (2 layers per
tower); :func:`truth_patterns` generalises them to any number of layers, so config variants
(tests/test_label_variants.py) are checked against the same truth.
"""

from __future__ import annotations

import re

from helpers import expand

V, P, X, L, H = "vision", "projector", "cross_attention", "language", "head"


def pairs(names: str, roles: str) -> dict[str, str]:
    """``pairs("self_attn.{q,k}_proj", "attn.{q,k}")`` -> {"self_attn.q_proj": "attn.q", ...}."""
    left, right = expand(names), expand(roles)
    assert len(left) == len(right), (names, roles)
    return dict(zip(left, right))


def tower(prefix: str, layers: str, component: str, *parts: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Every ``prefix.<layer>.<part>`` of the listed layers -> (component, role)."""
    out = {}
    for layer in expand(layers):
        for part in parts:
            out.update({f"{prefix}.{layer}.{name}": (component, role) for name, role in part.items()})
    return out


def single(component: str, role: str, *names: str) -> dict[str, tuple[str, str]]:
    return {name: (component, role) for pattern in names for name in expand(pattern)}


# -- blocks, by what their linears compute ------------------------------------------------------
# Llama-style decoder: q/k/v feed SDPA, o reads its output; down(silu(gate(x)) * up(x)).
LLAMA_ATTN = pairs("self_attn.{q,k,v,o}_proj", "attn.{q,k,v,o}")
LLAMA_MLP = pairs("mlp.{gate,up,down}_proj", "mlp.{gate,up,down}")
LLAMA = {**LLAMA_ATTN, **LLAMA_MLP}
# CLIP / SigLIP / Idefics3 / Phi-4 vision encoder layers: fc2(gelu(fc1(x))): fc1 is up, fc2 down.
CLIP = {**pairs("self_attn.{q,k,v,out}_proj", "attn.{q,k,v,o}"), **pairs("mlp.fc{1,2}", "mlp.{up,down}")}
# Pixtral's vision layers: attention + a SwiGLU feed-forward.
PIXTRAL = {**pairs("attention.{q,k,v,o}_proj", "attn.{q,k,v,o}"),
           **pairs("feed_forward.{gate,up,down}_proj", "mlp.{gate,up,down}")}
# InternViT: the attention output projection is called projection_layer.
INTERNVIT = {**pairs("attention.{q,k,v}_proj", "attn.{q,k,v}"), "attention.projection_layer": "attn.o",
             **pairs("mlp.fc{1,2}", "mlp.{up,down}")}
# Qwen-style vision blocks: one fused qkv linear, split after the matmul; proj reads the attention output.
QWEN_VIT_ATTN = pairs("attn.{qkv,proj}", "attn.{qkv,o}")
# MoE feed-forward of Qwen3-VL-MoE / GLM-4.5V: the router (F.linear on ``gate.weight``; its scores go through
# softmax or sigmoid and top-k and only pick and weight the experts) is role other; the 3-D expert parameters
# feed per-expert matmuls: gate_up_proj's output is chunked in two halves, act(gate) * up, then down_proj.
MOE_ROUTED = {"mlp.gate.weight": "other", **pairs("mlp.experts.{gate_up,down}_proj", "mlp.{gate_up,down}")}
# Mllama / Llama 4 vision layers: q/k/v/o_proj with a GELU MLP fc1 -> fc2.
META_VIT = {**LLAMA_ATTN, **pairs("mlp.fc{1,2}", "mlp.{up,down}")}

LM = "model.language_model.layers"
PHI4_HEAD = "model.embed_tokens_extend.image_embed.img_processor.head"


def llava_like(vision_prefix: str, vision_block: dict, projector: list[str], lm: str = LM) -> dict:
    return {
        **tower(vision_prefix, "{0,1}", V, vision_block),
        **single(P, "other", *projector),
        **tower(lm, "{0,1}", L, LLAMA),
        **single(H, "other", "lm_head"),
    }


# family -> {site name: (component, role)}: every labelled matmul of the full-VLM rewrite.
EXPECTED: dict[str, dict[str, tuple[str, str]]] = {
    # LLaVA: CLIP tower (all of it runs; layer 1 is dead weight for the loss, see below), a 2-layer
    # GELU projector, Llama decoder, untied lm_head.
    "llava": llava_like("model.vision_tower.encoder.layers", CLIP, ["model.multi_modal_projector.linear_{1,2}"]),
    "llava_next": llava_like("model.vision_tower.encoder.layers", CLIP, ["model.multi_modal_projector.linear_{1,2}"]),
    "pixtral": llava_like("model.vision_tower.transformer.layers", PIXTRAL,
                          ["model.multi_modal_projector.linear_{1,2}"]),
    # Mistral 3: the patch merger (unfold 2x2 patches -> merging_layer) is the first step of the projector.
    "mistral3": llava_like("model.vision_tower.transformer.layers", PIXTRAL,
                           ["model.multi_modal_projector.patch_merger.merging_layer",
                            "model.multi_modal_projector.linear_{1,2}"]),
    # Aya Vision: pixel shuffle -> LayerNorm -> linear_1 (SwiGLU, chunked) -> linear_2: all projector;
    # Cohere2 decoder (parallel attention and MLP) has Llama-named linears.
    "aya_vision": llava_like("model.vision_tower.encoder.layers", CLIP, ["model.multi_modal_projector.linear_{1,2}"]),
    # LLaVA-OneVision: SigLIP tower read at its last layer (all layers live), LLaVA's 2-layer GELU projector
    # (image_newline is a parameter concatenated after it, no matmul), Qwen2 decoder, untied lm_head.
    "llava_onevision": llava_like("model.vision_tower.encoder.layers", CLIP,
                                  ["model.multi_modal_projector.linear_{1,2}"]),
    # Cohere2 Vision: Aya Vision's layout: pixel shuffle -> linear_1 (SwiGLU, chunked) -> linear_2 (projector);
    # Cohere2 decoder; lm_head tied to the embeddings (still a matmul that produces the logits).
    "cohere2_vision": llava_like("model.vision_tower.encoder.layers", CLIP,
                                 ["model.multi_modal_projector.linear_{1,2}"]),
    # DeepSeek-VL: AutoModel of a SigLIP vision config is the bare SiglipVisionTransformer (no inner
    # ``vision_model``); its pooling head runs (vision_use_head as released) but the aligner reads
    # last_hidden_state, so the head is vision and dead. Aligner linear1 -> GELU -> linear2: projector.
    "deepseek_vl": {
        **llava_like("model.vision_model.encoder.layers", CLIP, ["model.aligner.linear{1,2}"]),
        **{f"model.vision_model.head.{name}": (V, role) for name, role in {
            "attention.in_proj_weight": "attn.qkv", "attention.out_proj": "attn.o",
            "mlp.fc1": "mlp.up", "mlp.fc2": "mlp.down"}.items()},
    },
    "internvl": llava_like("model.vision_tower.encoder.layer", INTERNVIT, ["model.multi_modal_projector.linear_{1,2}"]),
    "paligemma": llava_like("model.vision_tower.encoder.layers", CLIP, ["model.multi_modal_projector.linear"]),
    # Gemma 3: the projector has no Linear: avg-pool, RMSNorm, then ``x @ mm_input_projection_weight``.
    "gemma3": llava_like("model.vision_tower.encoder.layers", CLIP,
                         ["model.multi_modal_projector.mm_input_projection_weight"]),
    # Idefics3 / SmolVLM: pixel shuffle + one Linear in the connector.
    "idefics3": llava_like("model.vision_model.encoder.layers", CLIP, ["model.connector.modality_projection.proj"],
                           lm="model.text_model.layers"),
    "smolvlm": llava_like("model.vision_model.encoder.layers", CLIP, ["model.connector.modality_projection.proj"],
                          lm="model.text_model.layers"),
    # Idefics2: SigLIP-like tower; the connector is modality_projection (a SwiGLU MLP to the text width, outside any
    # block: role other) then a perceiver resampler whose learned latents (queries) attend to [projected patches;
    # latents] (keys/values): its layers are attention + SwiGLU blocks, but they compress the image for the text
    # and feed no vision block: the projector, with their attention/MLP roles and no layer. Mistral text.
    "idefics2": {
        **tower("model.vision_model.encoder.layers", "{0,1}", V, CLIP),
        **single(P, "other", "model.connector.modality_projection.{gate,up,down}_proj"),
        **tower("model.connector.perceiver_resampler.layers", "{0,1}", P, LLAMA),
        **tower("model.text_model.layers", "{0,1}", L, LLAMA),
        **single(H, "other", "lm_head"),
    },
    # GOT-OCR2: SAM ViT layers with one fused qkv linear (reshaped, unbound into q/k/v, eager q k^T (+ decomposed
    # rel-pos) softmax v) and proj on its output; lin1 -> GELU -> lin2. The neck and the projector's two stride-2
    # convolutions are Conv2d (no matmul); the relative-position einsums read interpolated, indexed parameters
    # (no weight). multimodal_projector is the one projector linear. Qwen2 text; lm_head tied to the embedding.
    "got_ocr2": llava_like("model.vision_tower.layers",
                           {**pairs("attn.{qkv,proj}", "attn.{qkv,o}"), **pairs("mlp.lin{1,2}", "mlp.{up,down}")},
                           ["model.multi_modal_projector.multimodal_projector"]),
    # Ovis2: AIMv2-like tower (q/k/v/out_proj, SwiGLU ffn). head_linear gives logits over a visual vocabulary (then
    # LayerNorm, softmax: soft visual tokens) and the visual embedding table's matmul turns them into text
    # embeddings: two pixel-only matmuls outside the blocks between the tower and the text: the projector (like
    # Qwen2-VL's merger, although head_linear sits in the vision model). Qwen2 text; lm_head tied.
    "ovis2": llava_like("model.vision_tower.transformer.encoder.layers",
                        {**pairs("attention.{q,k,v,out}_proj", "attn.{q,k,v,o}"),
                         **pairs("ffn.{gate,up,down}_proj", "mlp.{gate,up,down}")},
                        ["model.vision_tower.head_linear", "model.visual_embeddings_table.weight"]),
    # Qwen2-VL: the merger (LayerNorm, mlp.0, GELU, mlp.2) sits inside the vision tower but is the projector.
    "qwen2_vl": llava_like("model.visual.blocks", {**QWEN_VIT_ATTN, **pairs("mlp.fc{1,2}", "mlp.{up,down}")},
                           ["model.visual.merger.mlp.{0,2}"]),
    "qwen2_5_vl": llava_like("model.visual.blocks",
                             {**QWEN_VIT_ATTN, **pairs("mlp.{gate,up,down}_proj", "mlp.{gate,up,down}")},
                             ["model.visual.merger.mlp.{0,2}"]),
    # Qwen3-VL: the deepstack mergers map block 0's output into decoder layer 0: projectors too.
    "qwen3_vl": llava_like("model.visual.blocks", {**QWEN_VIT_ATTN, **pairs("mlp.linear_fc{1,2}", "mlp.{up,down}")},
                           ["model.visual.merger.linear_fc{1,2}", "model.visual.deepstack_merger_list.0.linear_fc{1,2}"]),
    # Qwen3-VL-MoE: Qwen3-VL's vision tower and mergers; every decoder layer's MLP is a sparse MoE block
    # (router + routed experts, no shared expert).
    "qwen3_vl_moe": {
        **tower("model.visual.blocks", "{0,1}", V, QWEN_VIT_ATTN, pairs("mlp.linear_fc{1,2}", "mlp.{up,down}")),
        **single(P, "other", "model.visual.merger.linear_fc{1,2}", "model.visual.deepstack_merger_list.0.linear_fc{1,2}"),
        **tower(LM, "{0,1}", L, LLAMA_ATTN, MOE_ROUTED),
        **single(H, "other", "lm_head"),
    },
    # GLM-4V: the merger is proj -> norm -> GELU -> down(act(gate) * up): a projector (role other, not
    # a block); the text MLP has one fused gate_up_proj, chunked in two halves.
    "glm4v": {
        **tower("model.visual.blocks", "{0,1}", V, QWEN_VIT_ATTN, pairs("mlp.{gate,up,down}_proj", "mlp.{gate,up,down}")),
        **single(P, "other", "model.visual.merger.{proj,gate_proj,up_proj,down_proj}"),
        **tower(LM, "{0,1}", L, LLAMA_ATTN, pairs("mlp.{gate_up,down}_proj", "mlp.{gate_up,down}")),
        **single(H, "other", "lm_head"),
    },
    # GLM-4.5V (glm4v_moe): GLM-4V's vision tower and merger; decoder layer 0 is dense with separate
    # gate/up/down linears (not GLM-4V's fused gate_up_proj); layer 1 is MoE: router, routed experts and a
    # shared expert (an ordinary SwiGLU MLP on the same input, added to the experts' output).
    "glm4v_moe": {
        **tower("model.visual.blocks", "{0,1}", V, QWEN_VIT_ATTN, pairs("mlp.{gate,up,down}_proj", "mlp.{gate,up,down}")),
        **single(P, "other", "model.visual.merger.{proj,gate_proj,up_proj,down_proj}"),
        **tower(LM, "{0,1}", L, LLAMA_ATTN),
        **tower(LM, "0", L, LLAMA_MLP),
        **tower(LM, "1", L, MOE_ROUTED, pairs("mlp.shared_experts.{gate,up,down}_proj", "mlp.{gate,up,down}")),
        **single(H, "other", "lm_head"),
    },
    # Mllama: local vision layers then the global (gated) ones; the projector is a bare Linear; text
    # layer 1 is a cross-attention layer: its attention reads the image states (cross_attention), its
    # MLP is an ordinary language MLP.
    "mllama": {
        **tower("model.vision_model.transformer.layers", "{0,1}", V, META_VIT),
        **tower("model.vision_model.global_transformer.layers", "0", V, META_VIT),
        **single(P, "other", "model.multi_modal_projector"),
        **tower(LM, "{0,2}", L, LLAMA),
        **tower(LM, "1", X, pairs("cross_attn.{q,k,v,o}_proj", "attn.{q,k,v,o}")),
        **tower(LM, "1", L, LLAMA_MLP),
        **single(H, "other", "lm_head"),
    },
    # Llama 4: the unfold-convolution patch embedding is a Linear before the blocks (vision, other); the
    # pixel-shuffle MLP (vision_adapter) and linear_1 map vision features to the text width: projector.
    # Text layer 0 is dense; layer 1 is MoE: router (role other), shared expert, and 3-D expert
    # parameters used by bmm (gate_up chunked in two halves, then down).
    "llama4": {
        **single(V, "other", "vision_model.patch_embedding.linear"),
        **tower("vision_model.model.layers", "{0,1}", V, META_VIT),
        **single(P, "other", "vision_model.vision_adapter.mlp.fc{1,2}", "multi_modal_projector.linear_1"),
        **tower("language_model.model.layers", "{0,1}", L, LLAMA_ATTN),
        **tower("language_model.model.layers", "0", L, pairs("feed_forward.{gate,up,down}_proj", "mlp.{gate,up,down}")),
        **tower("language_model.model.layers", "1", L, {
            "feed_forward.router": "other",
            **pairs("feed_forward.shared_expert.{gate,up,down}_proj", "mlp.{gate,up,down}"),
            **pairs("feed_forward.experts.{gate_up,down}_proj", "mlp.{gate_up,down}"),
        }),
        **single(H, "other", "language_model.lm_head"),
    },
    # Phi-4 multimodal: the vision tower lives inside the embedding; its multi-head-attention pooling
    # head runs but its output is discarded (an MLP of the vision model, outside the layer stack).
    # img_projection_up -> GELU -> img_projection_down is the projector. The decoder has fused
    # qkv_proj and gate_up_proj.
    "phi4_multimodal": {
        **tower("model.embed_tokens_extend.image_embed.img_processor.encoder.layers", "{0,1}", V, CLIP),
        **{f"{PHI4_HEAD}.{name}": (V, role) for name, role in {
            "attention.in_proj_weight": "attn.qkv",  # nn.MultiheadAttention: packed q/k/v, split, F.linear
            "attention.out_proj": "attn.o",  # an nn.Linear that MultiheadAttention calls with F.linear
            "mlp.fc1": "mlp.up", "mlp.fc2": "mlp.down"}.items()},
        **single(P, "other", "model.embed_tokens_extend.image_embed.img_projection_{up,down}"),
        **tower("model.layers", "{0,1}", L, pairs("self_attn.{qkv,o}_proj", "attn.{qkv,o}"),
                pairs("mlp.{gate_up,down}_proj", "mlp.{gate_up,down}")),
        **single(H, "other", "lm_head"),
    },
    # LFM2-VL: Siglip2 NaFlex tower: the patch embedding is a Linear on patchified pixels and the learned 4x4
    # position table is resized to each image's patch grid by ``weights @ table`` (weights computed from the
    # integer spatial_shapes alone), added to the patch embeddings: both vision, other. Pixel unshuffle ->
    # LayerNorm -> linear_1 -> GELU -> linear_2: projector. LFM2 decoder: layer 0 is a gated short convolution,
    # ``out_proj(C * conv(B * x))`` with B, C, x the three chunks of ``in_proj``: linear attention with a fixed
    # local (depthwise causal) kernel in place of softmax(q k^T), C the query, B the key, x the value, so
    # in_proj is attn.qkv and out_proj (reads the mixed sequence) attn.o; layer 1 is ordinary attention. Every
    # layer's feed-forward is w2(silu(w1(x)) * w3(x)). lm_head is tied to the embedding (as released).
    "lfm2_vl": {
        **single(V, "other", "model.vision_tower.embeddings.patch_embedding",
                 "model.vision_tower.embeddings.position_embedding.weight"),
        **tower("model.vision_tower.encoder.layers", "{0,1}", V, CLIP),
        **single(P, "other", "model.multi_modal_projector.linear_{1,2}"),
        **tower(LM, "0", L, pairs("conv.{in,out}_proj", "attn.{qkv,o}")),
        **tower(LM, "1", L, pairs("self_attn.{q,k,v,out}_proj", "attn.{q,k,v,o}")),
        **tower(LM, "{0,1}", L, pairs("feed_forward.w{1,3,2}", "mlp.{gate,up,down}")),
        **single(H, "other", "lm_head"),
    },
    # Janus (understanding path): conv patch embedding, SigLIP-like layers whose attention output projection is
    # called projection_layer, then the aligner (fc1, then GELU + Linear per hidden layer) maps every patch
    # feature to the text width: projector; Llama decoder; lm_head tied to the embedding (as released). The
    # VQ-VAE (convolutions only) and the generation embeddings / aligner / head serve image generation and never
    # run in this forward: they are not in the graph, so not labelled (and not adapted).
    "janus": {
        **tower("model.vision_model.encoder.layers", "{0,1}", V,
                {**pairs("self_attn.{q,k,v}_proj", "attn.{q,k,v}"), "self_attn.projection_layer": "attn.o",
                 **pairs("mlp.fc{1,2}", "mlp.{up,down}")}),
        **single(P, "other", "model.aligner.fc1", "model.aligner.hidden_layers.0"),
        **tower(LM, "{0,1}", L, LLAMA),
        **single(H, "other", "lm_head"),
    },
}



#: Extra sites of config variants the zoo's configs do not have, by family.
#: SigLIP's pooling head (``vision_use_head=True``): nn.MultiheadAttention (packed q/k/v, then out_proj) and an
#: MLP; its output never reaches the language model in Gemma 3 and PaliGemma.
SIGLIP_HEAD = {f"model.vision_tower.head.{name}": (V, role) for name, role in {
    "attention.in_proj_weight": "attn.qkv", "attention.out_proj": "attn.o",
    "mlp.fc1": "mlp.up", "mlp.fc2": "mlp.down"}.items()}
VARIANT_EXTRAS: dict[str, dict[str, tuple[str, str]]] = {
    "gemma3": SIGLIP_HEAD, "paligemma": SIGLIP_HEAD, "llava_onevision": SIGLIP_HEAD, "cohere2_vision": SIGLIP_HEAD}

def _pattern(name: str) -> re.Pattern:
    """``name`` with every block index (a numeric segment followed by more) matching any index."""
    parts = name.split(".")
    return re.compile(r"\.".join(r"\d+" if part.isdigit() and i < len(parts) - 1 else re.escape(part)
                                 for i, part in enumerate(parts)) + "$")


def truth_patterns(family: str) -> list[tuple[re.Pattern, tuple[str, str]]]:
    """(name pattern, (component, role)) for every site of ``family``: block indices match any layer."""
    table = {**EXPECTED[family], **VARIANT_EXTRAS.get(family, {})}
    return [(_pattern(name), labels) for name, labels in table.items()]


def expected_labels(family: str, name: str) -> tuple[str, str] | None:
    for pattern, labels in truth_patterns(family):
        if pattern.match(name):
            return labels
    return None
