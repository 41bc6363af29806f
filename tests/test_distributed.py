"""Distributed training on the CPU (gloo, 2 processes): DDP in whole mode, FSDP2 in blocks mode.

Each run is ``python -m torch.distributed.run --nproc_per_node=2 --standalone tests/dist_scripts/train_dist.py``
(see that script): every rank trains the same tiny LLaVA on its own batches and writes its LoRA weights and
step-0 gradients. Checked here: the ranks saw different batches (different local losses), the synchronised
gradients and the final adapters are identical on both ranks, the adapters moved away from their initial
values, and both equal a single-process reference that averages the two ranks' losses (what data parallelism
computes). The adapter rank 0 saved holds the final weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "dist_scripts" / "train_dist.py"
STEPS = 3


def _script():
    spec = importlib.util.spec_from_file_location("graphlora_train_dist", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_torchrun(out: Path, *args: str, timeout: int = 150) -> tuple[list[dict], list[dict]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(SCRIPT),
           "--out", str(out), "--steps", str(STEPS), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    tensors = [load_file(out / f"rank{r}.safetensors") for r in range(2)]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return tensors, records


@pytest.fixture(scope="module")
def reference():
    """Single process: the mean of both ranks' losses per step, AdamW; step-0 gradients and final weights."""
    dist_script = _script()
    torch.manual_seed(0)
    lora_model, pairs = dist_script.build("ddp")
    lora_model.train()
    params = {n: p for n, p in lora_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=dist_script.LR)
    out = {f"init.{n}": p.detach().clone() for n, p in params.items()}
    losses = []
    for step in range(STEPS):
        per_rank = [lora_model(**dist_script.rank_batch(pairs, step, r, 2)).loss for r in range(2)]
        ((per_rank[0] + per_rank[1]) / 2).backward()
        if step == 0:
            out.update({f"grad0.{n}": p.grad.detach().clone() for n, p in params.items()})
        optimizer.step()
        optimizer.zero_grad()
        losses.append([loss.item() for loss in per_rank])
    out.update({f"final.{n}": p.detach().clone() for n, p in params.items()})
    return out, losses


def _check_run(tensors: list[dict], records: list[dict], reference, adapter_dir: Path) -> None:
    ref, ref_losses = reference
    r0, r1 = tensors
    assert set(r0) == set(r1) == set(ref)
    # Different batches per rank: different local losses, each equal to the reference's loss for that batch.
    for step in range(STEPS):
        assert records[0]["losses"][step] != records[1]["losses"][step]
        for rank in range(2):
            assert records[rank]["losses"][step] == pytest.approx(ref_losses[step][rank], rel=1e-5)
    names = sorted(k[len("final."):] for k in ref if k.startswith("final."))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert any("vision_tower" in n for n in names) and any("language_model" in n for n in names)
    for n in names:
        # Gradients were synchronised: identical on both ranks, and the average of the two batches' gradients.
        assert torch.equal(r0[f"grad0.{n}"], r1[f"grad0.{n}"]), n
        torch.testing.assert_close(r0[f"grad0.{n}"], ref[f"grad0.{n}"], rtol=1e-4, atol=1e-6)
        # Identical adapters on both ranks, trained away from their initial values, equal to the reference.
        assert torch.equal(r0[f"final.{n}"], r1[f"final.{n}"]), n
        assert torch.equal(r0[f"init.{n}"], ref[f"init.{n}"]), n
        assert not torch.allclose(r0[f"final.{n}"], r0[f"init.{n}"], atol=1e-4), n
        torch.testing.assert_close(r0[f"final.{n}"], ref[f"final.{n}"], rtol=1e-3, atol=1e-4)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert len(saved) == len(names)
    for n in names:
        assert torch.equal(saved[f"base_model.model.{n}"], r0[f"final.{n}"]), n


def test_ddp_two_ranks_synchronise_lora(tmp_path, reference):
    tensors, records = run_torchrun(tmp_path, "--mode", "ddp")
    assert [r["trace_mode"] for r in records] == ["blocks", "blocks"]
    _check_run(tensors, records, reference, tmp_path / "adapter")


@pytest.mark.slow
def test_ddp_two_ranks_synchronise_lora_with_a_whole_model_program(tmp_path, reference):
    tensors, records = run_torchrun(tmp_path, "--mode", "ddp", "--trace-mode", "whole")
    assert [r["trace_mode"] for r in records] == ["whole", "whole"]
    _check_run(tensors, records, reference, tmp_path / "adapter")


def test_fsdp2_blocks_two_ranks_synchronise_lora(tmp_path, reference):
    tensors, records = run_torchrun(tmp_path, "--mode", "fsdp")
    for record in records:
        assert record["trace_mode"] == "blocks"
        assert record["layers"] == 4  # 2 CLIP blocks + 2 Llama decoder layers, each fully_shard-ed
        assert record["sharded_params"] > 0
        # The user's original model object no longer keeps the full weights alive.
        assert record["original_full_params"] == 0 and record["original_weight_freed"]
        # FSDP2's per-layer hooks ran around every layer call (4 layers x STEPS forwards).
        assert record["layer_calls"] == 4 * STEPS
    _check_run(tensors, records, reference, tmp_path / "adapter")


@pytest.mark.slow
def test_fsdp2_blocks_with_activation_checkpointing(tmp_path, reference):
    tensors, records = run_torchrun(tmp_path, "--mode", "fsdp", "--checkpointing")
    _check_run(tensors, records, reference, tmp_path / "adapter")


@pytest.mark.slow
def test_ddp_text_only_step_needs_find_unused_parameters(tmp_path):
    """A text-only batch leaves the vision LoRA without gradient: DDP with find_unused_parameters=True copes."""
    tensors, records = run_torchrun(tmp_path, "--mode", "ddp", "--text-step")
    assert all(len(r["losses"]) == STEPS + 1 for r in records)
    r0, r1 = tensors
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key


def test_fsdp2_on_layers_in_whole_mode_is_refused_clearly():
    """One process (world size 1): per-layer fully_shard needs blocks mode, and the error says so; FSDP2 on the
    root alone works in whole mode (its hooks run around the whole program)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    import graphlora
    from graphlora.errors import GraphLoraError
    from graphlora.testing import synthetic, zoo

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        dist_script = _script()
        models = []
        for _ in range(2):
            model = zoo.build_tiny_model("llava")
            pairs = synthetic.caption_dataset(model, 2)
            models.append(graphlora.rewrite(model, dist_script.POLICY, example_inputs=synthetic.collate(pairs),
                                            trace_mode="whole"))
        per_layer, root_only = models
        batch = synthetic.collate(pairs)
        for layer in [m for m in per_layer.modules() if isinstance(m, GradientCheckpointingLayer)]:
            fully_shard(layer)
        fully_shard(per_layer)
        per_layer.train()
        with pytest.raises(GraphLoraError, match=r"needs trace_mode='blocks'.*trace_by_blocks\(\)"):
            per_layer(**batch)
        fully_shard(root_only)
        root_only.train()
        loss = root_only(**batch).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for n, p in root_only.named_parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()
