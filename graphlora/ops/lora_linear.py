"""The fused LoRA linear custom ops: ``graphlora::lora_linear`` and ``graphlora::lora_linear_group``.

``torch.ops.graphlora.lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)``::

    y = x @ weight.T + bias + scale * ((dropout(x) @ lora_a.T) @ lora_b.T)

for ``x [..., in]``, ``weight [out, in]``, ``bias [out]`` or None, ``lora_a [r, in]``,
``lora_b [out, r]``. Numerics follow PEFT's ``lora.Linear``: ``x`` is cast to the LoRA dtype before
the LoRA matmuls (and dropout), the scaled LoRA result is added to the base result in the promoted
dtype and the sum is cast to ``x``'s dtype (PEFT's ``result + lora_B(lora_A(dropout(x))) * scaling``
followed by ``result.to(torch_result_dtype)``). With fp32 LoRA weights and a bf16 ``x`` the add
therefore happens in fp32, as in PEFT.

Dropout: when ``dropout_p > 0`` a ``seed`` (int64 tensor with one element, any device) is required;
the keep-mask is a pure function of (seed, stream, element index in the flattened ``[N, in]`` view
of ``x``) computed by ``graphlora.ops.dropout_rng`` (the Triton kernels implement the same
generator bit for bit). The op has no train/eval state: pass ``dropout_p=0`` for evaluation.
Backward regenerates the mask from the seed. Base ``weight``/``bias`` must be frozen.

Implementations: the reference (torch ops, any device) is registered for all devices, the
``register_fake`` implementation for Meta/fake tensors, and a CUDA implementation that runs the
Triton kernels of ``graphlora.ops.triton_kernels`` when the inputs are supported (fp32/bf16/fp16
``x``, LoRA dtype fp32 or ``x``'s dtype, rank <= 128) and the reference otherwise. Backward goes
through the custom ops ``graphlora::lora_linear_backward`` / ``lora_linear_group_backward`` (same
reference/fake/CUDA structure), so ``torch.compile`` sees opaque forward and backward nodes.

``lora_linear_group`` computes several LoRA linears that read the same ``x`` (q/k/v, gate/up)
with one read of ``x`` for all down-projections; member ``m`` uses dropout stream ``m`` (member 0
of a group draws the same mask as the single op with the same seed).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dropout_rng

__all__ = [
    "lora_linear",
    "lora_linear_backward",
    "lora_linear_group",
    "lora_linear_group_backward",
    "reference_lora_linear",
    "reference_lora_linear_backward",
    "reference_lora_linear_group",
    "reference_lora_linear_group_backward",
    "triton_path_reason",
    "triton_on_cpu",
    "main_gemm_backend",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# ----------------------------------------------------------------------------------------------
# Lazy access to the Triton kernels (imported on first use so TRITON_INTERPRET is honoured)
# ----------------------------------------------------------------------------------------------

_KERNELS = None
_KERNELS_ERROR: Optional[str] = None
_TRITON_ON_CPU = False


def _kernels():
    """The ``triton_kernels`` module, or None when Triton cannot be imported."""
    global _KERNELS, _KERNELS_ERROR
    if _KERNELS is None and _KERNELS_ERROR is None:
        try:
            from . import triton_kernels
        except Exception as exc:  # no triton, or a broken install: use the reference
            _KERNELS_ERROR = f"{type(exc).__name__}: {exc}"
        else:
            _KERNELS = triton_kernels
    return _KERNELS


def triton_path_reason(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                       lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor]) -> Optional[str]:
    """None if these inputs run the Triton kernels, else why they use the reference."""
    if x.device.type == "cpu" and not _TRITON_ON_CPU:
        return "CPU tensors use the reference implementation"
    k = _kernels()
    if k is None:
        return f"Triton unavailable ({_KERNELS_ERROR})"
    if x.device.type == "cpu" and not k.INTERPRET:
        return "Triton on CPU needs TRITON_INTERPRET=1 before graphlora.ops.triton_kernels is imported"
    return k.unsupported_reason(x, weights, biases, lora_as, lora_bs)


@contextlib.contextmanager
def triton_on_cpu(enabled: bool = True) -> Iterator[None]:
    """Route CPU calls of the ops through the Triton kernels (interpreter only; for tests)."""
    global _TRITON_ON_CPU
    if enabled:
        k = _kernels()
        if k is None or not k.INTERPRET:
            raise RuntimeError("triton_on_cpu() needs triton with TRITON_INTERPRET=1 set before "
                               "graphlora.ops.triton_kernels is first imported")
    prev, _TRITON_ON_CPU = _TRITON_ON_CPU, enabled
    try:
        yield
    finally:
        _TRITON_ON_CPU = prev


@contextlib.contextmanager
def main_gemm_backend(name: str) -> Iterator[None]:
    """Temporarily run the big GEMMs of the Triton path with ``"triton"`` or ``"torch"`` (cuBLAS)."""
    k = _kernels()
    if k is None:
        raise RuntimeError(f"Triton unavailable ({_KERNELS_ERROR})")
    prev = k.set_main_gemm(name)
    try:
        yield
    finally:
        k.set_main_gemm(prev)


# ----------------------------------------------------------------------------------------------
# Argument checks (shared by all implementations, including the fake one)
# ----------------------------------------------------------------------------------------------


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"graphlora::{op}: {msg}")


def _check_dropout(op: str, dropout_p: float, seed: Optional[Tensor]) -> None:
    if not (0.0 <= dropout_p < 1.0) or math.isnan(dropout_p):
        _fail(op, f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0:
        if seed is None:
            _fail(op, f"dropout_p={dropout_p} > 0 needs a seed (a 0-dim int64 tensor); "
                      "pass dropout_p=0.0 to disable dropout")
        if seed.numel() != 1 or seed.dtype != torch.int64:
            _fail(op, f"seed must be an int64 tensor with one element, got dtype {seed.dtype} "
                      f"and shape {tuple(seed.shape)}")


def _check_member(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                  lora_b: Tensor, where: str = "") -> None:
    if x.dim() < 1:
        _fail(op, "x must have at least one dimension [..., in_features]")
    if weight.dim() != 2:
        _fail(op, f"weight{where} must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        _fail(op, f"x.shape[-1]={x.shape[-1]} does not match weight{where} in_features={in_f} "
                  f"(weight shape {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (out_f,):
        _fail(op, f"bias{where} must have shape ({out_f},), got {tuple(bias.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != in_f:
        _fail(op, f"lora_a{where} must have shape [r, {in_f}], got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if r < 1:
        _fail(op, f"lora rank must be >= 1, got lora_a{where} shape {tuple(lora_a.shape)}")
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (out_f, r):
        _fail(op, f"lora_b{where} must have shape [{out_f}, {r}], got {tuple(lora_b.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        _fail(op, f"x must be floating point, got {x.dtype}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        _fail(op, f"weight{where}/bias{where} dtype must match x ({x.dtype}), got "
                  f"{weight.dtype}/{None if bias is None else bias.dtype}")
    if lora_a.dtype not in _FLOAT_DTYPES or lora_b.dtype != lora_a.dtype:
        _fail(op, f"lora_a{where}/lora_b{where} must share a floating dtype, got "
                  f"{lora_a.dtype}/{lora_b.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t is not None and t.device != x.device:
            _fail(op, f"{name}{where} is on {t.device} but x is on {x.device}")


def _check_frozen(op: str, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]]) -> None:
    for w, b in zip(weights, biases):
        if w.requires_grad or (b is not None and b.requires_grad):
            raise RuntimeError(
                f"graphlora::{op} is for frozen base weights: weight/bias has requires_grad=True. "
                "Freeze the base layer (weight.requires_grad_(False)) or use a plain linear.")


def check_lora_linear_args(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed) -> None:
    """Raise ``ValueError`` with a clear message if the op's arguments are inconsistent."""
    _check_member("lora_linear", x, weight, bias, lora_a, lora_b)
    _check_dropout("lora_linear", dropout_p, seed)


def check_lora_linear_group_args(x, weights, biases, lora_as, lora_bs, scales, dropout_p,
                                 seed) -> None:
    op = "lora_linear_group"
    n = len(weights)
    if n == 0:
        _fail(op, "needs at least one member")
    lens = (len(biases), len(lora_as), len(lora_bs), len(scales))
    if any(v != n for v in lens):
        _fail(op, f"weights, biases, lora_as, lora_bs and scales must have the same length, got "
                  f"{(n, *lens)}")
    for m in range(n):
        _check_member(op, x, weights[m], biases[m], lora_as[m], lora_bs[m], where=f"[{m}]")
    _check_dropout(op, dropout_p, seed)


# ----------------------------------------------------------------------------------------------
# Reference implementation (torch ops, any device)
# ----------------------------------------------------------------------------------------------


def _dropout_scale(x: Tensor, dropout_p: float, seed: Optional[Tensor], stream: int) -> Tensor:
    """Per-element dropout factor (0 or 1/(1-p)) in x's dtype, shaped like x."""
    keep = dropout_rng.dropout_mask(x, seed, dropout_p, stream)
    return keep.to(x.dtype) * (1.0 / (1.0 - dropout_p))


def reference_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                          lora_b: Tensor, scale: float, dropout_p: float,
                          seed: Optional[Tensor], stream: int = 0) -> Tensor:
    """PEFT-style forward with torch ops (dropout stream ``stream``)."""
    result = F.linear(x, weight, bias)
    xl = x.to(lora_a.dtype)
    if dropout_p > 0.0:
        xl = xl * _dropout_scale(xl, dropout_p, seed, stream)
    lora = F.linear(F.linear(xl, lora_a), lora_b) * scale
    return (result + lora).to(x.dtype)


def reference_lora_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor,
                                   lora_b: Tensor, scale: float, dropout_p: float,
                                   seed: Optional[Tensor], compute_dx: bool = True,
                                   stream: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(dx or empty(0), d lora_a, d lora_b) of the reference forward, PEFT's autograd numerics."""
    in_f = x.shape[-1]
    x2 = x.reshape(-1, in_f)
    g2 = grad.reshape(-1, weight.shape[0])
    ld = lora_a.dtype
    xd = x2.to(ld)
    drop = None
    if dropout_p > 0.0:
        drop = _dropout_scale(xd, dropout_p, seed, stream)
        xd = xd * drop
    h = xd @ lora_a.t()
    gl = g2.to(ld) * scale
    d_b = gl.t() @ h
    dh = gl @ lora_b
    d_a = dh.t() @ xd
    if not compute_dx:
        return x.new_empty(0), d_a, d_b
    dxd = dh @ lora_a
    if drop is not None:
        dxd = dxd * drop
    dx = g2.to(x.dtype) @ weight + dxd.to(x.dtype)
    return dx.view(x.shape), d_a, d_b


def reference_lora_linear_group(x, weights, biases, lora_as, lora_bs, scales, dropout_p,
                                seed) -> list[Tensor]:
    return [reference_lora_linear(x, w, b, a, bb, s, dropout_p, seed, stream=m)
            for m, (w, b, a, bb, s) in enumerate(zip(weights, biases, lora_as, lora_bs, scales))]


def reference_lora_linear_group_backward(grads, x, weights, lora_as, lora_bs, scales, dropout_p,
                                         seed, compute_dx=True):
    dx = None
    d_as, d_bs = [], []
    for m, (g, w, a, bb, s) in enumerate(zip(grads, weights, lora_as, lora_bs, scales)):
        dxm, d_a, d_b = reference_lora_linear_backward(g, x, w, a, bb, s, dropout_p, seed,
                                                       compute_dx, stream=m)
        d_as.append(d_a)
        d_bs.append(d_b)
        if compute_dx:
            dx = dxm if dx is None else dx + dxm
    return (dx if compute_dx else x.new_empty(0)), d_as, d_bs


def _use_triton(x, weights, biases, lora_as, lora_bs):
    if triton_path_reason(x, weights, biases, lora_as, lora_bs) is None:
        return _kernels()
    return None


# ----------------------------------------------------------------------------------------------
# graphlora::lora_linear
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("graphlora::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scale: float, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
    """Fused LoRA linear (see the module docstring). All devices: the reference implementation."""
    return _lora_linear_impl(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, _TRITON_ON_CPU)


@lora_linear.register_kernel("cuda")
def _lora_linear_cuda(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
    return _lora_linear_impl(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, True)


def _lora_linear_impl(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, try_triton: bool):
    """The Triton kernels where ``try_triton`` and they apply to these inputs, else the reference."""
    check_lora_linear_args(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    k = _use_triton(x, [weight], [bias], [lora_a], [lora_b]) if try_triton else None
    if k is not None:
        return k.lora_forward(x, [weight], [bias], [lora_a], [lora_b], [scale], dropout_p, seed)[0]
    return reference_lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)


@lora_linear.register_fake
def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
    check_lora_linear_args(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("graphlora::lora_linear_backward", mutates_args=())
def lora_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                         scale: float, dropout_p: float, seed: Optional[Tensor],
                         compute_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of ``lora_linear``: (dx, or an empty tensor if not compute_dx; d lora_a; d lora_b)."""
    return _lora_linear_backward_impl(grad, x, weight, lora_a, lora_b, scale, dropout_p, seed,
                                      compute_dx, _TRITON_ON_CPU)


@lora_linear_backward.register_kernel("cuda")
def _lora_linear_backward_cuda(grad, x, weight, lora_a, lora_b, scale, dropout_p, seed,
                               compute_dx):
    return _lora_linear_backward_impl(grad, x, weight, lora_a, lora_b, scale, dropout_p, seed,
                                      compute_dx, True)


def _lora_linear_backward_impl(grad, x, weight, lora_a, lora_b, scale, dropout_p, seed, compute_dx,
                               try_triton: bool):
    k = _use_triton(x, [weight], [None], [lora_a], [lora_b]) if try_triton else None
    if k is not None:
        dx, d_as, d_bs = k.lora_backward([grad], x, [weight], [lora_a], [lora_b], [scale],
                                         dropout_p, seed, compute_dx)
        return dx, d_as[0], d_bs[0]
    return reference_lora_linear_backward(grad, x, weight, lora_a, lora_b, scale, dropout_p, seed,
                                          compute_dx)


@lora_linear_backward.register_fake
def _lora_linear_backward_fake(grad, x, weight, lora_a, lora_b, scale, dropout_p, seed,
                               compute_dx):
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty(0)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _lora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, dropout_p, seed = inputs
    _check_frozen("lora_linear", [weight], [bias])
    ctx.save_for_backward(x, weight, lora_a, lora_b, seed)
    ctx.scale = scale
    ctx.dropout_p = dropout_p


def _lora_linear_autograd_backward(ctx, grad):
    x, weight, lora_a, lora_b, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not (need[0] or need[3] or need[4]):
        return (None,) * 8
    dx, d_a, d_b = torch.ops.graphlora.lora_linear_backward(
        grad, x, weight, lora_a, lora_b, ctx.scale, ctx.dropout_p, seed, bool(need[0]))
    return (dx if need[0] else None, None, None, d_a if need[3] else None,
            d_b if need[4] else None, None, None, None)


lora_linear.register_autograd(_lora_linear_autograd_backward,
                              setup_context=_lora_linear_setup_context)


# ----------------------------------------------------------------------------------------------
# graphlora::lora_linear_group
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("graphlora::lora_linear_group", mutates_args=())
def lora_linear_group(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                      lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor], scales: Sequence[float],
                      dropout_p: float, seed: Optional[Tensor]) -> list[Tensor]:
    """Several LoRA linears on the same input; member ``m`` uses dropout stream ``m``."""
    return _lora_linear_group_impl(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed,
                                   _TRITON_ON_CPU)


@lora_linear_group.register_kernel("cuda")
def _lora_linear_group_cuda(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed):
    return _lora_linear_group_impl(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed, True)


def _lora_linear_group_impl(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed,
                            try_triton: bool):
    check_lora_linear_group_args(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed)
    k = _use_triton(x, weights, biases, lora_as, lora_bs) if try_triton else None
    if k is not None:
        return k.lora_forward(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed)
    return reference_lora_linear_group(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed)


@lora_linear_group.register_fake
def _lora_linear_group_fake(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed):
    check_lora_linear_group_args(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed)
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]


@torch.library.custom_op("graphlora::lora_linear_group_backward", mutates_args=())
def lora_linear_group_backward(grads: Sequence[Tensor], x: Tensor, weights: Sequence[Tensor],
                               lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor],
                               scales: Sequence[float], dropout_p: float, seed: Optional[Tensor],
                               compute_dx: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Backward of ``lora_linear_group``: (dx or empty(0), [d lora_a_m], [d lora_b_m])."""
    return _lora_linear_group_backward_impl(grads, x, weights, lora_as, lora_bs, scales, dropout_p,
                                            seed, compute_dx, _TRITON_ON_CPU)


@lora_linear_group_backward.register_kernel("cuda")
def _lora_linear_group_backward_cuda(grads, x, weights, lora_as, lora_bs, scales, dropout_p, seed,
                                     compute_dx):
    return _lora_linear_group_backward_impl(grads, x, weights, lora_as, lora_bs, scales, dropout_p,
                                            seed, compute_dx, True)


def _lora_linear_group_backward_impl(grads, x, weights, lora_as, lora_bs, scales, dropout_p, seed,
                                     compute_dx, try_triton: bool):
    k = _use_triton(x, weights, [None] * len(weights), lora_as, lora_bs) if try_triton else None
    if k is not None:
        return k.lora_backward(grads, x, weights, lora_as, lora_bs, scales, dropout_p, seed,
                               compute_dx)
    return reference_lora_linear_group_backward(grads, x, weights, lora_as, lora_bs, scales,
                                                dropout_p, seed, compute_dx)


@lora_linear_group_backward.register_fake
def _lora_linear_group_backward_fake(grads, x, weights, lora_as, lora_bs, scales, dropout_p, seed,
                                     compute_dx):
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty(0)
    return (dx, [a.new_empty(a.shape) for a in lora_as], [b.new_empty(b.shape) for b in lora_bs])


def _lora_linear_group_setup_context(ctx, inputs, output):
    x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed = inputs
    _check_frozen("lora_linear_group", weights, biases)
    n = len(weights)
    ctx.save_for_backward(x, seed, *weights, *lora_as, *lora_bs)
    ctx.n = n
    # torch.library flattens a list argument holding any None as one leaf: its gradient is then a
    # single None, and a list of Nones only when every bias is a tensor.
    ctx.bias_grads = [None] * len(biases) if all(isinstance(b, Tensor) for b in biases) else None
    ctx.scales = list(scales)
    ctx.dropout_p = dropout_p


def _lora_linear_group_autograd_backward(ctx, grads):
    x, seed, *rest = ctx.saved_tensors
    n = ctx.n
    weights, lora_as, lora_bs = rest[:n], rest[n:2 * n], rest[2 * n:]
    need = ctx.needs_input_grad
    need_x = bool(need[0])
    need_a = list(need[3]) if isinstance(need[3], (list, tuple)) else [bool(need[3])] * n
    need_b = list(need[4]) if isinstance(need[4], (list, tuple)) else [bool(need[4])] * n
    if not (need_x or any(need_a) or any(need_b)):
        return (None, [None] * n, ctx.bias_grads, [None] * n, [None] * n, None, None, None)
    grads = [g if g is not None else x.new_zeros((*x.shape[:-1], w.shape[0]))
             for g, w in zip(grads, weights)]
    dx, d_as, d_bs = torch.ops.graphlora.lora_linear_group_backward(
        grads, x, list(weights), list(lora_as), list(lora_bs), ctx.scales, ctx.dropout_p, seed,
        need_x)
    # Same structure as the inputs: one entry per tensor of a Tensor[] argument.
    return (dx if need_x else None, [None] * n, ctx.bias_grads,
            [d if f else None for d, f in zip(d_as, need_a)],
            [d if f else None for d, f in zip(d_bs, need_b)], None, None, None)


lora_linear_group.register_autograd(_lora_linear_group_autograd_backward,
                                    setup_context=_lora_linear_group_setup_context)
