"""Llama 4 (tiled ViT with pixel-shuffle adapter, Linear projector, MoE text decoder).

Per image (``Llama4Processor._prompt_split_image``), ``n = (S/patch)^2 * pixel_shuffle_ratio^2``
``<|patch|>`` tokens (``image_token_id``) per tile: ``<|image_start|>``, then for a multi-tile image
each row ``(<|patch|>*n <|tile_x_separator|>)* ... <|patch|>*n <|tile_y_separator|>``, then
``<|image|> <|patch|>*n <|image_end|>`` for the global tile. The requested ``image_size`` is the
original size: ``ceil(h/S) x ceil(w/S)`` tiles, plus the global tile when more than one.
``pixel_values`` ``[total_tiles, 3, S, S]`` (tiles of an image, then its global tile).
``<|image|>`` and the separators: config attributes ``image_separator_token_id``,
``tile_x_separator_token_id``, ``tile_y_separator_token_id`` when set, else from the top of the vocab.
"""

from __future__ import annotations

from ._common import InputRequest, TokenPool, cfg_size, collate, interleaved_samples, tile_grid


def llama4_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    side = cfg_size(vc.image_size)
    n = int((side // cfg_size(vc.patch_size)) ** 2 * vc.pixel_shuffle_ratio**2)
    grids = [tile_grid(s, side) for s in req.sizes(side)]

    pool = TokenPool(config)
    image_sep = pool.structural(config, "image_separator_token_id")
    x_sep = pool.structural(config, "tile_x_separator_token_id")
    y_sep = pool.structural(config, "tile_y_separator_token_id")

    def add_image(s, k):
        rows, cols = grids[k]
        s.special(config.boi_token_id)
        if rows * cols > 1:
            for _ in range(rows):
                for x in range(cols):
                    s.image(config.image_token_id, n)
                    if x < cols - 1:
                        s.special(x_sep)
                s.special(y_sep)
        s.special(image_sep).image(config.image_token_id, n).special(config.eoi_token_id)

    out = collate(interleaved_samples(req, pool, add_image), req, pool)
    tiles = sum(r * c + (1 if r * c > 1 else 0) for r, c in grids)
    out["pixel_values"] = req.pixels(req.batch_size * tiles, vc.num_channels, side, side)
    return out
