"""Triton kernels and Python launchers for ``graphlora::lora_linear`` / ``lora_linear_group``.

Import this module lazily (``graphlora.ops.lora_linear`` does): ``@triton.jit`` decides at
definition time whether a kernel runs compiled or under the interpreter, so ``TRITON_INTERPRET=1``
must be in the environment before the first import for the CPU tests to work. ``INTERPRET`` records
which mode this import got.

Notation: ``x`` is the flattened ``[M, K]`` input (``M`` tokens, ``K = in_features``), member ``m``
of a group has ``W_m [N_m, K]``, ``A_m [r_m, K]``, ``B_m [N_m, r_m]``, scale ``s_m``; ``drop_m``
is the dropout of stream ``m`` (see ``dropout_rng``), ``inv = 1 / (1 - p)``. The single op is a
one-member group. Kernels (what each reads / writes, in HBM terms):

``_lora_down_kernel``   reads ``x`` once (all members from the same tile load), ``A_cat``;
                        writes ``xa[M, R] = s_m * drop_m(x) @ A_m^T`` (fp32, accumulated with
                        atomics when split along K). ~1 read of ``x``.
``_lora_gemm_kernel``   generic ``out = sum_src a_s @ b_s (+ bias) (+ out) + sum_m lora_m``,
                        fp32 accumulator, one pass over ``out``:
                        forward  ``y_m = x W_m^T + b_m + xa_m B_m^T`` (LoRA up-projection added to
                        the main GEMM's accumulator in the epilogue);
                        backward ``dx = sum_m dy_m W_m + sum_m drop_m(dxa_m A_m) * inv`` and, from
                        the same tile, ``dA_m += dxa_m^T drop_m(x) * inv`` (reads the ``x`` tile,
                        fp32 atomics into a ``[R, K]`` buffer).
``_lora_up_bwd_kernel`` reads ``dy_m`` once; writes ``dxa_m = s_m dy_m B_m`` and
                        ``dB_m += dy_m^T xa_m`` (fp32 atomics; ``xa_m`` already holds ``s_m``).

Per training step this adds ~4 passes over ``[M, K]``-sized tensors to the frozen linear
(forward: ``x`` read by the down kernel; backward: ``x`` re-read to recompute ``xa``, ``dy`` read
by the up-backward kernel, ``x`` read by the ``dx`` epilogue for ``dA``); see docs/kernels.md.

``main_gemm`` backend: ``"triton"`` (default) runs the big GEMMs in ``_lora_gemm_kernel``;
``"torch"`` runs them with cuBLAS (``torch.mm``) and only the LoRA epilogue in Triton (reads and
rewrites ``y`` / ``dx`` once more). Choose with ``GRAPHLORA_LORA_GEMM=torch|triton`` or
``set_main_gemm()``. LoRA-side dots on fp32 operands use ``GRAPHLORA_LORA_DOT_PRECISION``
(``tf32`` default for bf16/fp16 compute, always ``ieee`` for fp32 compute).

The dA/dB/xa reductions use fp32 atomics, so their last bits can vary from run to run.
Written against the Triton 3.6 API (no TMA descriptors, no warp specialisation).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import dropout_rng as _rng

__all__ = [
    "INTERPRET",
    "MAX_RANK",
    "MAX_RANK_FP32",
    "MAX_MEMBERS_PER_LAUNCH",
    "unsupported_reason",
    "lora_forward",
    "lora_backward",
    "set_main_gemm",
    "get_main_gemm",
    "rng_bits",
]

MAX_RANK = 128  # per member; BLOCK_R = next_pow2(max(r, 16)) <= 128
MAX_RANK_FP32 = 32  # fp32 compute (exact "ieee" dots) on the GPU: larger ranks use the reference
MAX_MEMBERS_PER_LAUNCH = 3  # members handled by one launch; bigger groups are chunked

_MAIN_GEMM = os.environ.get("GRAPHLORA_LORA_GEMM", "triton").strip().lower() or "triton"
_LORA_PREC = os.environ.get("GRAPHLORA_LORA_DOT_PRECISION", "tf32").strip().lower() or "tf32"
# GRAPHLORA_TRITON_AUTOTUNE=0: one fixed config per operand width instead of benchmarking a few
# (fast compiles for tests and quick checks on a GPU).
_AUTOTUNE = os.environ.get("GRAPHLORA_TRITON_AUTOTUNE", "1").strip() not in ("0", "false", "no")

_MIX_MUL1 = tl.constexpr(_rng.MIX_MUL1)
_MIX_MUL2 = tl.constexpr(_rng.MIX_MUL2)
_SEED_SALT = tl.constexpr(_rng.SEED_SALT)
_STREAM_SALT = tl.constexpr(_rng.STREAM_SALT)
_KEY_SALT = tl.constexpr(_rng.KEY_SALT)
_MASK32 = tl.constexpr(_rng.MASK32)


def set_main_gemm(name: str) -> str:
    """Select the backend of the big GEMMs (``"triton"`` or ``"torch"``); returns the previous one."""
    global _MAIN_GEMM
    name = name.strip().lower()
    if name not in ("triton", "torch"):
        raise ValueError(f"main GEMM backend must be 'triton' or 'torch', got {name!r}")
    prev, _MAIN_GEMM = _MAIN_GEMM, name
    return prev


def get_main_gemm() -> str:
    return _MAIN_GEMM


# ----------------------------------------------------------------------------------------------
# Counter-based RNG (bit-identical to dropout_rng.py; uint32 arithmetic wraps modulo 2**32)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mix32(h):
    """lowbias32 integer hash of a uint32 tensor."""
    h ^= h >> 16
    h *= _MIX_MUL1
    h ^= h >> 15
    h *= _MIX_MUL2
    h ^= h >> 16
    return h


@triton.jit
def _stream_keys(seed_ptr, STREAM: tl.constexpr):
    """Keys (k0, k1) of (seed, STREAM); reads the int64 seed from device memory (no host sync)."""
    s = tl.load(seed_ptr)
    s_lo = (s & _MASK32).to(tl.uint32)
    s_hi = (s >> 32).to(tl.uint32)
    k = _mix32(s_lo ^ _SEED_SALT)
    k = _mix32(k ^ s_hi)
    k0 = _mix32(k ^ _mix32(tl.full([], _STREAM_SALT ^ STREAM, tl.uint32)))
    k1 = _mix32(k0 ^ _KEY_SALT) | 1
    return k0, k1


@triton.jit
def _element_index(rows, cols, ncols, SMALL_INDEX: tl.constexpr):
    """Low / high 32-bit words of ``rows[:, None] * ncols + cols[None, :]`` (uint32 tiles)."""
    if SMALL_INDEX:  # the whole [M, ncols] index space fits in int32
        i_lo = (rows[:, None] * ncols + cols[None, :]).to(tl.uint32)
        i_hi = i_lo  # unused
    else:
        idx = rows[:, None].to(tl.int64) * ncols + cols[None, :]
        i_lo = (idx & _MASK32).to(tl.uint32)
        i_hi = (idx >> 32).to(tl.uint32)
    return i_lo, i_hi


@triton.jit
def _keep_mask(i_lo, i_hi, k0, k1, thr, SMALL_INDEX: tl.constexpr):
    """Dropout keep-mask (bool tile): ``(bits >> 1) >= thr``, bits as in dropout_rng.random_bits."""
    if SMALL_INDEX:
        base = k0 ^ _mix32(k1)  # i_hi == 0 everywhere
    else:
        base = k0 ^ _mix32(i_hi ^ k1)
    h = _mix32((i_lo ^ base) * k1)
    return (h >> 1).to(tl.int32) >= thr


@triton.jit
def _rng_bits_kernel(seed_ptr, out_ptr, rows, cols, row0, STREAM: tl.constexpr,
                     SMALL_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Test helper: writes the 32-bit random words (as int64) of rows row0 .. row0 + rows of a
    ``[*, cols]`` index space into out[rows, cols] (row0 > 0 reaches indices >= 2**32)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_lo, i_hi = _element_index(offs_m + row0, offs_n, cols, SMALL_INDEX)
    k0, k1 = _stream_keys(seed_ptr, STREAM)
    if SMALL_INDEX:
        base = k0 ^ _mix32(k1)
    else:
        base = k0 ^ _mix32(i_hi ^ k1)
    h = _mix32((i_lo ^ base) * k1)
    mask = (offs_m[:, None] < rows) & (offs_n[None, :] < cols)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * cols + offs_n[None, :], h.to(tl.int64), mask=mask)


# ----------------------------------------------------------------------------------------------
# Kernel 1: xa = s_m * drop_m(x) @ A_m^T   (LoRA down-projection, all members from one x read)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _down_member(acc, xt, a_ptr, off, r, stride_am, offs_k, mask_k, rr, keep,
                 DROPOUT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc[BM, BR] += drop(xt)[BM, BK] @ A[off:off+r, k-tile]^T  (A tile loaded as [BK, BR])."""
    a = tl.load(a_ptr + (off + rr)[None, :] * stride_am + offs_k[:, None],
                mask=(rr < r)[None, :] & mask_k[:, None], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    if DROPOUT:
        xt = tl.where(keep, xt, 0.0)
    return tl.dot(xt, a, acc, input_precision=PREC)


@triton.jit
def _store_down(acc, xa_ptr, stride_xam, offs_m, mask_m, rr, off, r, factor):
    tl.atomic_add(xa_ptr + offs_m[:, None].to(tl.int64) * stride_xam + (off + rr)[None, :],
                  acc * factor, mask=mask_m[:, None] & (rr < r)[None, :], sem="relaxed")


@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, xa_ptr, seed_ptr,
    M, K, stride_xm, stride_am, stride_xam,
    off0, r0, s0, off1, r1, s1, off2, r2, s2,
    thr, inv_keep, k_per_split,
    NUM_MEMBERS: tl.constexpr, STREAM0: tl.constexpr, DROPOUT: tl.constexpr,
    SMALL_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Reads x[M, K] (row stride stride_xm, unit column stride) and A_cat[R, K]; accumulates
    ``xa[:, off_i:off_i+r_i] += s_i * inv * drop_{STREAM0+i}(x) @ A_i^T`` (fp32, zero-initialised)
    for up to three members. Grid: (cdiv(M, BLOCK_M), split_k); program (i, j) covers rows
    i*BLOCK_M.. and columns [j*k_per_split, (j+1)*k_per_split) of x, hashing each x element once
    per member."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    lm = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + lm
    mask_m = offs_m < M
    lk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    x_blk = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_xm
    k_start = pid_k * k_per_split
    k_end = min(K, k_start + k_per_split)

    acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if DROPOUT:
        k00, k10 = _stream_keys(seed_ptr, STREAM0)
        k01, k11 = _stream_keys(seed_ptr, STREAM0 + 1)
        k02, k12 = _stream_keys(seed_ptr, STREAM0 + 2)

    for k in range(k_start, k_end, BLOCK_K):
        offs_k = k + lk
        mask_k = offs_k < k_end
        xt = tl.load(x_blk + lm[:, None] * stride_xm + offs_k[None, :],
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        xt = xt.to(a_ptr.dtype.element_ty)  # PEFT: x is cast to the LoRA dtype first
        if UPCAST:
            xt = xt.to(tl.float32)
        if DROPOUT:
            i_lo, i_hi = _element_index(offs_m, offs_k, K, SMALL_INDEX)
            keep = _keep_mask(i_lo, i_hi, k00, k10, thr, SMALL_INDEX)
            acc0 = _down_member(acc0, xt, a_ptr, off0, r0, stride_am, offs_k, mask_k, rr, keep,
                                True, PREC, UPCAST)
            if NUM_MEMBERS >= 2:
                keep = _keep_mask(i_lo, i_hi, k01, k11, thr, SMALL_INDEX)
                acc1 = _down_member(acc1, xt, a_ptr, off1, r1, stride_am, offs_k, mask_k, rr, keep,
                                    True, PREC, UPCAST)
            if NUM_MEMBERS >= 3:
                keep = _keep_mask(i_lo, i_hi, k02, k12, thr, SMALL_INDEX)
                acc2 = _down_member(acc2, xt, a_ptr, off2, r2, stride_am, offs_k, mask_k, rr, keep,
                                    True, PREC, UPCAST)
        else:
            acc0 = _down_member(acc0, xt, a_ptr, off0, r0, stride_am, offs_k, mask_k, rr, mask_k,
                                False, PREC, UPCAST)
            if NUM_MEMBERS >= 2:
                acc1 = _down_member(acc1, xt, a_ptr, off1, r1, stride_am, offs_k, mask_k, rr, mask_k,
                                    False, PREC, UPCAST)
            if NUM_MEMBERS >= 3:
                acc2 = _down_member(acc2, xt, a_ptr, off2, r2, stride_am, offs_k, mask_k, rr, mask_k,
                                    False, PREC, UPCAST)

    _store_down(acc0, xa_ptr, stride_xam, offs_m, mask_m, rr, off0, r0, s0 * inv_keep)
    if NUM_MEMBERS >= 2:
        _store_down(acc1, xa_ptr, stride_xam, offs_m, mask_m, rr, off1, r1, s1 * inv_keep)
    if NUM_MEMBERS >= 3:
        _store_down(acc2, xa_ptr, stride_xam, offs_m, mask_m, rr, off2, r2, s2 * inv_keep)


# ----------------------------------------------------------------------------------------------
# Kernel 2: dxa = s * dy @ B,  dB += dy^T @ xa   (one read of dy)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lora_up_bwd_kernel(
    dy_ptr, b_ptr, xa_ptr, dxa_ptr, db_ptr,
    M, N, R, n_per_split,
    stride_dym, stride_bn, stride_br, stride_xam, col_off, stride_dbn,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr,
):
    """Reads dy[M, N] (unit column stride) once, B[N, R], and the fp32 xa[:, col_off:col_off+R]
    (which already includes the LoRA scale); accumulates (fp32 atomics, zero-initialised outputs)
    ``dxa[:, col_off:col_off+R] += scale * dy @ B`` and ``dB[N, R] += dy^T @ xa``.
    Grid: (cdiv(M, BLOCK_M), split_n); program (i, j) covers rows i*BLOCK_M.. and columns
    [j*n_per_split, (j+1)*n_per_split) of dy."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    lm = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + lm
    mask_m = offs_m < M
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    xa = tl.load(xa_ptr + row0 * stride_xam + lm[:, None] * stride_xam + (col_off + rr)[None, :],
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    dy_blk = dy_ptr + row0 * stride_dym
    dxa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_start = pid_n * n_per_split
    n_end = min(N, n_start + n_per_split)
    ln = tl.arange(0, BLOCK_N)
    for n in range(n_start, n_end, BLOCK_N):
        offs_n = n + ln
        mask_n = offs_n < n_end
        dy = tl.load(dy_blk + lm[:, None] * stride_dym + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        dxa = tl.dot(dy, b, dxa, input_precision=PREC)
        db = tl.dot(tl.trans(dy), xa, input_precision=PREC)
        tl.atomic_add(db_ptr + offs_n[:, None] * stride_dbn + rr[None, :], db,
                      mask=mask_n[:, None] & mask_r[None, :], sem="relaxed")
    tl.atomic_add(dxa_ptr + row0 * stride_xam + lm[:, None] * stride_xam + (col_off + rr)[None, :],
                  dxa * scale, mask=mask_m[:, None] & mask_r[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Kernel 3: the main GEMM with the LoRA terms in its epilogue
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mm_acc(acc, a_blk, b_blk, K, stride_am, stride_bk, stride_bn, mask_m, mask_n,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            EVEN_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a[BM, K] @ b[K, BN]; a_blk / b_blk point at the tile's first row / column; a has a
    unit column stride, b is addressed as b[k, n] = b_blk[k * stride_bk + n * stride_bn]."""
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    lk = tl.arange(0, BLOCK_K)
    a_ptrs = a_blk + lm[:, None] * stride_am + lk[None, :]
    b_ptrs = b_blk + lk[:, None] * stride_bk + ln[None, :] * stride_bn
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_rem = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (lk[None, :] < k_rem), other=0.0)
            b = tl.load(b_ptrs, mask=(lk[:, None] < k_rem) & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _lora_term(acc, u_blk, stride_um, u_off, v_blk, stride_vr, stride_vn, v_off, R,
               x_blk, stride_xm, da_blk, stride_dar, seed_ptr, thr, inv_keep, i_lo, i_hi,
               mask_m, mask_n,
               STREAM: tl.constexpr, DROPOUT: tl.constexpr, SMALL_INDEX: tl.constexpr,
               ADD_OUT: tl.constexpr, COMPUTE_DA: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
               PREC: tl.constexpr):
    """One LoRA member in the epilogue of a [BM, BN] output tile.

    Reads u[BM, R] (fp32, columns u_off..), v[R, BN] (rows v_off.., any dtype, addressed with
    strides) and, for COMPUTE_DA, the x tile [BM, BN]. ADD_OUT: acc += drop(u @ v) * inv.
    COMPUTE_DA: da[v_off:v_off+R, tile] += u^T @ drop(x) * inv (fp32 atomics). The keep-mask of
    stream STREAM is computed once and shared by both."""
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    u = tl.load(u_blk + lm[:, None] * stride_um + (u_off + rr)[None, :],
                mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    if DROPOUT:
        k0, k1 = _stream_keys(seed_ptr, STREAM)
        keep = _keep_mask(i_lo, i_hi, k0, k1, thr, SMALL_INDEX)
    if ADD_OUT:
        v = tl.load(v_blk + (v_off + rr)[:, None] * stride_vr + ln[None, :] * stride_vn,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            t = tl.dot(u, v, input_precision=PREC)
            acc += tl.where(keep, t * inv_keep, 0.0)
        else:  # accumulate straight into acc: no second [BM, BN] fp32 tile
            acc = tl.dot(u, v, acc, input_precision=PREC)
    if COMPUTE_DA:
        xt = tl.load(x_blk + lm[:, None] * stride_xm + ln[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            xt = tl.where(keep, xt, 0.0)
        da = tl.dot(tl.trans(u), xt, input_precision=PREC)
        if DROPOUT:
            da = da * inv_keep
        tl.atomic_add(da_blk + (v_off + rr)[:, None] * stride_dar + ln[None, :], da,
                      mask=mask_r[:, None] & mask_n[None, :], sem="relaxed")
    return acc


@triton.jit
def _lora_gemm_kernel(
    out_ptr, M, N, stride_om,
    a0_ptr, b0_ptr, K0, stride_a0m, stride_b0k, stride_b0n,
    a1_ptr, b1_ptr, K1, stride_a1m, stride_b1k, stride_b1n,
    a2_ptr, b2_ptr, K2, stride_a2m, stride_b2k, stride_b2n,
    bias_ptr,
    u_ptr, stride_um, v_ptr, stride_vr, stride_vn,
    uoff0, voff0, r0, uoff1, voff1, r1, uoff2, voff2, r2,
    x_ptr, stride_xm, da_ptr, stride_dar,
    seed_ptr, thr, inv_keep, M_BUCKET,
    NUM_SRC: tl.constexpr, NUM_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_IN: tl.constexpr,
    STORE_OUT: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_DA: tl.constexpr,
    STREAM0: tl.constexpr, SMALL_INDEX: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, MAIN_PREC: tl.constexpr, LORA_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[M, N] = sum_{s<NUM_SRC} a_s[M, K_s] @ b_s[K_s, N] (+ bias[N]) (+ out if ACC_IN)
                  + sum_{m<NUM_LORA} drop_{STREAM0+m}(u[:, uoff_m:+r_m] @ v[voff_m:+r_m, :]) * inv
    with one fp32 accumulator per tile, written once in out's dtype (if STORE_OUT). With
    COMPUTE_DA the same epilogue also accumulates da[voff_m:+r_m, :] += u_m^T @ drop_m(x) * inv
    (x[M, N]). Reads: each a_s / b_s tile (the GEMM), u/v/x tiles in the epilogue.
    Grid: 1-D over (M, N) tiles, grouped along M (GROUP_M) for L2 reuse of b. M_BUCKET is not
    read: it is the autotuning key for M (a power of two), so a new token count reuses the
    tuning of its bucket."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if NUM_SRC >= 1:
        acc = _mm_acc(acc, a0_ptr + row0 * stride_a0m, b0_ptr + col0 * stride_b0n, K0,
                      stride_a0m, stride_b0k, stride_b0n, mask_m, mask_n,
                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, MAIN_PREC, UPCAST)
    if NUM_SRC >= 2:
        acc = _mm_acc(acc, a1_ptr + row0 * stride_a1m, b1_ptr + col0 * stride_b1n, K1,
                      stride_a1m, stride_b1k, stride_b1n, mask_m, mask_n,
                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, MAIN_PREC, UPCAST)
    if NUM_SRC >= 3:
        acc = _mm_acc(acc, a2_ptr + row0 * stride_a2m, b2_ptr + col0 * stride_b2n, K2,
                      stride_a2m, stride_b2k, stride_b2n, mask_m, mask_n,
                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, MAIN_PREC, UPCAST)

    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + row0 * stride_om + lm[:, None] * stride_om + col0 + ln[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACC_IN:
        acc += tl.load(out_ptrs, mask=mask_out, other=0.0).to(tl.float32)

    if NUM_LORA >= 1:
        if DROPOUT:
            i_lo, i_hi = _element_index(offs_m, offs_n, N, SMALL_INDEX)
        else:
            i_lo = offs_m
            i_hi = offs_m
        u_blk = u_ptr + row0 * stride_um
        v_blk = v_ptr + col0 * stride_vn
        x_blk = x_ptr + row0 * stride_xm + col0
        da_blk = da_ptr + col0
        acc = _lora_term(acc, u_blk, stride_um, uoff0, v_blk, stride_vr, stride_vn, voff0, r0,
                         x_blk, stride_xm, da_blk, stride_dar, seed_ptr, thr, inv_keep, i_lo, i_hi,
                         mask_m, mask_n, STREAM0, DROPOUT, SMALL_INDEX, STORE_OUT, COMPUTE_DA,
                         BLOCK_M, BLOCK_N, BLOCK_R, LORA_PREC)
        if NUM_LORA >= 2:
            acc = _lora_term(acc, u_blk, stride_um, uoff1, v_blk, stride_vr, stride_vn, voff1, r1,
                             x_blk, stride_xm, da_blk, stride_dar, seed_ptr, thr, inv_keep, i_lo,
                             i_hi, mask_m, mask_n, STREAM0 + 1, DROPOUT, SMALL_INDEX, STORE_OUT,
                             COMPUTE_DA, BLOCK_M, BLOCK_N, BLOCK_R, LORA_PREC)
        if NUM_LORA >= 3:
            acc = _lora_term(acc, u_blk, stride_um, uoff2, v_blk, stride_vr, stride_vn, voff2, r2,
                             x_blk, stride_xm, da_blk, stride_dar, seed_ptr, thr, inv_keep, i_lo,
                             i_hi, mask_m, mask_n, STREAM0 + 2, DROPOUT, SMALL_INDEX, STORE_OUT,
                             COMPUTE_DA, BLOCK_M, BLOCK_N, BLOCK_R, LORA_PREC)

    if STORE_OUT:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


# Whether this import got the interpreter (decided by @triton.jit when the kernels were defined).
INTERPRET = type(_lora_gemm_kernel).__name__ == "InterpretedFunction"


def _gemm_configs():
    if INTERPRET:
        # Small blocks so the CPU tests cover several tiles and ragged edges.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2},
                              num_warps=4, num_stages=1)]
    if not _AUTOTUNE:
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
                              num_warps=8, num_stages=4),
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8},
                              num_warps=4, num_stages=3)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8},
                      num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
                      num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8},
                      num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
                      num_warps=4, num_stages=4),
        # fp32 operands (BLOCK_K = 32 marks them; see _prune_gemm_configs)
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8},
                      num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8},
                      num_warps=4, num_stages=3),
    ]


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Keep the configs made for the operand width (BLOCK_K 64 for 16-bit, 32 for fp32 operands,
    whose 64-deep tiles overflow shared memory) and drop tiles far larger than the problem."""
    m, n = named_args["M_BUCKET"], named_args["N"]
    wide = named_args["a0_ptr"].element_size() > 2
    by_dtype = [c for c in configs if c.kwargs["BLOCK_K"] == (32 if wide else 64)] or configs
    kept = [c for c in by_dtype
            if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))
            and c.kwargs["BLOCK_N"] <= max(128, triton.next_power_of_2(n))]
    return kept or by_dtype[-1:]


# Autotuned entry point for launches that do not read ``out`` (NUM_SRC >= 1, ACC_IN False). The
# dA atomics would be repeated by the benchmarking runs, so ``da_ptr`` is restored after each.
_lora_gemm_tuned = triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "K0", "NUM_SRC", "NUM_LORA", "DROPOUT", "COMPUTE_DA", "BLOCK_R"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_gemm_configs},
    restore_value=["da_ptr"],
)(triton.heuristics({"EVEN_K": lambda a: a["K0"] % a["BLOCK_K"] == 0
                                          and a["K1"] % a["BLOCK_K"] == 0
                                          and a["K2"] % a["BLOCK_K"] == 0})(_lora_gemm_kernel))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 2
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _block_r(ranks: Sequence[int]) -> int:
    return max(16, triton.next_power_of_2(max(ranks)))


def _precisions(x_dtype: torch.dtype) -> tuple[str, str]:
    """(main GEMM precision, LoRA-side precision) for dots on fp32 operands."""
    if x_dtype == torch.float32:
        return "ieee", "ieee"
    return "tf32", _LORA_PREC


def _upcast(*dtypes: torch.dtype) -> bool:
    # The interpreter's tl.dot mishandles bf16 operands: do those dots in fp32 there.
    return INTERPRET and torch.bfloat16 in dtypes


def unsupported_reason(x: torch.Tensor, weights: Sequence[torch.Tensor],
                       biases: Sequence[Optional[torch.Tensor]], lora_as: Sequence[torch.Tensor],
                       lora_bs: Sequence[torch.Tensor]) -> Optional[str]:
    """None if the Triton path handles these inputs, else a short reason (then use the reference)."""
    dev = x.device
    if dev.type != "cuda" and not (INTERPRET and dev.type == "cpu"):
        return f"device {dev.type} (Triton path needs CUDA, or CPU under TRITON_INTERPRET=1)"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"x dtype {x.dtype}"
    lora_dtype = lora_as[0].dtype
    if lora_dtype not in (torch.float32, x.dtype):
        return f"LoRA dtype {lora_dtype} with x dtype {x.dtype}"
    for w, b, a, bb in zip(weights, biases, lora_as, lora_bs):
        if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
            return "weight/bias dtype differs from x"
        if a.dtype != lora_dtype or bb.dtype != lora_dtype:
            return "LoRA dtypes differ between members"
        if a.shape[0] > MAX_RANK:
            return f"rank {a.shape[0]} > {MAX_RANK}"
        if x.dtype == torch.float32 and a.shape[0] > MAX_RANK_FP32 and not INTERPRET:
            # exact-fp32 ("ieee") dots with wide LoRA tiles spill badly; cuBLAS is the better choice
            return f"fp32 compute with rank {a.shape[0]} > {MAX_RANK_FP32}"
        for t in (w, b, a, bb):
            if t is not None and t.device != dev:
                return "tensors on different devices"
    if x.numel() == 0:
        return "empty input"
    return None


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _seed_arg(seed: Optional[torch.Tensor], p: float, placeholder: torch.Tensor) -> torch.Tensor:
    """The seed as a 1-element int64 tensor on the kernels' device (a CPU seed costs a tiny
    host-to-device copy: keep the seed on the GPU). Without dropout the kernels never read it."""
    if p <= 0.0:
        return placeholder
    return seed.reshape(1).to(device=placeholder.device, dtype=torch.int64)


def _chunks(n: int):
    for start in range(0, n, MAX_MEMBERS_PER_LAUNCH):
        yield start, min(n, start + MAX_MEMBERS_PER_LAUNCH)


def _pad3(values: list, fill):
    return list(values) + [fill] * (3 - len(values))


_SMEM_BUDGET = 160 * 1024  # bytes of shared memory the fixed (non-autotuned) configs may use


def _down_config(members: int, block_r: int, a_bytes: int):
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) of the down kernel: keep the per-member fp32
    accumulators small (members * BLOCK_R <= 64 columns at BLOCK_M = 64) and the pipelined x and
    A tiles (both in the LoRA dtype) within the shared-memory budget."""
    block_m = 64 if members * block_r <= 64 else (32 if members * block_r <= 192 else 16)
    block_k, stages = 64, 3
    while stages * (block_m + members * block_r) * block_k * a_bytes > _SMEM_BUDGET:
        if block_k > 32:
            block_k //= 2
        elif stages > 2:
            stages -= 1
        else:
            break
    return block_m, block_k, 4, stages


def _split_reduction(length: int, block: int, grid_m: int, device) -> tuple[int, int]:
    """Split a reduction of ``length`` until there are ~2 programs per SM, each split keeping >= 4
    iterations of ``block``; under the interpreter, at most 2 splits (still exercising the atomics).

    Returns (number of splits, length per split, a multiple of ``block``).
    """
    if INTERPRET:
        split = min(2, triton.cdiv(length, block))
    else:
        max_split = max(1, triton.cdiv(length, 4 * block))
        split = max(1, min(max_split, triton.cdiv(2 * _num_sms(device), grid_m)))
    per_split = triton.cdiv(triton.cdiv(length, split), block) * block
    return triton.cdiv(length, per_split), per_split


def _down(x2d, a_cat, offsets, ranks, scales, p, seed_t, stream0=0):
    """xa[M, R_total] (fp32) = s_m * drop_m(x) @ A_m^T for all members (chunks of <= 3)."""
    M, K = x2d.shape
    xa = torch.zeros((M, a_cat.shape[0]), dtype=torch.float32, device=x2d.device)
    block_r = _block_r(ranks)
    _, prec = _precisions(x2d.dtype)
    n_chunk = min(len(ranks), MAX_MEMBERS_PER_LAUNCH)
    if INTERPRET:
        block_m, block_k, num_warps, num_stages = 16, 32, 4, 1
    else:
        block_m, block_k, num_warps, num_stages = _down_config(n_chunk, block_r, a_cat.element_size())
    grid_m = triton.cdiv(M, block_m)
    split, k_per_split = _split_reduction(K, block_k, grid_m, x2d.device)
    small = (M + block_m) * K < 2**31
    thr = _rng.threshold(p) if p > 0 else 0
    inv_keep = 1.0 / (1.0 - p)
    for lo, hi in _chunks(len(ranks)):
        offs = _pad3(offsets[lo:hi], 0)
        rs = _pad3(ranks[lo:hi], 0)
        ss = _pad3([float(s) for s in scales[lo:hi]], 0.0)
        _lora_down_kernel[(grid_m, split)](
            x2d, a_cat, xa, seed_t,
            M, K, x2d.stride(0), a_cat.stride(0), xa.stride(0),
            offs[0], rs[0], ss[0], offs[1], rs[1], ss[1], offs[2], rs[2], ss[2],
            thr, inv_keep, k_per_split,
            NUM_MEMBERS=hi - lo, STREAM0=stream0 + lo, DROPOUT=p > 0, SMALL_INDEX=small,
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, PREC=prec,
            UPCAST=_upcast(x2d.dtype, a_cat.dtype), num_warps=num_warps, num_stages=num_stages,
        )
    return xa


def _up_bwd(dy2d, b, xa, dxa, db, col_off, r, scale, x_dtype):
    """dxa[:, col_off:+r] += scale * dy @ B ;  db[N, r] (fp32) += dy^T @ xa[:, col_off:+r]."""
    M, N = dy2d.shape
    block_r = _block_r([r])
    _, prec = _precisions(x_dtype)
    if INTERPRET:
        block_m, block_n, num_warps, num_stages = 16, 16, 4, 1
    else:  # fp32 tiles: dy [BM, BN], B [BN, BR], dxa / dB accumulators [BM | BN, BR]. A tall
        # BLOCK_M halves the dB atomics ((M / BLOCK_M) * N * R of them) for small ranks.
        block_m, block_n = (128, 64) if block_r <= 32 else (64, 32)
        num_warps, num_stages = 8, 3
    grid_m = triton.cdiv(M, block_m)
    split, n_per_split = _split_reduction(N, block_n, grid_m, dy2d.device)
    _lora_up_bwd_kernel[(grid_m, split)](
        dy2d, b, xa, dxa, db,
        M, N, r, n_per_split,
        dy2d.stride(0), b.stride(0), b.stride(1), xa.stride(0), col_off, db.stride(0),
        float(scale),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, PREC=prec,
        num_warps=num_warps, num_stages=num_stages,
    )


def _gemm(out, sources, *, bias=None, acc_in=False, store_out=True, u=None, v=None,
          v_strides=(0, 0), terms=(), x=None, da=None, p=0.0, seed_t=None, stream0=0):
    """Launch ``_lora_gemm_kernel``.

    sources: up to 3 (a[M, K] with unit column stride, b, stride_bk, stride_bn);
    terms: up to 3 (u_col_off, v_row_off, r); u fp32 [M, R]; v addressed v[r, n] via v_strides."""
    M, N = out.shape if store_out or acc_in else (x.shape[0], x.shape[1])
    dev = out.device
    srcs = list(sources)
    x_dtype = (srcs[0][0].dtype if srcs else (x.dtype if x is not None else out.dtype))
    main_prec, lora_prec = _precisions(x_dtype)
    dummy = out
    padded = srcs + [(dummy, dummy, 0, 0)] * (3 - len(srcs))
    ks = [s[0].shape[1] if i < len(srcs) else 0 for i, s in enumerate(padded)]
    t = list(terms) + [(0, 0, 0)] * (3 - len(terms))
    block_r = _block_r([r for (_, _, r) in terms] or [16])
    compute_da = da is not None
    if da is None:
        da = torch.empty(1, dtype=torch.float32, device=dev)  # placeholder (never written)
    if x is None:
        x = dummy
    dropout = p > 0 and len(terms) > 0
    upcast = _upcast(out.dtype, *(s[0].dtype for s in srcs),
                     *([v.dtype] if v is not None else []))
    args = (
        out, M, N, out.stride(0),
        padded[0][0], padded[0][1], ks[0], padded[0][0].stride(0), padded[0][2], padded[0][3],
        padded[1][0], padded[1][1], ks[1], padded[1][0].stride(0), padded[1][2], padded[1][3],
        padded[2][0], padded[2][1], ks[2], padded[2][0].stride(0), padded[2][2], padded[2][3],
        bias if bias is not None else dummy,
        u if u is not None else dummy, u.stride(0) if u is not None else 0,
        v if v is not None else dummy, v_strides[0], v_strides[1],
        t[0][0], t[0][1], t[0][2], t[1][0], t[1][1], t[1][2], t[2][0], t[2][1], t[2][2],
        x, x.stride(0), da, da.stride(0) if da.dim() == 2 else 0,
        seed_t if seed_t is not None else dummy,
        _rng.threshold(p) if dropout else 0, 1.0 / (1.0 - p),
        min(triton.next_power_of_2(M), 16384),
    )
    meta = dict(
        NUM_SRC=len(srcs), NUM_LORA=len(terms), HAS_BIAS=bias is not None, ACC_IN=acc_in,
        STORE_OUT=store_out, DROPOUT=dropout, COMPUTE_DA=compute_da, STREAM0=stream0,
        SMALL_INDEX=(M + 256) * N < 2**31, BLOCK_R=block_r, MAIN_PREC=main_prec,
        LORA_PREC=lora_prec, UPCAST=upcast,
    )
    if srcs and not acc_in and store_out:
        grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)  # noqa: E731
        _lora_gemm_tuned[grid](*args, **meta)
        return
    # Epilogue-only or accumulate-into launches: fixed config (reading ``out`` rules out
    # benchmarking-based autotuning).
    if INTERPRET:
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)
        num_warps, num_stages = 4, 1
    elif srcs:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
        num_warps, num_stages = 8, 3
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8)
        num_warps, num_stages = 4, 2
    even_k = all(k % cfg["BLOCK_K"] == 0 for k in ks)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _lora_gemm_kernel[grid](*args, **meta, **cfg, EVEN_K=even_k, num_warps=num_warps,
                            num_stages=num_stages)


def _member_layout(lora_as):
    ranks = [int(a.shape[0]) for a in lora_as]
    offsets = [0]
    for r in ranks[:-1]:
        offsets.append(offsets[-1] + r)
    return ranks, offsets


def _cat_a(lora_as):
    if len(lora_as) == 1:
        return lora_as[0] if lora_as[0].stride(-1) == 1 else lora_as[0].contiguous()
    return torch.cat([a.reshape(a.shape) for a in lora_as], dim=0).contiguous()


def lora_forward(x: torch.Tensor, weights: Sequence[torch.Tensor],
                 biases: Sequence[Optional[torch.Tensor]], lora_as: Sequence[torch.Tensor],
                 lora_bs: Sequence[torch.Tensor], scales: Sequence[float], p: float,
                 seed: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """Forward of ``lora_linear_group`` (the single op is one member): ``[y_m]`` shaped
    ``x.shape[:-1] + (N_m,)`` in x's dtype. Assumes ``unsupported_reason(...) is None``."""
    lead = x.shape[:-1]
    x2d = _as_2d(x)
    M = x2d.shape[0]
    ranks, offsets = _member_layout(lora_as)
    seed_t = _seed_arg(seed, p, x2d)
    a_cat = _cat_a(lora_as)
    xa = _down(x2d, a_cat, offsets, ranks, scales, p, seed_t)
    outs = []
    for m, (w, b, lb) in enumerate(zip(weights, biases, lora_bs)):
        n = w.shape[0]
        term = [(offsets[m], 0, ranks[m])]
        v_strides = (lb.stride(1), lb.stride(0))  # v[r, n] = B[n, r]
        if _MAIN_GEMM == "torch":
            y = torch.nn.functional.linear(x2d, w, b)
            _gemm(y, [], acc_in=True, u=xa, v=lb, v_strides=v_strides, terms=term)
        else:
            y = torch.empty((M, n), dtype=x.dtype, device=x.device)
            _gemm(y, [(x2d, w, w.stride(1), w.stride(0))], bias=b, u=xa, v=lb,
                  v_strides=v_strides, terms=term)
        outs.append(y.view(*lead, n))
    return outs


def lora_backward(grads: Sequence[torch.Tensor], x: torch.Tensor, weights: Sequence[torch.Tensor],
                  lora_as: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor],
                  scales: Sequence[float], p: float, seed: Optional[torch.Tensor],
                  compute_dx: bool = True):
    """Backward of ``lora_linear_group``: ``(dx or empty(0), [dA_m], [dB_m])``; dA/dB in the LoRA
    dtype, dx in x's dtype. Regenerates xa and the dropout masks from the seed."""
    x2d = _as_2d(x)
    M, K = x2d.shape
    dev = x.device
    ranks, offsets = _member_layout(lora_as)
    seed_t = _seed_arg(seed, p, x2d)
    a_cat = _cat_a(lora_as)
    dys = [_as_2d(g.to(x.dtype)) for g in grads]
    # 1) recompute xa (reads x), 2) dxa and dB (reads each dy once)
    xa = _down(x2d, a_cat, offsets, ranks, scales, p, seed_t)
    dxa = torch.zeros_like(xa)
    dbs = []
    for m, (dy, lb) in enumerate(zip(dys, lora_bs)):
        db = torch.zeros((lb.shape[0], ranks[m]), dtype=torch.float32, device=dev)
        _up_bwd(dy, lb, xa, dxa, db, offsets[m], ranks[m], scales[m], x.dtype)
        dbs.append(db)
    # 3) dx = sum dy_m W_m + drop(dxa_m A_m) * inv, and dA_m from the same tiles (reads x)
    da = torch.zeros((a_cat.shape[0], K), dtype=torch.float32, device=dev)
    dx = torch.empty((M, K), dtype=x.dtype, device=dev) if compute_dx else None
    v_strides = (a_cat.stride(0), a_cat.stride(1))
    if compute_dx and _MAIN_GEMM == "torch":
        torch.mm(dys[0], weights[0], out=dx)
        for dy, w in zip(dys[1:], weights[1:]):
            dx.addmm_(dy, w)
    for lo, hi in _chunks(len(ranks)):
        terms = [(offsets[m], offsets[m], ranks[m]) for m in range(lo, hi)]
        if not compute_dx:
            _gemm(x2d, [], store_out=False, u=dxa, v=a_cat, v_strides=v_strides, terms=terms,
                  x=x2d, da=da, p=p, seed_t=seed_t, stream0=lo)
        elif _MAIN_GEMM == "torch":
            _gemm(dx, [], acc_in=True, u=dxa, v=a_cat, v_strides=v_strides, terms=terms,
                  x=x2d, da=da, p=p, seed_t=seed_t, stream0=lo)
        else:
            srcs = [(dys[m], weights[m], weights[m].stride(0), weights[m].stride(1))
                    for m in range(lo, hi)]
            _gemm(dx, srcs, acc_in=lo > 0, u=dxa, v=a_cat, v_strides=v_strides, terms=terms,
                  x=x2d, da=da, p=p, seed_t=seed_t, stream0=lo)
    if len(ranks) == 1:
        das = [da.to(lora_as[0].dtype)]
    else:  # separate tensors: custom-op outputs may not alias each other
        das = [da[o:o + r].to(a.dtype, copy=True) for o, r, a in zip(offsets, ranks, lora_as)]
    dbs = [db.to(lb.dtype) for db, lb in zip(dbs, lora_bs)]
    dx_out = dx.view(x.shape) if compute_dx else x.new_empty(0)
    return dx_out, das, dbs


def rng_bits(seed: torch.Tensor, stream: int, rows: int, cols: int, device,
             row0: int = 0) -> torch.Tensor:
    """The kernels' random words (int64) for rows row0 .. row0 + rows of a [*, cols] index space
    (for tests: compare with ``dropout_rng.random_bits``)."""
    out = torch.empty((rows, cols), dtype=torch.int64, device=device)
    seed_t = seed.reshape(1).to(device=device, dtype=torch.int64)
    bm, bn = 16, 32
    _rng_bits_kernel[(triton.cdiv(rows, bm), triton.cdiv(cols, bn))](
        seed_t, out, rows, cols, row0, STREAM=stream,
        SMALL_INDEX=(row0 + rows + bm) * cols < 2**31, BLOCK_M=bm, BLOCK_N=bn)
    return out
