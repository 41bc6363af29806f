"""Phi-4-multimodal (SigLIP-like tower inside the token embedding, HD crops, Phi-3 text). Vision only.

The image arguments are named differently from other families: ``image_pixel_values``
``[N, 1 + crops, 3, C, C]`` (global resize first, then the ``rows x cols`` HD crops; C =
``vision_config.crop_size``), ``image_sizes`` ``[N, 2]`` = ``(rows*C, cols*C)`` and
``image_attention_mask`` ``[N, 1 + crops, C/patch, C/patch]``. Per image the processor emits
``<|image|>`` (``vision_config.image_token_id``) ``b*(b+1) + 1 + rows*b*(cols*b+1)`` times, where
``b`` = features per side after the 2x2 average pool; nothing wraps them. The requested
``image_size`` is the original size: ``ceil(h/C) x ceil(w/C)`` crops (default 1 x 1).
"""

from __future__ import annotations

import torch

from ._common import InputRequest, TokenPool, cfg_size, collate, interleaved_samples, tile_grid


def phi4_multimodal_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    crop = cfg_size(vc.crop_size)
    patches = cfg_size(vc.image_size) // cfg_size(vc.patch_size)
    b = (patches + patches % 2) // 2  # odd grids are reflection-padded before the 2x2 pool
    mask_side = crop // cfg_size(vc.patch_size)
    grids = [tile_grid(s, crop) for s in req.sizes(crop)]
    n_tokens = [b * (b + 1) + 1 + r * b * (c * b + 1) for r, c in grids]

    pool = TokenPool(config)
    samples = interleaved_samples(req, pool, lambda s, k: s.image(vc.image_token_id, n_tokens[k]))
    out = collate(samples, req, pool)

    n_images = req.batch_size * req.images_per_sample
    max_crops = 1 + max(r * c for r, c in grids)
    pixels = torch.zeros(n_images, max_crops, vc.num_channels, crop, crop)
    mask = torch.zeros(n_images, max_crops, mask_side, mask_side, dtype=torch.bool)
    sizes = []
    for i in range(n_images):
        rows, cols = grids[i % req.images_per_sample]
        pixels[i, : 1 + rows * cols] = req.pixels(1 + rows * cols, vc.num_channels, crop, crop)
        mask[i, : 1 + rows * cols] = True
        sizes.append([rows * crop, cols * crop])
    out["image_pixel_values"] = pixels
    out["image_sizes"] = torch.tensor(sizes)
    out["image_attention_mask"] = mask
    return out
