"""passes/lower_segment_attention_pass.py: programs that run eagerly call the eager segment attention, with the
same outputs and gradients; the op stays where its log-sum-exp is read, and in compiled programs."""

import operator

import torch

from graphlora.ops.segment_attention import segment_attention_eager
from graphlora.passes.lower_segment_attention_pass import LowerSegmentAttentionPass
from graphlora.pipeline import Pipeline
from graphlora.policy import Policy

OP = torch.ops.graphlora.segment_attention.default


class _Attend(torch.nn.Module):
    def __init__(self, read_lse: bool = False):
        super().__init__()
        self.read_lse = read_lse

    def forward(self, q, k, v, cu):
        out, lse = OP(q, k, v, cu, 0.5)
        return (out * 2, lse) if self.read_lse else out * 2


def _exported(module):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g) for _ in range(3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    seq = torch.export.Dim("seq", min=2)
    ep = torch.export.export(module, (q, k, v, cu), dynamic_shapes=({2: seq}, {2: seq}, {2: seq}, None))
    return ep.module(), (q, k, v, cu)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]


def test_lowered_program_equals_the_op_forward_and_backward():
    gm, (q, k, v, cu) = _exported(_Attend())
    reference = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = _Attend()(*reference, cu)
    expected.sum().backward()

    result = LowerSegmentAttentionPass()(gm)
    gm.recompile()
    assert result.modified
    assert OP not in _targets(gm) and segment_attention_eager in _targets(gm)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = gm(*inputs, cu)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    for mine, theirs in zip(inputs, reference):
        torch.testing.assert_close(mine.grad, theirs.grad)
    # another sequence length and other boundaries through the same lowered program
    q2, k2, v2 = (torch.randn(1, 2, 12, 4) for _ in range(3))
    cu2 = torch.tensor([0, 7, 12], dtype=torch.int32)
    torch.testing.assert_close(gm(q2, k2, v2, cu2), _Attend()(q2, k2, v2, cu2))


def test_op_kept_where_the_log_sum_exp_is_read():
    gm, _ = _exported(_Attend(read_lse=True))
    assert not LowerSegmentAttentionPass()(gm).modified
    assert OP in _targets(gm)


def test_pipeline_lowers_only_programs_that_run_eagerly_and_call_the_op():
    pipeline = Pipeline(Policy())
    gm, _ = _exported(_Attend())
    assert [type(p) for p in pipeline.lowering(gm, compiled=False)] == [LowerSegmentAttentionPass]
    assert pipeline.lowering(gm, compiled=True) == []
    plain = torch.export.export(torch.nn.Linear(3, 3), (torch.randn(2, 3),)).module()
    assert pipeline.lowering(plain, compiled=False) == []


def test_qwen2_vl_vision_block_program_runs_the_eager_lowering():
    """The Qwen2-VL vision block traces the op (export needs it) and its program calls the eager lowering."""
    import graphlora
    from graphlora.families import synthesize_inputs
    from graphlora.testing import zoo

    model = zoo.build_tiny_model("qwen2_vl", layers=2).train()
    lora_model = graphlora.rewrite(model, Policy(), example_inputs=synthesize_inputs(model, batch_size=2))
    vision = [p for p in lora_model.runtime.programs()
              if any(n.target is segment_attention_eager for n in p.graph_module.graph.nodes)]
    assert vision, "no program calls the eager segment attention"
    assert all(OP not in _targets(p.graph_module) for p in lora_model.runtime.programs())
    assert any(r.name == LowerSegmentAttentionPass.name for t in lora_model.traces for r in t.passes)
