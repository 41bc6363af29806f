"""Triton kernels of graphlora::lora_linear(_group) against the reference implementation.

Without CUDA the kernels run on CPU tensors under the Triton interpreter. ``TRITON_INTERPRET=1``
must be in the environment before ``graphlora.ops.triton_kernels`` is first imported (tests/
conftest.py sets it when there is no GPU; this module sets it too, for runs of this file alone).
With CUDA the compiled kernels run on the GPU, one fixed config per dtype (no autotuning).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from contextlib import nullcontext

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("GRAPHLORA_TRITON_AUTOTUNE", "0")

pytest.importorskip("triton")

from graphlora.ops import dropout_rng  # noqa: E402
from graphlora.ops import lora_linear as L  # noqa: E402
from graphlora.ops import triton_kernels as K  # noqa: E402

if not _HAS_CUDA and not K.INTERPRET:
    pytest.skip("graphlora.ops.triton_kernels was imported before TRITON_INTERPRET=1 was set; "
                "run with TRITON_INTERPRET=1 in the environment", allow_module_level=True)

DEVICE = "cuda" if (_HAS_CUDA and not K.INTERPRET) else "cpu"
OPS = torch.ops.graphlora


def _triton_ctx():
    return L.triton_on_cpu() if DEVICE == "cpu" else nullcontext()


# max |a - b| <= tol * max |b| (+ a tiny floor), per dtype of the compared tensor. bf16 is loose
# also because the interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest even).
_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _lora_grad_tol(x_dtype, lora_dtype):
    """Tolerance of dA / dB. With bf16/fp16 compute the kernels' LoRA-side dots on fp32 operands
    run in TF32 on the GPU (the interpreter computes them in fp32)."""
    tol = _TOL[lora_dtype] if lora_dtype != torch.float32 else _TOL[torch.float32]
    if lora_dtype != torch.float32:
        tol = max(tol, _TOL[x_dtype])
    if DEVICE == "cuda" and x_dtype != torch.float32:
        tol = max(tol, 5e-3)
    return tol


def assert_close(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    a, e = actual.double(), expected.double()
    err = (a - e).abs().max().item()
    scale = e.abs().max().item()
    assert err <= tol * scale + 1e-6, f"{what}: max err {err:.3e} vs scale {scale:.3e} (tol {tol})"


def _make(T=37, d_in=48, d_out=40, r=5, dtype=torch.float32, lora_dtype=torch.float32, bias=True,
          lead=(), seed=1234, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(*lead, T, d_in, generator=g).to(dtype)
    w = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dtype)
    b = torch.randn(d_out, generator=g).to(dtype) if bias else None
    a = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(lora_dtype)
    bb = torch.randn(d_out, r, generator=g).to(lora_dtype)
    gy = torch.randn(*lead, T, d_out, generator=g).to(dtype)
    s = torch.tensor(seed, dtype=torch.int64)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x), to(w), to(b), to(a), to(bb), to(gy), s


def _run_single(x, w, b, a, bb, gy, scale, p, seed, triton_path):
    x = x.detach().requires_grad_(True)
    a = a.detach().requires_grad_(True)
    bb = bb.detach().requires_grad_(True)
    with (_triton_ctx() if triton_path else nullcontext()):
        if DEVICE == "cuda" and not triton_path:
            y = L.reference_lora_linear(x, w, b, a, bb, scale, p, seed)
        else:
            y = OPS.lora_linear(x, w, b, a, bb, scale, p, seed)
        y.backward(gy)
    return y.detach(), x.grad, a.grad, bb.grad


def _check_against_reference(tensors, scale, p, x_dtype, lora_dtype):
    x, w, b, a, bb, gy, seed = tensors
    got = _run_single(x, w, b, a, bb, gy, scale, p, seed, True)
    ref = _run_single(x, w, b, a, bb, gy, scale, p, seed, False)
    tx = _TOL[x_dtype]
    tl_ = _lora_grad_tol(x_dtype, lora_dtype)
    for name, u, v, tol in zip(("y", "dx", "dA", "dB"), got, ref, (tx, tx, tl_, tl_)):
        assert_close(u, v, tol, name)


def test_kernel_path_is_used():
    x, w, b, a, bb, _, _ = _make()
    with _triton_ctx():
        assert L.triton_path_reason(x, [w], [b], [a], [bb]) is None


@pytest.mark.parametrize("seed", [0, 1, -7, 2**40 + 123, -(2**62) + 5])
@pytest.mark.parametrize("stream", [0, 2])
def test_rng_bits_match_reference(seed, stream):
    s = torch.tensor(seed, dtype=torch.int64)
    rows, cols = 21, 50
    got = K.rng_bits(s, stream, rows, cols, DEVICE).cpu()
    idx = torch.arange(rows * cols, dtype=torch.int64).view(rows, cols)
    assert torch.equal(got, dropout_rng.random_bits(s, stream, idx))


def test_rng_bits_match_reference_beyond_2_pow_32():
    """64-bit element indices (x with more than 2**32 elements) without allocating such an x."""
    s = torch.tensor(987654321, dtype=torch.int64)
    rows, cols, row0 = 20, 48, (2**32 // 48) - 7  # crosses index 2**32
    got = K.rng_bits(s, 1, rows, cols, DEVICE, row0=row0).cpu()
    idx = (torch.arange(rows, dtype=torch.int64)[:, None] + row0) * cols + torch.arange(cols)
    assert idx.min() < 2**32 <= idx.max()
    assert torch.equal(got, dropout_rng.random_bits(s, 1, idx))


_SINGLE_CASES = [
    # (x dtype, lora dtype, dropout, bias, leading shape)
    (torch.float32, torch.float32, 0.0, True, ()),
    (torch.float32, torch.float32, 0.3, True, ()),
    (torch.float32, torch.float32, 0.3, False, (2,)),
    (torch.float32, torch.float32, 0.0, False, (2,)),
    (torch.float16, torch.float32, 0.3, True, ()),
    (torch.float16, torch.float16, 0.0, True, (2,)),
    (torch.bfloat16, torch.float32, 0.3, True, (2,)),
    (torch.bfloat16, torch.bfloat16, 0.3, False, ()),
]


@pytest.mark.parametrize("x_dtype,lora_dtype,p,bias,lead", _SINGLE_CASES)
def test_single_op_matches_reference(x_dtype, lora_dtype, p, bias, lead):
    tensors = _make(dtype=x_dtype, lora_dtype=lora_dtype, bias=bias, lead=lead)
    _check_against_reference(tensors, 0.7, p, x_dtype, lora_dtype)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_single_op_other_ragged_shape(p):
    """K not a multiple of BLOCK_K in the forward GEMM either, rank exactly 16."""
    tensors = _make(T=19, d_in=50, d_out=33, r=16, gen_seed=3)
    _check_against_reference(tensors, 2.0, p, torch.float32, torch.float32)


def test_backward_without_dx():
    """x does not require grad: the backward op runs with compute_dx=False (dA only from tiles)."""
    x, w, b, a, bb, gy, seed = _make()
    grads = []
    for use_triton in (True, False):
        a_ = a.detach().requires_grad_(True)
        b_ = bb.detach().requires_grad_(True)
        with (_triton_ctx() if use_triton else nullcontext()):
            if DEVICE == "cuda" and not use_triton:
                y = L.reference_lora_linear(x, w, b, a_, b_, 0.5, 0.3, seed)
            else:
                y = OPS.lora_linear(x, w, b, a_, b_, 0.5, 0.3, seed)
            y.backward(gy)
        grads.append((a_.grad, b_.grad))
    assert_close(grads[0][0], grads[1][0], 2e-5, "dA")
    assert_close(grads[0][1], grads[1][1], 2e-5, "dB")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_main_gemm_backend(p):
    """main GEMMs in torch (cuBLAS on GPU), LoRA epilogue kernels in Triton."""
    tensors = _make(lead=(2,), gen_seed=5)
    with L.main_gemm_backend("torch"):
        _check_against_reference(tensors, 0.7, p, torch.float32, torch.float32)


def test_seed_on_other_device_and_kernel_mask_equals_reference_mask():
    """With W = 0, A = B = I, scale 1 and x = 1 the op returns the scaled keep-mask itself."""
    d = 48
    x = torch.ones(37, d, device=DEVICE)
    eye = torch.eye(d, device=DEVICE)
    w = torch.zeros(d, d, device=DEVICE)
    seed = torch.tensor(42, dtype=torch.int64)  # CPU seed, also with CUDA tensors
    with _triton_ctx(), torch.no_grad():
        y = OPS.lora_linear(x, w, None, eye, eye, 1.0, 0.4, seed)
    expected = dropout_rng.dropout_mask(x, seed, 0.4).float() / 0.6
    assert_close(y, expected, 1e-6, "mask")


def _make_group(outs, ranks, dtype=torch.float32, lora_dtype=torch.float32, T=37, d_in=48,
                lead=(), gen_seed=11):
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(*lead, T, d_in, generator=g).to(dtype).to(DEVICE)
    ws = [(torch.randn(o, d_in, generator=g) / d_in**0.5).to(dtype).to(DEVICE) for o in outs]
    bs = [None if k % 2 else torch.randn(o, generator=g).to(dtype).to(DEVICE)
          for k, o in enumerate(outs)]
    as_ = [(torch.randn(r, d_in, generator=g) / d_in**0.5).to(lora_dtype).to(DEVICE) for r in ranks]
    bbs = [torch.randn(o, r, generator=g).to(lora_dtype).to(DEVICE) for o, r in zip(outs, ranks)]
    gys = [torch.randn(*lead, T, o, generator=g).to(dtype).to(DEVICE) for o in outs]
    scales = [0.5 + 0.25 * k for k in range(len(outs))]
    return x, ws, bs, as_, bbs, gys, scales


def _run_group(x, ws, bs, as_, bbs, gys, scales, p, seed, triton_path):
    x = x.detach().requires_grad_(True)
    as_ = [a.detach().requires_grad_(True) for a in as_]
    bbs = [b.detach().requires_grad_(True) for b in bbs]
    with (_triton_ctx() if triton_path else nullcontext()):
        if DEVICE == "cuda" and not triton_path:
            ys = L.reference_lora_linear_group(x, ws, bs, as_, bbs, scales, p, seed)
        else:
            ys = OPS.lora_linear_group(x, ws, bs, as_, bbs, scales, p, seed)
        torch.autograd.backward(ys, gys)
    return ([y.detach() for y in ys], x.grad, [a.grad for a in as_], [b.grad for b in bbs])


@pytest.mark.parametrize("x_dtype,outs,ranks,p", [
    (torch.float32, (40, 24, 24), (5, 3, 8), 0.0),
    (torch.float32, (40, 24, 24), (5, 3, 8), 0.3),
    (torch.bfloat16, (40, 56), (4, 16), 0.3),
    (torch.float32, (16, 24, 40, 8), (2, 5, 3, 7), 0.3),  # 4 members: two launches per kernel
])
def test_group_op_matches_reference(x_dtype, outs, ranks, p):
    x, ws, bs, as_, bbs, gys, scales = _make_group(outs, ranks, dtype=x_dtype,
                                                   lead=(2,) if len(outs) == 2 else ())
    seed = torch.tensor(77, dtype=torch.int64)
    got = _run_group(x, ws, bs, as_, bbs, gys, scales, p, seed, True)
    ref = _run_group(x, ws, bs, as_, bbs, gys, scales, p, seed, False)
    tx = _TOL[x_dtype]
    tl_ = _lora_grad_tol(x_dtype, torch.float32)
    for m in range(len(outs)):
        assert_close(got[0][m], ref[0][m], tx, f"y[{m}]")
        assert_close(got[2][m], ref[2][m], tl_, f"dA[{m}]")
        assert_close(got[3][m], ref[3][m], tl_, f"dB[{m}]")
    assert_close(got[1], ref[1], tx, "dx")


def test_group_member0_equals_single_op():
    """Stream 0 of a group is the single op's stream: a one-member group is the single op."""
    x, w, b, a, bb, gy, seed = _make()
    with _triton_ctx(), torch.no_grad():
        y1 = OPS.lora_linear(x, w, b, a, bb, 0.7, 0.3, seed)
        (y2,) = OPS.lora_linear_group(x, [w], [b], [a], [bb], [0.7], 0.3, seed)
    assert_close(y2, y1, 1e-6, "y")


def test_unsupported_inputs_fall_back_to_reference():
    x, w, b, a, bb, _, seed = _make(r=K.MAX_RANK + 1, T=5, d_in=16, d_out=8)
    with _triton_ctx():
        reason = L.triton_path_reason(x, [w], [b], [a], [bb])
        assert reason is not None and "rank" in reason
        y = OPS.lora_linear(x, w, b, a, bb, 0.5, 0.2, seed)
    assert_close(y, L.reference_lora_linear(x, w, b, a, bb, 0.5, 0.2, seed), 1e-6, "y")
    xd = x.double()
    with _triton_ctx():
        assert "dtype" in L.triton_path_reason(xd, [w.double()], [None], [a.double()],
                                               [bb.double()])


_AOT_SCRIPT = textwrap.dedent('''
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from graphlora.ops import triton_kernels as K
    assert not K.INTERPRET

    def build(fn, ptrs, floats, constexprs, num_warps, num_stages):
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in ptrs:
                sig[name] = "*" + ptrs[name]
            else:
                sig[name] = "fp32" if name in floats else "i32"
        names = list(sig)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
                 if sig[n].startswith("*") or n.startswith("stride")}
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
        assert k.metadata.shared <= 227 * 1024, (fn.__name__, k.metadata.shared)
        print(fn.__name__, "shared", k.metadata.shared)

    bf = "bf16"
    for drop in (False, True):
        bm, bk, w, s = K._down_config(3 if drop else 1, 16, 4)
        build(K._lora_down_kernel, dict(x_ptr=bf, a_ptr="fp32", xa_ptr="fp32", seed_ptr="i64"),
              {"s0", "s1", "s2", "inv_keep"},
              dict(NUM_MEMBERS=3 if drop else 1, STREAM0=0, DROPOUT=drop, SMALL_INDEX=not drop,
                   BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=16, PREC="tf32", UPCAST=False), w, s)
    build(K._lora_up_bwd_kernel, dict(dy_ptr=bf, b_ptr="fp32", xa_ptr="fp32", dxa_ptr="fp32",
                                      db_ptr="fp32"), {"scale"},
          dict(BLOCK_M=128, BLOCK_N=64, BLOCK_R=16, PREC="tf32"), 8, 3)
    ptrs = dict(out_ptr=bf, a0_ptr=bf, b0_ptr=bf, a1_ptr=bf, b1_ptr=bf, a2_ptr=bf, b2_ptr=bf,
                bias_ptr=bf, u_ptr="fp32", v_ptr="fp32", x_ptr=bf, da_ptr="fp32", seed_ptr="i64")
    for nsrc, nl, da, drop, acc_in in [(1, 1, False, False, False), (1, 1, True, True, False),
                                       (2, 2, True, True, True), (0, 1, True, True, True)]:
        build(K._lora_gemm_kernel, ptrs, {"inv_keep"},
              dict(NUM_SRC=nsrc, NUM_LORA=nl, HAS_BIAS=not da, ACC_IN=acc_in, STORE_OUT=True,
                   DROPOUT=drop, COMPUTE_DA=da, STREAM0=0, SMALL_INDEX=True, EVEN_K=not drop,
                   BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_R=16, GROUP_M=8,
                   MAIN_PREC="tf32", LORA_PREC="tf32", UPCAST=False), 8, 3)
    print("AOT OK")
''')


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Compile representative kernel variants for an H100/H200 (sm_90) without a GPU: catches
    errors of the compiled (non-interpreted) path and shared-memory overflows. ~1 minute."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=900, cwd=root)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip("no ptxas available")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "AOT OK" in proc.stdout
