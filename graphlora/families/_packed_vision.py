"""Packed-sequence vision attention that torch.export can trace: one segment-attention op, not a split.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL and GLM-4V (and the MoE variants Qwen3-VL-MoE and GLM-4.5V, whose vision
towers are the same) run their vision tower on the patches of *all* images of a
batch packed into one sequence; ``cu_seqlens`` (cumulative patch counts) say where each image (or,
in Qwen2.5-VL's windowed blocks, each window) starts. With sdpa/eager attention, transformers 5.24
does ``torch.split(q, (cu_seqlens[1:] - cu_seqlens[:-1]).tolist())`` and attends chunk by chunk:
the chunk lengths are tensor *data*, so export sees unbacked sizes and stops
(``Could not guard on data-dependent expression u0 > 1``).

With sdpa attention (the default) and no attention dropout, the subclass calls
``graphlora::segment_attention`` (graphlora/ops/segment_attention.py): one op with static shapes that
reads the boundaries as data inside and attends segment by segment, at the split's cost.

Otherwise (eager attention, or attention dropout in training) it computes one attention over the whole
packed sequence with a block-diagonal mask: token ``i`` may attend token ``j`` iff both lie in the same
``[cu_seqlens[s], cu_seqlens[s+1])`` segment. The mask is built from ``cu_seqlens`` with static-shape
tensor ops (the sequence length and the number of segments are shapes, the boundaries are data), so the
graph does not depend on the boundary values. Masked entries get the dtype's most negative value, whose
``exp`` is exactly 0, so the result equals the split computation up to summation order (~1e-7 in fp32).
Cost: an ``N x N`` mask per block (N = patches in the batch).

How it is installed (``install_block_diagonal_vision_attention``): the ``__class__`` of each vision
attention module of the given model is swapped for a subclass defined here, whose ``forward``
attends segment by segment as above and otherwise computes what the original does (and calls the original forward
when a flash-attention implementation is requested: flash varlen kernels take ``cu_seqlens``
natively). Nothing global changes: the transformers classes and every other model are untouched.
The swap is per module object; graphlora installs it on its mirror (which holds its own module
objects). The subclasses are built on first use and resolve by name in this module (module
``__getattr__``), so models holding them pickle and unpickle in a fresh process; ``uninstall``
restores the original classes. The subclass names contain the original ones (``BlockMasked`` + name), so
name-based labelling (component ``vision``, attention roles) is unchanged.
"""

from __future__ import annotations

import functools
import importlib
import sys

import torch

import graphlora.ops.segment_attention  # noqa: F401 - registers torch.ops.graphlora.segment_attention

#: (transformers module, class name) of each packed vision attention whose sdpa/eager path splits.
_TARGETS = [
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "VisionAttention"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLVisionAttention"),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionAttention"),
    ("transformers.models.glm4v.modeling_glm4v", "Glm4vVisionAttention"),
    ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeVisionAttention"),
    ("transformers.models.glm4v_moe.modeling_glm4v_moe", "Glm4vMoeVisionAttention"),
]

_PREFIX = "BlockMasked"


def block_diagonal_mask(cu_seqlens: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[1, 1, N, N]`` mask: 0 inside a ``cu_seqlens`` segment, the dtype's minimum elsewhere.

    Static-shape ops only: ``segment[i]`` = number of inner boundaries ``<= i`` (a comparison against
    the ``[S-1]`` inner boundaries, summed), then an equality outer product.
    """
    positions = torch.arange(seq_len, device=cu_seqlens.device)
    inner = cu_seqlens[1:-1].to(positions.dtype)
    segment = (positions[:, None] >= inner[None, :]).sum(-1)
    same = segment[:, None] == segment[None, :]
    zero = torch.zeros((), dtype=dtype, device=cu_seqlens.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=cu_seqlens.device)
    return torch.where(same, zero, neg)[None, None]


def _block_masked_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    """The packed vision attention of Qwen2/2.5/3-VL and GLM-4V, one masked attention over all segments."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.utils.generic import is_flash_attention_requested

    if is_flash_attention_requested(self.config):
        return super(type(self), self).forward(
            hidden_states, cu_seqlens, position_embeddings=position_embeddings, max_seqlen=max_seqlen, **kwargs
        )
    rotary = sys.modules[type(self).__mro__[1].__module__].apply_rotary_pos_emb_vision
    seq_len = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_len, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin)
    # [N, heads, d] -> [1, heads, N, d]
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    dropout = 0.0 if not self.training else self.attention_dropout
    if self.config._attn_implementation == "sdpa" and dropout == 0.0:
        # The split's cost (sum of the segments' squares, not N x N) in one op whose shapes are static.
        out, _ = torch.ops.graphlora.segment_attention.default(q, k, v, cu_seqlens.to(torch.int64), self.scaling)
        return self.proj(out.transpose(1, 2).reshape(seq_len, -1).contiguous())
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager_interface(self))
    mask = block_diagonal_mask(cu_seqlens, seq_len, q.dtype)
    out, _ = interface(
        self,
        q,
        k,
        v,
        attention_mask=mask,
        scaling=self.scaling,
        dropout=dropout,
        is_causal=False,
        **kwargs,
    )
    return self.proj(out.reshape(seq_len, -1).contiguous())


def _eager_interface(module):
    return sys.modules[type(module).__mro__[1].__module__].eager_attention_forward


@functools.cache
def subclasses() -> dict[type, type]:
    """Original transformers class -> block-masked subclass (built on first use: importing the
    modeling modules costs seconds, so ``import graphlora.families`` does not do it)."""
    out: dict[type, type] = {}
    for module_name, class_name in _TARGETS:
        try:
            base = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):  # pragma: no cover - another transformers version
            continue
        name = _PREFIX + class_name
        sub = type(name, (base,), {"forward": _block_masked_forward, "__module__": __name__, "__qualname__": name})
        sub.__doc__ = f"``{class_name}`` with a block-diagonal mask instead of a split (see {__name__})."
        globals()[name] = sub  # importable by name: pickling works
        out[base] = sub
    return out


def __getattr__(name: str):
    # Unpickling a model that holds a block-masked module looks its class up here by name.
    if name.startswith(_PREFIX):
        subclasses()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install_block_diagonal_vision_attention(model: torch.nn.Module) -> int:
    """Swap every packed vision attention module of ``model`` to its block-masked subclass.

    Idempotent; returns the number of modules now block-masked. Changes only these module objects.
    """
    table = subclasses()
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls in table:
            module.__class__ = table[cls]
            count += 1
        elif cls in table.values():
            count += 1
    return count


def uninstall_block_diagonal_vision_attention(model: torch.nn.Module) -> int:
    """Restore the original transformers classes; returns the number of modules restored."""
    originals = {sub: base for base, sub in subclasses().items()}
    count = 0
    for module in model.modules():
        base = originals.get(type(module))
        if base is not None:
            module.__class__ = base
            count += 1
    return count


def has_block_diagonal_vision_attention(model: torch.nn.Module) -> bool:
    """Whether ``model`` has a packed vision attention and all of them are block-masked."""
    table = subclasses()
    found = False
    for module in model.modules():
        cls = type(module)
        if cls in table:
            return False
        found = found or cls in table.values()
    return found
