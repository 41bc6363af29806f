"""LLaVA-OneVision (SigLIP + 2-layer GELU projector + Qwen2 text), anyres tiling as LLaVA-NeXT.

``LlavaOnevisionProcessor.replace_image_token``, for a sample with **one** image:
``<image>`` once per feature of the base tile (SigLIP: no CLS), plus the unpadded tile grid and one
``image_newline`` per row of it; when the grid holds more than ``anyres_max_N`` tiles' worth of
features (ratio > 1.1) the model shrinks it by bilinear interpolation and the count follows.
``pixel_values`` ``[B, 1 + tiles, 3, tile, tile]`` (base image first), ``image_sizes`` ``[B, 2]`` =
original (h, w). A sample with **several** images is not tiled: each image is one resized tile and
gets its base features plus one newline. ``batch_num_images`` ``[B]`` = images per sample tells the
model which case applies (the image processor always returns it).

Tracing (:func:`llava_onevision_prologue`): as LLaVA-NeXT, the tiling and unpadding are chosen from
``image_sizes`` values, and ``batch_num_images`` decides per image whether to tile; the prologue
passes both as Python values (static, part of the cache key).
"""

from __future__ import annotations

import math

import torch

from ._common import InputRequest, TokenPool, cfg_size, collate, interleaved_samples
from .llava import anyres_grid
from .pixtral import static_image_sizes


def _max_tiles(config) -> int:
    return int(config.vision_aspect_ratio.strip("anyres_max_"))


def llava_onevision_layout(config, size: tuple[int, int]) -> tuple[int, int]:
    """(number of tiles incl. the base image, number of image tokens) for one single-image sample."""
    tiles, side, cur_h, cur_w = anyres_grid(config, size)
    ratio = math.sqrt(cur_h * cur_w / (_max_tiles(config) * side**2))
    if ratio > 1.1:
        cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    n_tokens = side * side + cur_h * cur_w + cur_h  # base + grid + newlines
    return tiles + 1, _select(config, n_tokens)


def _select(config, n_tokens: int) -> int:
    # the processor drops one token per image with the "default" strategy
    return n_tokens - 1 if config.vision_feature_select_strategy == "default" else n_tokens


def llava_onevision_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    tile = cfg_size(vc.image_size)
    side = tile // cfg_size(vc.patch_size)
    k = req.images_per_sample
    if k == 1:
        sizes = req.sizes(config.image_grid_pinpoints[0])
        layouts = [llava_onevision_layout(config, sizes[0])]
    else:  # multi-image samples: one resized tile per image, base features + newline
        sizes = req.sizes(tile)
        layouts = [(1, _select(config, side * side + 1))] * k

    pool = TokenPool(config)
    samples = interleaved_samples(req, pool, lambda s, i: s.image(config.image_token_id, layouts[i][1]))
    out = collate(samples, req, pool)
    max_tiles = max(t for t, _ in layouts)
    pixels = torch.zeros(req.batch_size * k, max_tiles, vc.num_channels, tile, tile)
    for i in range(pixels.shape[0]):
        n_tiles = layouts[i % k][0]
        pixels[i, :n_tiles] = req.pixels(n_tiles, vc.num_channels, tile, tile)
    out["pixel_values"] = pixels
    out["image_sizes"] = torch.tensor([list(sizes[i % k]) for i in range(pixels.shape[0])])
    out["batch_num_images"] = torch.full((req.batch_size,), k, dtype=torch.long)
    return out


def llava_onevision_prologue(model, call: dict) -> dict:
    """``image_sizes`` as a list of ``(h, w)`` tuples and ``batch_num_images`` as a list of ints.

    A call without them is returned unchanged (as a new dict); so is one that already holds Python
    values (idempotent).
    """
    out = dict(call)
    if out.get("image_sizes") is not None:
        out["image_sizes"] = static_image_sizes(out["image_sizes"])
    counts = out.get("batch_num_images")
    if counts is not None and not (isinstance(counts, list) and all(type(n) is int for n in counts)):
        out["batch_num_images"] = [int(n) for n in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]
    return out
