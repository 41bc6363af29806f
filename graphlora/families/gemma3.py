"""Gemma 3 (SigLIP tower, avg-pool + matmul projector, Gemma 3 text decoder).

Layout per image (``Gemma3Processor.full_image_sequence``): ``<boi> <image_soft_token> *
mm_tokens_per_image <eoi>`` (the surrounding "\\n\\n" are plain text). ``token_type_ids`` is 1 on
the soft tokens: the decoder attends bidirectionally inside each image block (training needs it).
The projector reshapes to the configured patch grid, so every image has the tower's
``image_size``; ``pixel_values`` is ``[B*k, 3, S, S]``.
"""

from __future__ import annotations

from ._common import InputRequest, TokenPool, cfg_size, collate, interleaved_samples


def gemma3_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    side = cfg_size(vc.image_size)
    if req.uniform_size(side, "gemma3") != (side, side):
        raise ValueError(f"gemma3: images must be {side}x{side} (vision_config.image_size)")
    pool = TokenPool(config)

    def add_image(s, k):
        s.special(config.boi_token_id).image(config.image_token_id, config.mm_tokens_per_image)
        s.special(config.eoi_token_id)

    prefix = [pool.bos_id] if pool.bos_id is not None else []
    out = collate(interleaved_samples(req, pool, add_image, prefix=prefix), req, pool, token_type_ids=True)
    out["pixel_values"] = req.pixels(req.batch_size * req.images_per_sample, vc.num_channels, side, side)
    return out
