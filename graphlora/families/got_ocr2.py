"""GOT-OCR 2.0 (SAM-style ViT with windowed attention and a conv neck, conv + linear projector, Qwen2 text).

Per image (``GotOcr2Processor``, ``crop_to_patches`` off, its default): ``<img> <imgpad>*n </img>``. The
image processor resizes every image to the tower's ``S x S`` (the patch embedding refuses any other
size), so the requested ``image_size`` does not change the tensors; ``pixel_values`` is
``[B*k, 3, S, S]``. ``n`` = the neck's ``(S/patch)^2`` grid after the projector's two stride-2
convolutions: ``ceil(S/patch/4)^2`` (``config.image_seq_length``, 256 released).

``<img>`` / ``</img>`` are ``config.img_start_token_id`` / ``img_end_token_id`` when set, else the ids
below ``image_token_id`` (as released: 151857, 151858, 151859).
"""

from __future__ import annotations

from ._common import InputRequest, TokenPool, ceil_div, cfg_size, collate, interleaved_samples


def got_ocr2_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    side = cfg_size(vc.image_size)
    grid = side // cfg_size(vc.patch_size)
    n_tokens = ceil_div(ceil_div(grid, 2), 2) ** 2  # two stride-2, padding-1, kernel-3 convolutions
    pool = TokenPool(config)
    start = pool.structural(config, "img_start_token_id", config.image_token_id - 2)
    end = pool.structural(config, "img_end_token_id", config.image_token_id - 1)

    def add_image(s, k):
        s.special(start).image(config.image_token_id, n_tokens).special(end)

    out = collate(interleaved_samples(req, pool, add_image), req, pool)
    out["pixel_values"] = req.pixels(req.batch_size * req.images_per_sample, vc.num_channels, side, side)
    return out
