"""graphlora::segment_attention (graphlora/ops/segment_attention.py): attention within the segments of a
packed sequence equals transformers' split-and-attend, forward and backward; it exports with symbolic
sizes (the boundaries are data); and the Qwen vision blocks use it instead of the N x N mask."""

import pytest
import torch
import torch.nn.functional as F

from graphlora.ops import segment_attention as segment_attention_module
from graphlora.ops.segment_attention import segment_attention


def _reference(q, k, v, cu, scale):
    """What transformers 5.24's Qwen2-VL vision attention does with sdpa: split by segment, attend, concat."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    parts = [F.scaled_dot_product_attention(a, b, c, scale=scale)
             for a, b, c in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
    return torch.cat(parts, 2)


def _qkv(n, heads=2, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, dim, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("kernels", ["cpu-flash", "portable", "eager-lowering"])
@pytest.mark.parametrize("lengths", [[7], [3, 5], [4, 1, 6, 2]])
def test_forward_and_backward_equal_the_split(lengths, kernels, monkeypatch):
    """Every implementation: the op's CPU flash kernels, its portable path (sdpa forward, fp32 backward from
    the saved log-sum-exp) that other devices take, and the eager lowering that programs run."""
    if kernels == "portable":
        monkeypatch.setattr(segment_attention_module, "_uses_cpu_flash", lambda q: False)
    attend = ((lambda *a: segment_attention_module.segment_attention_eager(*a)[0]) if kernels == "eager-lowering"
              else segment_attention)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = _qkv(sum(lengths))
    grad = torch.randn(1, 2, sum(lengths), 8)
    out = attend(q, k, v, cu, 0.3)
    ref_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = _reference(*ref_inputs, cu, 0.3)
    torch.testing.assert_close(out, ref)
    out.backward(grad)
    ref.backward(grad)
    for mine, theirs in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_segments_do_not_see_each_other():
    """Changing one segment's values leaves the other segment's output unchanged (unlike plain attention)."""
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q, k, v = (t.detach() for t in _qkv(7))
    out = segment_attention(q, k, v, cu, 1.0)
    v2 = v.clone()
    v2[:, :, 3:] += 5.0
    out2 = segment_attention(q, k, v2, cu, 1.0)
    torch.testing.assert_close(out[:, :, :3], out2[:, :, :3])
    assert not torch.allclose(out[:, :, 3:], out2[:, :, 3:])


def test_opcheck():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    q, k, v = _qkv(5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.graphlora.segment_attention.default, (q, k, v, cu, 0.5))


@pytest.mark.parametrize("attend", [segment_attention, segment_attention_module.segment_attention_eager],
                         ids=["op", "eager-lowering"])
def test_bad_boundaries_are_refused(attend):
    q, k, v = (t.detach() for t in _qkv(5))
    with pytest.raises(ValueError, match="sequence length 5"):
        attend(q, k, v, torch.tensor([0, 2, 4], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="integer"):
        attend(q, k, v, torch.tensor([0.0, 5.0]), 1.0)


def test_eager_lowering_on_meta_calls_the_op():
    """Meta tensors have no boundary values to read: the lowering falls back to the op's fake shapes."""
    q, k, v = (torch.empty(1, 2, 6, 8, device="meta") for _ in range(3))
    out, lse = segment_attention_module.segment_attention_eager(q, k, v, torch.empty(3, dtype=torch.int32,
                                                                                     device="meta"), 1.0)
    assert out.shape == (1, 2, 6, 8) and out.device.type == "meta" and lse is None


def test_exports_with_a_symbolic_sequence_and_serves_other_boundaries():
    """One exported program serves another sequence length and another number of segments."""

    class Block(torch.nn.Module):
        def forward(self, q, k, v, cu):
            return segment_attention(q, k, v, cu, 0.25) * 2

    seq = torch.export.Dim("seq", min=2)
    segs = torch.export.Dim("segs", min=2)
    q, k, v = (t.detach() for t in _qkv(9))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    program = torch.export.export(Block(), (q, k, v, cu),
                                  dynamic_shapes=({2: seq}, {2: seq}, {2: seq}, {0: segs})).module()
    q2, k2, v2 = (t.detach() for t in _qkv(12, seed=1))
    cu2 = torch.tensor([0, 2, 7, 12], dtype=torch.int32)
    torch.testing.assert_close(program(q2, k2, v2, cu2), _reference(q2, k2, v2, cu2, 0.25) * 2)
