"""LFM2-VL (Siglip2 NaFlex tower, pixel-unshuffle MLP projector, LFM2 hybrid conv/attention text).

Per image (``Lfm2VlProcessor._build_image_tokens``, one tile): ``<|image_start|> <image> * n
<|image_end|>`` with ``n = (h / (patch * f)) * (w / (patch * f))``, ``f = downsample_factor``. The
processor's ``smart_resize`` makes both sides multiples of ``patch * f``; the requested size is taken as
that resized size (so it must be such a multiple). Images the processor would split into tiles
(more than ``max_image_tokens``) are not synthesised: a tile is one more image of the same kind,
between ``<|img_row_r_col_c|>`` tags.

NaFlex pixels: each image is patchified row-major into ``[patches, 3 * patch * patch]`` (channels
last within a patch, as ``convert_image_to_patches``), padded to the batch's largest image
(``pixel_values`` ``[B*k, max_patches, 3*p*p]``), with ``pixel_attention_mask`` ``[B*k, max_patches]``
(1 on real patches) and ``spatial_shapes`` ``[B*k, 2]`` = the patch grid ``(h/p, w/p)``. The
processor pads to a fixed ``max_num_patches`` instead; any padding length computes the same.

Structural ids: ``config.image_start_token_id`` / ``image_end_token_id`` when set, else taken from the
top of the vocabulary.
"""

from __future__ import annotations

import math

import torch

from ._common import InputRequest, TokenPool, cfg_size, check_divisible, collate, interleaved_samples


def lfm2_vl_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    p = cfg_size(vc.patch_size)
    f = config.downsample_factor
    default = math.isqrt(vc.num_patches) * p  # the learned position grid, at one patch per cell
    sizes = req.sizes(default)
    for size in sizes:
        check_divisible("lfm2_vl", size, p * f)
    grids = [(h // p, w // p) for h, w in sizes]

    pool = TokenPool(config)
    start = pool.structural(config, "image_start_token_id")
    end = pool.structural(config, "image_end_token_id")

    def add_image(s, k):
        gh, gw = grids[k]
        s.special(start).image(config.image_token_id, (gh // f) * (gw // f)).special(end)

    out = collate(interleaved_samples(req, pool, add_image), req, pool)
    n_images = req.batch_size * req.images_per_sample
    max_patches = max(gh * gw for gh, gw in grids)
    pixels = torch.zeros(n_images, max_patches, vc.num_channels * p * p)
    mask = torch.zeros(n_images, max_patches, dtype=torch.int32)
    for i in range(n_images):
        gh, gw = grids[i % req.images_per_sample]
        pixels[i, : gh * gw] = req.pixels(gh * gw, vc.num_channels * p * p)
        mask[i, : gh * gw] = 1
    out["pixel_values"] = pixels
    out["pixel_attention_mask"] = mask
    out["spatial_shapes"] = torch.tensor([list(grids[i % req.images_per_sample]) for i in range(n_images)])
    return out
