"""``graphlora::segment_attention``: attention within the segments of a packed sequence, as one opaque op.

Qwen2/2.5/3-VL and GLM-4V pack the patches of every image of a batch into one sequence; ``cu_seqlens``
(cumulative patch counts, int32 ``[S + 1]``) say where each image (or Qwen2.5-VL window) starts, and each
segment attends only to itself. transformers splits q/k/v by the segment lengths and attends chunk by
chunk; those lengths are tensor *data*, which torch.export cannot trace. A block-diagonal mask over the
whole sequence traces, but costs ``N x N`` (N = patches in the batch) where the split costs the sum of
the segments' squares: with 8 images of 1,000 patches that is 8x the attention work and a 256 MB mask
per block (fp32).

This op gives programs the split's cost: its inputs and output have static shapes (``q, k, v`` and the
result are ``[1, heads, N, head_dim]``), and it reads the boundaries as data inside, where it runs the
chunks eagerly with ``scaled_dot_product_attention``. Backward is the op
``graphlora::segment_attention_backward``, which recomputes each segment's probabilities and applies the
attention backward to them in fp32 (the forward saves only q, k, v): an opaque op too, so ``torch.compile`` (AOTAutograd) never traces the
data-dependent split. The fake implementations return tensors of the inputs' shapes, so export,
FakeTensor and the meta device see an ordinary op.

No dropout (the caller falls back to the masked path when attention dropout is on in training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _chunks(cu_seqlens: Tensor) -> list[int]:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


def _attend(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float) -> Tensor:
    lengths = _chunks(cu_seqlens)
    if len(lengths) == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    parts = [F.scaled_dot_product_attention(qi, ki, vi, scale=scale)
             for qi, ki, vi in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
    return torch.cat(parts, 2)


def _check(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> None:
    if q.dim() != 4 or q.shape[0] != 1 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"segment_attention: q, k, v must be [1, heads, N, head_dim] (got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)})")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"segment_attention: cu_seqlens must be a 1-D integer tensor (got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)})")


@torch.library.custom_op("graphlora::segment_attention", mutates_args=())
def segment_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float) -> Tensor:
    """softmax(q kᵀ · scale) v within each ``[cu_seqlens[s], cu_seqlens[s+1])`` segment of the sequence axis."""
    _check(q, k, v, cu_seqlens)
    if int(cu_seqlens[-1]) != q.shape[2] or int(cu_seqlens[0]) != 0:
        raise ValueError(f"segment_attention: cu_seqlens must run from 0 to the sequence length {q.shape[2]} "
                         f"(got {cu_seqlens.tolist()})")
    return _attend(q, k, v, cu_seqlens, scale)


@segment_attention.register_fake
def _segment_attention_fake(q, k, v, cu_seqlens, scale):
    _check(q, k, v, cu_seqlens)
    return q.new_empty((*q.shape[:3], v.shape[3]))


def _chunk_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Attention backward of one segment, in fp32: P = softmax(q kᵀ s); dv = Pᵀ g; dS = P ⊙ (g vᵀ - rowsum);
    dq = dS k s; dk = dSᵀ q s."""
    qf, kf, vf, gf = (t.float() for t in (q, k, v, grad))
    probs = torch.softmax(qf @ kf.transpose(-1, -2) * scale, dim=-1)
    dv = probs.transpose(-1, -2) @ gf
    dp = gf @ vf.transpose(-1, -2)
    ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
    dq = ds @ kf * scale
    dk = ds.transpose(-1, -2) @ qf * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@torch.library.custom_op("graphlora::segment_attention_backward", mutates_args=())
def segment_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
                               scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``segment_attention``, segment by segment (each segment's probabilities recomputed)."""
    lengths = _chunks(cu_seqlens)
    parts = [_chunk_backward(*chunk, scale) for chunk in
             zip(grad.split(lengths, 2), q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
    return tuple(torch.cat([p[i] for p in parts], 2) for i in range(3))


@segment_attention_backward.register_fake
def _segment_attention_backward_fake(grad, q, k, v, cu_seqlens, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, scale = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.scale = scale


def _backward(ctx, grad):
    q, k, v, cu_seqlens = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:3]):
        return None, None, None, None, None
    dq, dk, dv = torch.ops.graphlora.segment_attention_backward(grad.contiguous(), q, k, v, cu_seqlens, ctx.scale)
    need = ctx.needs_input_grad
    return dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None


segment_attention.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["segment_attention", "segment_attention_backward"]
