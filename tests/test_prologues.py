"""Eager prologues: the families whose plain call does not export trace after ``prologue(model, call)``.

For every family with a prologue (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V: M-RoPE positions and
vision metadata as inputs, block-diagonal vision attention; Pixtral, Mistral 3, LLaVA-NeXT: static
``image_sizes``; LLaVA-OneVision: also a static ``batch_num_images``) these tests prove:

1. eager ``model(**prologue(model, call))`` equals the unmodified model on ``call`` (logits, loss);
2. ``export_call`` of the prologue's output succeeds in eval and train mode and the exported program
   equals eager;
3. batch 1 and 3 (ragged), longer text, two images of different grids in one sample, another number
   of images; which calls re-use one exported program and which need a new trace;
4. idempotence; 5. text-only calls.

References always come from a *separate* unmodified model (same seed, same weights): the prologue
installs the block-diagonal attention on the model it is given.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from graphlora import families
from graphlora.families import _packed_vision, get_prologue, prepare_for_tracing
from graphlora.testing import zoo
from graphlora.trace import default_dynamic_shapes, export_call, make_call_key, split_call

GRID = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v", "qwen3_vl_moe", "glm4v_moe"]
SIZES = ["pixtral", "mistral3", "llava_next", "llava_onevision"]
PROLOGUE_FAMILIES = GRID + SIZES
ATOL = 1e-5

# Two images of different sizes in one sample (pixels; multiples of the family's unit).
MIXED = {
    **{n: [(16, 16), (16, 32)] for n in GRID},  # grids 4x4 and 4x8
    "pixtral": [(32, 32), (16, 32)],
    "mistral3": [(32, 32), (16, 32)],
    "llava_next": [(16, 32), (32, 32)],  # 2 and 4 tiles
    "llava_onevision": [(16, 32), (32, 32)],  # two images in a sample: one untiled tile each
}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    """name -> (reference model, model to trace): same weights; only the second sees prologues."""
    cache: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = (zoo.build_tiny_model(name), zoo.build_tiny_model(name))
        return cache[name]

    return get


def inputs(name: str, model, **kw) -> dict:
    return zoo.tiny_example_inputs(name, model, **kw)


def run(model, call: dict, training: bool = False):
    model.train(training)
    try:
        with torch.no_grad():
            out = model(**call)
    finally:
        model.eval()
    return out["logits"], out["loss"]


def assert_close(got, want, what: str):
    (logits, loss), (ref_logits, ref_loss) = got, want
    assert logits.shape == ref_logits.shape, what
    diff = (logits - ref_logits).abs().max().item()
    assert diff <= ATOL, f"{what}: logits differ by {diff:.3g}"
    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) <= ATOL, f"{what}: loss {loss} != {ref_loss}"


def export_prologue(model, call: dict, training: bool = False):
    """(exported program, tensor inputs, constants) for ``prologue(model, call)``."""
    prologue = get_prologue(model)
    tensors, constants = split_call(prologue(model, call) | {"use_cache": False})
    model.train(training)
    try:
        ep = export_call(model, tensors, constants)
    finally:
        model.eval()
    return ep, tensors, constants


def run_exported(ep, tensors: dict):
    with torch.no_grad():
        out = ep.module()(**tensors)  # constants are baked into the program
    return out["logits"], out["loss"]


def text_only(call: dict) -> dict:
    """The call without images: image arguments dropped, image and structural tokens (the tokens
    outside the loss that are not padding) made plain text."""
    ids = call["input_ids"].clone()
    labels = call["labels"].clone()
    structural = (labels == -100) & (call["attention_mask"] == 1)
    ids[structural] = 7
    labels[structural] = 7
    return {"input_ids": ids, "attention_mask": call["attention_mask"], "labels": labels}


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
def test_registry_has_prologues_where_needed():
    with_prologue = {n for n in zoo.tiny_model_names() if get_prologue(zoo.build_tiny_config(n)) is not None}
    # "llava" (plain CLIP LLaVA) shares the model_type with "pixtral": its prologue is a no-op there.
    assert with_prologue == set(PROLOGUE_FAMILIES) | {"llava"}
    assert get_prologue(zoo.build_tiny_config("phi4_multimodal")) is None
    assert families.get_recipe(zoo.build_tiny_config("qwen2_vl")).prepare is not None


def test_unknown_model_type_has_no_prologue():
    import transformers

    assert get_prologue(transformers.BertConfig()) is None
    assert get_prologue(torch.nn.Linear(2, 2)) is None  # a plain module: traced as it is
    assert prepare_for_tracing(torch.nn.Linear(2, 2)) is False


def test_plain_llava_prologue_is_a_no_op(models):
    _, model = models("llava")
    call = inputs("llava", model)
    out = get_prologue(model)(model, call)
    assert out == call and out is not call


# ---------------------------------------------------------------------------------------------
# 1. eager equivalence (cheap: every case, every family)
# ---------------------------------------------------------------------------------------------
CASES = {
    "default": {},
    "batch1": {"batch_size": 1},
    "batch3_ragged": {"batch_size": 3, "pad_tokens": 3},
    "long_text": {"text_len": 40},
    "mixed_sizes": None,  # MIXED[name]
    "two_images": {"images_per_sample": 2},
}


def case_kwargs(name: str, case: str) -> dict:
    return {"image_size": MIXED[name]} if case == "mixed_sizes" else dict(CASES[case])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", PROLOGUE_FAMILIES)
def test_eager_prologue_equals_plain_call(models, name, case):
    reference, model = models(name)
    call = inputs(name, model, **case_kwargs(name, case))
    snapshot = dict(call)
    new = get_prologue(model)(model, call)
    assert call == snapshot, "the prologue must not modify its input"
    assert_close(run(model, new), run(reference, call), f"{name}/{case} eval")
    assert_close(run(model, new, training=True), run(reference, call, training=True), f"{name}/{case} train")


# ---------------------------------------------------------------------------------------------
# 2. export, train and eval, default batch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", PROLOGUE_FAMILIES)
def test_export_default_batch(models, name, training):
    reference, model = models(name)
    call = inputs(name, model)
    ep, tensors, constants = export_prologue(model, call, training)
    assert_close(run_exported(ep, tensors), run(reference, call, training), f"{name} exported ({training=})")
    if name in SIZES:
        assert constants["image_sizes"] == [tuple(s) for s in call["image_sizes"].tolist()]
    else:
        assert {"position_ids", "image_position_ids", "image_cu_seqlens"} <= set(tensors)
        assert not set(constants) - {"use_cache"}, "grid families trace with tensor metadata only"


# ---------------------------------------------------------------------------------------------
# 3. other batches: each is a new trace (static batch / image shapes); one export each
# ---------------------------------------------------------------------------------------------
NEW_TRACE_CASES = ["batch1", "batch3_ragged", "mixed_sizes", "two_images"]
# Without --runslow each case runs on two families (mixed sizes on all); CI runs every combination.
FAST_NEW_TRACE = {
    "mixed_sizes": set(PROLOGUE_FAMILIES),
    "batch1": {"qwen2_vl", "pixtral"},
    "batch3_ragged": {"qwen2_5_vl", "llava_next"},
    "two_images": {"qwen3_vl", "mistral3"},
}
slow = pytest.mark.slow


def _maybe_slow(name: str, case: str):
    return pytest.param(name, case, marks=() if name in FAST_NEW_TRACE[case] else slow, id=f"{name}-{case}")


@pytest.mark.parametrize("name,case", [_maybe_slow(n, c) for n in PROLOGUE_FAMILIES for c in NEW_TRACE_CASES])
def test_export_other_batches(models, name, case):
    reference, model = models(name)
    call = inputs(name, model, **case_kwargs(name, case))
    ep, tensors, _ = export_prologue(model, call)
    assert_close(run_exported(ep, tensors), run(reference, call), f"{name}/{case} exported")


def _program_key(model, call):
    tensors, constants = split_call(get_prologue(model)(model, call))
    return make_call_key(tensors, constants, model.training, "lora"), tensors


@pytest.mark.parametrize("name", GRID)
def test_grid_families_reuse_one_program(models, name):
    """One program serves another text length and other grids with the same shapes.

    Traced on one 16x32 image per sample (grid 4x8); run on 32x16 images (grid 8x4: same patch and
    token counts, other positions, windows and interpolation taps) with a longer, ragged text.
    """
    reference, model = models(name)
    traced_call = inputs(name, model, image_size=[(16, 32)])
    ep, _, _ = export_prologue(model, traced_call)
    other = inputs(name, model, image_size=[(32, 16)], text_len=30, pad_tokens=2, seed=1)
    key_a, _ = _program_key(model, traced_call)
    key_b, tensors = _program_key(model, other)
    assert key_a == key_b, "same cache key: only tensor values and the text length differ"
    assert not torch.equal(traced_call["image_grid_thw"], other["image_grid_thw"])
    assert_close(run_exported(ep, tensors), run(reference, other), f"{name} re-used program")


@pytest.mark.parametrize(
    "name", ["pixtral", pytest.param("mistral3", marks=slow), pytest.param("llava_next", marks=slow),
             pytest.param("llava_onevision", marks=slow)]
)
def test_image_size_families_reuse_for_text_length_only(models, name):
    """Longer text: same program. Other image sizes: another cache key (``image_sizes`` is static)."""
    reference, model = models(name)
    call = inputs(name, model)
    ep, _, _ = export_prologue(model, call)
    longer = inputs(name, model, text_len=30, seed=1)
    key_a, _ = _program_key(model, call)
    key_b, tensors = _program_key(model, longer)
    assert key_a == key_b
    assert_close(run_exported(ep, tensors), run(reference, longer), f"{name} re-used program")
    key_c, _ = _program_key(model, inputs(name, model, image_size=MIXED[name]))
    assert key_c != key_a, "image sizes are part of the cache key"


# ---------------------------------------------------------------------------------------------
# 4. idempotence, 5. text only, no-op cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROLOGUE_FAMILIES)
def test_prologue_is_idempotent(models, name):
    reference, model = models(name)
    call = inputs(name, model, image_size=MIXED[name])
    prologue = get_prologue(model)
    once = prologue(model, call)
    twice = prologue(model, once)
    assert twice.keys() == once.keys()
    for key, value in once.items():
        assert twice[key] is value, f"{name}: {key} recomputed"
    assert_close(run(model, twice), run(reference, call), f"{name} twice")


@pytest.mark.parametrize(
    "name", GRID + ["pixtral", pytest.param("mistral3", marks=slow), pytest.param("llava_next", marks=slow),
                    pytest.param("llava_onevision", marks=slow)]
)
def test_text_only_call(models, name):
    reference, model = models(name)
    call = text_only(inputs(name, model, pad_tokens=2))
    new = get_prologue(model)(model, call)
    assert new == call, "nothing to precompute without images"
    ep, tensors, _ = export_prologue(model, call)
    assert_close(run_exported(ep, tensors), run(reference, call), f"{name} text only exported")


@pytest.mark.parametrize("name", GRID)
def test_call_with_cache_is_left_alone(models, name):
    from transformers import DynamicCache

    _, model = models(name)
    call = inputs(name, model) | {"cache": DynamicCache(config=model.config.text_config)}
    assert get_prologue(model)(model, call) == call


@pytest.mark.parametrize("name", ["qwen2_vl", pytest.param("qwen2_5_vl", marks=slow)])
def test_video_metadata(models, name):
    """Videos get ``video_*`` metadata (t frames = t attention segments); exported equals eager."""
    reference, model = models(name)
    call = inputs(name, model, batch_size=1)
    config = model.config
    frames, side = 2, 4
    n_tokens = frames * side * side // config.vision_config.spatial_merge_size**2
    video = [config.vision_start_token_id] + [config.video_token_id] * n_tokens + [config.vision_end_token_id, 7, 8]
    types = [0] + [2] * n_tokens + [0, 0, 0]
    call["input_ids"] = torch.cat([call["input_ids"], torch.tensor([video])], 1)
    call["attention_mask"] = torch.ones_like(call["input_ids"])
    call["mm_token_type_ids"] = torch.cat([call["mm_token_type_ids"], torch.tensor([types])], 1)
    labels = call["input_ids"].clone()
    labels[call["mm_token_type_ids"] != 0] = -100
    call["labels"] = labels
    call["pixel_values_videos"] = torch.randn(frames * side * side, call["pixel_values"].shape[1])
    call["video_grid_thw"] = torch.tensor([[frames, side, side]])
    new = get_prologue(model)(model, call)
    assert new["video_cu_seqlens"].tolist() == [0, 16, 32]
    ep, tensors, _ = export_prologue(model, call)
    assert_close(run_exported(ep, tensors), run(reference, call), f"{name} video exported")


# ---------------------------------------------------------------------------------------------
# the block-diagonal vision attention
# ---------------------------------------------------------------------------------------------
def test_block_diagonal_mask():
    mask = _packed_vision.block_diagonal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5, torch.float32)
    allowed = mask[0, 0] == 0
    want = torch.zeros(5, 5, dtype=torch.bool)
    want[:2, :2] = True
    want[2:, 2:] = True
    assert torch.equal(allowed, want)
    assert mask.min().item() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_block_masked_attention_gradients_equal_split(name):
    """Train-mode gradients of the block-masked attention equal transformers' split attention."""
    reference, model = zoo.build_tiny_model(name), zoo.build_tiny_model(name)
    assert prepare_for_tracing(model)
    call = inputs(name, model, image_size=MIXED[name])
    grads = []
    for m in (reference, model):
        m.train()
        m(**call)["loss"].backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None and ".visual." in n})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        assert (g - grads[1][n]).abs().max().item() <= ATOL, n


def test_install_is_contained_and_reversible():
    model = zoo.build_tiny_model("qwen2_vl")
    other = zoo.build_tiny_model("qwen2_vl")
    base = type(model.model.visual.blocks[0].attn)
    assert _packed_vision.install_block_diagonal_vision_attention(model) == 2
    assert _packed_vision.install_block_diagonal_vision_attention(model) == 2  # idempotent
    assert _packed_vision.has_block_diagonal_vision_attention(model)
    attn = model.model.visual.blocks[0].attn
    assert isinstance(attn, base) and type(attn).__name__ == "BlockMasked" + base.__name__
    assert type(other.model.visual.blocks[0].attn) is base, "another model is untouched"
    clone = pickle.loads(pickle.dumps(model))  # module-level subclasses: picklable by name
    assert type(clone.model.visual.blocks[0].attn) is type(attn)
    assert _packed_vision.uninstall_block_diagonal_vision_attention(model) == 2
    assert type(model.model.visual.blocks[0].attn) is base


def test_text_length_stays_the_only_dynamic_dimension():
    """The prologue's integer outputs are static except where their size is the text length."""
    model = zoo.build_tiny_model("qwen2_vl")
    call = inputs("qwen2_vl", model, text_len=12)
    tensors, _ = split_call(get_prologue(model)(model, call))
    spec = default_dynamic_shapes(tensors)
    length = tensors["input_ids"].shape[1]
    assert spec["position_ids"] is not None and set(spec["position_ids"]) == {2}
    assert tensors["image_position_ids"].shape[0] != length and spec["image_position_ids"] is None
