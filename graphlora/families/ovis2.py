"""Ovis2 (AIMv2-like tower, a visual tokenizer head over a visual vocabulary, a visual embedding table, Qwen2 text).

Per image (``Ovis2Processor.replace_image_token``, ``crop_to_patches`` off, the image processor's
default: a 1 x 1 grid): ``<IMG_START> <IMG_ATOM>*n <IMG_GRID> <IMG_END>``. ``<IMG_ATOM>`` is
``config.image_token_id``; the indicators are ``config.visual_indicator_token_ids`` in the order
START, GRID, COL, ROW, END (their embeddings are the last rows of the visual embedding table).
``n = ((S/patch) / hidden_stride)^2`` (the processor's ``image_seq_length``).

Every image is resized to the tower's ``S x S`` (its position embedding has one entry per patch), so
the requested ``image_size`` does not change the tensors: ``pixel_values`` is ``[B*k, 3, S, S]``.
"""

from __future__ import annotations

from ._common import InputRequest, TokenPool, ceil_div, cfg_size, collate, interleaved_samples


def ovis2_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    side = cfg_size(vc.image_size)
    n_tokens = ceil_div(side // cfg_size(vc.patch_size), vc.hidden_stride) ** 2  # the tower pads to the stride
    start, grid, _col, _row, end = config.visual_indicator_token_ids
    pool = TokenPool(config)

    def add_image(s, k):
        s.special(start).image(config.image_token_id, n_tokens).special(grid, end)

    out = collate(interleaved_samples(req, pool, add_image), req, pool)
    out["pixel_values"] = req.pixels(req.batch_size * req.images_per_sample, vc.num_channels, side, side)
    return out
