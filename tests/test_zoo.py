"""Tiny-model zoo and per-family input synthesis: every family builds, trains and keeps its vision path alive."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import graphlora
from graphlora import families
from graphlora.families import IGNORE_INDEX, UnsupportedFamilyError, get_recipe, refused_model_types, supported_model_types
from graphlora.testing import zoo

NAMES = zoo.tiny_model_names()

# zoo name -> (vision tower, projector or None, language decoder) module paths.
PARTS = {
    "llava": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "llava_next": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "pixtral": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "mistral3": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "aya_vision": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "llava_onevision": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "cohere2_vision": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "deepseek_vl": ("model.vision_model", "model.aligner", "model.language_model"),
    "internvl": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "paligemma": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "gemma3": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "idefics3": ("model.vision_model", "model.connector", "model.text_model"),
    "smolvlm": ("model.vision_model", "model.connector", "model.text_model"),
    "idefics2": ("model.vision_model", "model.connector", "model.text_model"),
    "got_ocr2": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "ovis2": ("model.vision_tower.transformer", "model.visual_embeddings_table", "model.language_model"),
    "qwen2_vl": ("model.visual.blocks", "model.visual.merger", "model.language_model"),
    "qwen2_5_vl": ("model.visual.blocks", "model.visual.merger", "model.language_model"),
    "qwen3_vl": ("model.visual.blocks", "model.visual.merger", "model.language_model"),
    "qwen3_vl_moe": ("model.visual.blocks", "model.visual.merger", "model.language_model"),
    "glm4v": ("model.visual.blocks", "model.visual.merger", "model.language_model"),
    "glm4v_moe": ("model.visual.blocks", "model.visual.merger", "model.language_model"),
    "mllama": ("model.vision_model", "model.multi_modal_projector", "model.language_model"),
    "llama4": ("vision_model", "multi_modal_projector", "language_model.model"),  # no `model.` level
    "lfm2_vl": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "janus": ("model.vision_model", "model.aligner", "model.language_model"),
    "phi4_multimodal": (
        "model.embed_tokens_extend.image_embed.img_processor",
        "model.embed_tokens_extend.image_embed.img_projection_up",  # with img_projection_down
        "model.layers",
    ),
}


def image_token_id(config) -> int:
    """The placeholder id each image feature replaces (Llama 4: ``<|patch|>``)."""
    if config.model_type == "phi4_multimodal":
        return config.vision_config.image_token_id
    return config.image_token_id


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny ops: one intra-op thread is faster, and far faster on a busy 2-core box (OpenMP spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = zoo.build_tiny_model(name)
        return cache[name]

    return get


def test_zoo_covers_every_family():
    assert zoo.DEFAULT_TINY_MODEL in NAMES
    assert set(PARTS) == set(NAMES)
    model_types = {zoo.build_tiny_config(n).model_type for n in NAMES}
    assert model_types == set(supported_model_types())


def test_unknown_family_is_rejected():
    config = transformers_config("bert")
    with pytest.raises(UnsupportedFamilyError, match="'bert'") as info:
        get_recipe(config)
    assert isinstance(info.value, ValueError)
    assert "llava" in str(info.value) and "mllama" in str(info.value)
    with pytest.raises(ValueError, match="unknown tiny model"):
        zoo.build_tiny_model("bert")


@pytest.mark.parametrize("model_type", sorted(refused_model_types()))
def test_a_refused_family_is_refused_with_what_is_missing(model_type):
    """A model of a refused family (a stand-in carrying its config: a timm tower needs timm) gets the reason, in
    rewrite() and when inputs are synthesised; docs/models.md lists it with the same reason."""
    reason = refused_model_types()[model_type]

    class Refused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers_config(model_type)
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(graphlora.UnsupportedModelError, match=fr"\(model_type '{model_type}'\) is not supported") as info:
        graphlora.rewrite(Refused(), {}, {"x": torch.ones(1, 4)})
    assert reason in str(info.value)
    with pytest.raises(UnsupportedFamilyError, match=re.escape(reason)):
        get_recipe(Refused().config)
    docs = (Path(__file__).parent.parent / "docs" / "models.md").read_text()
    assert f"| {model_type} | " in docs and reason in docs
    assert model_type not in supported_model_types()


def transformers_config(model_type):
    import transformers

    return transformers.AutoConfig.for_model(model_type)


@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic(name, models):
    a = models(name).state_dict()
    b = zoo.build_tiny_model(name, seed=0).state_dict()
    c = zoo.build_tiny_model(name, seed=1).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    model = models(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # nothing but biases is left all-zero (zero gates / projectors would block the vision path)
    zero = [n for n, p in model.named_parameters() if not p.any() and not n.endswith("bias")]
    assert zero == []


def _linear_grads(model, prefix):
    module = model.get_submodule(prefix)
    linears = {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    return {n: m.weight.grad is not None and bool(m.weight.grad.abs().sum() > 0) for n, m in linears.items()}


@pytest.mark.parametrize("name", NAMES)
def test_train_step_reaches_every_part(name, models):
    model = models(name)
    for batch_size in (1, 2, 3):
        inputs = zoo.tiny_example_inputs(name, model, batch_size=batch_size)
        assert inputs["input_ids"].shape[0] == batch_size
        model.zero_grad(set_to_none=True)
        out = model(**inputs, use_cache=False)
        assert out.loss is not None and torch.isfinite(out.loss), out.loss
        out.loss.backward()
        for part in PARTS[name]:
            grads = _linear_grads(model, part)
            if part == PARTS[name][1] and not grads:  # Gemma 3's projector is a bare matrix
                grads = {n: bool(p.grad.abs().sum() > 0) for n, p in model.get_submodule(part).named_parameters()}
            assert grads, f"no Linear under {part}"
            assert any(grads.values()), f"{name}: no gradient reaches {part} (batch {batch_size})"


@pytest.mark.parametrize("name", NAMES)
def test_labels_and_logits(name, models):
    model = models(name)
    inputs = zoo.tiny_example_inputs(name, model, batch_size=2)
    ids, labels = inputs["input_ids"], inputs["labels"]
    image = ids == image_token_id(model.config)
    assert image.any(dim=1).all(), "every sample has image placeholders"
    assert (labels[image] == IGNORE_INDEX).all()
    assert (labels[inputs["attention_mask"] == 0] == IGNORE_INDEX).all()
    kept = labels != IGNORE_INDEX
    assert kept.any(dim=1).all(), "every sample has text in the loss"
    assert torch.equal(labels[kept], ids[kept])
    vocab = model.config.get_text_config().vocab_size
    assert int(labels[kept].max()) < vocab and int(ids.min()) >= 0

    no_labels = zoo.tiny_example_inputs(name, model, batch_size=2, with_labels=False)
    assert "labels" not in no_labels
    with torch.no_grad():
        out = model(**no_labels, use_cache=False)
    assert out.loss is None
    assert out.logits.shape == (2, ids.shape[1], vocab)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_inputs_are_deterministic(name, models):
    model = models(name)
    a = zoo.tiny_example_inputs(name, model, seed=3)
    b = zoo.tiny_example_inputs(name, model, seed=3)
    c = zoo.tiny_example_inputs(name, model, seed=4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])
    pixels = [k for k, v in a.items() if v.is_floating_point()]
    assert pixels and all(not torch.equal(a[k], c[k]) for k in pixels)


@pytest.mark.parametrize("name", NAMES)
def test_ragged_batch_with_padding(name, models):
    model = models(name)
    inputs = zoo.tiny_example_inputs(name, model, batch_size=2, pad_tokens=3, text_len=6)
    mask = inputs["attention_mask"]
    assert mask[0].all() and int((mask[1] == 0).sum()) == 3
    assert (inputs["labels"][1, -3:] == IGNORE_INDEX).all()
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", ["llava", "gemma3", "mllama", "qwen2_vl"])
def test_dtype_and_meta_device(name, models):
    with torch.device("meta"):
        meta = zoo._model_class(name)(zoo.build_tiny_config(name)).to(torch.bfloat16)
    inputs = families.synthesize_inputs(meta)
    assert all(v.device.type == "cpu" for v in inputs.values())
    assert inputs["pixel_values"].dtype == torch.bfloat16
    real = families.synthesize_inputs(models(name))
    assert torch.equal(inputs["input_ids"], real["input_ids"])
    on_meta = families.synthesize_inputs(meta, device="meta")
    assert on_meta["input_ids"].device.type == "meta"


@pytest.mark.parametrize("name", ["llava", "idefics3", "gemma3", "mllama", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "lfm2_vl",
                                  "idefics2", "got_ocr2", "ovis2"])
def test_two_images_per_sample(name, models):
    model = models(name)
    inputs = zoo.tiny_example_inputs(name, model, images_per_sample=2)
    out = model(**inputs, use_cache=False)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_qwen_images_of_different_grids(name, models):
    model = models(name)
    inputs = zoo.tiny_example_inputs(name, model, batch_size=2, image_size=[(32, 32), (32, 64)])
    grids = inputs["image_grid_thw"]
    assert grids.shape == (4, 3)
    assert not torch.equal(grids[0], grids[1]) and torch.equal(grids[0], grids[2])
    merge = model.config.vision_config.spatial_merge_size
    n_tokens = int((inputs["input_ids"] == image_token_id(model.config)).sum())
    assert n_tokens == int(grids.prod(-1).sum()) // merge**2
    out = model(**inputs, use_cache=False)
    assert torch.isfinite(out.loss)


def test_lfm2_vl_images_of_different_sizes_pad_their_patches(models):
    """NaFlex: each image keeps its own patch grid; the smaller one is padded and masked, and its tokens
    count only its real patches (4 x 4 patches -> 2 x 2 tokens, 4 x 8 -> 2 x 4)."""
    model = models("lfm2_vl")
    inputs = zoo.tiny_example_inputs("lfm2_vl", model, batch_size=2, image_size=[(16, 16), (16, 32)])
    assert inputs["spatial_shapes"].tolist() == [[4, 4], [4, 8]] * 2
    assert inputs["pixel_values"].shape == (4, 32, 48)
    assert inputs["pixel_attention_mask"].sum(-1).tolist() == [16, 32] * 2
    assert int((inputs["input_ids"] == image_token_id(model.config)).sum()) == 2 * (4 + 8)
    out = model(**inputs, use_cache=False)
    assert torch.isfinite(out.loss)


def test_idefics2_layout_adjacent_images_and_padding(models):
    """Idefics2Processor: <fake> <image>*n <fake> per image, one <fake> between adjacent images; images of different
    sizes are padded bottom/right to the largest, pixel_attention_mask marks the real pixels."""
    model = models("idefics2")
    inputs = zoo.tiny_example_inputs("idefics2", model, batch_size=1, text_len=1, image_size=[(16, 8), (8, 16)])
    fake, image = model.config.fake_image_token_id, model.config.image_token_id
    n = model.config.perceiver_config.resampler_n_latents
    assert inputs["input_ids"][0, : 3 + 2 * n].tolist() == [fake] + [image] * n + [fake] + [image] * n + [fake]
    assert inputs["pixel_values"].shape == (1, 2, 3, 16, 16)
    mask = inputs["pixel_attention_mask"][0]
    assert mask[0, :, :8].all() and not mask[0, :, 8:].any() and mask[1, :8].all() and not mask[1, 8:].any()
    assert torch.isfinite(model(**inputs, use_cache=False).loss)
