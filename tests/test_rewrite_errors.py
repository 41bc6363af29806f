"""Errors that name what and where."""

import pytest
import torch

import graphlora
from graphlora.errors import ExportFailedError, NoSitesSelectedError, PolicyError, QuantizedBaseLayerError


def test_policy_selecting_nothing_names_the_flags(tiny):
    model, inputs = tiny("llava")
    with pytest.raises(NoSitesSelectedError) as info:
        graphlora.rewrite(model, dict(finetune_vision_layers=False, finetune_language_layers=False), inputs)
    message = str(info.value)
    assert "finetune_vision_layers=False" in message
    assert "finetune_language_layers=False" in message
    assert "finetune_projector=False" in message


def test_attention_and_mlp_flags_off_are_named(tiny):
    model, inputs = tiny("llava")
    with pytest.raises(NoSitesSelectedError, match="finetune_attention_modules=False.*|.*finetune_mlp_modules=False"):
        graphlora.rewrite(model, dict(finetune_attention_modules=False, finetune_mlp_modules=False), inputs)


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x, labels=None):
        if x.sum() > 0:  # a branch on tensor data: torch.export cannot trace it
            x = x * 2
        return self.proj(x)


def test_export_failure_names_operation_and_source_line():
    model = DataDependent()
    with pytest.raises(ExportFailedError) as info:
        graphlora.rewrite(model, dict(rules=[{"match": {"component": "other"}, "target": True}]),
                          {"x": torch.randn(2, 4)}, trace_mode="whole")
    message = str(info.value)
    assert "test_rewrite_errors.py" in message
    assert "if x.sum() > 0:" in message
    assert "data-dependent" in message or "Could not guard" in message


def test_export_failure_falls_back_to_regions_and_says_why():
    model = DataDependent()
    lora_model = graphlora.rewrite(model, dict(rules=[{"match": {"component": "other"}, "target": True}]),
                                   {"x": torch.randn(2, 4)})
    assert lora_model.trace_mode == "regional"
    whole = lora_model.regions[0]
    assert whole.path == "" and whole.mode == "eager"
    assert "whole-model export failed" in whole.reason and "if x.sum() > 0:" in whole.reason
    assert [s.name for s in lora_model.sites] == ["proj"]  # adapted in the eager glue


def test_unknown_policy_key_is_refused():
    with pytest.raises(Exception, match="finetune_vison_layers"):
        graphlora.Policy(finetune_vison_layers=True)


def test_modules_to_save_matching_nothing_is_an_error(tiny):
    model, inputs = tiny("llava")
    with pytest.raises(PolicyError, match="modules_to_save: 'no_such_head' matches no module"):
        graphlora.rewrite(model, dict(modules_to_save=["no_such_head"]), inputs)


def test_torchao_quantized_layer_is_refused_by_name(tiny):
    quantization = pytest.importorskip("torchao.quantization")
    model, inputs = tiny("llava")
    target = model.model.language_model.layers[0].mlp.down_proj
    quantization.quantize_(target, quantization.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: True)
    with pytest.raises(QuantizedBaseLayerError, match=r"model\.language_model\.layers\.0\.mlp\.down_proj"):
        graphlora.rewrite(model, None, inputs)


def test_quantized_tensor_subclass_is_refused():
    class FakeQuantized(torch.Tensor):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model[0].weight = torch.nn.Parameter(torch.randn(4, 4).as_subclass(FakeQuantized), requires_grad=False)
    with pytest.raises(QuantizedBaseLayerError, match=r"0 \(Linear: a .*FakeQuantized 'weight'\)"):
        graphlora.rewrite(model, None, {"input": torch.randn(2, 4)})
