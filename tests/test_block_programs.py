"""Block programs, the default trace mode: one program per block class serves a stream of real shapes.

For every family of the zoo, a stream of batches whose batch size, text length and image size vary as
the family's processor makes them trains with no trace after the first batch (the trace log says so),
and every batch's outputs and LoRA gradients equal module-level LoRA on the original model (same
weights). Also: what makes a new trace (and the reason logged), batch size 1 first, block classes,
verification of every block, import of the published configs on the meta device.
"""

import pytest
import torch

import graphlora
from graphlora.errors import TraceMismatchError
from graphlora.testing import zoo
from helpers import EagerLoraReference, lora_grads, set_random_lora

FULL_VLM = dict(finetune_vision_layers=True, finetune_language_layers=True)

#: Per family, image sizes (h, w) its processor would produce from images of several sizes (dynamic
#: resolution: multiples of patch x merge; tiling families: original sizes, tiled as the processor does);
#: families whose processor resizes every image to one size vary batch size and text length only.
IMAGE_SIZES = {
    "qwen2_vl": [(16, 32), (32, 16), (24, 24)], "qwen2_5_vl": [(16, 32), (32, 32), (24, 16)],
    "qwen3_vl": [(32, 32), (16, 32), (32, 16)], "glm4v": [(16, 32), (32, 32), (24, 16)],
    "qwen3_vl_moe": [(32, 32), (16, 32), (32, 16)], "glm4v_moe": [(16, 32), (32, 32), (24, 16)],
    "llava_next": [(16, 32), (32, 32), (32, 16)], "pixtral": [(16, 32), (32, 16), (24, 32)],
    "mistral3": [(16, 32), (32, 16), (32, 32)], "idefics3": [(32, 32), (16, 32), (48, 32)],
    "smolvlm": [(32, 32), (16, 32), (48, 32)], "mllama": [(32, 32), (16, 32), (32, 16)],
    "llama4": [(32, 32), (16, 32), (32, 16)], "phi4_multimodal": [(32, 32), (16, 32), (32, 16)],
    "llava_onevision": [(16, 32), (32, 32), (32, 16)], "cohere2_vision": [(32, 32), (16, 32), (48, 32)],
    "idefics2": [(16, 12), (8, 16), (12, 12)],  # native aspect ratio, padded to the batch's largest image
}
SHAPES = [dict(batch_size=2, text_len=8), dict(batch_size=1, text_len=5), dict(batch_size=3, text_len=12, pad_tokens=3),
          dict(batch_size=2, text_len=20, pad_tokens=1), dict(batch_size=1, text_len=9), dict(batch_size=3, text_len=6)]


def stream(name: str, model) -> list[dict]:
    shapes = [dict(s) for s in SHAPES]
    for i, size in enumerate(IMAGE_SIZES.get(name, [])):
        shapes[2 * i + 1]["image_size"] = size
    return [zoo.tiny_example_inputs(name, model, seed=i, **s) for i, s in enumerate(shapes)]


def shape_of(batch: dict) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()) if isinstance(v, torch.Tensor))


def program_traces(lora_model) -> list:
    return [t for t in lora_model.traces if t.kind == "program"]


@pytest.mark.parametrize("name", zoo.tiny_model_names())
def test_stream_trains_with_one_trace_per_block_class_and_equals_eager(name):
    model = zoo.build_tiny_model(name).train()
    batches = stream(name, model)
    assert len({shape_of(b) for b in batches}) >= 6
    lora_model = graphlora.rewrite(model, FULL_VLM, batches[0])
    assert lora_model.trace_mode == "blocks"
    set_random_lora(lora_model, std=0.1)  # B != 0, so the branches count
    optimizer = torch.optim.SGD([p for p in lora_model.parameters() if p.requires_grad], lr=1e-3)
    traced_after_first = None
    for i, batch in enumerate(batches):
        lora_model.zero_grad(set_to_none=True)
        out = lora_model(**batch)
        out.loss.backward()
        got = lora_grads(lora_model)
        lora_model.zero_grad(set_to_none=True)
        with EagerLoraReference(model, lora_model):
            ref = model(**batch, use_cache=False)
        ref.loss.backward()
        want = lora_grads(lora_model)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-4, msg=f"batch {i}")
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-4, msg=f"batch {i}")
        for key in want:
            assert (got[key] is None) == (want[key] is None), (i, key)
            if want[key] is not None:
                torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=f"batch {i}: {key}")
        optimizer.step()  # the weights move: the next batch checks the same programs on new values
        if i == 0:
            traced_after_first = len(program_traces(lora_model))
    traces = program_traces(lora_model)
    assert len(traces) == traced_after_first, lora_model.trace_log()
    units = [t.unit for t in traces]
    assert len(units) == len(set(units)), lora_model.trace_log()  # one trace per block class
    assert all(t.reason == "first call" for t in traces), lora_model.trace_log()


def test_blocks_share_one_program_per_class():
    model = zoo.build_tiny_model("llava", layers=6)
    lora_model = graphlora.rewrite(model, FULL_VLM, zoo.tiny_example_inputs("llava", model))
    graphs = [r for r in lora_model.regions if r.mode == "graph"]
    # 6 decoder layers and the 5 CLIP layers the loss reads (features come from layer -2: the 6th is dead)
    assert len(graphs) == 6 + 5
    assert sorted(t.unit for t in program_traces(lora_model)) == ["CLIPEncoderLayer", "LlamaDecoderLayer"]
    assert all(r.verification is not None and r.verification.passed for r in graphs)
    programs = lora_model.programs()
    assert len(programs) == 2


def test_gemma3_sliding_and_full_layers_are_two_block_classes():
    model = zoo.build_tiny_model("gemma3", layers=4)
    lora_model = graphlora.rewrite(model, FULL_VLM, zoo.tiny_example_inputs("gemma3", model))
    units = sorted(t.unit for t in program_traces(lora_model))
    assert units == ["Gemma3DecoderLayer", "Gemma3DecoderLayer (2)", "SiglipEncoderLayer"]


def test_batch_of_one_first_then_larger_batches_reuse_the_program():
    model = zoo.build_tiny_model("qwen2_vl")
    first = zoo.tiny_example_inputs("qwen2_vl", model, batch_size=1)
    lora_model = graphlora.rewrite(model, FULL_VLM, first)
    before = len(program_traces(lora_model))
    set_random_lora(lora_model)
    for batch_size, image in ((3, (16, 32)), (2, (32, 32)), (1, (24, 16))):
        batch = zoo.tiny_example_inputs("qwen2_vl", model, batch_size=batch_size, image_size=image, pad_tokens=2)
        with torch.no_grad(), EagerLoraReference(model, lora_model):
            ref = model(**batch, use_cache=False).logits
        with torch.no_grad():
            torch.testing.assert_close(lora_model(**batch).logits, ref, atol=1e-5, rtol=1e-4)
    assert len(program_traces(lora_model)) == before, lora_model.trace_log()


def test_new_traces_only_for_mode_dtype_and_adapters_with_the_reason():
    model = zoo.build_tiny_model("llava").train()
    batch = zoo.tiny_example_inputs("llava", model)
    lora_model = graphlora.rewrite(model, FULL_VLM, batch)
    classes = len(program_traces(lora_model))
    lora_model.eval()
    with torch.no_grad():
        lora_model(**batch)
    eval_traces = program_traces(lora_model)[classes:]
    assert len(eval_traces) == classes and all(t.reason == "eval mode" for t in eval_traces)
    with torch.no_grad(), lora_model.disable_adapter():
        base = lora_model(**batch).logits
        torch.testing.assert_close(base, model(**batch, use_cache=False).logits)
    off = program_traces(lora_model)[2 * classes:]
    assert len(off) == classes and all(t.reason == "adapters disabled" for t in off)
    lora_model.double()
    with torch.no_grad():
        lora_model(**{k: v.double() if v.is_floating_point() else v for k, v in batch.items()})
    doubled = program_traces(lora_model)[3 * classes:]
    assert len(doubled) == classes and all("float64" in t.reason for t in doubled), lora_model.trace_log()
    assert "LlamaDecoderLayer: eval mode" in lora_model.trace_log()


def test_repeated_block_calls_are_served_by_signature_and_never_across_modes(monkeypatch):
    import graphlora.runtime as runtime

    model = zoo.build_tiny_model("llava", layers=4).train()
    lora_model = graphlora.rewrite(model, FULL_VLM, zoo.tiny_example_inputs("llava", model))
    set_random_lora(lora_model)
    lora_model(**zoo.tiny_example_inputs("llava", model, seed=1)).loss.backward()
    keyed = []
    real_key = runtime.make_call_key
    monkeypatch.setattr(runtime, "make_call_key", lambda *a, **k: keyed.append(a) or real_key(*a, **k))
    other = zoo.tiny_example_inputs("llava", model, batch_size=3, text_len=11, pad_tokens=2, seed=2)
    with torch.no_grad(), EagerLoraReference(model, lora_model):
        ref = model(**other, use_cache=False).logits
    with torch.no_grad():
        torch.testing.assert_close(lora_model(**other).logits, ref, atol=1e-5, rtol=1e-4)
    assert keyed == []  # new sizes, same signature: no splitting, keying or flattening per block call
    traces = len(program_traces(lora_model))
    lora_model.eval()
    with torch.no_grad():
        lora_model(**other)
    assert keyed and all(t.reason == "eval mode" for t in program_traces(lora_model)[traces:])


def test_call_signature_is_structure_not_size():
    from graphlora.runtime import call_signature

    def call(n, **extra):
        return dict(hidden_states=torch.zeros(2, n, 8), position_embeddings=(torch.zeros(n, 4), torch.zeros(n, 4)),
                    attention_mask=None, output_attentions=False, **extra)

    assert call_signature(call(5), True, "lora") == call_signature(call(9), True, "lora")
    assert call_signature(call(5), True, "lora") != call_signature(call(5), False, "lora")
    assert call_signature(call(5), True, "lora") != call_signature(call(5), True, "base")
    assert call_signature(call(5), True, "lora") != call_signature(call(5, scale=2), True, "lora")
    half = call(5)
    half["hidden_states"] = half["hidden_states"].half()
    assert call_signature(half, True, "lora") != call_signature(call(5), True, "lora")
    assert call_signature(call(5, sizes=[1, 2]), True, "lora") is None  # lists, objects: the keyed path
    assert call_signature(call(5, cache=object()), True, "lora") is None


def test_trace_cache_forgets_signatures_of_evicted_programs():
    from graphlora.runtime import TraceCache

    cache = TraceCache(maxsize=1)
    first, second = object(), object()
    cache.put("key-1", first, ("sig-1",))
    assert cache.served(("sig-1",)) is first
    cache.put("key-2", second, ("sig-2",))
    assert cache.served(("sig-1",)) is None and cache.served(("sig-2",)) is second
    cache.clear()
    assert cache.served(("sig-2",)) is None


class ExportSensitiveMLP(torch.nn.Module):
    """An MLP whose traced numerics differ from eager without any error."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out * 1.5 if torch.compiler.is_exporting() else out


def test_a_block_whose_program_differs_from_eager_runs_eagerly():
    model = zoo.build_tiny_model("llava")
    layer = model.model.language_model.layers[1]
    layer.mlp = ExportSensitiveMLP(layer.mlp)  # layer 1 is its own block class now, and its program is wrong
    batch = zoo.tiny_example_inputs("llava", model)
    lora_model = graphlora.rewrite(model, FULL_VLM, batch)
    by_path = {r.path: r for r in lora_model.regions}
    bad = by_path["model.language_model.layers.1"]
    assert bad.mode == "eager" and not bad.verification.passed
    assert by_path["model.language_model.layers.0"].mode == "graph"
    set_random_lora(lora_model)
    with torch.no_grad(), EagerLoraReference(model, lora_model):
        ref = model(**batch, use_cache=False).logits
    with torch.no_grad():
        torch.testing.assert_close(lora_model(**batch).logits, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(TraceMismatchError, match=r"model\.language_model\.layers\.1"):
        graphlora.rewrite(model, FULL_VLM, batch, verify="strict")


def test_trace_modes_whole_and_regional_stay_available():
    model = zoo.build_tiny_model("llava")
    batch = zoo.tiny_example_inputs("llava", model)
    blocks = graphlora.rewrite(model, FULL_VLM, batch)
    whole = graphlora.rewrite(model, FULL_VLM, batch, trace_mode="whole")
    regional = graphlora.rewrite(model, FULL_VLM, batch, trace_mode="regional")
    assert (blocks.trace_mode, whole.trace_mode, regional.trace_mode) == ("blocks", "whole", "regional")
    rows = [sorted((r.name, r.component, r.role, r.layer, r.targeted) for r in m.explain_rows())
            for m in (blocks, whole)]
    assert rows[0] == rows[1]  # the eager analysis recording labels exactly as the whole-model export
    assert sorted(s.name for s in blocks.sites) == sorted(s.name for s in regional.sites)


def test_switching_from_whole_to_blocks_keeps_the_sites():
    model = zoo.build_tiny_model("qwen2_vl")
    batch = zoo.tiny_example_inputs("qwen2_vl", model)
    lora_model = graphlora.rewrite(model, FULL_VLM, batch, trace_mode="whole")
    set_random_lora(lora_model)
    with torch.no_grad():
        before = lora_model(**batch).logits
    sites = [s.name for s in lora_model.sites]
    lora_model.trace_by_blocks()
    assert lora_model.trace_mode == "blocks" and [s.name for s in lora_model.sites] == sites
    with torch.no_grad():
        torch.testing.assert_close(lora_model(**batch).logits, before, atol=1e-5, rtol=1e-4)
