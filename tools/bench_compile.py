#!/usr/bin/env python
"""``compile=True``: one compile per block class (block programs) against compiling the whole-model program.

For a tiny model (default LLaVA, 4 layers per tower), each mode in its own process (fresh compile caches):
``graphlora.rewrite(..., compile=True)``, then a stream of training steps whose batch size and text length
vary. Reported per mode: rewrite time, the first step (which compiles), the compile-bearing steps after it
(a new shape that makes a new trace or a recompile), the steady step time, the traces made and the
TorchDynamo frames compiled.

    python tools/bench_compile.py                 # both modes, 8 batches
    python tools/bench_compile.py --family qwen2_vl --layers 2 --batches 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
_MARK = "BENCH_RESULT "


def child(family: str, layers: int, batches: int, mode: str) -> dict:
    import graphlora
    from graphlora.testing import zoo

    sys.path.insert(0, str(ROOT / "tools"))
    from bench_stream import POLICY, stream_shapes  # noqa: PLC0415

    model = zoo.build_tiny_model(family, layers=layers).train()
    shapes = stream_shapes(family, batches, seed=0)
    stream = [zoo.tiny_example_inputs(family, model, **s) for s in shapes]
    t0 = time.perf_counter()
    lora_model = graphlora.rewrite(model, POLICY, stream[0], compile=True, trace_mode=mode)
    rewrite_s = time.perf_counter() - t0
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for batch in stream:
        t0 = time.perf_counter()
        lora_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    from torch._dynamo.utils import counters

    steady = sorted(times[1:])[: max(1, len(times[1:]) // 2)]  # the faster half: steps that compiled nothing
    return dict(mode=mode, family=family, layers=layers, batches=batches, rewrite_s=rewrite_s,
                first_step_s=times[0], total_s=rewrite_s + sum(times), steady_step_s=statistics.median(steady),
                traces=lora_model.num_traces, frames_compiled=int(counters["frames"]["ok"]),
                step_times=[round(t, 3) for t in times])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llava")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(2)
        print(_MARK + json.dumps(child(args.family, args.layers, args.batches, args.child)))
        return []
    rows = []
    for mode in ("blocks", "whole"):
        done = subprocess.run([sys.executable, __file__, "--child", mode, "--family", args.family, "--layers",
                               str(args.layers), "--batches", str(args.batches)], capture_output=True, text=True,
                              cwd=ROOT, timeout=3600)
        line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith(_MARK)), None)
        if line is None:
            raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(line[len(_MARK):]))
        r = rows[-1]
        print(f"{mode:6s}: rewrite {r['rewrite_s']:.1f} s, first step {r['first_step_s']:.1f} s, total "
              f"{r['total_s']:.1f} s, steady step {1000 * r['steady_step_s']:.1f} ms, {r['traces']} traces, "
              f"{r['frames_compiled']} frames compiled; steps {r['step_times']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
