"""Idefics3 and SmolVLM (same layout; SigLIP-like tower, pixel-shuffle connector, Llama text).

Per image (``Idefics3Processor.replace_image_token``), with ``seq = (S/patch)^2 / scale^2``:

- not split:  ``<fake> <global-img> <image>*seq <fake>``
- split into ``rows x cols`` tiles: for each row, for each col ``<fake> <row_r_col_c> <image>*seq``,
  then ``\\n``; then ``\\n <fake> <global-img> <image>*seq <fake>``.

Every crop (tiles + global) is one ``S x S`` image (``S = vision_config.image_size``), so
``pixel_values`` is ``[B, crops, 3, S, S]`` and ``pixel_attention_mask`` ``[B, crops, S, S]``.
The requested ``image_size`` is the original image size: ``ceil(h/S) x ceil(w/S)`` tiles, no split
when it fits in one tile (the default).

Structural ids: ``config.fake_image_token_id`` / ``global_image_token_id`` / ``row_col_token_ids``
(36 ids, row-major 6x6) / ``newline_token_id`` when set; otherwise ``<fake>`` is
``image_token_id - 1`` (true for the released checkpoints) and the rest are taken from the top of
the vocabulary.
"""

from __future__ import annotations

import torch

from ._common import InputRequest, TokenPool, ceil_div, cfg_size, collate, interleaved_samples


def _row_col_ids(config, pool: TokenPool) -> list[int]:
    ids = getattr(config, "row_col_token_ids", None)
    return list(ids) if ids else pool.take(36)


def idefics3_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    tile = cfg_size(vc.image_size)
    seq = (tile // cfg_size(vc.patch_size)) ** 2 // config.scale_factor**2
    pool = TokenPool(config)
    fake = pool.structural(config, "fake_image_token_id", config.image_token_id - 1)
    glob = pool.structural(config, "global_image_token_id")
    newline = pool.structural(config, "newline_token_id")
    row_col = _row_col_ids(config, pool)

    grids = []
    for h, w in req.sizes(tile):
        rows, cols = ceil_div(h, tile), ceil_div(w, tile)
        grids.append((0, 0) if rows * cols == 1 else (rows, cols))
    if any(r > 6 or c > 6 for r, c in grids):
        raise ValueError("idefics3: at most 6x6 tiles per image")

    def add_image(s, k):
        rows, cols = grids[k]
        for r in range(rows):
            for c in range(cols):
                s.special(fake, row_col[6 * r + c]).image(config.image_token_id, seq)
            s.special(newline)
        if rows:
            s.special(newline)
        s.special(fake, glob).image(config.image_token_id, seq).special(fake)

    out = collate(interleaved_samples(req, pool, add_image), req, pool)
    crops = sum(r * c + 1 for r, c in grids)
    out["pixel_values"] = req.pixels(req.batch_size, crops, vc.num_channels, tile, tile)
    out["pixel_attention_mask"] = torch.ones(req.batch_size, crops, tile, tile, dtype=torch.bool)
    return out
