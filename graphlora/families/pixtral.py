"""Pixtral image layout (a LLaVA config with a Pixtral vision tower, and Mistral 3).

Each image becomes rows of ``[IMG]`` tokens, one per ``patch * merge`` pixels, each row closed by
``[IMG_BREAK]`` except the last, closed by ``[IMG_END]`` (``PixtralProcessor.replace_image_token``).
Images of different sizes are zero-padded into one ``pixel_values`` ``[N, 3, Hmax, Wmax]`` tensor,
with their real sizes in ``image_sizes`` ``[N, 2]``.

Break/end ids come from ``config.image_break_token_id`` / ``config.image_end_token_id`` when set,
else the Mistral tokenizer's 12 / 13.

Tracing (:func:`image_sizes_prologue`): the vision tower cuts each image to its ``image_sizes``
entry and the projector / feature split reshape by it, so those values are shapes. The prologue
passes ``image_sizes`` as a Python list of ``(h, w)`` tuples: export specialises on them (they are
part of the trace's cache key) and the graph has no data-dependent shape left. The same prologue
serves LLaVA-NeXT (``image_sizes`` picks the tiling) and Mistral 3.
"""

from __future__ import annotations

import torch

from ._common import InputRequest, Sample, TokenPool, cfg_size, check_divisible, collate, interleaved_samples

MISTRAL_IMG_BREAK, MISTRAL_IMG_END = 12, 13


def pixtral_inputs(config, req: InputRequest, *, merge: int) -> dict:
    vc = config.vision_config
    unit = cfg_size(vc.patch_size) * merge
    sizes = req.sizes(vc.image_size)
    for s in sizes:
        check_divisible(config.model_type, s, unit)

    pool = TokenPool(config)
    img_break = pool.structural(config, "image_break_token_id", MISTRAL_IMG_BREAK)
    img_end = pool.structural(config, "image_end_token_id", MISTRAL_IMG_END)

    def add_image(s: Sample, k: int) -> None:
        rows, cols = sizes[k][0] // unit, sizes[k][1] // unit
        for r in range(rows):
            s.image(config.image_token_id, cols)
            s.special(img_end if r == rows - 1 else img_break)

    out = collate(interleaved_samples(req, pool, add_image), req, pool)
    n = req.batch_size * req.images_per_sample
    hmax, wmax = max(s[0] for s in sizes), max(s[1] for s in sizes)
    pixels = torch.zeros(n, vc.num_channels, hmax, wmax)
    for i in range(n):
        h, w = sizes[i % req.images_per_sample]
        pixels[i, :, :h, :w] = req.pixels(vc.num_channels, h, w)
    out["pixel_values"] = pixels
    out["image_sizes"] = torch.tensor([list(sizes[i % req.images_per_sample]) for i in range(n)])
    return out


def static_image_sizes(image_sizes) -> list[tuple[int, ...]]:
    """``image_sizes`` (tensor ``[N, 2]``, or a sequence of pairs) as a list of int tuples.

    A list of int tuples is returned as it is (same object).
    """
    if isinstance(image_sizes, list) and all(
        isinstance(s, tuple) and all(type(v) is int for v in s) for s in image_sizes
    ):
        return image_sizes
    if isinstance(image_sizes, torch.Tensor):
        image_sizes = image_sizes.tolist()
    return [tuple(int(v) for v in (size.tolist() if isinstance(size, torch.Tensor) else size)) for size in image_sizes]


def image_sizes_prologue(model: torch.nn.Module, call: dict) -> dict:
    """Pixtral (LLaVA with a Pixtral tower), Mistral 3, LLaVA-NeXT: ``image_sizes`` -> list of tuples.

    A call without ``image_sizes`` is returned unchanged (as a new dict); so is one that already
    holds a list of tuples (idempotent).
    """
    out = dict(call)
    if out.get("image_sizes") is not None:
        out["image_sizes"] = static_image_sizes(out["image_sizes"])
    return out
