"""Shared building blocks for the per-family input recipes.

A recipe is a function ``recipe(config, req) -> dict`` that turns a transformers config and an
:class:`InputRequest` into the keyword arguments of ``model.forward`` for one training batch.
It builds one :class:`Sample` per batch row (text tokens, image placeholder tokens and the
structural tokens a processor would insert around them), draws pixel tensors, and lets
:func:`collate` turn the samples into ``input_ids`` / ``attention_mask`` / ``labels``.

Everything here runs on CPU in float32 with one local ``torch.Generator``; the public
:func:`graphlora.families.synthesize_inputs` casts and moves the result afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

IGNORE_INDEX = -100

# Token type ids, as in transformers' ``mm_token_type_ids`` (0 text, 1 image).
TEXT, IMAGE = 0, 1

Size = tuple[int, int]


# --------------------------------------------------------------------------------------------
# request
# --------------------------------------------------------------------------------------------


@dataclass
class InputRequest:
    """What the caller asked for, normalised. Recipes read it; only the generator mutates.

    ``image_sizes`` holds one entry per image of a sample (``images_per_sample`` entries), each
    ``None`` (the family default) or ``(height, width)`` in pixels. Every sample of the batch
    gets the same images layout (sizes differ across the images of a sample, not across samples).
    """

    batch_size: int
    text_len: int
    with_labels: bool
    images_per_sample: int
    image_sizes: tuple[Size | None, ...]
    generator: torch.Generator
    pad_tokens: int = 0

    def size(self, index: int, default: int | Sequence[int]) -> Size:
        """Pixel size of image ``index`` of a sample, falling back to ``default``."""
        chosen = self.image_sizes[index]
        return as_size(default if chosen is None else chosen)

    def sizes(self, default: int | Sequence[int]) -> list[Size]:
        return [self.size(i, default) for i in range(self.images_per_sample)]

    def uniform_size(self, default: int | Sequence[int], family: str) -> Size:
        """The single image size of families that stack images into one dense tensor."""
        sizes = set(self.sizes(default))
        if len(sizes) != 1:
            raise ValueError(f"{family}: all images must have the same size, got {sorted(sizes)}")
        return sizes.pop()

    def pixels(self, *shape: int) -> torch.Tensor:
        """Random float32 pixel values (already 'normalised': standard normal)."""
        return torch.randn(*shape, generator=self.generator)

    def text_chunks(self) -> list[int]:
        """Split ``text_len`` over the gaps before, between and after the images.

        The first image comes after ``text_len // (k + 1)`` tokens (0 when ``text_len`` is
        small); the remainder goes after the last image, so the loss always covers text
        that follows the images.
        """
        k = self.images_per_sample
        base = self.text_len // (k + 1)
        chunks = [base] * (k + 1)
        chunks[-1] += self.text_len - base * (k + 1)
        return chunks


def as_size(value: int | Sequence[int]) -> Size:
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


def cfg_size(value) -> int:
    """A square ``image_size``/``patch_size`` config value (int or [h, w]) as an int."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square size {value} is not supported here")
        return int(value[0])
    return int(value)


def check_divisible(family: str, size: Size, unit: int) -> None:
    if size[0] % unit or size[1] % unit:
        raise ValueError(f"{family}: image size {size} must be a multiple of {unit} pixels")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# token ids
# --------------------------------------------------------------------------------------------

_TOKEN_SUFFIXES = ("token_id", "token_index", "token_ids")


def special_token_ids(config) -> set[int]:
    """Every id a config (and its sub-configs) names as a special token (image, boi, pad...)."""
    found: set[int] = set()
    seen: set[int] = set()

    def walk(cfg) -> None:
        if id(cfg) in seen:
            return
        seen.add(id(cfg))
        for key, value in vars(cfg).items():
            key = key.lstrip("_")
            if key.endswith(_TOKEN_SUFFIXES):
                values = value if isinstance(value, (list, tuple)) else [value]
                found.update(int(v) for v in values if isinstance(v, int) and not isinstance(v, bool))
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):
                walk(value)

    walk(config)
    return found


class TokenPool:
    """Valid plain-text token ids: the text vocabulary minus every special id of the config.

    ``take(n)`` hands out ids for structural tokens that the config does not name (e.g. the
    ``<row_1_col_1>`` tags of Idefics3); taken ids are removed from the text pool, so text
    never collides with them.
    """

    def __init__(self, config, vocab_size: int | None = None, reserved: Iterable[int] = ()):
        text_config = config.get_text_config()
        self.vocab_size = int(vocab_size if vocab_size is not None else text_config.vocab_size)
        self.reserved = special_token_ids(config) | {int(r) for r in reserved}
        allowed = torch.ones(self.vocab_size, dtype=torch.bool)
        bad = [r for r in self.reserved if 0 <= r < self.vocab_size]
        if bad:
            allowed[torch.tensor(bad)] = False
        self._ids = allowed.nonzero().squeeze(1)
        if len(self._ids) < 8:
            raise ValueError(f"vocabulary of {self.vocab_size} leaves too few plain-text token ids")
        pad = getattr(text_config, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) and 0 <= pad < self.vocab_size else int(self._ids[0])
        bos = getattr(text_config, "bos_token_id", None)
        self.bos_id = int(bos) if isinstance(bos, int) and 0 <= bos < self.vocab_size else None

    def take(self, n: int = 1) -> list[int]:
        """``n`` ids from the top of the pool, reserved for structural tokens from now on."""
        ids, self._ids = self._ids[-n:].tolist(), self._ids[:-n]
        return ids

    def structural(self, config, name: str, preferred: int | None = None) -> int:
        """Id of a structural token the layout needs: ``config.<name>`` when the config sets it,
        else ``preferred`` (the real tokenizer's id) when that is a free id of this vocabulary,
        else an id taken from the pool. The id is withheld from text from now on."""
        value = config_id(config, name)
        if value is None:
            free = preferred is not None and 0 <= preferred < self.vocab_size and preferred not in self.reserved
            value = preferred if free else self.take(1)[0]
        self.reserved.add(value)
        self._ids = self._ids[self._ids != value]
        return value

    def draw(self, n: int, generator: torch.Generator) -> list[int]:
        if n <= 0:
            return []
        idx = torch.randint(len(self._ids), (n,), generator=generator)
        return self._ids[idx].tolist()


def config_id(config, name: str, default: int | None = None) -> int | None:
    """An optional token-id attribute of the config (``None``/missing -> ``default``)."""
    value = getattr(config, name, None)
    return int(value) if isinstance(value, int) else default


# --------------------------------------------------------------------------------------------
# samples
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One row of the batch, built left to right.

    ``no_loss`` marks tokens whose label is -100: tokens inserted by the image layout
    (placeholders and the begin/end/row/break tokens around them) and text added with
    ``loss=False``. ``types`` is the transformers ``mm_token_type_ids`` convention: 1 on image
    placeholder tokens only.
    """

    ids: list[int] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    no_loss: list[bool] = field(default_factory=list)

    def text(self, ids: Iterable[int], *, loss: bool = True, type_id: int = TEXT) -> "Sample":
        for i in ids:
            self._add(i, type_id, not loss)
        return self

    def special(self, *ids: int) -> "Sample":
        """Structural tokens of the image layout (not predicted: label -100)."""
        for i in ids:
            self._add(i, TEXT, True)
        return self

    def image(self, token_id: int, n: int, *, type_id: int = IMAGE) -> "Sample":
        """``n`` image placeholder tokens (replaced by image features inside the model)."""
        for _ in range(n):
            self._add(token_id, type_id, True)
        return self

    def _add(self, i: int, t: int, no_loss: bool) -> None:
        self.ids.append(int(i))
        self.types.append(t)
        self.no_loss.append(no_loss)

    def __len__(self) -> int:
        return len(self.ids)


def interleaved_samples(req: InputRequest, pool: TokenPool, add_image, *, prefix=()) -> list[Sample]:
    """The common layout: ``prefix text [image text]*k`` for every sample of the batch.

    ``add_image(sample, image_index)`` appends the tokens of one image; ``prefix`` ids (e.g. BOS)
    start every sample and are kept in the loss.
    """
    chunks = req.text_chunks()
    samples = []
    for _ in range(req.batch_size):
        s = Sample().text(prefix)
        s.text(pool.draw(chunks[0], req.generator))
        for k in range(req.images_per_sample):
            add_image(s, k)
            s.text(pool.draw(chunks[k + 1], req.generator))
        samples.append(s)
    return samples


def collate(samples: list[Sample], req: InputRequest, pool: TokenPool, *, token_type_ids: bool = False) -> dict:
    """Right-pad the samples and build ``input_ids``, ``attention_mask`` (and ``labels``).

    With ``req.pad_tokens = p > 0`` the first sample gets ``p`` extra text tokens and every other
    sample ``p`` pad tokens, so the batch exercises padding (attention_mask 0, label -100).
    """
    samples = [Sample(list(s.ids), list(s.types), list(s.no_loss)) for s in samples]
    if req.pad_tokens:
        last_type = samples[0].types[-1] if len(samples[0]) else TEXT
        samples[0].text(pool.draw(req.pad_tokens, req.generator), type_id=last_type)
    length = max(len(s) for s in samples)
    ids = torch.full((len(samples), length), pool.pad_id, dtype=torch.long)
    attn = torch.zeros((len(samples), length), dtype=torch.long)
    no_loss = torch.ones((len(samples), length), dtype=torch.bool)
    types = torch.zeros((len(samples), length), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s)
        ids[row, :n] = torch.tensor(s.ids)
        attn[row, :n] = 1
        no_loss[row, :n] = torch.tensor(s.no_loss)
        types[row, :n] = torch.tensor(s.types)
    out = {"input_ids": ids, "attention_mask": attn}
    if token_type_ids:
        out["token_type_ids"] = types
    if req.with_labels:
        out["labels"] = ids.masked_fill(no_loss, IGNORE_INDEX)
    return out


def tile_grid(size: Size, tile: int) -> tuple[int, int]:
    """(rows, cols) of ``tile``-pixel tiles covering an image (1 x 1 when it fits in one tile)."""
    return ceil_div(size[0], tile), ceil_div(size[1], tile)
