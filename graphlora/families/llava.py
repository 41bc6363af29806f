"""LLaVA (1.5) and LLaVA-NeXT.

LLaVA: ``<image>`` repeated once per vision feature (patches, +1 CLS for CLIP towers, -1 with the
"default" feature-select strategy); ``pixel_values`` ``[B*k, 3, H, W]``. A LLaVA config whose
vision tower is Pixtral (the "pixtral" zoo model) uses the Pixtral row/break layout instead.

LLaVA-NeXT ("anyres"): the original image is tiled onto the best ``image_grid_pinpoints``
resolution; ``pixel_values`` ``[B*k, 1 + tiles, 3, tile, tile]`` (base image first),
``image_sizes`` ``[B*k, 2]`` = original (h, w). The token count mirrors
``LlavaNextProcessor._get_number_of_features`` (base tile + unpadded grid + one newline per row).

Tracing: LLaVA-NeXT chooses each image's tiling and unpadding from ``image_sizes`` values, and a
Pixtral tower crops by them; :func:`llava_prologue` passes ``image_sizes`` as a list of tuples (static
values, part of the cache key). Plain LLaVA calls have no ``image_sizes``: nothing changes.
"""

from __future__ import annotations

import torch
from transformers.image_processing_utils import select_best_resolution

from ._common import InputRequest, TokenPool, cfg_size, check_divisible, collate, interleaved_samples
from .pixtral import image_sizes_prologue, pixtral_inputs

# Vision towers that prepend a CLS token to the patch features.
_CLS_TOWERS = {"clip_vision_model", "clip", "chinese_clip_vision_model", "metaclip_2_vision_model"}


def _features_per_tile(config, side: int) -> int:
    n = side * side + (1 if config.vision_config.model_type in _CLS_TOWERS else 0)
    return n - 1 if config.vision_feature_select_strategy == "default" else n


def llava_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    if vc.model_type == "pixtral":
        return pixtral_inputs(config, req, merge=1)
    h, w = req.uniform_size(vc.image_size, "llava")
    p = cfg_size(vc.patch_size)
    check_divisible("llava", (h, w), p)
    n_tokens = (h // p) * (w // p) + (1 if vc.model_type in _CLS_TOWERS else 0)
    if config.vision_feature_select_strategy == "default":
        n_tokens -= 1

    pool = TokenPool(config)
    samples = interleaved_samples(req, pool, lambda s, k: s.image(config.image_token_id, n_tokens))
    out = collate(samples, req, pool)
    out["pixel_values"] = req.pixels(req.batch_size * req.images_per_sample, vc.num_channels, h, w)
    return out


def anyres_grid(config, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(tiles without the base image, patches per tile side, unpadded feature-grid height, width) of one original
    image size under "anyres" tiling (LLaVA-NeXT, LLaVA-OneVision: select_best_resolution, then unpad_image)."""
    tile = cfg_size(config.vision_config.image_size)
    side = tile // cfg_size(config.vision_config.patch_size)
    best_h, best_w = select_best_resolution(list(size), config.image_grid_pinpoints)
    rows, cols = best_h // tile, best_w // tile
    # unpad the (rows*side, cols*side) feature grid to the original aspect ratio (unpad_image)
    orig_h, orig_w = size
    cur_h, cur_w = rows * side, cols * side
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(orig_w * (cur_h / orig_h), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    return rows * cols, side, cur_h, cur_w


def llava_next_layout(config, size: tuple[int, int]) -> tuple[int, int]:
    """(number of tiles incl. the base image, number of image tokens) for one original image size."""
    tiles, side, cur_h, cur_w = anyres_grid(config, size)
    n_tokens = _features_per_tile(config, side) + cur_h * cur_w + cur_h  # base + grid + newlines
    return tiles + 1, n_tokens


def llava_next_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    tile = cfg_size(vc.image_size)
    sizes = req.sizes(config.image_grid_pinpoints[0])
    layouts = [llava_next_layout(config, s) for s in sizes]

    pool = TokenPool(config)
    samples = interleaved_samples(req, pool, lambda s, k: s.image(config.image_token_id, layouts[k][1]))
    out = collate(samples, req, pool)
    max_tiles = max(t for t, _ in layouts)
    pixels = torch.zeros(req.batch_size * req.images_per_sample, max_tiles, vc.num_channels, tile, tile)
    for i in range(pixels.shape[0]):
        n_tiles = layouts[i % req.images_per_sample][0]
        pixels[i, :n_tiles] = req.pixels(n_tiles, vc.num_channels, tile, tile)
    out["pixel_values"] = pixels
    out["image_sizes"] = torch.tensor([list(sizes[i % req.images_per_sample]) for i in range(pixels.shape[0])])
    return out


def llava_prologue(model, call: dict) -> dict:
    """LLaVA and LLaVA-NeXT (and a LLaVA config with a Pixtral tower): ``image_sizes`` as a list of
    ``(h, w)`` tuples (see :func:`graphlora.families.pixtral.image_sizes_prologue`)."""
    return image_sizes_prologue(model, call)
