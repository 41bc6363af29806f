"""Mllama (Llama 3.2 Vision): tiled vision encoder, cross-attention into the text decoder.

Per image one ``<|image|>`` token (``image_token_id`` = text ``vocab_size``: an id only the
embedding table knows, never a label); the sequence starts with BOS. Pixels are tiles:
``pixel_values`` ``[B, k, max_num_tiles, 3, S, S]`` (unused tiles zero), ``aspect_ratio_ids``
``[B, k]`` (1-based index into ``supported_aspect_ratios``), ``aspect_ratio_mask``
``[B, k, max_num_tiles]``, and ``cross_attention_mask`` ``[B, L, k, max_num_tiles]``: every
token from an image's placeholder on attends to that image (up to the next non-adjacent image),
as ``MllamaProcessor`` builds it. The requested ``image_size`` is the original size, placed on
the best tile canvas like ``MllamaImageProcessor`` (default: one tile).
"""

from __future__ import annotations

import torch

from ._common import InputRequest, TokenPool, cfg_size, collate, interleaved_samples


def best_tile_grid(size: tuple[int, int], tile: int, ratios: list) -> tuple[int, int]:
    """(rows, cols) of tiles, as ``get_optimal_tiled_canvas``: the smallest upscale, else the
    largest downscale, ties broken by the smallest canvas."""
    h, w = size
    scored = []
    for rows, cols in ratios:
        scale = min(rows * tile / h, cols * tile / w)
        scored.append((scale, rows * cols, (rows, cols)))
    up = [s for s in scored if s[0] >= 1]
    best = min(up, key=lambda s: (s[0], s[1])) if up else max(scored, key=lambda s: (s[0], -s[1]))
    return best[2]


def cross_attention_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, tiles: list[int], max_tiles: int
) -> torch.Tensor:
    """Dense ``[B, L, k, max_tiles]`` mask (``get_cross_attention_token_mask`` + densify)."""
    batch, length = input_ids.shape
    mask = torch.zeros(batch, length, len(tiles), max_tiles, dtype=torch.long)
    for b in range(batch):
        locs = (input_ids[b] == image_token_id).nonzero().squeeze(1).tolist()
        unpadded = int(attention_mask[b].sum())
        spans = [[a, c] for a, c in zip(locs[:-1], locs[1:])] + [[locs[-1], unpadded]]
        last_end = spans[-1][1]
        for span in reversed(spans):  # adjacent images all attend to the text that follows them
            if span[0] == span[1] - 1:
                span[1] = last_end
            last_end = span[1]
        for j, (start, end) in enumerate(spans):
            mask[b, start:end, j, : tiles[j]] = 1
    return mask


def mllama_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    tile, max_tiles = cfg_size(vc.image_size), vc.max_num_tiles
    ratios = [tuple(r) for r in vc.supported_aspect_ratios]
    grids = [best_tile_grid(s, tile, ratios) for s in req.sizes(tile)]
    tiles = [r * c for r, c in grids]

    pool = TokenPool(config, reserved=[config.image_token_id])
    prefix = [pool.bos_id] if pool.bos_id is not None else []
    samples = interleaved_samples(req, pool, lambda s, k: s.image(config.image_token_id, 1), prefix=prefix)
    out = collate(samples, req, pool)

    b, k = req.batch_size, req.images_per_sample
    pixels = torch.zeros(b, k, max_tiles, vc.num_channels, tile, tile)
    ratio_mask = torch.zeros(b, k, max_tiles, dtype=torch.long)
    for i in range(b):
        for j in range(k):
            pixels[i, j, : tiles[j]] = req.pixels(tiles[j], vc.num_channels, tile, tile)
            ratio_mask[i, j, : tiles[j]] = 1
    out["pixel_values"] = pixels
    out["aspect_ratio_ids"] = torch.tensor([[ratios.index(g) + 1 for g in grids]] * b)
    out["aspect_ratio_mask"] = ratio_mask
    out["cross_attention_mask"] = cross_attention_mask(
        out["input_ids"], out["attention_mask"], config.image_token_id, tiles, max_tiles
    )
    return out
