"""A data collator for vision chat samples: the model's own processor, labels on the assistant's answers only.

``VisionChatCollator(processor)`` turns samples ``{"messages": [...], "images": [PIL images]}`` (transformers'
chat format: ``content`` a string or a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts)
into a batch: the processor renders each conversation with its chat template, expands the image placeholders
to the family's image tokens, resizes the images to its grids and pads. ``labels`` are ``-100`` everywhere but
on the assistant turns' tokens (what the template writes for the answer, its end-of-turn token included):
prompts, images and padding are not learned ("train on responses only").

Where the answer tokens are, is read from the template itself, for any template: for assistant turn ``i`` the
conversation up to it is rendered with the generation prompt and tokenized (with the images it holds), and the
conversation through it without; the answer is the tokens between the two lengths. The collator checks that
those tokens are where the batch has them (a template whose earlier turns tokenize differently once a later
turn follows would otherwise label the wrong tokens) and raises naming the sample and turn if not.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from graphlora.errors import GraphLoraError

IGNORE_INDEX = -100


class CollatorError(GraphLoraError, ValueError):
    """A sample the collator cannot turn into labels: no assistant turn, images that do not match, a template
    whose prefixes do not tokenize as the whole conversation does."""


def _images_in(messages: Sequence[dict]) -> int:
    count = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
    return count


class VisionChatCollator:
    """Batches vision chat samples through ``processor`` with labels on the assistant's answers (module docstring).

    ``messages_key`` / ``images_key``: the sample fields. ``max_length``: truncate longer conversations (their
    labels are truncated with them). ``image_token_id``: the token whose positions are never labelled (read
    from the processor when None).
    """

    def __init__(self, processor: Any, *, messages_key: str = "messages", images_key: str = "images",
                 max_length: int | None = None, image_token_id: int | None = None):
        self.processor = processor
        self.messages_key = messages_key
        self.images_key = images_key
        self.max_length = max_length
        tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer = tokenizer
        if image_token_id is None:
            image_token_id = getattr(processor, "image_token_id", None)
            token = getattr(processor, "image_token", None)
            if image_token_id is None and token is not None:
                image_token_id = tokenizer.convert_tokens_to_ids(token)
        self.image_token_id = image_token_id

    # ------------------------------------------------------------------ tokenizing
    def _render(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _ids(self, text: str, images: list) -> list[int]:
        out = self.processor(text=[text], images=images or None, return_tensors="pt")
        return out["input_ids"][0].tolist()

    def _answer_spans(self, messages: Sequence[dict], images: list, where: str) -> list[tuple[int, int, list[int]]]:
        """``(start, end, ids)`` of each assistant turn's tokens in the whole conversation's tokens."""
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            shown = images[:_images_in(messages[:i])]
            start = len(self._ids(self._render(messages[:i], True), shown))
            through = self._ids(self._render(messages[:i + 1], False), images[:_images_in(messages[:i + 1])])
            spans.append((start, len(through), through[start:]))
        if not spans:
            raise CollatorError(f"{where}: the conversation has no assistant turn: nothing to learn")
        return spans

    # ------------------------------------------------------------------ batch
    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        texts, images, spans = [], [], []
        for n, sample in enumerate(samples):
            messages = sample[self.messages_key]
            sample_images = list(sample.get(self.images_key) or [])
            if _images_in(messages) != len(sample_images):
                raise CollatorError(f"sample {n}: its messages hold {_images_in(messages)} image parts but it has "
                                    f"{len(sample_images)} images")
            texts.append(self._render(messages, False))
            images.extend(sample_images)
            spans.append(self._answer_spans(messages, sample_images, f"sample {n}"))
        kwargs = dict(text=texts, images=images or None, return_tensors="pt", padding=True)
        if self.max_length is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        batch = dict(self.processor(**kwargs))
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        labels = torch.full_like(ids, IGNORE_INDEX)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for row, sample_spans in enumerate(spans):
            offset = int((mask[row] == 0).sum()) if left else 0
            for turn, (start, end, answer) in enumerate(sample_spans):
                lo, hi = offset + start, min(offset + end, ids.shape[1])
                got = ids[row, lo:hi].tolist()
                if got != answer[:hi - lo]:
                    raise CollatorError(
                        f"sample {row}, assistant turn {turn}: the conversation up to the answer tokenizes differently "
                        "on its own than inside the whole conversation, so the answer's tokens cannot be located; "
                        "use a chat template whose turns end in a special token")
                labels[row, lo:hi] = ids[row, lo:hi]
        labels[mask == 0] = IGNORE_INDEX
        if self.image_token_id is not None:
            labels[ids == self.image_token_id] = IGNORE_INDEX
        batch["labels"] = labels
        return batch
