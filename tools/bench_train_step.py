"""Training-step time and peak memory: graphlora's rewritten model vs PEFT's ``get_peft_model``, side by side.

Same model (a random-weight LLaVA of about 100M parameters: a CLIP-style vision tower of 6 layers, width 512,
and a Llama text model of 8 layers, width 768, vocabulary 32000), same sites (full VLM: attention + MLP of both
towers, the sites graphlora selects; PEFT's ``target_modules`` is that exact list of module paths), same r and
alpha, dropout 0, same batch.

* Time: both models live in one process; after warm-up steps they take turns (graphlora, PEFT, graphlora, ...)
  so that both see the same machine load. One step = forward + backward + AdamW step + zero_grad. Reported: the
  median (and minimum) of ``--steps`` steps each.
* Memory: each model in its OWN subprocess (this script with ``--child``), same warm-up and steps. On CPU the
  peak RSS during the timed steps (``VmHWM`` after resetting it through ``/proc/self/clear_refs`` once warm) and
  the process's lifetime peak (``resource.getrusage``: includes rewriting/tracing); glibc's dynamic mmap
  threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) in both children so that freed activations leave RSS and the
  two models' figures stay comparable. On CUDA ``torch.cuda.max_memory_allocated`` over the timed steps.

    python tools/bench_train_step.py                 # ~100M config, prints a table (a few minutes on 2 cores)
    python tools/bench_train_step.py --smoke         # tiny config, 2 steps (the test suite runs this)
    python tools/bench_train_step.py --profile       # also: top ops of one step of each, by self CPU time
    python tools/bench_train_step.py --quantized nf4 # QLoRA: both over the same 4-bit base; 4-bit vs 16-bit weights
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

R = 16
ALPHA = 16
POLICY = dict(finetune_vision_layers=True, finetune_language_layers=True, finetune_attention_modules=True,
              finetune_mlp_modules=True, finetune_projector=False, r=R, lora_alpha=ALPHA, lora_dropout=0.0)


# ------------------------------------------------------------------------------------------------ model and data
def bench_config(smoke: bool):
    import transformers

    if smoke:
        from graphlora.testing import zoo

        return zoo.build_tiny_config("llava")
    vision = transformers.CLIPVisionConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                                           num_attention_heads=8, image_size=224, patch_size=32, projection_dim=512)
    text = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=1280, num_hidden_layers=8,
                                    num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999,
                                      image_seq_length=(224 // 32) ** 2, vision_feature_layer=-2,
                                      vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    return config


def build_base(smoke: bool, device: str, quantized: str | None = None):
    """The benchmark model in fp32; with ``quantized`` (nf4 / fp4 / int8) saved once and loaded back through
    ``from_pretrained`` with a ``BitsAndBytesConfig``, as a user loads a QLoRA base."""
    import transformers

    config = bench_config(smoke)
    if quantized and smoke:
        from graphlora.testing.quantized import widen_config

        widen_config(config)  # bitsandbytes' 4-bit CPU kernels want in-features that are multiples of 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlavaForConditionalGeneration(config)
    model = model.float().train()
    if not quantized:
        return model.to(device)
    from graphlora.testing.quantized import bnb_config

    directory = Path(tempfile.gettempdir()) / f"graphlora-bench-train-step-{'smoke' if smoke else '100m'}"
    if not (directory / "config.json").exists():
        model.save_pretrained(directory)
    bits, quant_type = (8, "nf4") if quantized == "int8" else (4, quantized)
    loaded = transformers.LlavaForConditionalGeneration.from_pretrained(
        directory, quantization_config=bnb_config(bits, quant_type, double_quant=True), device_map=device,
        dtype=torch.float32)
    return loaded.train()


def weight_breakdown(model: torch.nn.Module) -> dict[str, float]:
    """MB of a quantized model's weights: its bitsandbytes linears as stored (packed weights, block scales and
    other constants, bias) and as 16-bit tensors of the same shapes; its other parameters and buffers as
    loaded and in 16 bits."""
    from graphlora.quantized import bitsandbytes_format

    def nbytes(t):
        return t.numel() * t.element_size()

    quantized = quantized_16 = 0
    seen: set[int] = set()
    for m in model.modules():
        if bitsandbytes_format(m) is None:
            continue
        tensors = [m.weight] + ([m.bias] if m.bias is not None else [])
        state = getattr(m.weight, "quant_state", None)
        if state is not None:  # 4-bit: block scales and code tables
            tensors += [v for v in state.as_dict(packed=True).values() if isinstance(v, torch.Tensor)]
        scb = getattr(getattr(m, "state", None), "SCB", None)
        scb = scb if scb is not None else getattr(m.weight, "SCB", None)
        if scb is not None:  # 8-bit: per-row scales
            tensors.append(scb)
        quantized += sum(nbytes(t) for t in tensors)
        quantized_16 += 2 * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))
        seen.update(id(t) for t in (m.weight, m.bias) if t is not None)
    others = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in seen}
    other = sum(nbytes(t) for t in others.values())
    other_16 = sum(2 * t.numel() if t.is_floating_point() else nbytes(t) for t in others.values())
    mb = 2**20
    return {"quantized_linears_mb": quantized / mb, "quantized_linears_16bit_mb": quantized_16 / mb,
            "other_weights_mb": other / mb, "other_weights_16bit_mb": other_16 / mb}


def make_batch(model, smoke: bool, device: str) -> dict:
    from graphlora.families import synthesize_inputs

    batch = synthesize_inputs(model, batch_size=2, text_len=8 if smoke else 128, seed=0)
    return {k: v.to(device) for k, v in batch.items()}


def build(kind: str, smoke: bool, device: str, site_names: list[str] | None = None, fuse: bool = True,
          quantized: str | None = None):
    """(model, batch, setup seconds, site names) for kind "graphlora" or "peft"."""
    import graphlora

    base = build_base(smoke, device, quantized)
    batch = make_batch(base, smoke, device)
    t0 = time.perf_counter()
    if kind == "graphlora":
        model = graphlora.rewrite(base, POLICY, example_inputs=batch, fuse=fuse)
        names = sorted(s.name for s in model.sites)
    else:
        import peft

        if site_names is None:  # the sites graphlora picks (no training, no verification needed for the names)
            probe = graphlora.rewrite(build_base(smoke, device, quantized), POLICY, example_inputs=batch, verify=False)
            site_names = sorted(s.name for s in probe.sites)
            del probe
            t0 = time.perf_counter()
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(site_names), bias="none")
        model = peft.get_peft_model(base, config)
        names = sorted(n[len("base_model.model."):].rsplit(".lora_A", 1)[0]
                       for n, _ in model.named_parameters() if ".lora_A." in n)
    model.train()
    return model, batch, time.perf_counter() - t0, names


def train_step(model, optimizer, batch, device: str) -> tuple[float, float]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0, loss.item()


def optimizer_for(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters; a quantized linear's weight counts its in x out elements, not its packed bytes."""
    from graphlora.quantized import bitsandbytes_format

    weights = {}
    for m in model.modules():
        if bitsandbytes_format(m) is not None:
            weights[id(m.weight)] = m.in_features * m.out_features
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(weights.get(i, p.numel()) for i, p in {id(p): p for p in model.parameters()}.items())
    return trainable, total


# ------------------------------------------------------------------------------------------------ memory (child)
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def child(kind: str, smoke: bool, device: str, warmup: int, steps: int, sites: list[str] | None,
          fuse: bool = True, quantized: str | None = None) -> dict:
    model, batch, setup_s, names = build(kind, smoke, device, sites, fuse, quantized)
    optimizer = optimizer_for(model)
    for _ in range(warmup):
        train_step(model, optimizer, batch, device)
    out = {"kind": kind, "setup_s": setup_s, "sites": len(names)}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            train_step(model, optimizer, batch, device)
        out.update(step_peak_mb=torch.cuda.max_memory_allocated() / 2**20, before_steps_mb=base / 2**20,
                   memory="torch.cuda.max_memory_allocated")
    else:
        before = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
            reset = True
        except OSError:
            reset = False
        for _ in range(steps):
            train_step(model, optimizer, batch, device)
        out.update(step_peak_mb=_status_kb("VmHWM") / 1024 if reset else float("nan"), before_steps_mb=before / 1024,
                   memory="peak RSS (VmHWM reset before the steps)")
    out["process_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_children(kinds: list[str], args, sites: list[str], parallel: bool = False) -> dict[str, dict]:
    """Run one memory child per kind (one after the other; ``parallel`` only for --smoke, whose numbers mean
    nothing): {kind: result}."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    results = {}
    running = []
    for kind in kinds:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--device", args.device,
               "--warmup", str(args.warmup), "--steps", str(args.mem_steps), "--threads", str(args.threads),
               "--sites-json", json.dumps(sites)] + (["--smoke"] if args.smoke else []) + \
              (["--no-fuse"] if args.no_fuse else []) + (["--quantized", args.quantized] if args.quantized else [])
        if not parallel:
            print(f"memory: {kind} in its own process ...", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        running.append((kind, proc))
        if not parallel:
            results.update(_collect(*running.pop()))
    for kind, proc in running:
        results.update(_collect(kind, proc))
    return results


def _collect(kind: str, proc: subprocess.Popen) -> dict[str, dict]:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} memory child failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    line = [ln for ln in stdout.splitlines() if ln.startswith("{")][-1]
    return {kind: json.loads(line)}


# ------------------------------------------------------------------------------------------------ profile
def profile_steps(model, optimizer, batch, device: str, steps: int = 3, top: int = 12) -> tuple[str, dict]:
    """(table of the top ops by self CPU time over ``steps`` steps, per-step totals by group in ms)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(model, optimizer, batch, device)
    events = prof.key_averages()
    groups = {"matmul (aten::mm/addmm/bmm)": 0.0, "attention (sdpa)": 0.0,
              "graphlora custom ops (self, incl. autograd glue)": 0.0, "everything else": 0.0}
    calls = 0
    for e in events:
        name = e.key
        if name.startswith("ProfilerStep") or name.startswith("autograd::engine::evaluate_function"):
            continue  # wrappers: their self time is bookkeeping, their children are counted on their own
        calls += e.count
        if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
            group = "matmul (aten::mm/addmm/bmm)"
        elif "scaled_dot_product" in name:
            group = "attention (sdpa)"
        elif "graphlora" in name:
            group = "graphlora custom ops (self, incl. autograd glue)"
        else:
            group = "everything else"
        groups[group] += e.self_cpu_time_total / 1000 / steps
    groups["total self CPU"] = sum(groups.values())
    groups["op calls per step"] = calls / steps
    return events.table(sort_by="self_cpu_time_total", row_limit=top), groups


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config, 2 steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default 5; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; smoke 1)")
    parser.add_argument("--mem-steps", type=int, default=None, help="steps in each memory child (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no-fuse", action="store_true", help="graphlora without the fused lora_linear op")
    parser.add_argument("--quantized", choices=("nf4", "fp4", "int8"), default=None,
                        help="QLoRA: both models over the same bitsandbytes-quantized base (graphlora vs PEFT QLoRA)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--child", choices=("graphlora", "peft"), help=argparse.SUPPRESS)
    parser.add_argument("--sites-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    args.mem_steps = args.mem_steps or 2
    torch.set_num_threads(args.threads)

    if args.child:
        sites = json.loads(args.sites_json) if args.sites_json else None
        result = child(args.child, args.smoke, args.device, args.warmup, args.steps, sites, not args.no_fuse,
                       args.quantized)
        print(json.dumps(result))
        return result

    import peft
    import transformers

    print(f"building both models ({'smoke' if args.smoke else '~100M'} config, device {args.device}, "
          f"{args.threads} thread(s){', base in ' + args.quantized if args.quantized else ''}) ...", flush=True)
    g_model, batch, g_setup, sites = build("graphlora", args.smoke, args.device, fuse=not args.no_fuse,
                                           quantized=args.quantized)
    p_model, p_batch, p_setup, p_sites = build("peft", args.smoke, args.device, sites, quantized=args.quantized)
    weights = {}
    if args.quantized:
        weights = weight_breakdown(g_model.base_model)
        w = weights
        print(f"quantized linears: {w['quantized_linears_mb']:.1f} MB in {args.quantized} (constants included) "
              f"against {w['quantized_linears_16bit_mb']:.1f} MB in 16 bits "
              f"({w['quantized_linears_mb'] / w['quantized_linears_16bit_mb']:.3f}); whole model as loaded "
              f"{w['quantized_linears_mb'] + w['other_weights_mb']:.1f} MB (other weights in fp32), all in 16 bits "
              f"{w['quantized_linears_16bit_mb'] + w['other_weights_16bit_mb']:.1f} MB; 4-bit linears + 16-bit "
              f"rest {w['quantized_linears_mb'] + w['other_weights_16bit_mb']:.1f} MB", flush=True)
    if p_sites != sites:
        raise RuntimeError(f"PEFT adapted other modules than graphlora: {sorted(set(p_sites) ^ set(sites))[:5]}")
    g_trainable, total = count_params(g_model)
    p_trainable, _ = count_params(p_model)
    tokens = int(batch["input_ids"].numel())
    print(f"model: {total / 1e6:.1f}M parameters; {len(sites)} sites, r={R}: {g_trainable:,} trainable (graphlora), "
          f"{p_trainable:,} (PEFT); batch {tuple(batch['input_ids'].shape)} tokens + "
          f"{tuple(batch['pixel_values'].shape)} pixels", flush=True)

    optims = {"graphlora": optimizer_for(g_model), "peft": optimizer_for(p_model)}
    models = {"graphlora": (g_model, batch), "peft": (p_model, p_batch)}
    first_loss = {}
    for kind, (model, b) in models.items():
        for i in range(args.warmup):
            _, loss = train_step(model, optims[kind], b, args.device)
            first_loss.setdefault(kind, loss)
    times: dict[str, list[float]] = {"graphlora": [], "peft": []}
    for _ in range(args.steps):
        for kind, (model, b) in models.items():
            seconds, _ = train_step(model, optims[kind], b, args.device)
            times[kind].append(seconds)
    profiles, profile_groups = {}, {}
    if args.profile:
        for kind, (model, b) in models.items():
            profiles[kind], profile_groups[kind] = profile_steps(model, optims[kind], b, args.device)

    memory = {}
    if not args.no_memory:
        del g_model, p_model, models, optims
        memory = run_children(["graphlora", "peft"], args, sites, parallel=args.smoke)

    rows = [
        ("step time, median (s)", statistics.median(times["graphlora"]), statistics.median(times["peft"])),
        ("step time, min (s)", min(times["graphlora"]), min(times["peft"])),
    ]
    if memory:
        rows += [
            (f"peak memory during steps (MB; {memory['graphlora']['memory']})",
             memory["graphlora"]["step_peak_mb"], memory["peft"]["step_peak_mb"]),
            ("memory before the timed steps (MB)", memory["graphlora"]["before_steps_mb"],
             memory["peft"]["before_steps_mb"]),
            ("  step peak minus that (MB: activations, gradients)",
             memory["graphlora"]["step_peak_mb"] - memory["graphlora"]["before_steps_mb"],
             memory["peft"]["step_peak_mb"] - memory["peft"]["before_steps_mb"]),
            ("process peak RSS incl. setup (MB; getrusage)", memory["graphlora"]["process_peak_mb"],
             memory["peft"]["process_peak_mb"]),
        ]
    rows.append(("setup: rewrite / get_peft_model (s)", g_setup, p_setup))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'graphlora':>10}  {'PEFT':>10}  {'graphlora/PEFT':>14}"]
    for name, g, p in rows:
        ratio = g / p if p else float("nan")
        lines.append(f"{name:{width}}  {g:10.3f}  {p:10.3f}  {ratio:14.2f}")
    table = "\n".join(lines)
    meta = {
        "date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "device": args.device, "threads": args.threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "params_m": total / 1e6,
        "sites": len(sites), "r": R, "graphlora_fuse": not args.no_fuse, "quantized": args.quantized,
        "weights_mb": weights, "tokens": tokens, "steps": args.steps,
        "warmup": args.warmup,
        "first_loss": first_loss,
    }
    print()
    print(table)
    print(f"\n{json.dumps(meta)}")
    print(f"graphlora step times: {[round(t, 3) for t in times['graphlora']]}")
    print(f"PEFT step times:      {[round(t, 3) for t in times['peft']]}")
    for kind, text in profiles.items():
        print(f"\n--- {kind}: 3 steps, top ops by self CPU time ---\n{text}")
    if profile_groups:
        print("\nself CPU time per step by group (ms; torch.profiler, 3 steps each):")
        print(f"{'':50}  {'graphlora':>10}  {'PEFT':>10}")
        for group in profile_groups["graphlora"]:
            print(f"{group:50}  {profile_groups['graphlora'][group]:10.1f}  {profile_groups['peft'][group]:10.1f}")
    result = {"rows": rows, "times": times, "memory": memory, "meta": meta, "table": table,
              "profile_groups": profile_groups}
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1))
    return result


if __name__ == "__main__":
    main()
