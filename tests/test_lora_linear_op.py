"""graphlora::lora_linear / lora_linear_group: the reference implementation, autograd, export,
torch.compile, dtypes, errors, dropout statistics, and the benchmark script's --smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from graphlora.ops import dropout_rng
from graphlora.ops import lora_linear as L

OPS = torch.ops.graphlora
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors(T=7, d_in=6, d_out=5, r=3, dtype=torch.float64, lora_dtype=None, lead=(), bias=True,
             gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    lora_dtype = lora_dtype or dtype
    x = torch.randn(*lead, T, d_in, generator=g).to(dtype)
    w = torch.randn(d_out, d_in, generator=g).to(dtype)
    b = torch.randn(d_out, generator=g).to(dtype) if bias else None
    a = torch.randn(r, d_in, generator=g).to(lora_dtype)
    bb = torch.randn(d_out, r, generator=g).to(lora_dtype)
    return x, w, b, a, bb


SEED = torch.tensor(2024, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


def test_schemas():
    assert str(OPS.lora_linear.default._schema) == (
        "graphlora::lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
        "Tensor lora_b, float scale, float dropout_p, Tensor? seed) -> Tensor")
    assert str(OPS.lora_linear_group.default._schema) == (
        "graphlora::lora_linear_group(Tensor x, Tensor[] weights, Tensor?[] biases, "
        "Tensor[] lora_as, Tensor[] lora_bs, float[] scales, float dropout_p, Tensor? seed) "
        "-> Tensor[]")


def test_importing_ops_does_not_import_triton_kernels():
    code = ("import sys, graphlora.ops; "
            "print('graphlora.ops.triton_kernels' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------
# Numerics of the reference implementation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_equals_merged_weight_without_dropout(bias):
    x, w, b, a, bb = _tensors(lead=(2,), bias=bias)
    y = OPS.lora_linear(x, w, b, a, bb, 0.75, 0.0, None)
    expected = F.linear(x, w + 0.75 * bb @ a, b)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_fp64(p, bias):
    x, w, b, a, bb = _tensors(lead=(2,), bias=bias)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    seed = SEED if p > 0 else None
    fn = lambda x_, a_, b_: OPS.lora_linear(x_, w, b, a_, b_, 1.3, p, seed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, bb), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_group_fp64(p):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(o, 6, generator=g, dtype=torch.float64) for o in (4, 3)]
    bs = [torch.randn(4, generator=g, dtype=torch.float64), None]
    as_ = [torch.randn(r, 6, generator=g, dtype=torch.float64, requires_grad=True) for r in (2, 3)]
    bbs = [torch.randn(o, r, generator=g, dtype=torch.float64, requires_grad=True)
           for o, r in ((4, 2), (3, 3))]

    def fn(x_, a0, a1, b0, b1):
        return tuple(OPS.lora_linear_group(x_, ws, bs, [a0, a1], [b0, b1], [0.5, 2.0], p, SEED))

    assert torch.autograd.gradcheck(fn, (x, *as_, *bbs), eps=1e-6, atol=1e-6)


def test_group_equals_single_ops_with_member_streams():
    x, w, b, a, bb = _tensors(dtype=torch.float32)
    x2, w2, b2, a2, bb2 = _tensors(dtype=torch.float32, d_out=4, r=2, gen_seed=1)
    ys = OPS.lora_linear_group(x, [w, w2], [b, None], [a, a2], [bb, bb2], [0.5, 1.5], 0.3, SEED)
    torch.testing.assert_close(ys[0], OPS.lora_linear(x, w, b, a, bb, 0.5, 0.3, SEED))
    torch.testing.assert_close(
        ys[1], L.reference_lora_linear(x, w2, None, a2, bb2, 1.5, 0.3, SEED, stream=1))
    # member 1 draws another mask than member 0
    assert not torch.equal(dropout_rng.dropout_mask(x, SEED, 0.3, 0),
                           dropout_rng.dropout_mask(x, SEED, 0.3, 1))


def test_matches_peft_bf16_base_fp32_adapters():
    """Same numerics as PEFT's lora.Linear (bf16 base layer, fp32 adapters, no dropout)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24).to(torch.bfloat16)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = base

        def forward(self, x):
            return self.lin(x)

    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["lin"])
    layer = peft.get_peft_model(One(), cfg).base_model.model.lin
    assert isinstance(layer, peft.tuners.lora.Linear)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    for p_ in base.parameters():
        p_.requires_grad_(False)
    x = torch.randn(3, 10, 32).to(torch.bfloat16).requires_grad_(True)
    gy = torch.randn(3, 10, 24).to(torch.bfloat16)
    y_peft = layer(x)
    y_peft.backward(gy)
    grads_peft = [x.grad.clone(), layer.lora_A["default"].weight.grad.clone(),
                  layer.lora_B["default"].weight.grad.clone()]
    x.grad = None
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    bb = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    y = OPS.lora_linear(x, base.weight, base.bias, a, bb, layer.scaling["default"], 0.0, None)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, y_peft)  # same ops in the same order
    y.backward(gy)
    for got, ref in zip((x.grad, a.grad, bb.grad), grads_peft):
        torch.testing.assert_close(got, ref, rtol=1e-2 if got.dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if got.dtype == torch.bfloat16 else 1e-5)


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------


def _mask_through_op(p, seed, rows=4096, d=64):
    """With W = 0, A = B = I, scale 1 and x = 1 the op returns the scaled keep-mask."""
    x = torch.ones(rows, d)
    eye = torch.eye(d)
    return OPS.lora_linear(x, torch.zeros(d, d), None, eye, eye, 1.0, p, seed)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(p):
    y = _mask_through_op(p, torch.tensor(7, dtype=torch.int64))
    n = y.numel()
    kept = y != 0
    frac = kept.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sigma, (frac, 1 - p)
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1.0 / (1.0 - p)))
    assert abs(y.mean().item() - 1.0) < 6 * sigma / (1 - p)  # inverted dropout keeps the mean
    # no structure along rows or columns
    col_frac = kept.float().mean(0)
    row_frac = kept.float().mean(1)
    assert (col_frac - (1 - p)).abs().max() < 6 * (p * (1 - p) / y.shape[0]) ** 0.5
    assert (row_frac - (1 - p)).abs().max() < 6 * (p * (1 - p) / y.shape[1]) ** 0.5


def test_same_seed_same_mask_different_seed_different_mask():
    s1 = torch.tensor(11, dtype=torch.int64)
    y1 = _mask_through_op(0.3, s1, rows=64)
    y2 = _mask_through_op(0.3, s1.clone(), rows=64)
    y3 = _mask_through_op(0.3, torch.tensor(12, dtype=torch.int64), rows=64)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1 != 0, y3 != 0)
    agree = ((y1 != 0) == (y3 != 0)).float().mean().item()
    assert abs(agree - (0.7**2 + 0.3**2)) < 0.03  # independent masks
    # seeds that differ only in the high 32 bits give different masks too
    y4 = _mask_through_op(0.3, torch.tensor(11 + 2**40, dtype=torch.int64), rows=64)
    assert not torch.equal(y1 != 0, y4 != 0)


def test_mask_depends_on_flat_index_only():
    x = torch.randn(2, 3, 8)
    m1 = dropout_rng.dropout_mask(x, SEED, 0.5)
    m2 = dropout_rng.dropout_mask(x.reshape(6, 8), SEED, 0.5)
    assert torch.equal(m1.reshape(6, 8), m2)
    bits = dropout_rng.random_bits(SEED, 0, torch.arange(48))
    assert torch.equal(m2.reshape(-1), (bits >> 1) >= dropout_rng.threshold(0.5))


def test_rng_matches_python_int_arithmetic():
    """The int64 tensor arithmetic equals the spec computed with Python ints."""
    def spec(seed, stream, i):
        m32 = dropout_rng.MASK32
        s_lo, s_hi = seed & m32, (seed >> 32) & m32
        mix = dropout_rng.mix32_int
        k = mix(mix(s_lo ^ dropout_rng.SEED_SALT) ^ s_hi)
        k0 = mix(k ^ mix(stream ^ dropout_rng.STREAM_SALT))
        k1 = mix(k0 ^ dropout_rng.KEY_SALT) | 1
        base = k0 ^ mix((i >> 32) ^ k1)
        return mix((((i & m32) ^ base) * k1) & m32)

    for seed in (0, 5, -3, 2**63 - 1, -(2**63)):
        idx = torch.tensor([0, 1, 2, 12345, 2**32 - 1, 2**32, 2**33 + 17, 2**45 + 3])
        got = dropout_rng.random_bits(torch.tensor(seed, dtype=torch.int64), 3, idx)
        assert got.tolist() == [spec(seed, 3, int(i)) for i in idx]


def test_backward_regenerates_mask():
    x, w, b, a, bb = _tensors(T=9, d_in=8, d_out=7, r=4, dtype=torch.float32)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    y = OPS.lora_linear(x, w, b, a, bb, 0.9, 0.5, SEED)
    y.sum().backward()
    # autograd through the reference math with the same mask
    x2 = x.detach().clone().requires_grad_(True)
    a2 = a.detach().clone().requires_grad_(True)
    b2 = bb.detach().clone().requires_grad_(True)
    keep = dropout_rng.dropout_mask(x2, SEED, 0.5).float() / 0.5
    y2 = F.linear(x2, w, b) + F.linear(F.linear(x2 * keep, a2), b2) * 0.9
    y2.sum().backward()
    torch.testing.assert_close(y, y2)
    for g1, g2 in ((x.grad, x2.grad), (a.grad, a2.grad), (bb.grad, b2.grad)):
        torch.testing.assert_close(g1, g2)


def test_x_without_grad_skips_dx():
    x, w, b, a, bb = _tensors(dtype=torch.float32)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    y = OPS.lora_linear(x, w, b, a, bb, 0.5, 0.2, SEED)
    y.sum().backward()
    _, da, db = L.reference_lora_linear_backward(torch.ones_like(y), x, w, a.detach(),
                                                 bb.detach(), 0.5, 0.2, SEED)
    torch.testing.assert_close(a.grad, da)
    torch.testing.assert_close(bb.grad, db)


# ----------------------------------------------------------------------------------------------
# Dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_x_with_fp32_lora(x_dtype):
    x, w, b, a, bb = _tensors(T=8, d_in=16, d_out=12, r=4, dtype=x_dtype,
                              lora_dtype=torch.float32)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    y = OPS.lora_linear(x, w, b, a, bb, 0.5, 0.1, SEED)
    assert y.dtype == x_dtype
    y.float().sum().backward()
    assert x.grad.dtype == x_dtype
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32
    ref = L.reference_lora_linear(x.double(), w.double(), b.double(), a.double(), bb.double(),
                                  0.5, 0.1, SEED)
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=5e-2)


def test_same_dtype_lora_weights():
    x, w, b, a, bb = _tensors(T=8, d_in=16, d_out=12, r=4, dtype=torch.bfloat16)
    y = OPS.lora_linear(x, w, b, a, bb, 0.5, 0.0, None)
    assert y.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_error_messages():
    x, w, b, a, bb = _tensors(dtype=torch.float32)
    with pytest.raises(ValueError, match="in_features"):
        OPS.lora_linear(x[:, :-1], w, b, a, bb, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="lora_a"):
        OPS.lora_linear(x, w, b, a[:, :-1], bb, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="lora_b"):
        OPS.lora_linear(x, w, b, a, bb[:, :-1], 1.0, 0.0, None)
    with pytest.raises(ValueError, match="bias"):
        OPS.lora_linear(x, w, b[:-1], a, bb, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="needs a seed"):
        OPS.lora_linear(x, w, b, a, bb, 1.0, 0.1, None)
    with pytest.raises(ValueError, match="dropout_p"):
        OPS.lora_linear(x, w, b, a, bb, 1.0, 1.0, SEED)
    with pytest.raises(ValueError, match="int64"):
        OPS.lora_linear(x, w, b, a, bb, 1.0, 0.1, torch.tensor(1.0))
    with pytest.raises(ValueError, match="dtype"):
        OPS.lora_linear(x, w.double(), b, a, bb, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="same length"):
        OPS.lora_linear_group(x, [w, w], [b], [a, a], [bb, bb], [1.0, 1.0], 0.0, None)


def test_trainable_weight_is_rejected():
    x, w, b, a, bb = _tensors(dtype=torch.float32)
    w.requires_grad_(True)
    a.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen base weights"):
        OPS.lora_linear(x, w, b, a, bb, 1.0, 0.0, None)
    with torch.no_grad():  # no autograd, nothing to reject
        OPS.lora_linear(x, w, b, a, bb, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="frozen base weights"):
        OPS.lora_linear_group(x, [w], [b], [a], [bb], [1.0], 0.0, None)


def test_dropout_p_zero_ignores_seed():
    x, w, b, a, bb = _tensors(dtype=torch.float32)
    torch.testing.assert_close(OPS.lora_linear(x, w, b, a, bb, 1.0, 0.0, SEED),
                               OPS.lora_linear(x, w, b, a, bb, 1.0, 0.0, None))


# ----------------------------------------------------------------------------------------------
# Fake tensors, torch.export, torch.compile
# ----------------------------------------------------------------------------------------------


def test_meta_tensors():
    x, w, b, a, bb = (t.to("meta") for t in _tensors(lead=(3,), dtype=torch.bfloat16))
    y = OPS.lora_linear(x, w, b, a, bb, 1.0, 0.1, torch.tensor(1, device="meta"))
    assert y.shape == (3, 7, 5) and y.device.type == "meta" and y.dtype == torch.bfloat16
    ys = OPS.lora_linear_group(x, [w, w[:2]], [b, None], [a, a], [bb, bb[:2]], [1.0, 1.0], 0.0, None)
    assert [tuple(t.shape) for t in ys] == [(3, 7, 5), (3, 7, 2)]


class _LoraModule(torch.nn.Module):
    def __init__(self, d_in=12, d_out=10, r=4, p=0.2):
        super().__init__()
        self.base = torch.nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_a = torch.nn.Parameter(torch.randn(r, d_in) * 0.1)
        self.lora_b = torch.nn.Parameter(torch.randn(d_out, r) * 0.1)
        self.register_buffer("seed", torch.tensor(99, dtype=torch.int64))
        self.p = p

    def forward(self, x):
        return OPS.lora_linear(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, 2.0,
                               self.p, self.seed)


def test_export_single_node():
    torch.manual_seed(0)
    mod = _LoraModule()
    x = torch.randn(2, 5, 12)
    ep = torch.export.export(mod, (x,))
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [OPS.lora_linear.default]
    torch.testing.assert_close(ep.module()(x), mod(x), rtol=0, atol=0)
    # exported module trains like the eager one
    x1 = x.clone().requires_grad_(True)
    ep.module()(x1).sum().backward()
    x2 = x.clone().requires_grad_(True)
    mod(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_export_group_single_node():
    class Qkv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ws = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.randn(o, 8), requires_grad=False) for o in (8, 4, 4)])
            self.as_ = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(2, 8)) for _ in range(3)])
            self.bs = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.randn(o, 2)) for o in (8, 4, 4)])

        def forward(self, x):
            q, k, v = OPS.lora_linear_group(x, list(self.ws), [None, None, None], list(self.as_),
                                            list(self.bs), [1.0, 1.0, 0.5], 0.0, None)
            return q, k, v

    mod = Qkv()
    x = torch.randn(3, 8)
    ep = torch.export.export(mod, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(OPS.lora_linear_group.default) == 1
    assert all(t in (OPS.lora_linear_group.default,) or "getitem" in str(t) for t in targets)
    for a_, b_ in zip(ep.module()(x), mod(x)):
        torch.testing.assert_close(a_, b_)


def _compile_roundtrip(backend):
    torch.manual_seed(0)
    mod = _LoraModule()
    x = torch.randn(2, 5, 12)

    def step(m, x_):
        x_ = x_.clone().requires_grad_(True)
        y = m(x_)
        y.square().sum().backward()
        grads = (x_.grad, m.lora_a.grad.clone(), m.lora_b.grad.clone())
        m.zero_grad()
        return y.detach(), grads

    y_ref, g_ref = step(mod, x)
    compiled = torch.compile(mod, backend=backend, fullgraph=True)
    y_c, g_c = step(compiled, x)
    torch.testing.assert_close(y_c, y_ref)
    for a_, b_ in zip(g_c, g_ref):
        torch.testing.assert_close(a_, b_)


def test_torch_compile_aot_eager():
    torch._dynamo.reset()
    _compile_roundtrip("aot_eager")


def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    _compile_roundtrip("inductor")


# ----------------------------------------------------------------------------------------------
# Benchmark script
# ----------------------------------------------------------------------------------------------


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.jsonl"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_lora_linear.py"), "--smoke",
         "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.lstrip().startswith("T "))
    for col in ("T", "d_in", "d_out", "r", "p", "frozen_ms", "R_graphlora", "R_peft",
                "R_peft_compile", "vs_peft_graphlora", "vs_peft_peft_compile"):
        assert col in header.split(), (col, header)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    methods = {r["method"] for r in rows if r.get("kind") == "timing"}
    assert {"frozen", "graphlora", "peft", "peft_compile"} <= methods
    assert all(r["ms"] > 0 for r in rows if r.get("kind") == "timing")


@pytest.mark.parametrize("biases", ["none", "all", "mixed"])
def test_group_backward_with_any_bias_pattern(biases):
    """torch.library flattens a Tensor?[] holding a None as one leaf: backward must match that."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, requires_grad=True)
    weights = [torch.randn(6, 8), torch.randn(4, 8)]
    bias_list = {"none": [None, None], "all": [torch.randn(6), torch.randn(4)], "mixed": [torch.randn(6), None]}[biases]
    lora_as = [torch.randn(2, 8, requires_grad=True) for _ in range(2)]
    lora_bs = [torch.randn(o, 2, requires_grad=True) for o in (6, 4)]
    outs = torch.ops.graphlora.lora_linear_group(x, weights, bias_list, lora_as, lora_bs, [0.5, 2.0], 0.0, None)
    sum(o.sum() for o in outs).backward()
    ref_x = x.detach().clone().requires_grad_(True)
    ref_as = [a.detach().clone().requires_grad_(True) for a in lora_as]
    ref_bs = [b.detach().clone().requires_grad_(True) for b in lora_bs]
    total = 0
    for w, b, a, bb, s in zip(weights, bias_list, ref_as, ref_bs, [0.5, 2.0]):
        total = total + (torch.nn.functional.linear(ref_x, w, b) + s * (ref_x @ a.T) @ bb.T).sum()
    total.backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    for got, want in zip(lora_as + lora_bs, ref_as + ref_bs):
        torch.testing.assert_close(got.grad, want.grad)
