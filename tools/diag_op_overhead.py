#!/usr/bin/env python
"""Where the fused LoRA op's time goes on CUDA: host (Python, dispatch, launches) vs device.

For a few (T, d_in, d_out, r, dtype) it runs ``forward + backward`` of one LoRA linear ``n`` times
without synchronising and reports, per call,

* ``host_us``: wall time of the loop before the final synchronise (what the CPU spends to enqueue);
* ``wall_us``: wall time including the synchronise (what a training step sees);
* ``gpu_us``: median CUDA-event time of one call when the GPU is kept busy.

Variants: ``unfused`` (F.linear + the two LoRA matmuls through autograd: PEFT's numerics),
``op`` (``torch.ops.graphlora.lora_linear`` through autograd), ``op_cublas`` (the same op with the
big GEMMs in cuBLAS), ``kernels`` (``triton_kernels.lora_forward`` + ``lora_backward`` called
directly: no custom-op dispatch, no autograd), and ``down`` (one launch of the down kernel alone).
``wall_us`` near ``host_us`` means the call is bound by the host.

    python tools/diag_op_overhead.py [--n 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from graphlora.ops import lora_linear as L  # noqa: E402

SHAPES = ((354, 768, 768, 16, torch.bfloat16), (354, 768, 768, 16, torch.float32),
          (4096, 4096, 4096, 16, torch.bfloat16))


def measure(fn, n: int) -> tuple[float, float, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    gpu = statistics.median(a.elapsed_time(b) for a, b in ev) * 1e3
    return host / n * 1e6, wall / n * 1e6, gpu


def variants(T, d_in, d_out, r, dtype):
    from graphlora.ops import triton_kernels as K

    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(T, d_in, generator=g).to(dev, dtype).requires_grad_(True)
    w = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dev, dtype)
    a = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(dev).requires_grad_(True)
    b = (torch.randn(d_out, r, generator=g) * 0.01).to(dev).requires_grad_(True)
    gy = torch.randn(T, d_out, generator=g).to(dev, dtype)
    s = 2.0

    def unfused():
        y = F.linear(x, w) + (F.linear(F.linear(x.to(a.dtype), a), b) * s).to(dtype)
        return torch.autograd.grad(y, (x, a, b), gy)

    def op():
        y = torch.ops.graphlora.lora_linear(x, w, None, a, b, s, 0.0, None)
        return torch.autograd.grad(y, (x, a, b), gy)

    def op_cublas():
        with L.main_gemm_backend("torch"):
            return op()

    xd, ad, bd = x.detach(), a.detach(), b.detach()

    def kernels():
        K.lora_forward(xd, [w], [None], [ad], [bd], [s], 0.0, None)
        return K.lora_backward([gy], xd, [w], [ad], [bd], [s], 0.0, None, True)

    def down():
        return K._down(xd, ad, [0], [r], [s], 0.0, xd)

    def op_one_thread():
        with torch.autograd.set_multithreading_enabled(False):
            return op()

    def fwd_op():
        with torch.no_grad():
            return torch.ops.graphlora.lora_linear(xd, w, None, ad, bd, s, 0.0, None)

    def fwd_impl():
        with torch.no_grad():
            return L._lora_linear_impl(xd, w, None, ad, bd, s, 0.0, None, True)

    def fwd_kernels():
        with torch.no_grad():
            return K.lora_forward(xd, [w], [None], [ad], [bd], [s], 0.0, None)

    def trivial_custom_op():
        return torch.ops.graphlora_diag.ident(xd)

    def trivial_lib_op():
        return torch.ops.graphlora_diag2.ident(xd)

    def autograd_fn():
        y = _KernelsFn.apply(x, w, a, b, s)
        return torch.autograd.grad(y, (x, a, b), gy)

    return {"unfused": unfused, "op": op, "op_cublas": op_cublas, "op_1thread": op_one_thread, "kernels": kernels, "down": down,
            "fwd_op": fwd_op, "fwd_impl": fwd_impl, "fwd_kernels": fwd_kernels,
            "triv_custom": trivial_custom_op, "triv_lib": trivial_lib_op, "autograd_fn": autograd_fn}


@torch.library.custom_op("graphlora_diag::ident", mutates_args=())
def _ident(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


_LIB = torch.library.Library("graphlora_diag2", "DEF")
_LIB.define("ident(Tensor x) -> Tensor")
_LIB.impl("ident", lambda x: x.clone(), "CUDA")


class _KernelsFn(torch.autograd.Function):
    """The Triton kernels behind a plain autograd.Function: no dispatcher, no custom-op wrapper."""

    @staticmethod
    def forward(ctx, x, w, a, b, s):
        from graphlora.ops import triton_kernels as K

        ctx.save_for_backward(x, w, a, b)
        ctx.s = s
        return K.lora_forward(x, [w], [None], [a], [b], [s], 0.0, None)[0]

    @staticmethod
    def backward(ctx, gy):
        from graphlora.ops import triton_kernels as K

        x, w, a, b = ctx.saved_tensors
        dx, das, dbs = K.lora_backward([gy], x, [w], [a], [b], [ctx.s], 0.0, None, True)
        return dx, None, das[0], dbs[0], None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--cprofile", action="store_true",
                    help="also: cProfile of 30 calls of the op at the first shape (top 30 by own time)")
    args = ap.parse_args()
    os.environ.setdefault("GRAPHLORA_TRITON_AUTOTUNE", "1")
    print(f"# {torch.cuda.get_device_name()} torch={torch.__version__}")
    print(f"{'shape':34s} {'variant':10s} {'host_us':>9s} {'wall_us':>9s} {'gpu_us':>9s}")
    for T, d_in, d_out, r, dtype in SHAPES:
        name = f"T={T} {d_in}->{d_out} r={r} {str(dtype)[6:]}"
        for v, fn in variants(T, d_in, d_out, r, dtype).items():
            try:
                host, wall, gpu = measure(fn, args.n)
            except Exception as exc:  # report and go on
                print(f"{name:34s} {v:10s} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            print(f"{name:34s} {v:10s} {host:9.1f} {wall:9.1f} {gpu:9.1f}", flush=True)
    if args.cprofile:
        import cProfile
        import pstats

        fn = variants(*SHAPES[0])["op"]
        fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(30):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
