"""Cohere2 Vision (Command A Vision: SigLIP + pixel-shuffle SwiGLU projector + Cohere2 text).

Per image (``Cohere2VisionProcessor.replace_image_token``), ``n = ((S/patch) / downsample_factor)^2``
``<|IMG_PATCH|>`` per tile (``image_token_id``), each tile closed by ``<|IMG_LINE_BREAK|>``:
``<|START_OF_IMG|> (<|IMG_PATCH|>*n <|IMG_LINE_BREAK|>)*tiles <|END_OF_IMG|>``. Tiling
(``Cohere2VisionImageProcessor.crop_image_to_patches``): the image is resized onto the
``(cols, rows)`` canvas of ``S``-pixel tiles that ``get_optimal_tiled_canvas`` picks (at most
``max_patches`` = 12 tiles), and a canvas of more than one tile adds the thumbnail (last).
``pixel_values`` ``[total_tiles, 3, S, S]``. Structural ids come from config attributes
``boi_token_id``, ``eoi_token_id``, ``img_line_break_token_id`` when set, else from the top of the
vocabulary.
"""

from __future__ import annotations

from ._common import InputRequest, TokenPool, cfg_size, collate, interleaved_samples

MAX_TILES = 12  # the image processor's max_patches default


def tiled_canvas(size: tuple[int, int], side: int, max_tiles: int = MAX_TILES) -> tuple[int, int]:
    """(cols, rows) of the canvas the image processor resizes an image of ``size`` (h, w) onto.

    Canvases of at most ``max_tiles`` tiles, smallest area first: the one needing the least
    upscaling to cover the image, or, when every canvas must shrink it, the one shrinking it least
    (the first in that order on ties). transformers' helper lives in a module that needs torchvision.
    """
    h, w = size
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles),
                   key=lambda g: g[0] * g[1])
    scales = [min(c * side / w, r * side / h) for c, r in grids]
    if all(s < 1 for s in scales):
        return grids[scales.index(max(scales))]
    upscales = [s if s >= 1 else float("inf") for s in scales]
    return grids[upscales.index(min(upscales))]


def cohere2_vision_tiles(size: tuple[int, int], side: int) -> int:
    """Tiles of one image of ``size`` (h, w) pixels: the canvas, plus the thumbnail when it has several."""
    cols, rows = tiled_canvas(size, side)
    return 1 if cols * rows == 1 else cols * rows + 1


def cohere2_vision_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    side = cfg_size(vc.image_size)
    n = (side // cfg_size(vc.patch_size) // config.downsample_factor) ** 2
    tiles = [cohere2_vision_tiles(size, side) for size in req.sizes(side)]

    pool = TokenPool(config)
    boi = pool.structural(config, "boi_token_id")
    eoi = pool.structural(config, "eoi_token_id")
    line_break = pool.structural(config, "img_line_break_token_id")

    def add_image(s, k):
        s.special(boi)
        for _ in range(tiles[k]):
            s.image(config.image_token_id, n).special(line_break)
        s.special(eoi)

    out = collate(interleaved_samples(req, pool, add_image), req, pool)
    out["pixel_values"] = req.pixels(req.batch_size * sum(tiles), vc.num_channels, side, side)
    return out
