"""The GraphLoraModel contract on the tiny LLaVA (numerics, calls, modes, copies, PEFT parity)."""

import copy
import inspect
import io

import pytest
import torch

import graphlora
from graphlora.testing import zoo
from helpers import merged_copy, set_random_lora

FULL = dict(finetune_vision_layers=True, finetune_language_layers=True)
# Against an eager copy with merged weights W + s B A: the sums are rounded differently in fp32.
MERGED = dict(atol=1e-5, rtol=1e-4)


def relative_error(value, reference):
    """||value - reference|| / ||reference||: bf16 keeps about 3 significant digits."""
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def no_labels(inputs):
    return {k: v for k, v in inputs.items() if k != "labels"}


@pytest.fixture
def llava(tiny):
    """(original, inputs, lora_model with random non-zero A and B, untouched deep copy of the original)."""
    model, inputs = tiny("llava")
    pristine = copy.deepcopy(model)
    lora_model = graphlora.rewrite(model, FULL, inputs)
    set_random_lora(lora_model)
    return model, inputs, lora_model, pristine


def test_lora_output_equals_eager_merged_weights(llava):
    model, inputs, lora_model, _ = llava
    merged = merged_copy(model, lora_model)
    with torch.no_grad():
        out = lora_model(**inputs)
        ref = merged(**inputs, use_cache=False)
        base = model(**inputs, use_cache=False)
    torch.testing.assert_close(out.logits, ref.logits, **MERGED)
    torch.testing.assert_close(out.loss, ref.loss, **MERGED)
    assert (out.logits - base.logits).abs().max() > 1e-3, "random LoRA weights must change the output"
    assert type(out) is type(ref)


def test_same_trainable_parameters_as_peft(llava):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    _, _, lora_model, pristine = llava
    config = LoraConfig(r=16, lora_alpha=16, target_modules=[s.name for s in lora_model.sites])
    peft_model = get_peft_model(pristine, config)
    peft_sd = get_peft_model_state_dict(peft_model)
    ours = lora_model.lora_state_dict(peft_keys=True)
    assert set(ours) == set(peft_sd)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in peft_sd.items()}
    peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_model.trainable_parameters()[0] == peft_trainable


def test_state_dict_keys_are_original_keys_plus_lora(llava):
    model, _, lora_model, _ = llava
    expected = set(model.state_dict()) | {f"{s.name}.lora_{ab}.weight" for s in lora_model.sites for ab in "AB"}
    assert set(lora_model.state_dict()) == expected
    # Shared, not copied: the base weights are the original model's tensors.
    assert lora_model.get_parameter("lm_head.weight") is model.get_parameter("lm_head.weight")


@pytest.mark.parametrize("variant", ["batch1", "batch3", "longer_text", "no_labels"])
def test_other_calls_match_the_reference(llava, variant):
    model, _, lora_model, _ = llava
    kwargs = {"batch1": dict(batch_size=1), "batch3": dict(batch_size=3), "longer_text": dict(text_len=30),
              "no_labels": dict(with_labels=False)}[variant]
    inputs = zoo.tiny_example_inputs("llava", model, **kwargs)
    merged = merged_copy(model, lora_model)
    with torch.no_grad():
        out = lora_model(**inputs)
        ref = merged(**inputs, use_cache=False)
    torch.testing.assert_close(out.logits, ref.logits, **MERGED)
    if variant == "no_labels":
        assert out.loss is None
    else:
        torch.testing.assert_close(out.loss, ref.loss, **MERGED)


def test_positional_call_and_signature(llava):
    model, inputs, lora_model, _ = llava
    assert inspect.signature(lora_model.forward) == inspect.signature(model.forward)
    with torch.no_grad():
        by_kw = lora_model(**inputs)
        by_pos = lora_model(inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"],
                            labels=inputs["labels"])
    torch.testing.assert_close(by_pos.logits, by_kw.logits)


def test_eval_turns_dropout_off(tiny):
    model, inputs = tiny("llava")
    lora_model = graphlora.rewrite(model, dict(lora_dropout=0.5), inputs)
    set_random_lora(lora_model)
    lora_model.train()
    with torch.no_grad():
        t1, t2 = lora_model(**inputs).logits, lora_model(**inputs).logits
    assert (t1 - t2).abs().max() > 1e-4, "dropout must be active in train mode"
    lora_model.eval()
    with torch.no_grad():
        e1, e2 = lora_model(**inputs).logits, lora_model(**inputs).logits
        ref = merged_copy(model, lora_model)(**inputs, use_cache=False).logits
    torch.testing.assert_close(e1, e2)
    torch.testing.assert_close(e1, ref, **MERGED)


def test_bfloat16_and_autocast(llava):
    _, inputs, lora_model, _ = llava
    with torch.no_grad():
        ref = lora_model(**inputs).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_model(**inputs)
        out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert relative_error(out.logits, ref) < 0.03
    assert all(p.grad is not None for p in lora_model.parameters() if p.requires_grad)

    lora_model.to(torch.bfloat16)
    bf16_inputs = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.no_grad():
        out = lora_model(**bf16_inputs)
    assert out.logits.dtype == torch.bfloat16
    assert relative_error(out.logits, ref) < 0.03


def test_deepcopy_and_torch_save(llava):
    _, inputs, lora_model, _ = llava
    with torch.no_grad():
        ref = lora_model(**inputs).logits
    clone = copy.deepcopy(lora_model)
    buffer = io.BytesIO()
    torch.save(lora_model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(clone(**inputs).logits, ref)
        torch.testing.assert_close(loaded(**inputs).logits, ref)
        # The copy owns its weights: changing them leaves the original alone.
        clone.get_parameter(f"{clone.sites[0].name}.lora_B.weight").add_(1.0)
        torch.testing.assert_close(lora_model(**inputs).logits, ref)
    assert [s.name for s in loaded.sites] == [s.name for s in lora_model.sites]


def test_disable_adapter_gives_the_base_model(llava):
    model, inputs, lora_model, _ = llava
    with torch.no_grad():
        base = model(**inputs, use_cache=False).logits
        with lora_model.disable_adapter():
            disabled = lora_model(**inputs).logits
        enabled = lora_model(**inputs).logits
    torch.testing.assert_close(disabled, base, atol=1e-6, rtol=0)
    assert (enabled - base).abs().max() > 1e-3


def test_generate_matches_peft(llava):
    from peft import LoraConfig, get_peft_model

    _, inputs, lora_model, pristine = llava
    peft_model = get_peft_model(pristine, LoraConfig(r=16, lora_alpha=16, target_modules=[s.name for s in lora_model.sites]))
    with torch.no_grad():
        for site in lora_model.sites:
            ours = lora_model.get_submodule(site.name)
            theirs = peft_model.base_model.model.get_submodule(site.name)
            theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    lora_model.eval()
    peft_model.eval()
    prompt = no_labels(inputs)
    with torch.no_grad():
        ours = lora_model.generate(**prompt, max_new_tokens=6, do_sample=False)
        theirs = peft_model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert ours.shape[1] == prompt["input_ids"].shape[1] + 6
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_config_and_hf_attributes_are_forwarded(llava):
    model, _, lora_model, _ = llava
    assert lora_model.config is model.config
    assert lora_model.base_model is model
    assert lora_model.get_input_embeddings() is not None


def test_modules_to_save_trains_a_copy(tiny):
    model, inputs = tiny("llava")
    original_head = model.lm_head.weight.detach().clone()
    lora_model = graphlora.rewrite(model, dict(finetune_vision_layers=False, modules_to_save=["lm_head"]), inputs)
    head = lora_model.get_parameter("lm_head.weight")
    assert head.requires_grad and head is not model.lm_head.weight
    lora_model(**inputs).loss.backward()
    assert head.grad is not None and head.grad.abs().sum() > 0
    torch.optim.SGD([head], lr=1.0).step()
    torch.testing.assert_close(model.lm_head.weight, original_head)  # the user's head is untouched
    assert "lm_head.weight" in lora_model.state_dict()


def test_policy_from_dict_path_and_object_agree(tiny, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("finetune_vision_layers: false\nr: 8\n")
    names = []
    for policy in (graphlora.Policy(finetune_vision_layers=False, r=8), {"finetune_vision_layers": False, "r": 8}, path):
        model, inputs = tiny("llava")
        lora_model = graphlora.rewrite(model, policy, inputs)
        names.append([(s.name, s.r) for s in lora_model.sites])
    assert names[0] == names[1] == names[2]
    assert all(r == 8 for _, r in names[0])
