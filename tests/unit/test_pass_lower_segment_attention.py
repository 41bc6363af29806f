"""lower_segment_attention: in a program that runs eagerly, each ``graphlora::segment_attention`` whose
log-sum-exp nothing reads calls the eager per-segment attention instead, with the same outputs and gradients; the
op stays where its log-sum-exp is read, and the pipeline lowers nothing in a compiled program."""

import operator

import torch
from torch.testing import FileCheck

from graphlora.ops.segment_attention import segment_attention_eager
from graphlora.pass_manager import PassManager
from graphlora.passes.lower_segment_attention_pass import LowerSegmentAttentionPass
from graphlora.pipeline import Pipeline
from graphlora.policy import Policy
from toy import count

OP = torch.ops.graphlora.segment_attention.default


def _lower(toy):
    passes = Pipeline(Policy()).lowering(toy.gm, compiled=False)
    assert [type(p) for p in passes] == [LowerSegmentAttentionPass]
    return PassManager(passes)(toy.gm)


def _lse_reads(gm):
    return sum(1 for n in gm.graph.nodes if n.target is operator.getitem and n.args[0].target in (OP, segment_attention_eager)
               and n.args[1] == 1)


def _run_with_grad(toy):
    pixels = toy.inputs["pixel_values"].detach().clone().requires_grad_()
    toy.inputs["pixel_values"] = pixels
    out = toy.run()
    out["loss"].backward()
    return out["logits"].detach(), pixels.grad


def test_every_packed_attention_is_lowered(make_toy):
    toy = make_toy(packed_vision=True)
    blocks = toy.cfg.vision_layers
    assert count(toy.gm, OP) == blocks and _lse_reads(toy.gm) == blocks
    FileCheck().check_count("torch.ops.graphlora.segment_attention.default(", blocks, exactly=True).run(toy.gm.code)
    logits, grad = _run_with_grad(toy)

    [record] = _lower(toy)

    assert record.modified
    assert count(toy.gm, OP) == 0 and count(toy.gm, segment_attention_eager) == blocks
    assert _lse_reads(toy.gm) == 0  # the unread log-sum-exp getitems went
    FileCheck().check_not("torch.ops.graphlora.segment_attention").check("segment_attention_eager").run(toy.gm.code)
    lowered_logits, lowered_grad = _run_with_grad(toy)
    torch.testing.assert_close(lowered_logits, logits)
    torch.testing.assert_close(lowered_grad, grad)
    assert grad.abs().sum() > 0


def test_the_op_stays_where_its_log_sum_exp_is_read(make_toy):
    """The toy returns the last vision block's log-sum-exp: that block keeps the op, the first is lowered."""
    toy = make_toy(packed_vision=True, expose_lse=True)
    _lower(toy)
    assert count(toy.gm, OP) == 1 and count(toy.gm, segment_attention_eager) == toy.cfg.vision_layers - 1
    [kept] = [n for n in toy.gm.graph.nodes if n.target is OP]
    assert any(u.args[1] == 1 for u in kept.users)
    with torch.no_grad():
        eager = toy.model(**toy.inputs)
    torch.testing.assert_close(toy.run()["vision_lse"], eager["vision_lse"])


def test_compiled_programs_and_graphs_without_the_op_get_no_lowering(make_toy, toy):
    packed = make_toy(packed_vision=True)
    assert Pipeline(Policy()).lowering(packed.gm, compiled=True) == []
    assert not LowerSegmentAttentionPass.applies_to(toy.gm)
    assert Pipeline(Policy()).lowering(toy.gm, compiled=False) == []
    code = toy.gm.code
    [record] = PassManager([LowerSegmentAttentionPass()])(toy.gm)
    assert not record.modified and toy.gm.code == code
