"""InternVL (InternViT + pixel-shuffle MLP projector + Qwen2/Llama text).

Per image: ``<img> <IMG_CONTEXT> * (seq * tiles) </img>`` with
``seq = (S/patch)^2 * downsample_ratio^2`` (``InternVLProcessor.replace_image_token``). An image
larger than one ``S``-pixel tile is cut into ``ceil(h/S) x ceil(w/S)`` tiles plus a thumbnail
(GotOcr2 ``crop_to_patches``); ``pixel_values`` is ``[total_tiles, 3, S, S]``, sample-major.
``<img>``/``</img>`` ids: ``config.start_image_token_id``/``end_image_token_id`` when set, else
``image_token_id - 2`` / ``- 1`` (the released tokenizers' order).
"""

from __future__ import annotations

from ._common import InputRequest, TokenPool, cfg_size, collate, interleaved_samples, tile_grid


def internvl_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    side = cfg_size(vc.image_size)
    seq = int((side // cfg_size(vc.patch_size)) ** 2 * config.downsample_ratio**2)
    tiles = []
    for size in req.sizes(side):
        rows, cols = tile_grid(size, side)
        tiles.append(1 if rows * cols == 1 else rows * cols + 1)

    pool = TokenPool(config)
    start = pool.structural(config, "start_image_token_id", config.image_token_id - 2)
    end = pool.structural(config, "end_image_token_id", config.image_token_id - 1)

    def add_image(s, k):
        s.special(start).image(config.image_token_id, seq * tiles[k]).special(end)

    out = collate(interleaved_samples(req, pool, add_image), req, pool)
    out["pixel_values"] = req.pixels(req.batch_size * sum(tiles), vc.num_channels, side, side)
    return out
