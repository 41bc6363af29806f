"""Opaque custom ops for bitsandbytes base layers: ``graphlora::linear_4bit`` and ``graphlora::linear_8bit``.

``torch.export`` cannot trace a bitsandbytes layer as it stands: its weight is a tensor subclass
(``Params4bit`` / ``Int8Params``) that fake tensors cannot represent, and its matmul is an autograd
function over a Python state object. graphlora gives each such layer (in its mirror of the model, see
graphlora/quantized.py) a forward that calls one of these ops with plain tensors: the packed weight and
the quantization constants are the layer's parameter and buffers, so every traced program lifts them as
inputs, and one program serves every layer of a block class. In the graph the op is one node
``y = graphlora::linear_4bit(x, weight, ...)`` whose first argument is the activation and second the
weight, as for ``aten.linear``: the structural analysis finds it as a linear site and the LoRA branch is
added to its output.

Numerics are bitsandbytes' own: the forward calls ``bnb.matmul_4bit`` / ``bnb.matmul`` with a state
rebuilt from the tensors, after the casts ``Linear4bit.forward`` / ``Linear8bitLt.forward`` make (x and
bias to the compute dtype, the result back to x's dtype). Backward gives the gradient of ``x`` only (the
base layer is frozen) from the weight dequantized again, as bitsandbytes' ``MatMul4Bit`` and
``MatMul8bitLt`` backward do; nothing but the packed weight and constants is saved, so a step holds no
16-bit copy of the weights between forward and backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["linear_4bit", "linear_8bit", "dequantize_4bit_weight", "dequantize_8bit_weight"]


def _bnb():
    try:
        import bitsandbytes
    except ImportError as exc:  # pragma: no cover - the layers cannot exist without it
        raise RuntimeError("graphlora's quantized linear ops need bitsandbytes (pip install bitsandbytes)") from exc
    return bitsandbytes


def _quant_state(absmax: Tensor, code: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
                 offset: Optional[Tensor], out_features: int, in_features: int, blocksize: int, blocksize2: int,
                 quant_type: str, weight_dtype: torch.dtype):
    from bitsandbytes.functional import QuantState

    state2 = None
    if absmax2 is not None:
        state2 = QuantState(absmax=absmax2, code=code2, blocksize=blocksize2, dtype=torch.float32)
    return QuantState(absmax=absmax, shape=torch.Size([out_features, in_features]), code=code,
                      blocksize=blocksize, quant_type=quant_type, dtype=weight_dtype, offset=offset,
                      state2=state2)


def dequantize_4bit_weight(packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor],
                           code2: Optional[Tensor], offset: Optional[Tensor], out_features: int, in_features: int,
                           blocksize: int, blocksize2: int, quant_type: str, weight_dtype: torch.dtype) -> Tensor:
    """The ``[out, in]`` weight in ``weight_dtype`` that a 4-bit layer's constants encode."""
    import bitsandbytes.functional as bnb_f

    state = _quant_state(absmax, code, absmax2, code2, offset, out_features, in_features, blocksize, blocksize2,
                         quant_type, weight_dtype)
    return bnb_f.dequantize_4bit(packed.reshape(-1, 1), state)


def dequantize_8bit_weight(weight: Tensor, scb: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``[out, in]`` weight of an 8-bit layer (``CB * SCB / 127``, as bitsandbytes' backward computes it)."""
    return weight.to(dtype, copy=True).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


# ----------------------------------------------------------------------------------------------
# graphlora::linear_4bit
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("graphlora::linear_4bit", mutates_args=())
def linear_4bit(x: Tensor, weight: Tensor, bias: Optional[Tensor], absmax: Tensor, code: Tensor,
                absmax2: Optional[Tensor], code2: Optional[Tensor], offset: Optional[Tensor], out_features: int,
                in_features: int, blocksize: int, blocksize2: int, quant_type: str, weight_dtype: torch.dtype,
                compute_dtype: Optional[torch.dtype]) -> Tensor:
    """``Linear4bit.forward`` on plain tensors: ``x`` and ``bias`` cast to ``compute_dtype`` (x's dtype when
    None), ``bnb.matmul_4bit`` with the rebuilt quantization state, the result cast back to x's dtype."""
    bnb = _bnb()
    cd = compute_dtype or x.dtype
    state = _quant_state(absmax, code, absmax2, code2, offset, out_features, in_features, blocksize, blocksize2,
                         quant_type, weight_dtype)
    with torch.no_grad():
        b = None if bias is None else bias.to(cd)
        return bnb.matmul_4bit(x.to(cd), weight.reshape(-1, 1), quant_state=state, bias=b).to(x.dtype)


@linear_4bit.register_fake
def _linear_4bit_fake(x, weight, bias, absmax, code, absmax2, code2, offset, out_features, in_features, blocksize,
                      blocksize2, quant_type, weight_dtype, compute_dtype):
    if x.shape[-1] != in_features:
        raise ValueError(f"graphlora::linear_4bit: x.shape[-1]={x.shape[-1]} does not match in_features={in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


def _linear_4bit_setup_context(ctx, inputs, output):
    (x, weight, bias, absmax, code, absmax2, code2, offset, out_features, in_features, blocksize, blocksize2,
     quant_type, weight_dtype, compute_dtype) = inputs
    _check_frozen("linear_4bit", weight, bias)
    ctx.save_for_backward(weight, absmax, code, absmax2, code2, offset)
    ctx.consts = (out_features, in_features, blocksize, blocksize2, quant_type, weight_dtype)
    ctx.compute_dtype = compute_dtype or x.dtype
    ctx.x_dtype = x.dtype


def _linear_4bit_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return (None,) * 15
    weight, absmax, code, absmax2, code2, offset = ctx.saved_tensors
    w = dequantize_4bit_weight(weight, absmax, code, absmax2, code2, offset, *ctx.consts)
    cd = ctx.compute_dtype
    dx = torch.matmul(grad.to(cd), w.to(cd)).to(ctx.x_dtype)
    return (dx,) + (None,) * 14


linear_4bit.register_autograd(_linear_4bit_backward, setup_context=_linear_4bit_setup_context)


# ----------------------------------------------------------------------------------------------
# graphlora::linear_8bit
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("graphlora::linear_8bit", mutates_args=())
def linear_8bit(x: Tensor, weight: Tensor, bias: Optional[Tensor], scb: Tensor, threshold: float,
                training: bool) -> Tensor:
    """``Linear8bitLt.forward`` on plain tensors (int8 ``weight`` = CB, per-row scales ``scb`` = SCB): bias
    cast to x's dtype, ``bnb.matmul`` with a state holding CB/SCB, the outlier threshold and the train
    flag (on the CPU bitsandbytes then dequantizes and multiplies, as it does in training)."""
    bnb = _bnb()
    state = bnb.MatmulLtState()
    state.CB, state.SCB = weight, scb
    state.threshold = threshold
    state.has_fp16_weights = False
    state.is_training = training
    with torch.no_grad():
        b = None if bias is None else bias.to(x.dtype)
        return bnb.matmul(x, weight, bias=b, state=state)


@linear_8bit.register_fake
def _linear_8bit_fake(x, weight, bias, scb, threshold, training):
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"graphlora::linear_8bit: x.shape[-1]={x.shape[-1]} does not match the weight's "
                         f"in_features={weight.shape[1]}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_8bit_setup_context(ctx, inputs, output):
    x, weight, bias, scb, threshold, training = inputs
    _check_frozen("linear_8bit", weight, bias)
    ctx.save_for_backward(weight, scb)
    ctx.x_dtype = x.dtype


def _linear_8bit_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return (None,) * 6
    weight, scb = ctx.saved_tensors
    w = dequantize_8bit_weight(weight, scb, ctx.x_dtype)
    return (torch.matmul(grad.to(ctx.x_dtype), w),) + (None,) * 5


linear_8bit.register_autograd(_linear_8bit_backward, setup_context=_linear_8bit_setup_context)


def _check_frozen(op: str, weight: Tensor, bias: Optional[Tensor]) -> None:
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise RuntimeError(f"graphlora::{op} is for frozen quantized base layers: its weight or bias has "
                           "requires_grad=True")
