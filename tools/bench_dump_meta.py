#!/usr/bin/env python
"""Benchmark of ``graphlora dump`` on the meta device: wall time and peak memory per model.

Each model config directory (default: every ``tests/data/configs/*/``, the published configs of
Llama-3.2-11B-Vision-Instruct and Qwen2.5-VL-7B-Instruct) is dumped in its **own process** (peak RSS
is per process), with every format, under ``--policy`` (default: the ``full-vlm`` preset, the policy
with the most sites). Per model it records

* ``dump_s``: the ``graphlora.dump.dump()`` call (build on meta, export, passes, all files);
* ``process_s``: the whole child process, imports included (what a user waits for);
* ``peak_rss_mb``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the child at its end;
* the stage timings, the number of graph nodes and of LoRA sites;
* or, when the dump fails, the error (the row says FAILED and why; the exit status is 1).

``--baseline`` adds a bare ``torch.export`` of the same meta model and inputs (graphlora's
``export_call``, no passes, no files) in another process, for comparison. Goals (docs/dump.md): under
60 s and 4 GB per model.

Examples::

    python tools/bench_dump_meta.py
    python tools/bench_dump_meta.py --baseline --json bench_dump_meta.json
    python tools/bench_dump_meta.py tests/data/configs/Llama-3.2-11B-Vision-Instruct
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parent.parent
_MARK = "BENCH_RESULT "
GOAL_SECONDS = 60.0
GOAL_RSS_MB = 4096.0


def _peak_rss_mb() -> float:
    # Linux reports kilobytes, macOS bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _child_dump(config: str, policy: str, out: str) -> dict:
    import io

    sys.path.insert(0, str(_ROOT))
    from graphlora.dump import dump

    t_import = time.perf_counter() - _T0
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        result = dump(config, policy, out, progress=log)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        text = str(e).strip()
        return dict(ok=False, error=f"{type(e).__name__}: {text.splitlines()[0] if text else ''}",
                    dump_s=time.perf_counter() - t0, import_s=t_import, peak_rss_mb=_peak_rss_mb(),
                    log=log.getvalue())
    return dict(
        ok=True, dump_s=time.perf_counter() - t0, import_s=t_import, peak_rss_mb=_peak_rss_mb(),
        model=type(result.lora_model.base_model).__name__, meta=result.meta, sites=len(result.lora_model.sites),
        skipped=len(result.lora_model.skipped_sites), nodes=result.stages[-1].num_nodes,
        stages=[dict(name=s.name, seconds=round(s.seconds, 2), nodes=s.num_nodes) for s in result.stages],
        files=len(result.files), log=log.getvalue(),
    )


def _child_baseline(config: str) -> dict:
    sys.path.insert(0, str(_ROOT))
    from graphlora.families import synthesize_inputs
    from graphlora.model_spec import load_model_spec
    from graphlora.trace import FORCED_KWARGS, export_call, split_call

    t_import = time.perf_counter() - _T0
    t0 = time.perf_counter()
    try:
        model, _ = load_model_spec(config, meta=True)
        tensors, constants = split_call(synthesize_inputs(model, device="meta"))
        ep = export_call(model, tensors, {**constants, **FORCED_KWARGS})
    except Exception as e:  # noqa: BLE001
        text = str(e).strip()
        return dict(ok=False, error=f"{type(e).__name__}: {text.splitlines()[0] if text else ''}",
                    dump_s=time.perf_counter() - t0, import_s=t_import, peak_rss_mb=_peak_rss_mb())
    return dict(ok=True, dump_s=time.perf_counter() - t0, import_s=t_import, peak_rss_mb=_peak_rss_mb(),
                nodes=len(ep.graph_module.graph.nodes))


def _run_child(args: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=str(_ROOT))
    except subprocess.TimeoutExpired:
        return dict(ok=False, error=f"timed out after {timeout:.0f} s", process_s=time.perf_counter() - t0)
    process_s = time.perf_counter() - t0
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_MARK):
            result = json.loads(line[len(_MARK):])
            result["process_s"] = process_s
            return result
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return dict(ok=False, error=f"child exited with {done.returncode}: {' | '.join(tail)}", process_s=process_s)


def machine() -> dict:
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    info = dict(date=datetime.date.today().isoformat(), cpus=os.cpu_count(), memory_gb=mem_gb,
                platform=platform.platform(), python=platform.python_version())
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:  # pragma: no cover
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", help="config directories (default: tests/data/configs/*/)")
    parser.add_argument("--policy", default="full-vlm", help="policy file or preset (default: full-vlm)")
    parser.add_argument("--out-dir", default=None, help="where the dumps go (default: a temporary directory)")
    parser.add_argument("--baseline", action="store_true", help="also time a bare torch.export of each model")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    parser.add_argument("--child", choices=("dump", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        config = args.configs[0]
        result = _child_dump(config, args.policy, args.child_out) if args.child == "dump" else _child_baseline(config)
        print(_MARK + json.dumps(result), flush=True)
        return 0

    default = (_ROOT / "tests" / "data" / "configs").glob("*/config.json")
    configs = args.configs or sorted(str(p.parent) for p in default)
    info = machine()
    print(f"machine: {info['cpus']} CPUs, {info['memory_gb']} GB, {info['platform']}, python {info['python']}, "
          f"torch {info.get('torch')}, transformers {info.get('transformers')}, load {info.get('load_average')}, "
          f"{info['date']}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            name = Path(config).name
            out = str(Path(args.out_dir) / name) if args.out_dir else str(Path(tmp) / name)
            result = _run_child(["--child", "dump", "--policy", args.policy, "--child-out", out, config], args.timeout)
            result.update(config=name, kind="dump")
            rows.append(result)
            _print_row(result)
            if args.baseline:
                base = _run_child(["--child", "baseline", config], args.timeout)
                base.update(config=name, kind="bare export")
                rows.append(base)
                _print_row(base)
    failed = [r for r in rows if not r.get("ok")]
    over = [r for r in rows if r.get("ok") and r["kind"] == "dump"
            and (r["process_s"] > GOAL_SECONDS or r["peak_rss_mb"] > GOAL_RSS_MB)]
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=info, policy=args.policy, goals=dict(
            seconds=GOAL_SECONDS, rss_mb=GOAL_RSS_MB), results=rows), indent=1) + "\n")
    for r in over:
        print(f"over goal: {r['config']} ({r['process_s']:.1f} s, {r['peak_rss_mb']:.0f} MB; goal "
              f"{GOAL_SECONDS:.0f} s, {GOAL_RSS_MB:.0f} MB)")
    return 1 if failed else 0


def _print_row(r: dict) -> None:
    if r.get("ok"):
        extra = f", {r['sites']} LoRA sites, {r['nodes']} nodes" if "sites" in r else f", {r.get('nodes')} nodes"
        print(f"{r['config']:<34} {r['kind']:<12} ok      call {r['dump_s']:6.1f} s  process {r['process_s']:6.1f} s  "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB{extra}", flush=True)
        for stage in r.get("stages", []):
            print(f"{'':<48}{stage['name']:<32} {stage['seconds']:6.2f} s  {stage['nodes']} nodes")
    else:
        print(f"{r['config']:<34} {r['kind']:<12} FAILED  {r.get('error')}"
              + (f"  (peak RSS {r['peak_rss_mb']:.0f} MB)" if "peak_rss_mb" in r else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
