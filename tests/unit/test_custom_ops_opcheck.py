"""torch.library.opcheck on every graphlora custom op: schema, autograd registration, fake (meta) implementation
against the real one, and AOT dispatch with static and dynamic shapes, on small float32 inputs (the quantized
linear ops on bitsandbytes layers quantized on the CPU; skipped without bitsandbytes).

Forward ops get inputs that require grad where the op has a backward (x and the LoRA matrices; base weights are
frozen, as the ops demand), so the AOT checks also compare gradients. The backward ops have no derivative of their
own (graphlora never differentiates twice): the AOT checks run them on inputs that do not require grad, and the
autograd-registration check runs them on inputs that do, where it verifies that an Autograd kernel exists (it
refuses to differentiate loudly instead of returning silently wrong gradients).
"""

import dataclasses
from collections.abc import Callable

import pytest
import torch

import graphlora.ops  # noqa: F401 - registers torch.ops.graphlora.*

ops = torch.ops.graphlora
UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
         "test_aot_dispatch_dynamic")


def _t(*shape, seed, grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    op: torch._ops.OpOverload
    #: args(grad) -> the op's arguments; grad: whether differentiable inputs require grad
    args: Callable[[bool], tuple]
    differentiable: bool  # the op has a registered backward


def _lora_linear(bias: bool, dropout: float):
    def args(grad):
        x = _t(2, 3, 8, seed=0, grad=grad)
        weight, b = _t(6, 8, seed=1), (_t(6, seed=2) if bias else None)
        lora_a, lora_b = _t(4, 8, seed=3, grad=grad), _t(6, 4, seed=4, grad=grad)
        seed = torch.tensor([12345]) if dropout else None
        return x, weight, b, lora_a, lora_b, 0.5, dropout, seed
    return args


def _lora_linear_group(biases: tuple[bool, ...], dropout: float):
    def args(grad):
        x = _t(2, 3, 8, seed=0, grad=grad)
        outs = [6, 5, 4][:len(biases)]
        weights = [_t(o, 8, seed=10 + m) for m, o in enumerate(outs)]
        bs = [_t(o, seed=20 + m) if has else None for m, (o, has) in enumerate(zip(outs, biases))]
        lora_as = [_t(2 + m, 8, seed=30 + m, grad=grad) for m in range(len(outs))]
        lora_bs = [_t(o, 2 + m, seed=40 + m, grad=grad) for m, o in enumerate(outs)]
        scales = [0.5 * (m + 1) for m in range(len(outs))]
        seed = torch.tensor([777]) if dropout else None
        return x, weights, bs, lora_as, lora_bs, scales, dropout, seed
    return args


def _lora_linear_backward(compute_dx: bool, dropout: float):
    def args(grad):
        x, weight, _, lora_a, lora_b, scale, p, seed = _lora_linear(False, dropout)(grad)
        return _t(2, 3, 6, seed=5, grad=grad), x, weight, lora_a, lora_b, scale, p, seed, compute_dx
    return args


def _lora_linear_group_backward(compute_dx: bool, dropout: float):
    def args(grad):
        x, weights, _, lora_as, lora_bs, scales, p, seed = _lora_linear_group((True, False, True), dropout)(grad)
        grads = [_t(2, 3, w.shape[0], seed=50 + m, grad=grad) for m, w in enumerate(weights)]
        return grads, x, weights, lora_as, lora_bs, scales, p, seed, compute_dx
    return args


CU_SEQLENS = (0, 3, 7)  # two segments of a packed sequence of 7


def _segment_attention(grad):
    q, k, v = (_t(1, 2, 7, 4, seed=60 + i, grad=grad) for i in range(3))
    return q, k, v, torch.tensor(CU_SEQLENS, dtype=torch.int32), 0.5


def _segment_attention_backward(grad):
    q, k, v, cu, scale = _segment_attention(False)
    out, lse = ops.segment_attention.default(q, k, v, cu, scale)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return _t(1, 2, 7, 4, seed=70, grad=grad), q, k, v, out, lse, cu, scale


def _bnb_layer(bits: int, double_quant: bool = False):
    """A frozen bitsandbytes linear [16 -> 8] with bias, quantized on the CPU (skips without bitsandbytes)."""
    bnb = pytest.importorskip("bitsandbytes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        if bits == 4:
            layer = bnb.nn.Linear4bit(64, 8, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                                      compress_statistics=double_quant)
        else:
            layer = bnb.nn.Linear8bitLt(64, 8, bias=True, has_fp16_weights=False, threshold=6.0)
    return layer.to("cpu").requires_grad_(False)


def _linear_4bit(double_quant: bool):
    def args(grad):
        layer = _bnb_layer(4, double_quant)
        state = layer.weight.quant_state
        nested = (state.state2.absmax, state.state2.code, torch.as_tensor(state.offset)) if state.nested else (None,) * 3
        packed = layer.weight.data.as_subclass(torch.Tensor)
        return (_t(2, 3, 64, seed=80, grad=grad), packed, layer.bias.data.as_subclass(torch.Tensor), state.absmax,
                state.code, *nested, 8, 64, state.blocksize, state.state2.blocksize if state.nested else 0,
                state.quant_type, state.dtype, torch.float32)
    return args


def _linear_8bit(training: bool):
    def args(grad):
        layer = _bnb_layer(8)
        return (_t(2, 3, 64, seed=81, grad=grad), layer.weight.data.as_subclass(torch.Tensor),
                layer.bias.data.as_subclass(torch.Tensor), layer.weight.SCB, 6.0, training)
    return args


CASES = [
    Case("linear_4bit[nf4]", ops.linear_4bit.default, _linear_4bit(False), True),
    Case("linear_4bit[nf4, double quant]", ops.linear_4bit.default, _linear_4bit(True), True),
    Case("linear_8bit[eval]", ops.linear_8bit.default, _linear_8bit(False), True),
    Case("linear_8bit[training]", ops.linear_8bit.default, _linear_8bit(True), True),
    Case("lora_linear[bias]", ops.lora_linear.default, _lora_linear(True, 0.0), True),
    Case("lora_linear[dropout]", ops.lora_linear.default, _lora_linear(False, 0.25), True),
    Case("lora_linear_group[mixed biases, dropout]", ops.lora_linear_group.default,
         _lora_linear_group((True, False, True), 0.25), True),
    Case("lora_linear_group[all biases]", ops.lora_linear_group.default, _lora_linear_group((True, True), 0.0), True),
    Case("lora_linear_backward[dx, dropout]", ops.lora_linear_backward.default, _lora_linear_backward(True, 0.25),
         False),
    Case("lora_linear_backward[no dx]", ops.lora_linear_backward.default, _lora_linear_backward(False, 0.0), False),
    Case("lora_linear_group_backward[dx, dropout]", ops.lora_linear_group_backward.default,
         _lora_linear_group_backward(True, 0.25), False),
    Case("lora_linear_group_backward[no dx]", ops.lora_linear_group_backward.default,
         _lora_linear_group_backward(False, 0.0), False),
    Case("segment_attention", ops.segment_attention.default, _segment_attention, True),
    Case("segment_attention_backward", ops.segment_attention_backward.default, _segment_attention_backward, False),
]


@pytest.mark.parametrize("util", UTILS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_opcheck(case, util):
    if case.differentiable:
        grad = True
    else:
        # Only the registration check needs grad-requiring inputs; AOT with them would differentiate the
        # backward op, which has (by design) no derivative.
        grad = util == "test_autograd_registration"
    args = case.args(grad)
    assert any(t.requires_grad for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)) == grad
    torch.library.opcheck(case.op, args, test_utils=(util,))


def test_every_graphlora_op_has_a_case():
    """A new op in the graphlora namespace must be added above."""
    registered = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("graphlora::")}
    covered = {c.op.name().split("::", 1)[1] for c in CASES}
    assert covered and registered == covered


def test_backward_ops_refuse_to_be_differentiated():
    """What the registration check relies on for the backward ops: their Autograd kernel raises on backward."""
    out = ops.lora_linear_backward.default(*_lora_linear_backward(True, 0.0)(True))
    assert out[1].requires_grad
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        out[1].sum().backward()


def test_opcheck_catches_a_wrong_fake_implementation():
    """The fake-tensor check is not vacuous: an op whose fake result has the wrong shape fails it."""
    @torch.library.custom_op("graphlora_unit_test::bad_fake", mutates_args=())
    def bad_fake(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @bad_fake.register_fake
    def _(x):
        return x.new_empty((*x.shape[:-1], x.shape[-1] + 1))

    with pytest.raises(Exception, match="(?i)shape|size"):
        torch.library.opcheck(torch.ops.graphlora_unit_test.bad_fake.default, (torch.randn(2, 3),),
                              test_utils=("test_faketensor",))
