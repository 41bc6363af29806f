"""DeepSeek-VL (SigLIP + 2-layer GELU aligner + Llama text).

``DeepseekVLProcessor.replace_image_token``: ``<image_placeholder>`` (``image_token_id``) repeated
``num_image_tokens`` times per image, one per SigLIP patch (``(S/patch)^2``, 576 for the released
384 px / 16 px tower); no start/end tokens. The image processor resizes (and pads) every image to
the tower's size: ``pixel_values`` ``[B*k, 3, S, S]``; images must have that size here.
"""

from __future__ import annotations

from ._common import InputRequest, TokenPool, cfg_size, collate, interleaved_samples


def deepseek_vl_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    side = cfg_size(vc.image_size)
    if req.uniform_size(side, "deepseek_vl") != (side, side):
        raise ValueError(f"deepseek_vl: images must be {side}x{side} (vision_config.image_size)")
    n = (side // cfg_size(vc.patch_size)) ** 2

    pool = TokenPool(config)
    samples = interleaved_samples(req, pool, lambda s, k: s.image(config.image_token_id, n))
    out = collate(samples, req, pool)
    out["pixel_values"] = req.pixels(req.batch_size * req.images_per_sample, vc.num_channels, side, side)
    return out
