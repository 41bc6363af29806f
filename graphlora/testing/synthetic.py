"""A tiny synthetic image + caption set for demos, examples and tests.

``caption_dataset(model, num_pairs)`` draws ``num_pairs`` (image, caption) samples in the family's own
input layout (``graphlora.families.synthesize_inputs`` with batch size 1 and a per-pair seed);
``caption_batches`` concatenates samples along dim 0 into batches. Memorising the pairs is an easy
task, so a LoRA model's loss visibly falls in a few steps.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from graphlora.families import synthesize_inputs


def caption_dataset(model: torch.nn.Module, num_pairs: int = 4, seed: int = 0, caption_vocab: int = 6,
                    text_len: int = 12) -> list[dict[str, Any]]:
    """``num_pairs`` single-sample input dicts (with labels), deterministic under ``seed``.

    Captions use a small vocabulary (``caption_vocab`` ids taken from the family's own plain-text
    ids, so no special token is hit), which makes the loss fall quickly from ~ln(vocab size).
    """
    samples = [synthesize_inputs(model, batch_size=1, with_labels=True, text_len=text_len, seed=seed * 1000 + i)
               for i in range(num_pairs)]
    text_ids = torch.unique(samples[0]["labels"][samples[0]["labels"] >= 0])[:caption_vocab]
    generator = torch.Generator().manual_seed(seed)
    for sample in samples:
        text = sample["labels"] >= 0
        caption = text_ids[torch.randint(0, len(text_ids), (int(text.sum()),), generator=generator)]
        sample["input_ids"] = sample["input_ids"].masked_scatter(text, caption)
        sample["labels"] = sample["labels"].masked_scatter(text, caption)
    return samples


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate single-sample inputs along dim 0 (works for every family's layout)."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.cat(values, dim=0) if isinstance(values[0], torch.Tensor) else values[0]
    return out


def caption_batches(
    model: torch.nn.Module, steps: int, batch_size: int = 2, num_pairs: int = 4, seed: int = 0
) -> Iterator[dict[str, Any]]:
    """``steps`` batches of ``batch_size`` samples drawn from a fixed set of ``num_pairs`` pairs."""
    pairs = caption_dataset(model, num_pairs, seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, num_pairs, (batch_size,), generator=generator).tolist()
        yield collate([pairs[i] for i in idx])
