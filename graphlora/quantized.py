"""Detect quantized base layers (bitsandbytes, torchao, ...), which LoRA does not support yet."""

from __future__ import annotations

import torch

from graphlora.errors import QuantizedBaseLayerError

_QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt", "Params4bit", "Int8Params", "QuantLinear", "QLinear",
                      "FP8Linear", "HQQLinear", "AQLMLinear", "GPTQLinear", "AWQLinear", "Float8Linear")
_QUANTIZED_DTYPES = {torch.int8, torch.uint8, torch.int4 if hasattr(torch, "int4") else torch.int8}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _QUANTIZED_DTYPES.add(getattr(torch, _name))


def _quantization_of(module: torch.nn.Module) -> str | None:
    cls = type(module).__name__
    if cls in _QUANTIZED_CLASSES:
        return f"{type(module).__module__}.{cls}"
    for pname, p in module.named_parameters(recurse=False):
        data = p.data if isinstance(p, torch.nn.Parameter) else p
        if type(data) is not torch.Tensor and type(data).__name__ != "FakeTensor":
            return f"a {type(data).__module__}.{type(data).__name__} {pname!r}"
        if p.dtype in _QUANTIZED_DTYPES:
            return f"{pname!r} stored as {p.dtype}"
    return None


def check_no_quantized_layers(model: torch.nn.Module) -> None:
    """Raise :class:`QuantizedBaseLayerError` naming the first quantized layer of ``model``."""
    found = []
    for name, module in model.named_modules():
        what = _quantization_of(module)
        if what is not None:
            found.append(f"{name or '<root>'} ({type(module).__name__}: {what})")
    if found:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise QuantizedBaseLayerError(
            f"quantized base layer {found[0]}{more}: graphlora does not support LoRA over quantized "
            "weights yet; load the model in float32/bfloat16/float16"
        )
