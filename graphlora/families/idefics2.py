"""Idefics2 (SigLIP-like NaViT tower, perceiver-resampler connector, Mistral text).

Per image (``Idefics2Processor.__call__``, no image splitting, the image processor's default):
``<fake> <image>*n <fake>`` with ``n = perceiver_config.resampler_n_latents`` (the processor's
``image_seq_len``): the resampler gives every image the same number of tokens whatever its size.
Two images with no text between them share one ``<fake>`` (the processor removes the doubled one).

Images keep their (resized) size: ``pixel_values`` is ``[B, images, 3, H, W]`` padded at the bottom
and right to the largest image of the batch, ``pixel_attention_mask`` ``[B, images, H, W]`` (int64,
as the image processor) marks the real pixels; the tower's patch mask and bucketed position ids
follow from it. The requested ``image_size`` is the resized size (a multiple of the patch size;
default the tower's ``image_size``).

``<fake>`` is ``config.fake_image_token_id`` when set, else ``image_token_id - 1`` (as released).
"""

from __future__ import annotations

import torch

from ._common import InputRequest, TokenPool, cfg_size, check_divisible, collate, interleaved_samples


def idefics2_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    patch = cfg_size(vc.patch_size)
    sizes = req.sizes(cfg_size(vc.image_size))
    for size in sizes:
        check_divisible("idefics2", size, patch)
    seq = config.perceiver_config.resampler_n_latents
    pool = TokenPool(config)
    fake = pool.structural(config, "fake_image_token_id", config.image_token_id - 1)

    def add_image(s, k):
        if not (s.ids and s.ids[-1] == fake):  # adjacent images: one <fake> between them
            s.special(fake)
        s.image(config.image_token_id, seq).special(fake)

    out = collate(interleaved_samples(req, pool, add_image), req, pool)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixels = torch.zeros(req.batch_size, len(sizes), vc.num_channels, height, width)
    mask = torch.zeros(req.batch_size, len(sizes), height, width, dtype=torch.long)
    for k, (h, w) in enumerate(sizes):
        pixels[:, k, :, :h, :w] = req.pixels(req.batch_size, vc.num_channels, h, w)
        mask[:, k, :h, :w] = 1
    out["pixel_values"] = pixels
    out["pixel_attention_mask"] = mask
    return out
