"""Every family traces (whole, prologue or regional) without example inputs, equals eager, trains;
Qwen-VL images of different grids and numbers; verification catches a trace that differs from eager;
trace counts stay bounded; docs/models.md matches what the code does."""

import pathlib
import re

import pytest
import torch

import graphlora
from graphlora.errors import TraceMismatchError
from graphlora.testing import zoo
from helpers import merged_copy, set_random_lora

ROOT = pathlib.Path(__file__).resolve().parents[1]
FULL_VLM = dict(finetune_vision_layers=True, finetune_language_layers=True)
# Against an eager copy with merged weights W + s B A: fp32 rounding differs, amplified across layers.
MERGED = dict(atol=1e-4, rtol=1e-3)


def documented_modes(column: int = 0) -> dict[str, str]:
    """family -> mode, from the table of docs/models.md (written by tools/gen_models_doc.py): the default
    mode (column 0) or the whole-model trace (column 1)."""
    modes = {}
    for line in (ROOT / "docs" / "models.md").read_text().splitlines():
        m = re.match(r"^\| (\w+) \(\w+\) \| \w+ \| (blocks|whole|regional) \| (whole|prologue|regional) \|", line)
        if m:
            modes[m.group(1)] = m.group(2 + column)
    return modes


def mode_of(lora_model) -> str:
    if lora_model.trace_mode in ("regional", "blocks"):
        return str(lora_model.trace_mode)
    return "prologue" if "prologue" in lora_model.regions[0].reason else "whole"


def frozen(model):
    """The model with its weights frozen, as rewrite() leaves them: the references below are compared at
    atol 1e-6, and a matmul on a non-contiguous input (Cohere2 Vision's pixel-shuffled projector input)
    takes another kernel path, with other rounding (1e-5 relative), when its weight requires grad."""
    return model.requires_grad_(False)


@pytest.mark.parametrize("name", zoo.tiny_model_names())
def test_family_rewrites_without_example_inputs_equals_eager_and_trains(name):
    model = frozen(zoo.build_tiny_model(name))
    inputs = zoo.tiny_example_inputs(name, model)  # what rewrite() synthesises from the config
    with torch.no_grad():
        reference = model(**inputs, use_cache=False)

    lora_model = graphlora.rewrite(model, FULL_VLM)

    assert lora_model.sites and all(v.passed for v in lora_model.verification if not v.note)
    graphs = [r for r in lora_model.regions if r.mode == "graph"]
    assert graphs, [r.describe() for r in lora_model.regions]  # the result says which parts are graphs
    assert mode_of(lora_model) == documented_modes()[name], "docs/models.md is stale: run tools/gen_models_doc.py"
    with torch.no_grad():
        out = lora_model(**inputs)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, reference.loss, atol=1e-6, rtol=0)
    _trains(lora_model, inputs)


@pytest.mark.parametrize("name", zoo.tiny_model_names())
def test_family_traces_whole_or_by_regions_as_documented(name):
    """The whole-model trace: plain, after the family's eager prologue, or (Phi-4) by regions."""
    model = frozen(zoo.build_tiny_model(name))
    inputs = zoo.tiny_example_inputs(name, model)
    with torch.no_grad():
        reference = model(**inputs, use_cache=False)
    lora_model = graphlora.rewrite(model, FULL_VLM, trace_mode="whole_or_regional")
    assert lora_model.sites and all(v.passed for v in lora_model.verification if not v.note)
    assert mode_of(lora_model) == documented_modes(1)[name], "docs/models.md is stale: run tools/gen_models_doc.py"
    with torch.no_grad():
        torch.testing.assert_close(lora_model(**inputs).logits, reference.logits, atol=1e-6, rtol=0)
    _trains(lora_model, inputs)


def _trains(lora_model, inputs):
    lora_model.train()
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = lora_model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_docs_models_lists_every_family_with_a_trace_time():
    text = (ROOT / "docs" / "models.md").read_text()
    assert set(documented_modes()) == set(zoo.tiny_model_names())
    for name in zoo.tiny_model_names():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} ("))
        export_s = float(row.split("|")[6])
        assert export_s > 0


@pytest.mark.parametrize("trace_mode", ["whole", "blocks"])
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_images_of_different_grids_and_numbers(tiny, name, trace_mode):
    model, inputs = tiny(name)  # one image per sample
    lora_model = graphlora.rewrite(model, FULL_VLM, inputs, trace_mode=trace_mode)
    set_random_lora(lora_model)
    merged = merged_copy(model, lora_model)
    calls = {
        "two images of different grids in one sample": zoo.tiny_example_inputs(name, model, image_size=[(16, 16), (16, 32)]),
        "three images per sample": zoo.tiny_example_inputs(name, model, images_per_sample=3),
        "batch of 3, one image each": zoo.tiny_example_inputs(name, model, batch_size=3),
    }
    for what, call in calls.items():
        with torch.no_grad():
            out = lora_model(**call)
            ref = merged(**call, use_cache=False)
        torch.testing.assert_close(out.logits, ref.logits, **MERGED, msg=what)
        torch.testing.assert_close(out.loss, ref.loss, **MERGED, msg=what)
    assert lora_model.trace_mode == trace_mode


class ExportSensitiveProjector(torch.nn.Module):
    """A projector whose traced numerics differ from eager without any error (like Phi-4's vision
    attention, causal in eager and bidirectional once exported)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, image_features):
        out = self.inner(image_features)
        if torch.compiler.is_exporting():
            out = out * 1.5
        return out


def model_with_mismatch():
    model = zoo.build_tiny_model("llava")
    model.model.multi_modal_projector = ExportSensitiveProjector(model.model.multi_modal_projector)
    return model, zoo.tiny_example_inputs("llava", model)


def test_verification_demotes_the_region_whose_trace_differs():
    model, inputs = model_with_mismatch()
    with torch.no_grad():
        reference = model(**inputs, use_cache=False)
    lora_model = graphlora.rewrite(model, dict(FULL_VLM, finetune_projector=True), inputs,
                                   trace_mode="whole_or_regional")
    assert lora_model.trace_mode == "regional"
    assert "the whole model: traced program DIFFERS from eager" in lora_model.regions[0].reason
    # The mismatch is localised to the wrapper: it runs eagerly, the projector inside it is traced.
    failed = {r.path: r for r in lora_model.regions if r.path and r.verification and not r.verification.passed}
    assert list(failed) == ["model.multi_modal_projector"]
    assert failed["model.multi_modal_projector"].mode != "graph"
    assert failed["model.multi_modal_projector"].verification.output_error > 0.1
    graphs = {r.path for r in lora_model.regions if r.mode == "graph"}
    assert {"model.multi_modal_projector.inner", "model.language_model"} <= graphs
    with torch.no_grad():
        out = lora_model(**inputs)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-6, rtol=0)
    # The projector's sites are still adapted, as module-level LoRA in the eager glue.
    assert {"model.multi_modal_projector.inner.linear_1", "model.multi_modal_projector.inner.linear_2"} <= \
        {s.name for s in lora_model.sites}
    lora_model.train()
    lora_model(**inputs).loss.backward()
    assert lora_model.get_submodule("model.multi_modal_projector.inner.linear_1").lora_B.weight.grad.abs().sum() > 0


def test_strict_verification_raises_naming_the_region():
    model, inputs = model_with_mismatch()
    with pytest.raises(TraceMismatchError, match=r"model\.multi_modal_projector: traced program DIFFERS from eager"):
        graphlora.rewrite(model, dict(FULL_VLM, finetune_projector=True), inputs, verify="strict",
                          trace_mode="whole_or_regional")
    model, inputs = model_with_mismatch()  # the projector not adapted: the mismatch is the whole model's
    with pytest.raises(TraceMismatchError, match=r"the whole model: traced program DIFFERS from eager"):
        graphlora.rewrite(model, FULL_VLM, inputs, verify="strict", trace_mode="whole_or_regional")


@pytest.mark.parametrize("trace_mode", ["whole", "blocks"])
@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "mllama", "gemma3"])
def test_trace_count_over_varied_batches(name, trace_mode):
    model = zoo.build_tiny_model(name).train()
    lora_model = graphlora.rewrite(model, FULL_VLM, zoo.tiny_example_inputs(name, model), trace_mode=trace_mode)
    optimizer = torch.optim.SGD([p for p in lora_model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(20):
        batch = zoo.tiny_example_inputs(name, model, batch_size=2 + step % 2, text_len=4 + step % 7, seed=step)
        lora_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if trace_mode == "whole":  # one program per batch size (2 and 3)
        assert lora_model.num_traces <= 2, [t.key for t in lora_model.traces]
    else:  # one program per block class serves every batch
        assert lora_model.num_traces == len(lora_model.block_classes()), lora_model.trace_log()


def test_trace_cache_is_bounded(tiny):
    model, inputs = tiny("llava")
    lora_model = graphlora.rewrite(model, FULL_VLM, inputs, cache_size=2, trace_mode="whole")
    with torch.no_grad():
        for batch_size in (1, 3, 4):
            lora_model(**zoo.tiny_example_inputs("llava", model, batch_size=batch_size))
    assert lora_model.cache_info() == {"programs": 2, "maxsize": 2, "traces_made": 4}
