"""Aya Vision (SigLIP + pixel-shuffle SwiGLU projector + Cohere2 text).

Per image (``AyaVisionProcessor.replace_image_token``), ``n = (S/patch)^2 / downsample_factor^2``:
``<|START_OF_IMG|> (TILE_i <|IMG_PATCH|>*n)*(tiles-1) TILE_GLOBAL <|IMG_PATCH|>*n <|END_OF_IMG|>``
where ``<|IMG_PATCH|>`` is ``image_token_id``. ``TILE_i``/``TILE_GLOBAL`` are plain words in the
real tokenizer; here each is one structural token. Tiling as InternVL: an image larger than one
``S``-pixel tile gives ``ceil(h/S) x ceil(w/S)`` tiles + the global thumbnail (last).
``pixel_values`` ``[total_tiles, 3, S, S]``. Structural ids come from config attributes
``start_of_img_token_id``, ``end_of_img_token_id``, ``tile_global_token_id``, ``tile_token_ids``
when set, else from the top of the vocabulary.
"""

from __future__ import annotations

from ._common import InputRequest, TokenPool, cfg_size, collate, interleaved_samples, tile_grid


def aya_vision_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    side = cfg_size(vc.image_size)
    n = (side // cfg_size(vc.patch_size)) ** 2 // config.downsample_factor**2
    tiles = []
    for size in req.sizes(side):
        rows, cols = tile_grid(size, side)
        tiles.append(1 if rows * cols == 1 else rows * cols + 1)

    pool = TokenPool(config)
    start = pool.structural(config, "start_of_img_token_id")
    end = pool.structural(config, "end_of_img_token_id")
    tile_global = pool.structural(config, "tile_global_token_id")
    tile_ids = list(getattr(config, "tile_token_ids", None) or pool.take(max(tiles) - 1 or 1))

    def add_image(s, k):
        s.special(start)
        for t in range(tiles[k] - 1):
            s.special(tile_ids[t]).image(config.image_token_id, n)
        s.special(tile_global).image(config.image_token_id, n).special(end)

    out = collate(interleaved_samples(req, pool, add_image), req, pool)
    out["pixel_values"] = req.pixels(req.batch_size * sum(tiles), vc.num_channels, side, side)
    return out
