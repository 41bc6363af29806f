#!/usr/bin/env python
"""Training on a realistic stream of batches: graphlora vs PEFT, same model, sites and batches.

Real training data has many shapes: the last batch is short, captions differ in length, and
dynamic-resolution processors (Qwen2/2.5/3-VL, LLaVA-NeXT, Mistral 3, Idefics3 tiles, Mllama tiles) give
every image its own grid. This benchmark feeds both models the same stream of batches whose batch size,
text length and image size vary as the family's processor would make them, and reports per family:

* ``traces``: programs graphlora traced over the whole stream, and its block classes (the goal: one
  program per block class and train/eval mode, none made after the first batch);
* ``rewrite_s`` / ``setup_s``: ``graphlora.rewrite()`` against ``peft.get_peft_model()``;
* ``total_s``: setup plus every step; ``steady_s``: every step after the first batch;
* the ratios graphlora / PEFT of both.

One step = forward + backward + AdamW step + zero_grad. The two models take turns batch by batch, so both
see the same machine load. PEFT's ``target_modules`` is graphlora's exact site list (full VLM, attention + MLP
of both towers), r = 16, alpha = 16, dropout 0.

Modes::

    python tools/bench_stream.py                         # 9 families, 12 layers per tower, tiny widths, 16 batches
    python tools/bench_stream.py --config 100m --batches 32   # the ~100M-parameter LLaVA of bench_train_step.py
    python tools/bench_stream.py --meta                  # rewrite() of published configs on meta vs one bare export
    python tools/bench_stream.py --smoke                 # 2 families, 4 batches (the test suite runs this)

``--meta`` runs, each in its own process, ``graphlora.rewrite()`` of the Llama-3.2-11B-Vision and
Qwen2.5-VL-7B configs (tests/data/configs) on the meta device and one bare ``torch.export`` of the same model
and inputs, and reports both times and their ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "mistral3", "idefics3", "llava", "mllama", "gemma3"]
R, ALPHA = 16, 16
POLICY = dict(finetune_vision_layers=True, finetune_language_layers=True, finetune_attention_modules=True,
              finetune_mlp_modules=True, finetune_projector=False, r=R, lora_alpha=ALPHA, lora_dropout=0.0)
META_CONFIGS = ["Llama-3.2-11B-Vision-Instruct", "Qwen2.5-VL-7B-Instruct"]
_MARK = "BENCH_RESULT "

#: Image sizes (h, w) in pixels that each family's processor produces for the tiny configs: multiples of the
#: patch (and merge) size for dynamic-resolution towers; original sizes that the processor tiles for tiling
#: families; None where the processor resizes every image to one size (LLaVA, Gemma 3).
IMAGE_SIZES = {
    "qwen2_vl": [(16, 16), (16, 32), (32, 16), (24, 32), (32, 32), (40, 24), (16, 48)],
    "qwen2_5_vl": [(16, 16), (16, 32), (32, 16), (24, 32), (32, 32), (40, 24), (16, 48)],
    "qwen3_vl": [(16, 16), (16, 32), (32, 16), (24, 32), (32, 32), (40, 24), (16, 48)],
    "llava_next": [(16, 16), (16, 32), (32, 16), (32, 32), (24, 40), (40, 24)],
    "mistral3": [(16, 16), (16, 32), (32, 16), (24, 32), (32, 32), (32, 24)],
    "idefics3": [(16, 16), (32, 32), (16, 32), (48, 32), (32, 48)],
    "mllama": [(16, 16), (16, 32), (32, 16), (32, 32)],
    "llava": None,
    "gemma3": None,
}


# ------------------------------------------------------------------------------------------------ the stream
def stream_shapes(family: str, n: int, seed: int, text_range=(5, 24), batch_range=(1, 3)) -> list[dict]:
    """``n`` batch descriptions (batch size, text length, padding, image size) drawn as a dataset would give them."""
    rng = random.Random(seed)
    sizes = IMAGE_SIZES.get(family)
    shapes = []
    for i in range(n):
        batch = rng.randint(*batch_range)
        shape = dict(batch_size=batch, text_len=rng.randint(*text_range), seed=i)
        if batch > 1:
            shape["pad_tokens"] = rng.randint(0, 4)
        if sizes:
            shape["image_size"] = rng.choice(sizes)
        shapes.append(shape)
    return shapes


def make_batch(model, shape: dict, device: str) -> dict:
    from graphlora.families import synthesize_inputs

    batch = synthesize_inputs(model, **shape)
    return {k: v.to(device) for k, v in batch.items()}


def describe_shapes(batches: list[dict]) -> int:
    """Number of distinct shape signatures among the batches."""
    return len({tuple((k, tuple(v.shape)) for k, v in sorted(b.items()) if isinstance(v, torch.Tensor))
                for b in batches})


# ------------------------------------------------------------------------------------------------ models
def build_model(family: str, layers: int, config: str, device: str):
    if config == "100m":
        from tools.bench_train_step import build_base  # noqa: PLC0415 - the ~100M LLaVA

        return build_base(False, device)
    from graphlora.testing import zoo

    return zoo.build_tiny_model(family, layers=layers).train().to(device)


def step(model, optimizer, batch, device: str) -> tuple[float, float]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0, loss.item()


def run_family(family: str, args) -> dict:
    import graphlora
    import peft

    n = args.batches
    shapes = stream_shapes(family, n, args.seed, text_range=args.text_range, batch_range=args.batch_range)
    g_base = build_model(family, args.layers, args.config, args.device)
    p_base = build_model(family, args.layers, args.config, args.device)
    batches = [make_batch(g_base, s, args.device) for s in shapes]

    t0 = time.perf_counter()
    g_model = graphlora.rewrite(g_base, POLICY, example_inputs=batches[0])
    rewrite_s = time.perf_counter() - t0
    sites = sorted(s.name for s in g_model.sites)
    t0 = time.perf_counter()
    p_model = peft.get_peft_model(p_base, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                          target_modules=sites, bias="none"))
    setup_s = time.perf_counter() - t0
    p_model.train()
    with torch.no_grad():  # same LoRA A matrices (B is zero in both): both runs train the same numbers
        for site in g_model.sites:
            p_model.get_submodule(f"base_model.model.{site.name}").lora_A["default"].weight.copy_(
                g_model.get_submodule(site.module).lora_A.weight)
    optimizers = {"graphlora": torch.optim.AdamW([p for p in g_model.parameters() if p.requires_grad], lr=1e-3),
                  "peft": torch.optim.AdamW([p for p in p_model.parameters() if p.requires_grad], lr=1e-3)}
    times: dict[str, list[float]] = {"graphlora": [], "peft": []}
    losses: dict[str, list[float]] = {"graphlora": [], "peft": []}
    traces_after_first = None
    for i, batch in enumerate(batches):
        order = (("graphlora", g_model), ("peft", p_model))
        # Alternate which one steps first, so that neither always runs with the other's data in the caches.
        for kind, model in order if i % 2 == 0 else order[::-1]:
            seconds, loss = step(model, optimizers[kind], batch, args.device)
            times[kind].append(seconds)
            losses[kind].append(loss)
        if i == 0:
            traces_after_first = g_model.num_traces
    programs = [t for t in g_model.traces if t.kind == "program"]
    classes = sorted({t.unit or t.path or "<whole model>" for t in programs})
    g_total, p_total = rewrite_s + sum(times["graphlora"]), setup_s + sum(times["peft"])
    g_steady, p_steady = sum(times["graphlora"][1:]), sum(times["peft"][1:])
    return dict(
        family=family, config=args.config, layers=args.layers, batches=n, distinct_shapes=describe_shapes(batches),
        params_m=sum(p.numel() for p in {id(p): p for p in g_base.parameters()}.values()) / 1e6,
        sites=len(sites), trace_mode=str(g_model.trace_mode), traces=len(programs),
        traces_after_first_batch=len(programs) - traces_after_first, block_classes=classes,
        trace_log=[t.describe() for t in programs],
        rewrite_s=rewrite_s, setup_s=setup_s, total_s=g_total, peft_total_s=p_total, total_ratio=g_total / p_total,
        steady_s=g_steady, peft_steady_s=p_steady, steady_ratio=g_steady / p_steady if p_steady else float("nan"),
        median_step_s=statistics.median(times["graphlora"][1:] or times["graphlora"]),
        peft_median_step_s=statistics.median(times["peft"][1:] or times["peft"]),
        first_loss=(losses["graphlora"][0], losses["peft"][0]), last_loss=(losses["graphlora"][-1], losses["peft"][-1]),
        step_times={k: [round(t, 4) for t in v] for k, v in times.items()}, shapes=shapes,
    )


# ------------------------------------------------------------------------------------------------ meta mode
def _child_meta(config: str, what: str) -> dict:
    import graphlora
    from graphlora.errors import GraphLoraError
    from graphlora.families import synthesize_inputs
    from graphlora.model_spec import load_model_spec
    from graphlora.trace import FORCED_KWARGS, export_call, split_call

    path = ROOT / "tests" / "data" / "configs" / config
    model, _ = load_model_spec(str(path), meta=True)
    t0 = time.perf_counter()
    if what == "export":
        tensors, constants = split_call(synthesize_inputs(model, device="meta"))
        try:
            export_call(model, tensors, {**constants, **FORCED_KWARGS})
            extra = {}
        except GraphLoraError as e:  # Qwen2.5-VL: the whole model computes shapes from image metadata
            extra = dict(failed=str(e).splitlines()[0][:300])
    else:
        lora_model = graphlora.rewrite(model, POLICY, synthesize_inputs(model))
        extra = dict(sites=len(lora_model.sites), traces=lora_model.num_traces, trace_mode=str(lora_model.trace_mode),
                     trace_log=[t.describe() for t in lora_model.traces])
    return dict(config=config, what=what, seconds=time.perf_counter() - t0, **extra)


def _run_child(args: list[str], timeout: float = 3600) -> dict:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    raise RuntimeError(f"child {args} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def run_meta(configs: list[str]) -> list[dict]:
    rows = []
    for config in configs:
        export = _run_child(["--child-meta", config, "export"])
        rewrite = _run_child(["--child-meta", config, "rewrite"])
        failed = export.get("failed")
        rows.append(dict(config=config, export_s=None if failed else export["seconds"], export_failed=failed,
                         rewrite_s=rewrite["seconds"], ratio=None if failed else rewrite["seconds"] / export["seconds"],
                         sites=rewrite.get("sites"), traces=rewrite.get("traces"),
                         trace_mode=rewrite.get("trace_mode"), trace_log=rewrite.get("trace_log")))
        baseline = (f"bare export fails after {export['seconds']:.1f} s ({failed})" if failed else
                    f"bare export {export['seconds']:.1f} s, ratio {rows[-1]['ratio']:.2f}")
        print(f"{config}: rewrite {rewrite['seconds']:.1f} s, {baseline} ({rewrite.get('traces')} traces)", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ main
def machine(args) -> dict:
    import peft
    import transformers

    return dict(date=datetime.date.today().isoformat(), platform=platform.platform(), cpus=os.cpu_count(),
                device=args.device, threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, peft=peft.__version__)


def format_rows(rows: list[dict]) -> str:
    header = ("family", "shapes", "traces", "after 1st", "rewrite s", "PEFT setup s", "total ratio", "steady ratio",
              "step ms", "PEFT step ms")
    table = [header]
    for r in rows:
        table.append((r["family"], str(r["distinct_shapes"]), f"{r['traces']} ({len(r['block_classes'])} classes)",
                      str(r["traces_after_first_batch"]), f"{r['rewrite_s']:.1f}", f"{r['setup_s']:.2f}",
                      f"{r['total_ratio']:.2f}", f"{r['steady_ratio']:.2f}", f"{1000 * r['median_step_s']:.1f}",
                      f"{1000 * r['peft_median_step_s']:.1f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in table)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=None, help=f"default: {' '.join(FAMILIES)}")
    parser.add_argument("--layers", type=int, default=12, help="layers per tower of the tiny configs (default 12)")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--config", choices=("tiny", "100m"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--meta", action="store_true", help="rewrite() of published configs on meta vs bare export")
    parser.add_argument("--smoke", action="store_true", help="2 families, 2 layers, 4 batches")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child-meta", nargs=2, metavar=("CONFIG", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_meta:
        result = _child_meta(*args.child_meta)
        print(_MARK + json.dumps(result))
        return result
    info = machine(args)
    if args.meta:
        rows = run_meta(META_CONFIGS)
        result = dict(machine=info, meta=rows)
    else:
        if args.smoke:
            args.layers, args.batches = 2, 4
        families = args.families or (["qwen2_vl", "llava"] if args.smoke else FAMILIES)
        if args.config == "100m":
            families = ["llava"]
            args.text_range, args.batch_range = (48, 160), (1, 3)
        else:
            args.text_range, args.batch_range = (5, 24), (1, 3)
        rows = []
        for family in families:
            print(f"{family}: {args.batches} batches ...", flush=True)
            rows.append(run_family(family, args))
            r = rows[-1]
            print(f"  traces {r['traces']} ({r['traces_after_first_batch']} after the first batch), total ratio "
                  f"{r['total_ratio']:.2f}, steady ratio {r['steady_ratio']:.2f}", flush=True)
        print()
        print(format_rows(rows))
        result = dict(machine=info, rows=rows)
    print("\n" + json.dumps(info))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
