"""QLoRA: rewriting bitsandbytes 4-bit (nf4) and 8-bit base models, loaded as a user loads them.

Each model is a zoo tiny VLM with doubled widths (bitsandbytes' 4-bit blocks of 64 need in-features that
are multiples of 64), saved with random weights and loaded back through ``from_pretrained`` with a
``BitsAndBytesConfig`` on the CPU. References: the same model rewritten in float (site selection), the
quantized model itself (outputs at B = 0) and PEFT's QLoRA over the same quantized model (gradients).
"""

from __future__ import annotations

import pytest
import torch

import graphlora
from graphlora.errors import QuantizedBaseLayerError
from graphlora.quantized import QuantFormat

bnb = pytest.importorskip("bitsandbytes")

from graphlora.testing import zoo  # noqa: E402
from graphlora.testing.quantized import bnb_config, build_wide_tiny_model  # noqa: E402
from helpers import set_random_lora, train_and_check_grads  # noqa: E402

STRATEGIES = {
    "language": dict(finetune_vision_layers=False, finetune_language_layers=True),
    "vision": dict(finetune_vision_layers=True, finetune_language_layers=False),
    "full": dict(finetune_vision_layers=True, finetune_language_layers=True),
}
CASES = [("llava", 4), ("qwen2_vl", 4), ("mllama", 4), ("llava", 8)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``checkpoint(family) -> (directory, float model)``: one saved random-weight model per family."""
    saved: dict[str, tuple] = {}

    def checkpoint(family: str):
        if family not in saved:
            model = build_wide_tiny_model(family)
            directory = tmp_path_factory.mktemp(f"{family}-float")
            model.save_pretrained(directory)
            saved[family] = (directory, model)
        return saved[family]

    return checkpoint


def load(checkpoints, family: str, bits: int):
    directory, model = checkpoints(family)
    quantized = type(model).from_pretrained(directory, quantization_config=bnb_config(bits), device_map="cpu",
                                            dtype=torch.float32)
    return quantized.train(), model  # train(): bitsandbytes' CPU eval path repacks 4-bit weights


def inputs_for(family: str, model) -> dict:
    return zoo.tiny_example_inputs(family, model)


def site_names(lora_model) -> list[str]:
    return sorted(s.name for s in lora_model.sites)


@pytest.mark.parametrize("family,bits", CASES)
def test_quantized_layers_are_the_bitsandbytes_ones(checkpoints, family, bits):
    quantized, _ = load(checkpoints, family, bits)
    expected = {name for name, m in quantized.named_modules()
                if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    assert expected, "the fixture must quantize something"
    lora_model = graphlora.rewrite(quantized, STRATEGIES["full"], inputs_for(family, quantized), verify=False)
    assert set(lora_model.quantized) == expected
    formats = {layer.format for layer in lora_model.quantized.values()}
    assert formats == ({QuantFormat.NF4} if bits == 4 else {QuantFormat.INT8})
    # the user's modules keep their bitsandbytes parameters: only the mirror's are plain
    assert all(type(m.weight).__name__ in ("Params4bit", "Int8Params") for name, m in quantized.named_modules()
               if name in expected)


@pytest.mark.parametrize("family,bits", CASES)
def test_strategies_select_the_float_models_sites(checkpoints, family, bits):
    quantized, float_model = load(checkpoints, family, bits)
    inputs = inputs_for(family, quantized)
    for name, strategy in STRATEGIES.items():
        floating = graphlora.rewrite(build_wide_tiny_model(family), strategy, inputs, verify=False)
        ours = graphlora.rewrite(quantized, strategy, inputs, verify=False)
        assert site_names(ours) == site_names(floating), name
        assert site_names(ours), f"{name} selects nothing"
        by_name = {s.name: s for s in floating.sites}
        for site in ours.sites:  # same labels: component and role
            assert (site.component, site.role) == (by_name[site.name].component, by_name[site.name].role)


@pytest.mark.parametrize("family,bits", CASES)
def test_at_init_outputs_equal_the_quantized_models_and_training_lowers_the_loss(checkpoints, family, bits):
    quantized, _ = load(checkpoints, family, bits)
    inputs = inputs_for(family, quantized)
    with torch.no_grad():
        reference = quantized(**inputs)
    lora_model = graphlora.rewrite(quantized, STRATEGIES["full"], inputs)
    lora_model.train()
    with torch.no_grad():
        out = lora_model(**inputs)
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=0)
    assert all(p.dtype == torch.float32 for n, p in lora_model.named_parameters() if p.requires_grad)
    losses = train_and_check_grads(lora_model, inputs, steps=3)
    assert losses[-1] < losses[0] - 0.5, losses
    report = lora_model.fusion_report()
    quantized_sites = [s.name for s in lora_model.sites if s.name in lora_model.quantized]
    assert quantized_sites and all(not report[name]["fused"] for name in quantized_sites)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_projector_in_the_eager_glue_trains_and_matches_peft(checkpoints, bits):
    """LLaVA's projector runs eagerly between block programs: its quantized linears get module-level LoRA
    over the quantized forward (GlueLoraForward with a base), unfused, with PEFT's gradients."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    ours_base, _ = load(checkpoints, "llava", bits)
    peft_base, _ = load(checkpoints, "llava", bits)
    inputs = inputs_for("llava", ours_base)
    policy = dict(finetune_vision_layers=False, finetune_language_layers=False, finetune_projector=True)
    lora_model = graphlora.rewrite(ours_base, policy, inputs)
    names = site_names(lora_model)
    assert names == ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"]
    assert all(n in lora_model.quantized for n in names)
    report = lora_model.fusion_report()
    assert all("quantized base layer" in report[n]["reason"] for n in names), report
    set_random_lora(lora_model, std=0.05)
    peft_model = get_peft_model(peft_base, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=names))
    set_peft_model_state_dict(peft_model, lora_model.lora_state_dict(peft_keys=True))
    loss = lora_model.train()(**inputs).loss
    loss.backward()
    peft_loss = peft_model.train()(**inputs).loss
    peft_loss.backward()
    torch.testing.assert_close(loss, peft_loss, rtol=1e-5, atol=1e-5)
    peft_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for name in names:
        key = next(k for k in peft_grads if k.endswith(f"{name}.lora_B.default.weight"))
        torch.testing.assert_close(lora_model.get_submodule(name).lora_B.weight.grad, peft_grads[key],
                                   rtol=1e-4, atol=1e-5)
    with torch.no_grad(), lora_model.disable_adapter():  # adapters off: the quantized layer alone
        torch.testing.assert_close(lora_model(**inputs).logits, ours_base(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family,bits", CASES)
def test_lora_gradients_equal_peft_qlora(checkpoints, family, bits):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    ours_base, _ = load(checkpoints, family, bits)
    peft_base, _ = load(checkpoints, family, bits)
    inputs = inputs_for(family, ours_base)
    lora_model = graphlora.rewrite(ours_base, STRATEGIES["full"], inputs)
    set_random_lora(lora_model, std=0.05)
    names = site_names(lora_model)
    peft_model = get_peft_model(peft_base, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=names))
    set_peft_model_state_dict(peft_model, lora_model.lora_state_dict(peft_keys=True))
    lora_model.train()
    peft_model.train()
    loss = lora_model(**inputs).loss
    loss.backward()
    peft_loss = peft_model(**inputs).loss
    peft_loss.backward()
    torch.testing.assert_close(loss, peft_loss, rtol=1e-5, atol=1e-5)
    peft_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    compared = 0
    for name in names:
        module = lora_model.get_submodule(name)
        for ab in "AB":
            key = next(k for k in peft_grads if k.endswith(f"{name}.lora_{ab}.default.weight"))
            torch.testing.assert_close(getattr(module, f"lora_{ab}").weight.grad, peft_grads[key],
                                       rtol=1e-4, atol=1e-5, msg=f"{name} lora_{ab}")
            compared += 1
    assert compared == 2 * len(names) and any(n in lora_model.quantized for n in names)


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------
def _fake_quantized_class(module_name: str, class_name: str) -> type:
    cls = type(class_name, (torch.nn.Module,), {"forward": lambda self, x: x})
    cls.__module__ = module_name
    return cls


@pytest.mark.parametrize("module_name,class_name,fmt", [
    ("auto_gptq.nn_modules.qlinear.qlinear_cuda", "QuantLinear", "GPTQ"),
    ("awq.modules.linear.gemm", "WQLinear_GEMM", "AWQ"),
    ("hqq.core.quantize", "HQQLinear", "HQQ"),
])
def test_unsupported_quantization_format_is_refused_with_layer_and_format(tiny, module_name, class_name, fmt):
    model, inputs = tiny("llava")
    model.model.language_model.layers[1].self_attn.o_proj = _fake_quantized_class(module_name, class_name)()
    with pytest.raises(QuantizedBaseLayerError, match=rf"layers\.1\.self_attn\.o_proj \({class_name}: {fmt} "):
        graphlora.rewrite(model, None, inputs)


def test_8bit_layer_that_trains_its_own_weights_is_refused(tiny):
    model, inputs = tiny("llava")
    layer = model.model.language_model.layers[0].mlp.up_proj
    model.model.language_model.layers[0].mlp.up_proj = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features,
                                                                          bias=False, has_fp16_weights=True)
    with pytest.raises(QuantizedBaseLayerError, match=r"layers\.0\.mlp\.up_proj.*has_fp16_weights=True"):
        graphlora.rewrite(model, None, inputs)


def test_4bit_weights_repacked_for_cpu_inference_are_refused(checkpoints):
    quantized, _ = load(checkpoints, "llava", 4)
    quantized.eval()
    with torch.no_grad():
        quantized(**inputs_for("llava", quantized))  # bitsandbytes repacks on this CPU eval forward
    repacked = [n for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)
                and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    if not repacked:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    with pytest.raises(QuantizedBaseLayerError, match="repacked this 4-bit weight for CPU inference"):
        graphlora.rewrite(quantized, None, inputs_for("llava", quantized))


# ---------------------------------------------------------------------------------------------
# The ops against bitsandbytes' own layers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type,double_quant,compute_dtype", [
    ("nf4", False, torch.float32), ("nf4", True, torch.float32), ("fp4", False, torch.float32),
    ("fp4", True, torch.bfloat16), ("nf4", True, torch.bfloat16),
])
def test_4bit_op_equals_bitsandbytes_forward_and_input_gradient(quant_type, double_quant, compute_dtype):
    from graphlora.mirror import mirror_module
    from graphlora.quantized import install_quantized_forwards

    torch.manual_seed(0)
    model = torch.nn.Sequential(bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=compute_dtype,
                                                  quant_type=quant_type, compress_statistics=double_quant))
    model = model.to("cpu").requires_grad_(False).train()
    twin = mirror_module(model)
    layers = install_quantized_forwards(twin)
    assert layers["0"].format.value == quant_type and layers["0"].double_quant == double_quant
    x = torch.randn(3, 5, 128)
    grad = torch.randn(3, 5, 64)
    results = []
    for module in (model, twin):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad))
    (y_bnb, dx_bnb), (y_ours, dx_ours) = results
    torch.testing.assert_close(y_ours, y_bnb, rtol=0, atol=0)
    torch.testing.assert_close(dx_ours, dx_bnb, rtol=0, atol=0)
    assert type(model[0].weight).__name__ == "Params4bit" and type(twin[0].weight) is torch.nn.Parameter


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("training", [False, True])
def test_8bit_op_equals_bitsandbytes_forward_and_input_gradient(threshold, training):
    from graphlora.mirror import mirror_module
    from graphlora.quantized import install_quantized_forwards

    torch.manual_seed(0)
    model = torch.nn.Sequential(bnb.nn.Linear8bitLt(128, 64, bias=True, has_fp16_weights=False,
                                                    threshold=threshold))
    model = model.to("cpu").requires_grad_(False).train(training)
    twin = mirror_module(model)
    install_quantized_forwards(twin)
    x = torch.randn(3, 5, 128) * 3  # some entries above the outlier threshold
    grad = torch.randn(3, 5, 64)
    results = []
    for module in (model, twin):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad))
    (y_bnb, dx_bnb), (y_ours, dx_ours) = results
    torch.testing.assert_close(y_ours, y_bnb, rtol=0, atol=0)
    torch.testing.assert_close(dx_ours, dx_bnb, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Adapters and merged checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def trained_4bit(checkpoints):
    """(graphlora model over a 4-bit llava with random non-zero LoRA, its inputs)."""
    quantized, _ = load(checkpoints, "llava", 4)
    inputs = inputs_for("llava", quantized)
    lora_model = graphlora.rewrite(quantized, STRATEGIES["full"], inputs)
    set_random_lora(lora_model, std=0.05)
    return lora_model.train(), inputs


def test_peft_loads_a_graphlora_qlora_adapter_onto_the_same_quantized_base(checkpoints, trained_4bit, tmp_path):
    from peft import PeftModel

    lora_model, inputs = trained_4bit
    lora_model.save_adapter(tmp_path / "adapter")
    with torch.no_grad():
        ours = lora_model(**inputs).logits
    base, _ = load(checkpoints, "llava", 4)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").train()
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), lora_model.disable_adapter():
        plain = lora_model(**inputs).logits
    assert (ours - plain).abs().max() > 1e-3, "the adapter must change the output"


def test_graphlora_loads_a_peft_qlora_adapter(checkpoints, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_base, _ = load(checkpoints, "llava", 4)
    inputs = inputs_for("llava", peft_base)
    targets = ["q_proj", "v_proj", "down_proj"]  # in the language model (the last CLIP layer is dead in LLaVA)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=rf".*language_model.*\.({'|'.join(targets)})")
    peft_model = get_peft_model(peft_base, config)
    set_random_lora(peft_model, std=0.05)
    peft_model.train()
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
    peft_model.save_pretrained(tmp_path / "peft")
    base, _ = load(checkpoints, "llava", 4)
    lora_model = graphlora.load_adapter(base, tmp_path / "peft", example_inputs=inputs).train()
    assert {s.name.rsplit(".", 1)[1] for s in lora_model.sites} == set(targets)
    assert all(s.name in lora_model.quantized for s in lora_model.sites)
    with torch.no_grad():
        ours = lora_model(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_merged_of_a_4bit_model_reloads_as_dequantized_base_plus_lora(trained_4bit, tmp_path, dtype):
    from transformers import LlavaForConditionalGeneration

    lora_model, inputs = trained_4bit
    with torch.no_grad():
        expected = lora_model(**inputs).logits
    lora_model.save_merged(tmp_path / "merged", dtype=dtype)
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=dtype).train()
    assert getattr(merged.config, "quantization_config", None) is None
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert merged.get_parameter("model.language_model.layers.0.self_attn.q_proj.weight").dtype == dtype
    with torch.no_grad():
        got = merged(**{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}).logits.float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    else:  # bf16 weights and activations through the whole model (the bound test_rewrite_api uses for bf16)
        assert ((got - expected).norm() / expected.norm()).item() < 0.03
    # the live quantized model is untouched and still quantized
    assert lora_model.quantized and getattr(lora_model.base_model, "hf_quantizer", None) is not None


def test_merge_in_place_on_a_quantized_base_is_refused_naming_save_merged(trained_4bit):
    from graphlora.adapters import AdapterError

    lora_model, _ = trained_4bit
    with pytest.raises(AdapterError, match=r"quantized .*nf4.*save_merged\(directory\)"):
        lora_model.merge()
    assert not lora_model.merged


# ---------------------------------------------------------------------------------------------
# Per-component quantization from labels
# ---------------------------------------------------------------------------------------------
def test_per_component_config_loads_4bit_language_and_float_vision_and_projector_and_trains(checkpoints):
    directory, float_model = checkpoints("llava")
    plan = graphlora.quantization_plan(directory, language="nf4", compute_dtype=torch.float32)
    assert plan.format is QuantFormat.NF4 and not plan.unlabelled
    model = type(float_model).from_pretrained(directory, quantization_config=plan.bnb_config(), device_map="cpu",
                                              dtype=torch.float32).train()
    inputs = inputs_for("llava", model)
    lora_model = graphlora.rewrite(model, STRATEGIES["full"], inputs)
    components = {row.name: row.component for row in lora_model.explain_rows()}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {components[n] for n in linears} >= {"language", "vision", "projector", "head"}
    for name, module in linears.items():  # layer by layer
        if components[name] == "language":
            assert isinstance(module, bnb.nn.Linear4bit), name
            assert module.weight.quant_state.quant_type == "nf4", name
        else:
            assert type(module) is torch.nn.Linear and module.weight.dtype == torch.float32, name
    assert set(lora_model.quantized) == {n for n in linears if components[n] == "language"}
    rows = {row.name: row for row in lora_model.explain_rows()}
    assert rows["model.language_model.layers.0.mlp.down_proj"].quantization.startswith("nf4")
    assert rows["model.multi_modal_projector.linear_1"].quantization is None
    from graphlora.report import format_explain

    table = format_explain(list(rows.values()))
    assert "quantization" in table.splitlines()[0] and "float" in table and "nf4 (double quant" in table
    losses = train_and_check_grads(lora_model, inputs, steps=3)
    assert losses[-1] < losses[0] - 0.5, losses


def test_per_component_plan_errors_name_the_component(checkpoints):
    from graphlora.component_quantization import QuantizationPlanError

    directory, _ = checkpoints("llava")
    with pytest.raises(QuantizationPlanError, match="vision='int4'"):
        graphlora.quantization_plan(directory, vision="int4")
    with pytest.raises(QuantizationPlanError, match="one format per model.*language=nf4, vision=int8"):
        graphlora.quantization_plan(directory, language="nf4", vision="int8")
    plan = graphlora.quantization_plan(directory, language=None)
    with pytest.raises(QuantizationPlanError, match="quantizes no linear"):
        plan.bnb_config()
