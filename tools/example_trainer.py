"""Fine-tune a tiny VLM on a synthetic image-caption set with transformers.Trainer, save and reload the adapter.

    python tools/example_trainer.py --output-dir out/example --steps 30

The model is one of graphlora's tiny random-weight fixtures (``graphlora.testing.zoo``, default ``llava``), so the
example runs in seconds on a CPU; with a real checkpoint only the two model lines change (docs/training.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import TrainingArguments

import graphlora
from graphlora.integrations import GraphLoraTrainer
from graphlora.testing import synthetic, zoo


class CaptionDataset(torch.utils.data.Dataset):
    """Single-sample dicts (input_ids, attention_mask, labels, pixel_values, ...) for the collator."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="out/example_trainer")
    parser.add_argument("--model", default="llava", help="a graphlora.testing.zoo tiny model name")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=8, help="image-caption pairs in the training set")
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    # 1. The base model and data. With a real model: AutoModelForImageTextToText.from_pretrained(...) and a
    #    dataset of processor outputs; graphlora.testing.synthetic.collate concatenates single-sample dicts.
    model = zoo.build_tiny_model(args.model)
    train_set = CaptionDataset(synthetic.caption_dataset(model, args.pairs, seed=0))
    eval_set = CaptionDataset(synthetic.caption_dataset(model, 2, seed=0))

    # 2. LoRA on attention and MLP of the vision tower and the language model (r=16).
    t0 = time.perf_counter()
    lora_model = graphlora.rewrite(
        model,
        dict(finetune_vision_layers=True, finetune_language_layers=True, r=16, lora_alpha=16),
        example_inputs=synthetic.collate([train_set[0], train_set[1]]),
    )
    trainable, total = lora_model.trainable_parameters()
    print(f"rewritten in {time.perf_counter() - t0:.1f} s: {len(lora_model.sites)} sites, "
          f"{trainable:,} trainable of {total:,} parameters")

    # 3. Train with GraphLoraTrainer (= Trainer whose checkpoints hold the adapter, not the base weights).
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        logging_steps=1 if args.steps < 10 else 5,
        eval_strategy="steps",
        eval_steps=max(1, args.steps // 2),
        save_steps=max(1, args.steps // 2),
        activation_checkpointing=args.activation_checkpointing,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = GraphLoraTrainer(model=lora_model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                               data_collator=synthetic.collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    # 4. Save the adapter (PEFT format + graphlora_policy.yaml) and load it onto a fresh base model.
    adapter_dir = Path(args.output_dir) / "adapter"
    trainer.save_model(str(adapter_dir))
    fresh = zoo.build_tiny_model(args.model)
    reloaded = graphlora.load_adapter(fresh, adapter_dir, example_inputs=synthetic.collate([eval_set[0]]))
    batch = synthetic.collate([eval_set[0]])
    lora_model.eval()
    with torch.no_grad():
        difference = (reloaded(**batch).logits - lora_model(**batch).logits).abs().max().item()
    print(f"adapter saved to {adapter_dir}: {sorted(p.name for p in adapter_dir.iterdir())}")
    print(f"reloaded adapter reproduces the trained model's logits (max difference {difference:.2e})")
    return {"losses": losses, "adapter_dir": adapter_dir, "difference": difference, "trainer": trainer}


if __name__ == "__main__":
    main()
