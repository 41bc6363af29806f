#!/usr/bin/env python
"""Benchmark of graphlora's fused LoRA linear against PEFT, per linear layer.

For each shape (T tokens, d_in, d_out, rank r, dropout p) it measures, in one run,

    R(method) = time(LoRA linear forward + backward, W frozen) / time(frozen linear fwd + bwd)

for ``graphlora`` (``torch.ops.graphlora.lora_linear``; Triton kernels on CUDA),
``graphlora_cublas`` (same op, big GEMMs in cuBLAS, LoRA epilogues in Triton; CUDA only),
``peft`` (``peft.tuners.lora.Linear`` around an ``nn.Linear``, eager) and ``peft_compile`` (the
same layer under ``torch.compile``). The frozen baseline is ``F.linear`` with a frozen weight and an
input that requires grad (backward = dx only); LoRA methods also produce dA and dB (fp32 adapters,
PEFT's default for a bf16 base layer). A table prints each R and R / R(peft).

Rows are appended to ``--out`` (JSON lines, flushed after every measurement), so a run that is cut
off still leaves its results. ``--tier N`` orders the work: tier 0 is T=4096, d=4096, r=16, p=0
against frozen and PEFT eager; tier 1 adds graphlora_cublas and peft_compile for that shape;
tier 2 the other (d_in, d_out) at T=4096, r=16, p=0; tier 3 r=64 and p=0.1 at T=4096; tier 4
T=16384. ``--budget-s`` stops starting new measurements after that many seconds.

Other modes: ``--smoke`` (tiny fp32 shapes, CPU is fine, 2 iterations; used by the tests),
``--check`` (GPU: Triton path vs the reference on a few bf16/fp16 shapes, prints max errors),
``--breakdown`` (GPU: time of each kernel of the Triton path for one shape).

Examples::

    python tools/bench_lora_linear.py --check
    python tools/bench_lora_linear.py --tier 1 --budget-s 240 --out bench.jsonl
    python tools/bench_lora_linear.py --breakdown --shape 4096,4096,4096,16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from graphlora.ops import lora_linear as L  # noqa: E402

METHODS = ("frozen", "graphlora", "graphlora_cublas", "peft", "peft_compile")
LORA_METHODS = METHODS[1:]
PAIRS = ((4096, 4096), (4096, 14336), (14336, 4096), (1152, 1152), (1152, 4304))


# ----------------------------------------------------------------------------------------------
# Work plan
# ----------------------------------------------------------------------------------------------


def plan(max_tier: int, smoke: bool):
    """[(tier, (T, d_in, d_out, r, p), methods)] in the order they should run."""
    if smoke:
        return [(0, (64, 32, 48, 4, 0.0), METHODS), (0, (64, 32, 48, 4, 0.1), METHODS)]
    items = [(0, (4096, 4096, 4096, 16, 0.0), ("frozen", "graphlora", "peft")),
             (1, (4096, 4096, 4096, 16, 0.0), ("graphlora_cublas", "peft_compile"))]
    done = {(4096, 4096, 4096, 16, 0.0)}
    for tier, T, ranks, ps in ((2, 4096, (16,), (0.0,)), (3, 4096, (16, 64), (0.0, 0.1)),
                               (4, 16384, (16, 64), (0.0, 0.1))):
        for r in ranks:
            for p in ps:
                for d_in, d_out in PAIRS:
                    shape = (T, d_in, d_out, r, p)
                    if shape not in done:
                        done.add(shape)
                        items.append((tier, shape, METHODS))
    return [it for it in items if it[0] <= max_tier]


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    """Median time of one call of ``fn`` in ms. GPU: CUDA events around each call, recorded
    without synchronising in between (the host may run ahead, as in training), so host launch
    overhead only counts when it starves the GPU. CPU: time.perf_counter."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class _OneLinear(torch.nn.Module):
    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def make_peft_layer(base: torch.nn.Linear, r: int, scale: float, p: float) -> torch.nn.Module:
    """PEFT's ``lora.Linear`` around ``base`` (via get_peft_model on a one-Linear module, so the
    adapter dtype follows PEFT's defaults: fp32 adapters for a bf16/fp16 base layer)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=p, target_modules=["lin"])
    model = get_peft_model(_OneLinear(base), cfg)
    return model.base_model.model.lin


class Case:
    """Tensors and step functions of one shape (built once, shared by all methods)."""

    def __init__(self, T, d_in, d_out, r, p, dtype, device, compile_backend):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.device = device
        self.p = p
        self.x = (torch.randn(T, d_in, generator=g) * 0.5).to(device=device, dtype=dtype)
        self.x.requires_grad_(True)
        self.gy = torch.randn(T, d_out, generator=g).to(device=device, dtype=dtype)
        self.base = torch.nn.Linear(d_in, d_out, bias=False).to(device=device, dtype=dtype)
        self.base.requires_grad_(False)
        self.lora_a = (torch.randn(r, d_in, generator=g) / math.sqrt(d_in)).to(device)
        self.lora_b = (torch.randn(d_out, r, generator=g) * 0.01).to(device)
        self.lora_a.requires_grad_(True)
        self.lora_b.requires_grad_(True)
        self.scale = 2.0
        self.seed = torch.tensor(1234, dtype=torch.int64, device=device)
        self.compile_backend = compile_backend
        self._peft = None
        self._peft_compiled = None

    def frozen(self):
        y = F.linear(self.x, self.base.weight)
        return torch.autograd.grad(y, (self.x,), self.gy)

    def graphlora(self):
        y = torch.ops.graphlora.lora_linear(self.x, self.base.weight, None, self.lora_a,
                                            self.lora_b, self.scale, self.p,
                                            self.seed if self.p > 0 else None)
        return torch.autograd.grad(y, (self.x, self.lora_a, self.lora_b), self.gy)

    def graphlora_cublas(self):
        with L.main_gemm_backend("torch"):
            return self.graphlora()

    def _peft_layer(self):
        if self._peft is None:
            layer = make_peft_layer(self.base, self.lora_a.shape[0], self.scale, self.p)
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(self.lora_a)
                layer.lora_B["default"].weight.copy_(self.lora_b)
            layer.train()
            self._peft = layer
        return self._peft

    def _peft_step(self, layer):
        y = layer(self.x)
        lp = self._peft_layer()
        return torch.autograd.grad(
            y, (self.x, lp.lora_A["default"].weight, lp.lora_B["default"].weight), self.gy)

    def peft(self):
        return self._peft_step(self._peft_layer())

    def peft_compile(self):
        if self._peft_compiled is None:
            self._peft_compiled = torch.compile(self._peft_layer(), backend=self.compile_backend,
                                                dynamic=False)
        return self._peft_step(self._peft_compiled)


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------

_COLUMNS = (["T", "d_in", "d_out", "r", "p", "frozen_ms"]
            + [f"R_{m}" for m in LORA_METHODS]
            + [f"vs_peft_{m}" for m in LORA_METHODS if m != "peft"])


def format_table(results: dict) -> str:
    """results: {(T, d_in, d_out, r, p): {method: ms}} -> text table."""
    lines = [" ".join(f"{c:>{max(7, len(c))}}" for c in _COLUMNS)]
    for (T, d_in, d_out, r, p), ms in results.items():
        frozen = ms.get("frozen")
        rs = {m: (ms[m] / frozen if (frozen and m in ms) else None) for m in LORA_METHODS}
        cells = [str(T), str(d_in), str(d_out), str(r), f"{p:g}",
                 f"{frozen:.3f}" if frozen else "-"]
        cells += [f"{rs[m]:.3f}" if rs[m] else "-" for m in LORA_METHODS]
        for m in LORA_METHODS:
            if m == "peft":
                continue
            ok = rs[m] is not None and rs["peft"] is not None
            cells.append(f"{rs[m] / rs['peft']:.3f}" if ok else "-")
        lines.append(" ".join(f"{v:>{max(7, len(c))}}" for v, c in zip(cells, _COLUMNS)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------------


def _env_info(device: torch.device) -> dict:
    info = {"kind": "env", "torch": torch.__version__, "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        info["triton"] = None
    try:
        import peft

        info["peft"] = peft.__version__
    except Exception:  # pragma: no cover
        info["peft"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_bench(args) -> int:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    methods_allowed = set(args.methods.split(",")) if args.methods else set(METHODS)
    if not cuda or L.triton_path_reason(torch.empty(1, 8, device=device, dtype=dtype),
                                        [torch.empty(8, 8, device=device, dtype=dtype)], [None],
                                        [torch.empty(4, 8, device=device)],
                                        [torch.empty(8, 4, device=device)]) is not None:
        methods_allowed.discard("graphlora_cublas")  # same as graphlora without the Triton path
    try:
        import peft  # noqa: F401
    except ImportError:
        print("peft is not installed: skipping the peft methods", file=sys.stderr)
        methods_allowed -= {"peft", "peft_compile"}

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    t_start = time.time()
    results: dict = {}
    out = open(args.out, "a", buffering=1) if args.out else None

    def emit(row):
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    emit({**_env_info(device), "dtype": args.dtype, "iters": args.iters, "warmup": args.warmup,
          "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"# device={device} dtype={args.dtype} torch={torch.__version__}", flush=True)
    stopped = False
    case_cache: dict = {}
    for tier, shape, methods in plan(args.tier, args.smoke):
        if stopped:
            break
        T, d_in, d_out, r, p = shape
        key = shape
        if key not in case_cache:
            case_cache.clear()  # one shape's tensors at a time
            if cuda:
                torch.cuda.empty_cache()
            case_cache[key] = Case(T, d_in, d_out, r, p, dtype, device, args.compile_backend)
        case = case_cache[key]
        row = results.setdefault(key, {})
        todo = [m for m in methods if m in methods_allowed]
        if "frozen" not in row and "frozen" not in todo and "frozen" in methods_allowed:
            todo.insert(0, "frozen")
        for m in todo:
            if args.budget_s and time.time() - t_start > args.budget_s:
                print(f"# time budget of {args.budget_s}s reached; stopping", flush=True)
                stopped = True
                break
            try:
                ms = time_ms(getattr(case, m), args.iters, args.warmup, device)
            except Exception as exc:  # keep going: report the failure in the output
                print(f"# {m} failed on {shape}: {type(exc).__name__}: {exc}", flush=True)
                emit({"kind": "error", "method": m, "T": T, "d_in": d_in, "d_out": d_out,
                      "r": r, "p": p, "error": f"{type(exc).__name__}: {exc}"})
                continue
            row[m] = ms
            frozen = row.get("frozen")
            emit({"kind": "timing", "tier": tier, "method": m, "T": T, "d_in": d_in,
                  "d_out": d_out, "r": r, "p": p, "dtype": args.dtype, "ms": ms,
                  "R": (ms / frozen) if frozen else None,
                  "elapsed_s": round(time.time() - t_start, 1)})
            print(f"# {m:17s} T={T} d_in={d_in} d_out={d_out} r={r} p={p:g}: {ms:.3f} ms"
                  + (f"  R={ms / frozen:.3f}" if frozen and m != "frozen" else ""), flush=True)
    table = format_table(results)
    print(table, flush=True)
    emit({"kind": "table", "text": table})
    if out:
        out.close()
    return 0


def _max_rel(a: torch.Tensor, truth: torch.Tensor) -> float:
    return ((a.double() - truth.double()).abs().max() / truth.double().abs().max().clamp_min(1e-30)
            ).item()


def _device(args) -> torch.device:
    return torch.device("cpu" if args.device == "cuda-interpreted-on-cpu" else args.device)


def run_check(args) -> int:
    """Triton path vs reference on GPU shapes; prints max |err| / max |truth| of y, dx, dA, dB
    for the Triton path and for the bf16/fp16 reference (PEFT numerics), both against an fp64
    evaluation with the same dropout mask. PASS if Triton <= 2 x reference + 3e-3 (the LoRA-side
    TF32 dots cost up to ~1e-3 on dA/dB)."""
    device = _device(args)
    if device.type != "cuda" and not args.tiny:
        return _on_cpu_interpreter(run_check, args, "--check")
    ok = True
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    print(f"# {gpu} torch={torch.__version__}")
    print(f"{'case':58s} {'y':>17s} {'dx':>17s} {'dA':>17s} {'dB':>17s}  (triton / reference)")
    bf, f32 = torch.bfloat16, torch.float32
    shapes = [(257, 1152, 4304, 16), (1000, 4096, 4096, 64), (2048, 4096, 14336, 16),
              (333, 14336, 4096, 8)]
    if args.tiny:
        shapes = [(37, 48, 40, 5), (21, 64, 32, 16), (9, 32, 48, 3), (5, 40, 16, 2)]
    # (main-GEMM backend, shape, x dtype, LoRA dtype): bf16 + fp32 adapters everywhere, the other
    # dtype pairs and the cuBLAS backend on two shapes (each new combination compiles kernels)
    cases = [("triton", s, bf, f32) for s in shapes]
    cases += [("triton", s, xd, ld) for s in shapes[:2]
              for xd, ld in ((bf, bf), (torch.float16, f32), (f32, f32))]
    cases += [("torch", s, bf, f32) for s in shapes[:2]]
    seed = torch.tensor(31337, dtype=torch.int64, device=device)
    for backend, (T, d_in, d_out, r), xd, ld in cases:
        for p in (0.0, 0.1):
            g = torch.Generator(device="cpu").manual_seed(T + d_in + r)
            x = torch.randn(T, d_in, generator=g).to(device, xd)
            w = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(device, xd)
            b = torch.randn(d_out, generator=g).to(device, xd)
            a = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(device, ld)
            bb = torch.randn(d_out, r, generator=g).to(device, ld)
            gy = torch.randn(T, d_out, generator=g).to(device, xd)
            reason = L.triton_path_reason(x, [w], [b], [a], [bb])
            with L.main_gemm_backend(backend):
                got = _fwd_bwd(torch.ops.graphlora.lora_linear, x, w, b, a, bb, gy, p,
                               seed)
            ref = _fwd_bwd(L.reference_lora_linear, x, w, b, a, bb, gy, p, seed)
            truth = _fwd_bwd(L.reference_lora_linear, x.double(), w.double(), b.double(),
                             a.double(), bb.double(), gy.double(), p, seed)
            cells = []
            for u, v, t in zip(got, ref, truth):
                eu, ev = _max_rel(u, t), _max_rel(v, t)
                good = eu <= 2 * ev + 3e-3
                ok &= good
                cells.append(f"{eu:.1e}/{ev:.1e}{'' if good else '!'}")
            name = (f"{backend:6s} T={T} {d_in}->{d_out} r={r} {str(xd)[6:]}/"
                    f"{str(ld)[6:]} p={p}")
            print(f"{name:58s} " + " ".join(f"{c:>17s}" for c in cells)
                  + ("" if reason is None else f"  [reference path: {reason}]"),
                  flush=True)
    # group op (q, k, v)
    for p in (0.0, 0.1):
        g = torch.Generator(device="cpu").manual_seed(5)
        T, d, outs, ranks = 1500, 4096, (4096, 1024, 1024), (16, 16, 8)
        if args.tiny:
            T, d, outs, ranks = 37, 48, (48, 16, 16), (5, 5, 3)
        x = torch.randn(T, d, generator=g).to(device, torch.bfloat16)
        ws = [(torch.randn(o, d, generator=g) / d**0.5).to(device, torch.bfloat16) for o in outs]
        as_ = [(torch.randn(r, d, generator=g) / d**0.5).to(device) for r in ranks]
        bbs = [torch.randn(o, r, generator=g).to(device) for o, r in zip(outs, ranks)]
        gys = [torch.randn(T, o, generator=g).to(device, torch.bfloat16) for o in outs]
        scales = [2.0, 1.0, 0.5]
        got = _group_fwd_bwd(torch.ops.graphlora.lora_linear_group, x, ws, as_, bbs, gys, scales,
                             p, seed)
        truth = _group_fwd_bwd(L.reference_lora_linear_group, x.double(),
                               [w.double() for w in ws], [a.double() for a in as_],
                               [b.double() for b in bbs], [t.double() for t in gys], scales, p,
                               seed)
        errs = [_max_rel(u, t) for u, t in zip(got, truth)]
        good = max(errs) < 3e-2
        ok &= good
        print(f"group qkv T={T} p={p}: max rel errors "
              + " ".join(f"{e:.1e}" for e in errs) + ("" if good else "  FAIL"), flush=True)
    print("CHECK PASS" if ok else "CHECK FAIL", flush=True)
    return 0 if ok else 1


def _fwd_bwd(fn, x, w, b, a, bb, gy, p, seed):
    x = x.detach().requires_grad_(True)
    a = a.detach().requires_grad_(True)
    bb = bb.detach().requires_grad_(True)
    y = fn(x, w, b, a, bb, 1.5, p, seed if p > 0 else None)
    dx, da, db = torch.autograd.grad(y, (x, a, bb), gy)
    return y.detach(), dx, da, db


def _group_fwd_bwd(fn, x, ws, as_, bbs, gys, scales, p, seed):
    x = x.detach().requires_grad_(True)
    as_ = [a.detach().requires_grad_(True) for a in as_]
    bbs = [b.detach().requires_grad_(True) for b in bbs]
    ys = fn(x, ws, [None] * len(ws), as_, bbs, scales, p, seed if p > 0 else None)
    grads = torch.autograd.grad(ys, (x, *as_, *bbs), gys)
    return [y.detach() for y in ys] + list(grads)


def _on_cpu_interpreter(fn, args, flag) -> int:
    """Run a GPU mode on CPU tensors through the Triton interpreter (tiny shapes; exercises the
    code, the timings mean nothing). Needs TRITON_INTERPRET=1 in the environment."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print(f"{flag} needs a CUDA device (or TRITON_INTERPRET=1 to exercise it on CPU)",
              file=sys.stderr)
        return 2
    args.tiny = True
    args.device = "cuda-interpreted-on-cpu"
    with L.triton_on_cpu():
        return fn(args)


def run_breakdown(args) -> int:
    """Per-kernel times of the Triton path for one shape (CUDA)."""
    device = _device(args)
    if device.type != "cuda" and not args.tiny:
        return _on_cpu_interpreter(run_breakdown, args, "--breakdown")
    from graphlora.ops import triton_kernels as K

    T, d_in, d_out, r = (int(v) for v in args.shape.split(","))
    if args.tiny:
        T, d_in, d_out, r = 37, 48, 40, 5
    p = args.dropout
    dtype = getattr(torch, args.dtype)
    case = Case(T, d_in, d_out, r, p, dtype, device, "inductor")
    x = case.x.detach()
    w = case.base.weight
    a, bb = case.lora_a.detach(), case.lora_b.detach()
    gy = case.gy
    seed_t = case.seed.reshape(1)
    xa = K._down(x, a, [0], [r], [case.scale], p, seed_t)
    dxa = torch.zeros_like(xa)
    db = torch.zeros(d_out, r, device=device)
    da = torch.zeros(r, d_in, device=device)
    y = torch.empty(T, d_out, device=device, dtype=dtype)
    dx = torch.empty(T, d_in, device=device, dtype=dtype)
    steps = {
        "frozen fwd (F.linear)": lambda: F.linear(x, w),
        "frozen dx (gy @ W)": lambda: gy @ w,
        "down: xa = drop(x) A^T": lambda: K._down(x, a, [0], [r], [case.scale], p, seed_t),
        "fwd GEMM + LoRA epilogue": lambda: K._gemm(
            y, [(x, w, w.stride(1), w.stride(0))], u=xa, v=bb, v_strides=(bb.stride(1),
                                                                          bb.stride(0)),
            terms=[(0, 0, r)]),
        "up_bwd: dxa, dB from dy": lambda: K._up_bwd(gy, bb, xa, dxa, db, 0, r, case.scale,
                                                     dtype),
        "dx GEMM + LoRA/dA epilogue": lambda: K._gemm(
            dx, [(gy, w, w.stride(0), w.stride(1))], u=dxa, v=a, v_strides=(a.stride(0),
                                                                            a.stride(1)),
            terms=[(0, 0, r)], x=x, da=da, p=p, seed_t=seed_t),
        "graphlora fwd+bwd (op)": case.graphlora,
        "frozen fwd+bwd": case.frozen,
    }
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    print(f"# T={T} d_in={d_in} d_out={d_out} r={r} p={p} {args.dtype} on {gpu}")
    for name, fn in steps.items():
        ms = time_ms(fn, args.iters, args.warmup, device)
        print(f"{name:32s} {ms * 1e3:10.1f} us", flush=True)
    return 0


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny fp32 shapes, 2 iterations")
    ap.add_argument("--check", action="store_true", help="GPU correctness check of the Triton path")
    ap.add_argument("--breakdown", action="store_true", help="per-kernel times for --shape")
    ap.add_argument("--tier", type=int, default=4, help="run tiers 0..N (default: all)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="stop starting measurements after this many seconds (0: no limit)")
    ap.add_argument("--out", default="bench_lora_linear.jsonl", help="JSON-lines output file")
    ap.add_argument("--methods", default="", help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) / float16 / float32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend of peft_compile (inductor; smoke: aot_eager)")
    ap.add_argument("--autotune", action="store_true",
                    help="--check: autotune the GEMM as in training (slower: more compiles)")
    ap.add_argument("--shape", default="4096,4096,4096,16", help="T,d_in,d_out,r for --breakdown")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout for --breakdown")
    args = ap.parse_args(argv)
    args.tiny = False
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny CPU problems: threads only add spin/sync overhead
    if args.smoke:
        args.dtype = args.dtype or "float32"
        args.iters = args.iters or 2
        args.warmup = args.warmup if args.warmup is not None else 1
        args.compile_backend = args.compile_backend or "aot_eager"
    else:
        args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
        args.iters = args.iters or 20
        args.warmup = args.warmup if args.warmup is not None else 5
        args.compile_backend = args.compile_backend or "inductor"
    if args.check:
        # one GEMM config instead of autotuning: the check compiles many dtype/mode variants
        if not args.autotune:
            os.environ.setdefault("GRAPHLORA_TRITON_AUTOTUNE", "0")
        return run_check(args)
    if args.breakdown:
        return run_breakdown(args)
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
