"""Labels from graph structure, checked against labels written out by hand.

The expected component and role of every trainable matmul of every fixture family were derived by
reading each family's transformers modeling code (what the linear computes and where its output
goes), not copied from graphlora's output. Where graphlora disagrees, the single site's case is an
``xfail(strict=True)`` naming graphlora's answer, so the disagreement stays visible.

Also: Mllama's cross-attention (``finetune_cross_attention``), the projector of four families
(``finetune_projector`` trains it), and LLaVA's dead last CLIP layer (``vision_layers``).
"""

from __future__ import annotations

import functools

import pytest

import graphlora
from graphlora.explainer import explain
from graphlora.testing import zoo
from helpers import expand
from label_truth import CLIP, EXPECTED, H, L, LM, P, V, X, tower  # the truth tables

# The full-VLM preset (both towers, attention and MLP) plus the projector.
FULL_VLM = dict(
    r=16, lora_alpha=16, target_modules="all-linear", finetune_vision_layers=True, finetune_language_layers=True,
    finetune_attention_modules=True, finetune_mlp_modules=True, finetune_projector=True,
)


# family -> {site: layer}: a few representative sites (block position in its tower; None outside blocks).
LAYERS: dict[str, dict[str, int | None]] = {
    "llava": {"model.vision_tower.encoder.layers.0.self_attn.q_proj": 0, "model.vision_tower.encoder.layers.1.mlp.fc2": 1,
              "model.multi_modal_projector.linear_1": None, f"{LM}.1.self_attn.v_proj": 1, "lm_head": None},
    "llava_next": {"model.vision_tower.encoder.layers.1.self_attn.out_proj": 1, f"{LM}.0.mlp.down_proj": 0,
                   "model.multi_modal_projector.linear_2": None},
    "pixtral": {"model.vision_tower.transformer.layers.1.feed_forward.gate_proj": 1, f"{LM}.0.self_attn.q_proj": 0,
                "model.multi_modal_projector.linear_1": None},
    "mistral3": {"model.vision_tower.transformer.layers.0.attention.o_proj": 0,
                 "model.multi_modal_projector.patch_merger.merging_layer": None, f"{LM}.1.mlp.up_proj": 1},
    "aya_vision": {"model.vision_tower.encoder.layers.1.mlp.fc1": 1, "model.multi_modal_projector.linear_1": None,
                   f"{LM}.1.self_attn.k_proj": 1},
    "llava_onevision": {"model.vision_tower.encoder.layers.1.self_attn.out_proj": 1, f"{LM}.0.mlp.down_proj": 0,
                        "model.multi_modal_projector.linear_1": None, "lm_head": None},
    "cohere2_vision": {"model.vision_tower.encoder.layers.0.mlp.fc2": 0, "model.multi_modal_projector.linear_2": None,
                       f"{LM}.1.self_attn.q_proj": 1},
    "deepseek_vl": {"model.vision_model.encoder.layers.1.mlp.fc1": 1, "model.vision_model.head.mlp.fc1": None,
                    "model.aligner.linear1": None, f"{LM}.0.self_attn.v_proj": 0},
    "internvl": {"model.vision_tower.encoder.layer.1.attention.projection_layer": 1, f"{LM}.0.mlp.gate_proj": 0,
                 "model.multi_modal_projector.linear_2": None},
    "paligemma": {"model.vision_tower.encoder.layers.0.mlp.fc2": 0, "model.multi_modal_projector.linear": None,
                  f"{LM}.1.self_attn.o_proj": 1, "lm_head": None},
    "gemma3": {"model.vision_tower.encoder.layers.1.self_attn.q_proj": 1,
               "model.multi_modal_projector.mm_input_projection_weight": None, f"{LM}.0.mlp.down_proj": 0},
    "idefics3": {"model.vision_model.encoder.layers.1.self_attn.v_proj": 1, "model.connector.modality_projection.proj": None,
                 "model.text_model.layers.1.mlp.gate_proj": 1},
    "smolvlm": {"model.vision_model.encoder.layers.0.self_attn.k_proj": 0, "model.text_model.layers.0.self_attn.o_proj": 0},
    # Idefics2: the perceiver's layers are the projector's, outside the towers' numbering.
    "idefics2": {"model.vision_model.encoder.layers.1.mlp.fc1": 1, "model.connector.modality_projection.down_proj": None,
                 "model.connector.perceiver_resampler.layers.1.self_attn.q_proj": None,
                 "model.text_model.layers.1.self_attn.k_proj": 1},
    "got_ocr2": {"model.vision_tower.layers.1.attn.qkv": 1, "model.multi_modal_projector.multimodal_projector": None,
                 f"{LM}.0.mlp.up_proj": 0, "lm_head": None},
    "ovis2": {"model.vision_tower.transformer.encoder.layers.1.ffn.gate_proj": 1, "model.vision_tower.head_linear": None,
              "model.visual_embeddings_table.weight": None, f"{LM}.1.self_attn.v_proj": 1},
    "qwen2_vl": {"model.visual.blocks.1.attn.qkv": 1, "model.visual.merger.mlp.0": None, f"{LM}.1.mlp.down_proj": 1},
    "qwen2_5_vl": {"model.visual.blocks.0.mlp.gate_proj": 0, "model.visual.blocks.1.attn.proj": 1,
                   "model.visual.merger.mlp.2": None, f"{LM}.0.self_attn.q_proj": 0},
    "qwen3_vl": {"model.visual.blocks.1.mlp.linear_fc2": 1, "model.visual.deepstack_merger_list.0.linear_fc1": None,
                 "model.visual.merger.linear_fc2": None, f"{LM}.1.self_attn.q_proj": 1},
    "glm4v": {"model.visual.blocks.0.attn.qkv": 0, "model.visual.merger.gate_proj": None, f"{LM}.1.mlp.gate_up_proj": 1},
    "qwen3_vl_moe": {"model.visual.blocks.1.attn.proj": 1, "model.visual.deepstack_merger_list.0.linear_fc2": None,
                     f"{LM}.0.mlp.gate.weight": 0, f"{LM}.0.mlp.experts.gate_up_proj": 0,
                     f"{LM}.1.mlp.experts.down_proj": 1, "lm_head": None},
    "glm4v_moe": {"model.visual.blocks.1.mlp.up_proj": 1, "model.visual.merger.proj": None, f"{LM}.0.mlp.down_proj": 0,
                  f"{LM}.1.mlp.gate.weight": 1, f"{LM}.1.mlp.experts.gate_up_proj": 1,
                  f"{LM}.1.mlp.shared_experts.up_proj": 1},
    # Mllama: the global vision layers continue the local ones' numbering (one execution order).
    "mllama": {"model.vision_model.transformer.layers.1.self_attn.q_proj": 1,
               "model.vision_model.global_transformer.layers.0.self_attn.q_proj": 2,
               "model.vision_model.global_transformer.layers.0.mlp.fc2": 2, "model.multi_modal_projector": None,
               f"{LM}.1.cross_attn.k_proj": 1, f"{LM}.1.mlp.up_proj": 1, f"{LM}.2.self_attn.q_proj": 2, "lm_head": None},
    "llama4": {"vision_model.patch_embedding.linear": None, "vision_model.model.layers.1.self_attn.q_proj": 1,
               "vision_model.vision_adapter.mlp.fc1": None, "multi_modal_projector.linear_1": None,
               "language_model.model.layers.1.feed_forward.router": 1,
               "language_model.model.layers.1.feed_forward.experts.down_proj": 1,
               "language_model.model.layers.0.feed_forward.up_proj": 0, "language_model.lm_head": None},
    "lfm2_vl": {"model.vision_tower.embeddings.position_embedding.weight": None, f"{LM}.0.conv.in_proj": 0,
                "model.vision_tower.encoder.layers.1.mlp.fc2": 1, f"{LM}.1.self_attn.out_proj": 1,
                "model.multi_modal_projector.linear_1": None},
    "janus": {"model.vision_model.encoder.layers.1.self_attn.projection_layer": 1, "model.aligner.hidden_layers.0": None,
              f"{LM}.0.mlp.up_proj": 0, "lm_head": None},
    "phi4_multimodal": {"model.embed_tokens_extend.image_embed.img_processor.encoder.layers.1.mlp.fc1": 1,
                        "model.layers.1.self_attn.qkv_proj": 1, "model.embed_tokens_extend.image_embed.img_projection_up": None},
}

# Where graphlora's labels differ from the expectations above: (family, site) -> graphlora's answer.
# Each is one strict xfail; delete the entry when graphlora is fixed (the xfail then fails loudly).
DISAGREEMENTS: dict[tuple[str, str], str] = {}

# Families whose explain() itself fails today: family -> reason. Their labels are still checked
# through a fallback (rewrite with every labelled matmul chosen; sites + skipped_sites).
EXPLAIN_FAILS: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------
# one rewrite per family, shared by the tests of this file
# ---------------------------------------------------------------------------------------------
def _fresh(family: str):
    model = zoo.build_tiny_model(family)
    model.eval()
    return model, zoo.tiny_example_inputs(family, model)


@functools.lru_cache(maxsize=None)
def _explain(family: str):
    """(rows by name, None) from graphlora.explain with the full-VLM policy, or (None, the exception)."""
    model, inputs = _fresh(family)
    try:
        rows = explain(model, FULL_VLM, inputs)
    except Exception as e:  # noqa: BLE001 - reported by test_explain_runs
        return None, e
    return {r.name: r for r in rows}, None


# Every labelled matmul chosen: rules override the flags for every component (the head and `other`
# included), so sites + skipped_sites list every labelled matmul with its labels.
_EVERYTHING = dict(FULL_VLM, rules=[dict(match=dict(component=[V, P, X, L, H, "other"]), target=True,
                                         allow_unmatched=True)])


@functools.lru_cache(maxsize=None)
def _fallback_rows(family: str) -> dict[str, tuple[str, str, int | None]]:
    model, inputs = _fresh(family)
    lora_model = graphlora.rewrite(model, _EVERYTHING, inputs, fuse=False)
    return {s.name: (s.component, s.role, s.layer) for s in [*lora_model.sites, *lora_model.skipped_sites]}


def labels_of(family: str) -> dict[str, tuple[str, str, int | None]]:
    """site -> (component, role, layer) as graphlora reports it (explain; the fallback when it fails)."""
    rows, error = _explain(family)
    if rows is None:
        return _fallback_rows(family)
    return {name: (r.component, r.role, r.layer) for name, r in rows.items()}


FAMILIES = zoo.tiny_model_names()


def _family_param(family: str):
    marks = [pytest.mark.xfail(strict=True, reason=EXPLAIN_FAILS[family])] if family in EXPLAIN_FAILS else []
    return pytest.param(family, marks=marks, id=family)


def _site_params():
    for family in FAMILIES:
        for site in EXPECTED[family]:
            why = DISAGREEMENTS.get((family, site))
            marks = [pytest.mark.xfail(strict=True, reason=f"graphlora says {why}")] if why else []
            yield pytest.param(family, site, marks=marks, id=f"{family}:{site}")


# ---------------------------------------------------------------------------------------------
# 1. every matmul of every family: component and role written out; a few layers
# ---------------------------------------------------------------------------------------------
def test_expectations_cover_the_zoo():
    assert sorted(EXPECTED) == sorted(FAMILIES)
    for family, sites in EXPECTED.items():
        assert set(LAYERS[family]) <= set(sites), family
    for (family, site) in DISAGREEMENTS:
        assert site in EXPECTED[family], (family, site)


def test_names_know_the_deepseek_vl_aligner():
    """The name rules label DeepSeek-VL's ``model.aligner`` (linear1 -> GELU -> linear2, read by the language
    model) as the projector, as the structure does (regional mode has only the names to go by)."""
    rows, error = _explain("deepseek_vl")
    assert error is None
    assert {name: row.names_say for name, row in rows.items() if row.names_say} == {}
    assert {str(rows[f"model.aligner.linear{i}"].component) for i in (1, 2)} == {P}


@pytest.mark.parametrize("family", [_family_param(f) for f in FAMILIES])
def test_explain_runs(family):
    rows, error = _explain(family)
    assert error is None, f"explain({family}) raised {type(error).__name__}: {str(error).splitlines()[0]}"
    assert all(r.reason for r in rows.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_site_names(family):
    """explain lists exactly the expected trainable matmuls (a missing one is a disagreement too)."""
    got = set(labels_of(family))
    missing = {s for s in set(EXPECTED[family]) - got if (family, s) not in DISAGREEMENTS}
    extra = got - set(EXPECTED[family])
    assert not missing and not extra, f"missing: {sorted(missing)}; unexpected: {sorted(extra)}"


@pytest.mark.parametrize("family, site", list(_site_params()))
def test_site_label(family, site):
    got = labels_of(family).get(site)
    assert got is not None, f"{site} is not labelled"
    assert got[:2] == EXPECTED[family][site]


@pytest.mark.parametrize("family", FAMILIES)
def test_layers(family):
    got = labels_of(family)
    assert {site: got[site][2] for site in LAYERS[family] if site in got} == LAYERS[family]


@pytest.mark.parametrize("family", ["llava", "llama4", "phi4_multimodal"])
def test_explain_agrees_with_the_rewrite(family):
    """explain's lora column says what the rewrite does: `yes` rows are the sites, `skipped` rows skipped_sites."""
    rows, _ = _explain(family)
    model, inputs = _fresh(family)
    lora_model = graphlora.rewrite(model, FULL_VLM, inputs)
    assert {name for name, r in rows.items() if r.targeted} == {s.name for s in lora_model.sites}
    assert {name for name, r in rows.items() if r.skipped} == {s.name for s in lora_model.skipped_sites}


# ---------------------------------------------------------------------------------------------
# 3. Mllama: cross-attention sites follow finetune_cross_attention
# ---------------------------------------------------------------------------------------------
MLLAMA_CROSS = expand(f"{LM}.1.cross_attn.{{q,k,v,o}}_proj")


def test_mllama_cross_attention_flag():
    labels = labels_of("mllama")
    assert sorted(s for s, (comp, _, _) in labels.items() if comp == X) == sorted(MLLAMA_CROSS)

    model, inputs = _fresh("mllama")
    with_cross = {s.name for s in graphlora.rewrite(model, FULL_VLM, inputs).sites}
    model, inputs = _fresh("mllama")
    without = graphlora.rewrite(model, dict(FULL_VLM, finetune_cross_attention=False), inputs)
    without_cross = {s.name for s in without.sites}
    assert without_cross <= with_cross
    assert sorted(with_cross - without_cross) == sorted(MLLAMA_CROSS)
    # The cross-attention layer's MLP is language: it stays.
    assert set(expand(f"{LM}.1.mlp.{{gate,up,down}}_proj")) <= without_cross


# ---------------------------------------------------------------------------------------------
# 4. the projector is labelled projector and finetune_projector trains it
# ---------------------------------------------------------------------------------------------
PROJECTORS = {
    "llava": expand("model.multi_modal_projector.linear_{1,2}"),
    "idefics3": ["model.connector.modality_projection.proj"],
    "qwen2_vl": expand("model.visual.merger.mlp.{0,2}"),
    "gemma3": ["model.multi_modal_projector.mm_input_projection_weight"],
    "idefics2": expand("model.connector.modality_projection.{gate,up,down}_proj",
                       "model.connector.perceiver_resampler.layers.{0,1}.self_attn.{q,k,v,o}_proj",
                       "model.connector.perceiver_resampler.layers.{0,1}.mlp.{gate,up,down}_proj"),
}


@pytest.mark.parametrize("family", list(PROJECTORS))
def test_projector_is_trained(family):
    projector = PROJECTORS[family]
    assert sorted(s for s, (comp, _, _) in labels_of(family).items() if comp == P) == sorted(projector)

    model, inputs = _fresh(family)
    default = graphlora.rewrite(model, None, inputs)
    assert not {s.name for s in default.sites} & set(projector)
    assert not any(s.component == P for s in default.sites)

    model, inputs = _fresh(family)
    policy = dict(finetune_vision_layers=False, finetune_language_layers=False, finetune_projector=True)
    lora_model = graphlora.rewrite(model, policy, inputs)
    sites = {s.name: s for s in lora_model.sites}
    assert sorted(sites) == sorted(projector)
    assert all(sites[name].component == P and sites[name].reason == "finetune_projector=True" for name in projector)
    lora_model.train()
    lora_model(**inputs).loss.backward()
    for name in projector:
        grad = lora_model.get_submodule(sites[name].module).lora_B.weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}.lora_B"


# ---------------------------------------------------------------------------------------------
# 5. LLaVA reads layer -2: the last CLIP layer is reported, not adapted
# ---------------------------------------------------------------------------------------------
def test_llava_dead_last_vision_layer():
    model, inputs = _fresh("llava")
    policy = dict(vision_layers="-2:", finetune_vision_layers=True, finetune_language_layers=False)
    lora_model = graphlora.rewrite(model, policy, inputs)
    layer = tower("model.vision_tower.encoder.layers", "{0}", V, CLIP)
    last = tower("model.vision_tower.encoder.layers", "{1}", V, CLIP)
    assert sorted(s.name for s in lora_model.sites) == sorted(layer)
    assert sorted(s.name for s in lora_model.skipped_sites) == sorted(last)
    for s in lora_model.skipped_sites:
        assert s.layer == 1 and s.component == V
        assert "never reaches" in s.reason and "loss" in s.reason, s.reason


# ---------------------------------------------------------------------------------------------
# 6. a learned-query resampler between the tower and the text is the projector, not more vision layers
# ---------------------------------------------------------------------------------------------
def _perceiver_vlm():
    """A tiny Idefics2 built here from transformers' configs: SigLIP-like tower, modality_projection (a SwiGLU MLP)
    then a perceiver resampler whose learned latents attend to the projected patches, Mistral text."""
    import torch
    import transformers

    config = transformers.Idefics2Config(
        vision_config=transformers.Idefics2VisionConfig(**zoo._vision()),
        perceiver_config=transformers.Idefics2PerceiverConfig(
            hidden_size=32, resampler_n_latents=4, resampler_depth=2, resampler_n_heads=4, resampler_head_dim=8,
            num_key_value_heads=2),
        text_config=transformers.MistralConfig(**zoo._text(head_dim=8)),
        image_token_id=255)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Idefics2ForConditionalGeneration(config)
    zoo.revive_zero_parameters(model)
    ids = torch.tensor([[5, 6, 254] + [255] * 4 + [254, 7, 8, 9]] * 2)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.masked_fill(ids >= 254, -100),
                  pixel_values=torch.randn(2, 1, 3, 16, 16), pixel_attention_mask=torch.ones(2, 1, 16, 16, dtype=torch.long))
    return model.eval(), inputs


@pytest.mark.parametrize("trace_mode", ["blocks", "whole"])
def test_perceiver_resampler_is_the_projector_with_its_block_roles(trace_mode):
    """Also in the exported whole-model graph, where the latents are expanded to the image batch by a ``sym_size``
    of the pixels: a size is not a value, the queries still read no input."""
    model, inputs = _perceiver_vlm()
    lora_model = graphlora.rewrite(model, _EVERYTHING, inputs, fuse=False, trace_mode=trace_mode)
    got = {s.name: (s.component, s.role, s.layer) for s in [*lora_model.sites, *lora_model.skipped_sites]}
    resampler = "model.connector.perceiver_resampler.layers"
    for layer in (0, 1):
        for name, role in {**dict(zip(expand("self_attn.{q,k,v,o}_proj"), expand("attn.{q,k,v,o}"))),
                           **dict(zip(expand("mlp.{gate,up,down}_proj"), expand("mlp.{gate,up,down}")))}.items():
            assert got[f"{resampler}.{layer}.{name}"] == (P, role, None), name
    # what feeds the resampler is the projector too (it no longer feeds a "vision block")
    for name in expand("model.connector.modality_projection.{gate,up,down}_proj"):
        assert got[name] == (P, "other", None), name
    assert {layer for comp, _, layer in got.values() if comp == V} == {0, 1}  # the tower alone
    assert lora_model.label_check["disagreements"] == []  # the name rules give the resampler's roles too


def test_name_rules_call_ovis2s_visual_tokenizer_head_and_embedding_table_the_projector():
    """Ovis2 maps the tower's features to text embeddings in two matmuls outside the blocks: ``head_linear`` (logits over a
    visual vocabulary, softmax) and the visual embedding table (their expected embedding). The structure labels both
    projector; the names must agree, or ``finetune_projector`` meets a disagreement that changes the selection."""
    from graphlora.labels import Component
    from graphlora.name_rules import StackEntry, component_by_name

    model = StackEntry("model", "Ovis2Model")
    tower = StackEntry("model.vision_tower", "Ovis2VisionModel")
    head = [model, tower, StackEntry("model.vision_tower.head_linear", "Linear")]
    table = [model, StackEntry("model.visual_embeddings_table", "Ovis2VisualEmbeddingTable"),
             StackEntry("model.visual_embeddings_table.weight", "Parameter")]
    block = [model, tower, StackEntry("model.vision_tower.transformer.encoder.layers.0.ffn.up_proj", "Linear")]
    assert component_by_name(head, frozenset()) == Component.PROJECTOR
    assert component_by_name(table, frozenset()) == Component.PROJECTOR
    assert component_by_name(block, frozenset()) == Component.VISION
