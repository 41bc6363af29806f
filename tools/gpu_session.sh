#!/usr/bin/env bash
# The one prepared script for a session that is lent a GPU (see docs/benchmarks.md): kernel check, the
# per-linear benchmark tiers, the training-step benchmark and the shape-stream benchmark on CUDA, each
# under its own time limit so that one that hangs leaves the others their time. Logs go to $OUT (or
# ./gpu_out). Packages the device image lacks (tomli_w, pydantic and its cp312 pydantic_core wheel, and
# bitsandbytes, all unpacked) are carried in .gpu_deps/ and put on PYTHONPATH; the device's own python3
# (torch, triton, transformers, peft) runs everything. Prepare .gpu_deps here first:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 pydantic-core==<venv's>
#   then unzip it, bitsandbytes' wheel and copy tomli_w, pydantic, annotated_types, typing_inspection from the venv.
#
#   tools/gpu_session.sh [check_s] [bench_s] [train_s] [stream_s] [qlora_s]
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
CHECK_S=${1:-150}
BENCH_S=${2:-150}
TRAIN_S=${3:-120}
STREAM_S=${4:-60}
QLORA_S=${5:-120}
PY=${PY:-python3}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda)'
  $PY -c 'import peft; print("peft", peft.__version__)' || echo "peft missing"
} 2>&1 | tee "$OUT/env.log"
$PY -c 'import graphlora; print("graphlora imports")' 2>&1 | tail -3; [ "${PIPESTATUS[0]}" = 0 ] || { echo "graphlora does not import: stopping"; exit 3; }

echo "=== check (limit ${CHECK_S}s)"
timeout "$CHECK_S" $PY tools/bench_lora_linear.py --check 2>&1 | tee "$OUT/check.log" | tail -40
echo "check rc=${PIPESTATUS[0]}"

echo "=== per-linear tiers (budget ${BENCH_S}s)"
timeout $((BENCH_S + 60)) $PY tools/bench_lora_linear.py --tier 4 --budget-s "$BENCH_S" \
  --out "$OUT/bench_lora_linear.jsonl" 2>&1 | tee "$OUT/bench.log" | grep -v '^# ' | tail -30
echo "bench rc=${PIPESTATUS[0]}"

echo "=== training step (limit ${TRAIN_S}s)"
timeout "$TRAIN_S" $PY tools/bench_train_step.py --device cuda --steps 10 --json "$OUT/train_step.json" \
  2>&1 | tee "$OUT/train.log" | tail -25
echo "train rc=${PIPESTATUS[0]}"

echo "=== shape stream (limit ${STREAM_S}s)"
timeout "$STREAM_S" $PY tools/bench_stream.py --device cuda --batches 8 llava --json "$OUT/stream.json" \
  2>&1 | tee "$OUT/stream.log" | tail -15
echo "stream rc=${PIPESTATUS[0]}"

echo "=== QLoRA training step, nf4 (limit ${QLORA_S}s)"
timeout "$QLORA_S" $PY tools/bench_train_step.py --device cuda --steps 10 --quantized nf4 --json "$OUT/qlora_nf4.json" \
  2>&1 | tee "$OUT/qlora.log" | tail -20
echo "qlora rc=${PIPESTATUS[0]}"
