"""Distributed training of a tiny graphlora LLaVA on the CPU (gloo), for tests/test_distributed.py.

Run with ``python -m torch.distributed.run --nproc_per_node=2 --standalone tests/dist_scripts/train_dist.py
--mode ddp|fsdp --out DIR``. Each rank rewrites the same tiny model (same seed, so the same LoRA init), gives
it the same random non-zero LoRA weights (so every LoRA matrix gets a gradient at step 0), trains ``--steps``
steps with AdamW on *its own* batches (rank r reads pairs 4*step + 2*r and 4*step + 2*r + 1), and writes to
``DIR``:

* ``rank{r}.safetensors``: ``init.*`` (LoRA weights before training), ``grad0.*`` (LoRA gradients of step 0,
  after synchronisation: DDP's all-reduce, FSDP2's reduce-scatter, gathered to full tensors), ``final.*``
  (LoRA weights after training, gathered to full tensors);
* ``rank{r}.json``: the rank's local losses, the trace mode, and (FSDP2) how many sharded parameters were seen
  and how often the per-layer pre-forward hooks ran;
* ``adapter/`` (rank 0): the adapter saved with ``save_adapter`` at the end (under FSDP2 after unsharding).

``--mode ddp``: ``DistributedDataParallel`` around the GraphLoraModel (block programs, the default mode;
``--trace-mode whole`` for one whole-model program).
``--mode fsdp``: ``trace_mode="blocks"`` and ``graphlora.integrations.fully_shard_by_blocks``: ``fully_shard`` on
every decoder layer and vision block (transformers' ``GradientCheckpointingLayer`` modules), then on the root.
``--checkpointing`` also turns on per-layer activation checkpointing. ``--text-step`` adds a last step on text-only
batches (vision LoRA unused: needs ``find_unused_parameters=True`` under DDP).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

NUM_PAIRS = 8
BATCH = 2
POLICY = dict(finetune_vision_layers=True, finetune_language_layers=True, r=8, lora_alpha=16, lora_dropout=0.0)
LR = 5e-3


def rank_batch(pairs, step: int, rank: int, world: int, text_only: bool = False) -> dict:
    from graphlora.testing import synthetic

    start = (step * BATCH * world + BATCH * rank) % len(pairs)
    batch = synthetic.collate([pairs[(start + i) % len(pairs)] for i in range(BATCH)])
    if text_only:
        keep = batch["input_ids"] != 255  # drop the image placeholder tokens (tiny LLaVA's image_token_index)
        batch = {k: batch[k][keep].view(BATCH, -1) for k in ("input_ids", "attention_mask", "labels")}
    return batch


def set_lora(lora_model, seed: int = 1, std: float = 0.2) -> None:
    """Random non-zero LoRA matrices (the same on every rank: a fixed generator)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(lora_model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def build(mode: str, trace_mode: str = "auto"):
    import graphlora
    from graphlora.testing import synthetic, zoo

    model = zoo.build_tiny_model("llava")
    pairs = synthetic.caption_dataset(model, NUM_PAIRS)
    lora_model = graphlora.rewrite(model, POLICY, example_inputs=synthetic.collate(pairs[:BATCH]),
                                   trace_mode="blocks" if mode == "fsdp" else trace_mode)
    set_lora(lora_model)
    return lora_model, pairs


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor (gathering a sharded DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().to("cpu").clone().contiguous()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("ddp", "fsdp"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--text-step", action="store_true")
    parser.add_argument("--trace-mode", default="auto", choices=("auto", "blocks", "whole"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from safetensors.torch import save_file

    lora_model, pairs = build(args.mode, args.trace_mode)
    if args.checkpointing:
        lora_model.activation_checkpointing_enable()
    lora_model.train()
    names = [n for n, p in lora_model.named_parameters() if p.requires_grad]
    record: dict = {"rank": rank, "mode": args.mode, "trace_mode": str(lora_model.trace_mode), "losses": []}
    tensors = {f"init.{n}": full(p) for n, p in lora_model.named_parameters() if p.requires_grad}

    if args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(lora_model, find_unused_parameters=args.text_step)
    else:
        import gc
        import weakref

        from torch.distributed.tensor import DTensor

        from graphlora.integrations import fully_shard_by_blocks

        # A full weight the user's original model object holds: freed once sharded (see fully_shard_by_blocks).
        original_weight = weakref.ref(lora_model.base_model.get_parameter(
            "model.language_model.layers.0.mlp.down_proj.weight"))
        layers = fully_shard_by_blocks(lora_model)
        gc.collect()
        model = lora_model
        record["sharded_params"] = sum(isinstance(p, DTensor) for p in lora_model.parameters())
        record["original_full_params"] = sum(not isinstance(p, DTensor) for p in lora_model.base_model.parameters())
        record["original_weight_freed"] = original_weight() is None
        record["layers"] = len(layers)
        calls = {"n": 0}

        def count(module, args, kwargs):
            calls["n"] += 1

        # Registered after fully_shard's own pre-forward hook: the layer's parameters are unsharded when it runs.
        for layer in layers:
            layer.register_forward_pre_hook(count, with_kwargs=True)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    steps = [(s, False) for s in range(args.steps)] + ([(args.steps, True)] if args.text_step else [])
    for step, text_only in steps:
        batch = rank_batch(pairs, step, rank, world, text_only)
        loss = model(**batch).loss
        loss.backward()
        if step == 0:
            params = dict(lora_model.named_parameters())
            tensors.update({f"grad0.{n}": full(params[n].grad) for n in names})
        optimizer.step()
        optimizer.zero_grad()
        record["losses"].append(loss.item())
    if args.mode == "fsdp":
        record["layer_calls"] = calls["n"]

    tensors.update({f"final.{n}": full(p) for n, p in lora_model.named_parameters() if p.requires_grad})
    os.makedirs(args.out, exist_ok=True)
    save_file(tensors, os.path.join(args.out, f"rank{rank}.safetensors"))
    # Saving the adapter: under FSDP2 unshard every FSDP module first (collective: all ranks), so that
    # save_adapter reads full tensors; rank 0 writes.
    if args.mode == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        fsdp_modules = [m for m in lora_model.modules() if isinstance(m, FSDPModule)]
        for m in fsdp_modules:
            m.unshard()
        if rank == 0:
            lora_model.save_adapter(os.path.join(args.out, "adapter"), overwrite=True)
        for m in fsdp_modules:
            m.reshard()
    elif rank == 0:
        lora_model.save_adapter(os.path.join(args.out, "adapter"), overwrite=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
