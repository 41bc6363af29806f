"""``graphlora::segment_attention``: attention within the segments of a packed sequence, as one opaque op.

Qwen2/2.5/3-VL and GLM-4V pack the patches of every image of a batch into one sequence; ``cu_seqlens``
(cumulative patch counts, int32 ``[S + 1]``) say where each image (or Qwen2.5-VL window) starts, and each
segment attends only to itself. transformers splits q/k/v by the segment lengths and attends chunk by
chunk; those lengths are tensor *data*, which torch.export cannot trace. A block-diagonal mask over the
whole sequence traces, but costs ``N x N`` (N = patches in the batch) where the split costs the sum of
the segments' squares: with 8 images of 1,000 patches that is 8x the attention work and a 256 MB mask
per block (fp32).

This op gives programs the split's cost: its inputs and outputs have static shapes (``q, k, v`` and the
result are ``[1, heads, N, head_dim]``, the log-sum-exp ``[1, heads, N]``), and it reads the boundaries as
data inside, where it runs the chunks eagerly: on CPU with the flash kernels sdpa itself picks there
(forward with log-sum-exp, backward from it, so a step costs what transformers' own split costs), elsewhere
with ``scaled_dot_product_attention`` and an fp32 backward from the saved log-sum-exp. Backward is the op
``graphlora::segment_attention_backward``: opaque too, so ``torch.compile`` (AOTAutograd) never traces
the data-dependent split. The fake implementations return tensors of the inputs' shapes, so export,
FakeTensor and the meta device see an ordinary op.

No dropout (the caller falls back to the masked path when attention dropout is on in training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake


def _split(lengths: list[int], *tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """The tensors' segments along the sequence axis (2), zipped segment by segment."""
    if len(lengths) == 1:
        return [tensors]
    return list(zip(*(t.split(lengths, 2) for t in tensors)))


def _cat(parts: list[tuple[Tensor, ...]], axis: int) -> tuple[Tensor, ...]:
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat([p[i] for p in parts], axis) for i in range(len(parts[0])))


def _uses_cpu_flash(q: Tensor) -> bool:
    """The CPU flash kernels (forward with log-sum-exp, backward from it): what sdpa runs on CPU anyway."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _chunk_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """One segment: (softmax(q kᵀ s) v, logsumexp(q kᵀ s) ``[1, heads, L]``, fp32 or fp64)."""
    if _uses_cpu_flash(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v, 0.0, False, scale=scale)
        return out, lse.to(_lse_dtype(q))
    lse = torch.logsumexp(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale), lse.to(_lse_dtype(q))


def _check(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> None:
    if q.dim() != 4 or q.shape[0] != 1 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"segment_attention: q, k, v must be [1, heads, N, head_dim] (got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)})")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"segment_attention: cu_seqlens must be a 1-D integer tensor (got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)})")


def _checked_lengths(cu_seqlens: Tensor, seq_len: int) -> list[int]:
    """The segment lengths (one host read); ValueError unless the boundaries rise from 0 to ``seq_len``."""
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != seq_len or min(lengths, default=-1) < 0:
        raise ValueError(f"segment_attention: cu_seqlens must rise from 0 to the sequence length {seq_len} "
                         f"(got {bounds})")
    return lengths


@torch.library.custom_op("graphlora::segment_attention", mutates_args=())
def segment_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
                               scale: float) -> tuple[Tensor, Tensor]:
    """(softmax(q kᵀ · scale) v, its log-sum-exp ``[1, heads, N]``) within each
    ``[cu_seqlens[s], cu_seqlens[s+1])`` segment of the sequence axis."""
    _check(q, k, v, cu_seqlens)
    lengths = _checked_lengths(cu_seqlens, q.shape[2])
    out, lse = _cat([_chunk_forward(*chunk, scale) for chunk in _split(lengths, q, k, v)], 2)
    return out.contiguous(), lse.contiguous()


@segment_attention_with_lse.register_fake
def _segment_attention_fake(q, k, v, cu_seqlens, scale):
    _check(q, k, v, cu_seqlens)
    return q.new_empty((*q.shape[:3], v.shape[3])), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


def segment_attention_eager(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
                            scale: float) -> tuple[Tensor, None]:
    """``segment_attention`` as plain eager ops: (output, None): what transformers' split computes.

    The lowering of the op for programs that run eagerly (passes/lower_segment_attention_pass.py): one
    ``scaled_dot_product_attention`` per segment with its native autograd, so a step pays neither the custom
    op's dispatch nor its Python backward. Data-dependent (the segment lengths become Python ints), so it
    cannot be traced: on meta or fake tensors and under ``torch.compile`` it calls the op. The log-sum-exp is
    not computed (None); the lowering applies only where the graph does not read it.
    """
    if q.device.type == "meta" or torch.compiler.is_compiling() or is_fake(q):
        return torch.ops.graphlora.segment_attention.default(q, k, v, cu_seqlens, scale)[0], None
    _check(q, k, v, cu_seqlens)
    lengths = _checked_lengths(cu_seqlens, q.shape[2])
    outs = [F.scaled_dot_product_attention(*chunk, scale=scale) for chunk in _split(lengths, q, k, v)]
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 2)), None


def segment_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float) -> Tensor:
    """softmax(q kᵀ · scale) v within each ``[cu_seqlens[s], cu_seqlens[s+1])`` segment of the sequence axis."""
    return torch.ops.graphlora.segment_attention.default(q, k, v, cu_seqlens, scale)[0]


def _chunk_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Attention backward of one segment from its saved output and log-sum-exp."""
    if _uses_cpu_flash(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            grad, q, k, v, out, lse, 0.0, False, scale=scale)
    # P = exp(q kᵀ s - lse); dv = Pᵀ g; dS = P ⊙ (g vᵀ - rowsum(g ⊙ out)); dq = dS k s; dk = dSᵀ q s (fp32)
    qf, kf, vf, gf = (t.float() for t in (q, k, v, grad))
    probs = torch.exp(qf @ kf.transpose(-1, -2) * scale - lse.unsqueeze(-1))
    dv = probs.transpose(-1, -2) @ gf
    ds = probs * (gf @ vf.transpose(-1, -2) - (gf * out.float()).sum(-1, keepdim=True))
    dq = ds @ kf * scale
    dk = ds.transpose(-1, -2) @ qf * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@torch.library.custom_op("graphlora::segment_attention_backward", mutates_args=())
def segment_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                               cu_seqlens: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``segment_attention``, segment by segment, from the forward's output and log-sum-exp."""
    lengths = _checked_lengths(cu_seqlens, q.shape[2])
    parts = [_chunk_backward(*chunk, scale) for chunk in _split(lengths, grad, q, k, v, out, lse)]
    return tuple(t.contiguous() for t in _cat(parts, 2))


@segment_attention_backward.register_fake
def _segment_attention_backward_fake(grad, q, k, v, out, lse, cu_seqlens, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.scale = scale


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not any(need[:3]):
        return None, None, None, None, None
    if grad is None:
        grad = torch.zeros_like(out)
    dq, dk, dv = torch.ops.graphlora.segment_attention_backward(grad.contiguous(), q, k, v, out, lse, cu_seqlens,
                                                                ctx.scale)
    return dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None


segment_attention_with_lse.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["segment_attention", "segment_attention_backward", "segment_attention_eager", "segment_attention_with_lse"]
