"""The vision chat collator: the family's processor, labels on the assistant's answers only."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("PIL")
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from graphlora.collator import IGNORE_INDEX, CollatorError, VisionChatCollator  # noqa: E402
from graphlora.testing import zoo  # noqa: E402
from graphlora.testing.processors import WORDS, build_tiny_processor, processor_families  # noqa: E402

#: Families whose processor takes images of several sizes in one batch (LLaVA's resizes and crops to one size).
ANY_SIZE = {"qwen2_vl"}


def _image(rng: random.Random, height: int, width: int) -> Image.Image:
    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_samples(family: str, count: int, seed: int = 0, string_answers: bool = True) -> list[dict]:
    """Conversations of 1-2 rounds with an image in the first user turn (sizes vary where the family allows);
    a second answer is a plain string when ``string_answers`` (Arrow tables need one type per column)."""
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        size = (rng.choice([16, 24, 32]), rng.choice([16, 24, 32])) if family in ANY_SIZE else (16, 16)
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": _sentence(rng, rng.randint(2, 6)) + " ?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": _sentence(rng, rng.randint(1, 5))}]}]
        if rng.random() < 0.5:
            messages += [{"role": "user", "content": [{"type": "text", "text": _sentence(rng, 3) + " ?"}]},
                         {"role": "assistant", "content": _sentence(rng, rng.randint(1, 3)) if string_answers
                          else [{"type": "text", "text": _sentence(rng, rng.randint(1, 3))}]}]
        samples.append({"messages": messages, "images": [_image(rng, *size)]})
    return samples


def _answers(sample: dict) -> list[str]:
    out = []
    for m in sample["messages"]:
        if m["role"] == "assistant":
            content = m["content"]
            out.append(content if isinstance(content, str) else " ".join(p["text"] for p in content))
    return out


@pytest.mark.parametrize("family", processor_families())
def test_labels_are_the_assistant_answers_and_nothing_else(family):
    processor = build_tiny_processor(family)
    collator = VisionChatCollator(processor)
    samples = make_samples(family, 4, seed=1)
    batch = collator(samples)
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for row, sample in enumerate(samples):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        kept = labels != IGNORE_INDEX
        assert torch.equal(labels[kept], ids[kept])
        # the labelled tokens, split at each end-of-turn, are exactly the answers
        words = tok.convert_ids_to_tokens(labels[kept].tolist())
        turns, current = [], []
        for w in words:
            if w == "<|im_end|>":
                turns.append(" ".join(current))
                current = []
            else:
                current.append(w)
        assert not current and turns == _answers(sample)
        assert int((labels == end).sum()) == len(turns)
        assert not kept[batch["attention_mask"][row] == 0].any()
        assert not kept[ids == collator.image_token_id].any() and (ids == collator.image_token_id).any()


@pytest.mark.parametrize("family", processor_families())
def test_the_batch_runs_through_the_original_model(family):
    model = zoo.build_tiny_model(family)
    batch = VisionChatCollator(build_tiny_processor(family))(make_samples(family, 3, seed=2))
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == batch["input_ids"].shape


def test_images_of_several_sizes_in_one_batch():
    samples = make_samples("qwen2_vl", 6, seed=3)
    sizes = {s["images"][0].size for s in samples}
    assert len(sizes) > 1
    batch = VisionChatCollator(build_tiny_processor("qwen2_vl"))(samples)
    grids = {tuple(g.tolist()) for g in batch["image_grid_thw"]}
    assert len(grids) > 1 and batch["image_grid_thw"].shape[0] == len(samples)
    zoo.build_tiny_model("qwen2_vl")(**batch).loss.backward()


def test_bad_samples_are_named():
    collator = VisionChatCollator(build_tiny_processor("llava"))
    sample = make_samples("llava", 1)[0]
    with pytest.raises(CollatorError, match="sample 0: its messages hold 1 image parts but it has 0 images"):
        collator([{**sample, "images": []}])
    with pytest.raises(CollatorError, match="sample 1: the conversation has no assistant turn"):
        collator([sample, {"messages": sample["messages"][:1], "images": sample["images"]}])
