"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL (and GLM-4V, which shares the layout; see ``glm4v.py``).

Images are cut into ``patch x patch`` pixel patches (times ``temporal_patch_size`` frames: a still
image is repeated), grouped ``spatial_merge_size**2`` at a time by the merger. Per image:
``<|vision_start|> <|image_pad|> * (h/patch * w/patch / merge**2) <|vision_end|>``.

- ``pixel_values`` ``[sum_i t*h_i*w_i, C * temporal_patch * patch * patch]``: flattened patches of
  all images, sample-major (the processor's patch order inside an image does not matter for
  random pixels).
- ``image_grid_thw`` ``[B*k, 3]`` = ``(1, h/patch, w/patch)`` per image.
- ``mm_token_type_ids`` (1 on ``<|image_pad|>``): required by transformers 5 to build the 3-D
  M-RoPE positions (``get_rope_index``) whenever ``image_grid_thw`` is passed.

Images of a sample may differ in size (``image_size=[(32, 32), (32, 64)]``); sizes must be
multiples of ``patch * merge`` pixels. The default image is ``2 * patch * merge`` pixels square.
"""

from __future__ import annotations

import torch

from ._common import InputRequest, TokenPool, cfg_size, check_divisible, collate, interleaved_samples


def vision_grid_inputs(config, req: InputRequest, *, start_id: int, end_id: int) -> dict:
    """Shared by the Qwen-VL family and GLM-4V (which only differ in the wrapper tokens)."""
    vc = config.vision_config
    patch, merge = cfg_size(vc.patch_size), vc.spatial_merge_size
    temporal = cfg_size(vc.temporal_patch_size)
    sizes = req.sizes(2 * patch * merge)
    for s in sizes:
        check_divisible(config.model_type, s, patch * merge)
    grids = [(1, h // patch, w // patch) for h, w in sizes]

    pool = TokenPool(config)

    def add_image(s, k):
        _, gh, gw = grids[k]
        s.special(start_id).image(config.image_token_id, gh * gw // merge**2).special(end_id)

    out = collate(interleaved_samples(req, pool, add_image), req, pool, token_type_ids=True)
    out["mm_token_type_ids"] = out.pop("token_type_ids")
    all_grids = grids * req.batch_size  # sample-major
    n_patches = sum(t * h * w for t, h, w in all_grids)
    out["pixel_values"] = req.pixels(n_patches, vc.in_channels * temporal * patch * patch)
    out["image_grid_thw"] = torch.tensor(all_grids, dtype=torch.long)
    return out


def qwen_vl_inputs(config, req: InputRequest) -> dict:
    return vision_grid_inputs(
        config, req, start_id=config.vision_start_token_id, end_id=config.vision_end_token_id
    )
