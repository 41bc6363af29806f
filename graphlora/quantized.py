"""Quantized base layers: which formats graphlora trains over, and how the mirror runs them.

Supported: bitsandbytes ``Linear4bit`` (nf4 and fp4, with or without double quantization, any compute
dtype) and ``Linear8bitLt`` (LLM.int8 with int8 weights), as transformers' ``BitsAndBytesConfig`` loads
them. :func:`install_quantized_forwards` gives each such layer *of the mirror* (never the user's module) a
forward that calls ``graphlora::linear_4bit`` / ``graphlora::linear_8bit`` (graphlora/ops/quantized_linear.py)
with plain tensors:

* the mirror module's ``weight`` becomes a plain, frozen ``Parameter`` over the same packed storage (the
  ``Params4bit`` / ``Int8Params`` subclass cannot be traced);
* the quantization constants become non-persistent buffers of the mirror module (``weight_absmax``,
  ``weight_code``, and for double quantization ``weight_absmax2``, ``weight_code2``, ``weight_offset``; 8-bit:
  ``weight_scb``), so every traced program lifts them as inputs and one program serves every layer of a
  block class.

Reads: the user's bitsandbytes layers and their quantization state. Writes: the mirror's modules of those
layers. Guarantees: the user's modules are untouched; a layer in any other quantized format
(GPTQ, AWQ, HQQ, AQLM, EETQ, quanto, torchao, FP8, integer weights) is refused by
:func:`check_supported_quantization` with its path and format.
"""

from __future__ import annotations

import dataclasses
import enum

import torch

from graphlora.errors import QuantizedBaseLayerError

#: Buffers the mirror's 4-bit / 8-bit modules get (docs/quantization.md).
ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, SCB = ("weight_absmax", "weight_code", "weight_absmax2", "weight_code2",
                                             "weight_offset", "weight_scb")


class QuantFormat(enum.StrEnum):
    """Quantization formats of base layers graphlora trains over."""

    NF4 = "nf4"
    FP4 = "fp4"
    INT8 = "int8"


@dataclasses.dataclass(frozen=True)
class QuantizedLayer:
    """One quantized base linear: its format and the settings that change its numerics."""

    path: str
    format: QuantFormat
    double_quant: bool = False
    blocksize: int | None = None
    compute_dtype: torch.dtype | None = None
    threshold: float | None = None  # LLM.int8 outlier threshold

    def describe(self) -> str:
        """A short description: ``nf4 (double quant, compute bfloat16)``, ``int8 (threshold 6.0)``."""
        extras = []
        if self.format is QuantFormat.INT8:
            extras.append(f"threshold {self.threshold:g}")
        else:
            if self.double_quant:
                extras.append("double quant")
            if self.compute_dtype is not None:
                extras.append(f"compute {str(self.compute_dtype).removeprefix('torch.')}")
        return f"{self.format.value} ({', '.join(extras)})" if extras else self.format.value


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------
_FORMAT_BY_MODULE_WORD = (("gptq", "GPTQ"), ("awq", "AWQ"), ("hqq", "HQQ"), ("aqlm", "AQLM"), ("eetq", "EETQ"),
                          ("quanto", "quanto"), ("torchao", "torchao"), ("fbgemm", "FBGEMM FP8"),
                          ("compressed_tensors", "compressed-tensors"), ("bitnet", "BitNet"), ("vptq", "VPTQ"),
                          ("higgs", "HIGGS"), ("spqr", "SpQR"), ("fp_quant", "FP-Quant"), ("mxfp4", "MXFP4"))
_FORMAT_BY_CLASS = {"QuantLinear": "GPTQ", "WQLinear_GEMM": "AWQ", "WQLinear_GEMV": "AWQ", "HQQLinear": "HQQ",
                    "QuantizedLinear": "AQLM", "EetqLinear": "EETQ", "QLinear": "quanto", "FP8Linear": "FP8",
                    "Float8Linear": "FP8", "GPTQLinear": "GPTQ", "AWQLinear": "AWQ", "AQLMLinear": "AQLM"}
_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
           if hasattr(torch, n)}
_INTEGER = {torch.int8, torch.uint8, torch.int16, torch.int32} | ({torch.int4} if hasattr(torch, "int4") else set())


def _bitsandbytes_classes() -> tuple[type | None, type | None]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None, None
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def bitsandbytes_format(module: torch.nn.Module) -> QuantFormat | None:
    """The format of a bitsandbytes linear (None for any other module)."""
    cls4, cls8 = _bitsandbytes_classes()
    if cls4 is not None and isinstance(module, cls4):
        state = getattr(module.weight, "quant_state", None)
        quant_type = getattr(state, "quant_type", None) or getattr(module.weight, "quant_type", "fp4")
        return QuantFormat(quant_type)
    if cls8 is not None and isinstance(module, cls8):
        return QuantFormat.INT8
    return None


def unsupported_quantization(module: torch.nn.Module) -> str | None:
    """What makes ``module`` a quantized layer graphlora cannot train over (None: not quantized, or supported)."""
    if bitsandbytes_format(module) is not None:
        if isinstance(module, _bitsandbytes_classes()[1]) and getattr(module.state, "has_fp16_weights", False):
            return "bitsandbytes 8-bit with has_fp16_weights=True (its weights train themselves)"
        return None
    cls = type(module).__name__
    mod = type(module).__module__.lower()
    for word, fmt in _FORMAT_BY_MODULE_WORD:
        if word in mod:
            return f"{fmt} ({type(module).__module__}.{cls})"
    if cls in _FORMAT_BY_CLASS:
        return f"{_FORMAT_BY_CLASS[cls]} ({type(module).__module__}.{cls})"
    for pname, p in module.named_parameters(recurse=False):
        data = p.data if isinstance(p, torch.nn.Parameter) else p
        if type(data) is not torch.Tensor and type(data).__name__ != "FakeTensor":
            return f"a {type(data).__module__}.{type(data).__name__} {pname!r}"
        if p.dtype in _FLOAT8:
            return f"FP8 ({pname!r} stored as {p.dtype})"
        if p.dtype in _INTEGER:
            return f"integer weights ({pname!r} stored as {p.dtype})"
    return None


def check_supported_quantization(model: torch.nn.Module) -> list[QuantizedLayer]:
    """The model's bitsandbytes layers; raise :class:`QuantizedBaseLayerError` naming the first layer in any
    format graphlora does not train over."""
    found, layers = [], []
    for name, module in model.named_modules():
        what = unsupported_quantization(module)
        if what is not None:
            found.append(f"{name or '<root>'} ({type(module).__name__}: {what})")
            continue
        fmt = bitsandbytes_format(module)
        if fmt is not None:
            layers.append(_describe(name, module, fmt))
    if found:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise QuantizedBaseLayerError(
            f"quantized base layer {found[0]}{more}: graphlora trains LoRA over bitsandbytes 4-bit (nf4, fp4) "
            "and 8-bit layers only; load the model in float32/bfloat16/float16 or with transformers' "
            "BitsAndBytesConfig")
    return layers


def _describe(path: str, module: torch.nn.Module, fmt: QuantFormat) -> QuantizedLayer:
    if fmt is QuantFormat.INT8:
        return QuantizedLayer(path, fmt, threshold=float(module.state.threshold))
    state = module.weight.quant_state
    return QuantizedLayer(path, fmt, double_quant=bool(state is not None and state.nested),
                          blocksize=None if state is None else int(state.blocksize),
                          compute_dtype=getattr(module, "compute_dtype", None))


def quantized_layers(model: torch.nn.Module) -> dict[str, QuantizedLayer]:
    """``{module path: QuantizedLayer}`` of the model's bitsandbytes layers."""
    return {layer.path: layer for layer in check_supported_quantization(model)}


# ---------------------------------------------------------------------------------------------
# The mirror's forwards
# ---------------------------------------------------------------------------------------------
def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor over ``t``'s storage (drops the Params4bit / Int8Params subclass)."""
    return t.data.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


class Linear4bitForward:
    """``forward`` of a mirror 4-bit layer: ``graphlora::linear_4bit`` over its parameter and buffers."""

    def __init__(self, module: torch.nn.Module, out_features: int, in_features: int, blocksize: int, blocksize2: int,
                 quant_type: str, weight_dtype: torch.dtype, compute_dtype: torch.dtype | None):
        self.module = module
        self.consts = (out_features, in_features, blocksize, blocksize2, quant_type, weight_dtype, compute_dtype)

    def _state(self) -> tuple:
        """(absmax, code, absmax2, code2, offset): the module's buffers, None for the double-quant ones it lacks."""
        m = self.module
        nested = getattr(m, ABSMAX2, None)
        if nested is None:
            return getattr(m, ABSMAX), getattr(m, CODE), None, None, None
        return getattr(m, ABSMAX), getattr(m, CODE), nested, getattr(m, CODE2), getattr(m, OFFSET)

    def dequantized_weight(self) -> torch.Tensor:
        """The ``[out, in]`` weight these constants encode, in the layer's original dtype."""
        from graphlora.ops.quantized_linear import dequantize_4bit_weight

        return dequantize_4bit_weight(self.module.weight, *self._state(), *self.consts[:-1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        return torch.ops.graphlora.linear_4bit.default(x, m.weight, m.bias, *self._state(), *self.consts)


class Linear8bitForward:
    """``forward`` of a mirror 8-bit layer: ``graphlora::linear_8bit`` over its int8 weight and row scales."""

    def __init__(self, module: torch.nn.Module, threshold: float):
        self.module = module
        self.threshold = threshold

    def dequantized_weight(self) -> torch.Tensor:
        """The ``[out, in]`` weight (``CB * SCB / 127``) in float32."""
        from graphlora.ops.quantized_linear import dequantize_8bit_weight

        return dequantize_8bit_weight(self.module.weight, getattr(self.module, SCB), torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        return torch.ops.graphlora.linear_8bit.default(x, m.weight, m.bias, getattr(m, SCB), self.threshold,
                                                       m.training)


def is_quantized_forward(forward: object) -> bool:
    """Whether a module's ``forward`` is one :func:`install_quantized_forwards` installed."""
    return isinstance(forward, (Linear4bitForward, Linear8bitForward))


def dequantized_weight(mirror_module: torch.nn.Module) -> torch.Tensor:
    """The float ``[out, in]`` weight of a mirror module whose forward :func:`install_quantized_forwards` set."""
    forward = mirror_module.__dict__.get("forward")
    forward = getattr(forward, "base", None) or forward  # under a glue LoRA forward
    if not is_quantized_forward(forward):
        raise TypeError(f"{type(mirror_module).__name__} has no quantized forward")
    return forward.dequantized_weight()


def install_quantized_forwards(mirror: torch.nn.Module,
                               layers: dict[str, QuantizedLayer] | None = None) -> dict[str, QuantizedLayer]:
    """Give every bitsandbytes layer of ``mirror`` a traceable forward (see the module docstring); returns the
    layers by path. The mirror's modules must be its own objects (graphlora.mirror), not the user's. ``layers``:
    what :func:`quantized_layers` found on the model the mirror copies (found again when None)."""
    import graphlora.ops  # noqa: F401 - registers torch.ops.graphlora.linear_4bit / linear_8bit

    if layers is None:
        layers = quantized_layers(mirror)
    for path, layer in layers.items():
        module = mirror.get_submodule(path)
        if layer.format is QuantFormat.INT8:
            _install_8bit(path, module, layer)
        else:
            _install_4bit(path, module)
    return layers


def _frozen_param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(_plain(t), requires_grad=False)


def _install_4bit(path: str, module: torch.nn.Module) -> None:
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise QuantizedBaseLayerError(
            f"{path}: its bitsandbytes 4-bit weight is not quantized yet (bitsandbytes quantizes when the layer "
            "is moved to a device); load the model with BitsAndBytesConfig or call .to(device) first")
    if getattr(state, "packing_format_for_cpu", False):
        raise QuantizedBaseLayerError(
            f"{path}: bitsandbytes has repacked this 4-bit weight for CPU inference (an eval-mode forward without "
            "gradients ran on the CPU; it also rounds the block scales to bfloat16, and its inverse is only "
            "approximate): reload the model and rewrite it before running it in eval mode on the CPU")
    data = weight.data
    out_features, in_features = (int(s) for s in state.shape)
    module._parameters["weight"] = _frozen_param(data)
    module.register_buffer(ABSMAX, _plain(state.absmax), persistent=False)
    module.register_buffer(CODE, _plain(state.code), persistent=False)
    blocksize2 = 0
    if state.nested:
        module.register_buffer(ABSMAX2, _plain(state.state2.absmax), persistent=False)
        module.register_buffer(CODE2, _plain(state.state2.code), persistent=False)
        module.register_buffer(OFFSET, torch.as_tensor(state.offset, device=state.absmax.device), persistent=False)
        blocksize2 = int(state.state2.blocksize)
    module.forward = Linear4bitForward(module, out_features, in_features, int(state.blocksize), blocksize2,
                                       str(state.quant_type), state.dtype, getattr(module, "compute_dtype", None))


def _install_8bit(path: str, module: torch.nn.Module, layer: QuantizedLayer) -> None:
    state = module.state
    cb = state.CB if state.CB is not None else module.weight.data
    scb = state.SCB if state.SCB is not None else getattr(module.weight, "SCB", None)
    if scb is None or cb.dtype != torch.int8:
        raise QuantizedBaseLayerError(
            f"{path}: its bitsandbytes 8-bit weight is not quantized yet (dtype {cb.dtype}); load the model with "
            "BitsAndBytesConfig(load_in_8bit=True) or call .to(device) first")
    module._parameters["weight"] = _frozen_param(cb)
    module.register_buffer(SCB, _plain(scb), persistent=False)
    module.forward = Linear8bitForward(module, float(layer.threshold))
