"""Janus (SigLIP-like understanding tower, MLP aligner, Llama text; a VQ-VAE and generation heads for images).

Per image (``JanusProcessor.replace_image_token``): ``<begin_of_image> <image_placeholder> *
num_image_tokens <end_of_image>``, ``num_image_tokens = (S / patch)^2`` (one feature per patch, no CLS);
the tokenizer starts each sample with BOS. ``pixel_values`` is ``[B*k, 3, S, S]`` (every image resized to
the tower's ``image_size``). The understanding forward never runs the VQ-VAE or the generation
embeddings, aligner and head: they are not inputs of this batch.

Structural ids: ``config.image_start_token_id`` / ``image_end_token_id`` when set, else taken from the top
of the vocabulary.
"""

from __future__ import annotations

from ._common import InputRequest, TokenPool, cfg_size, collate, interleaved_samples


def janus_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    side = cfg_size(vc.image_size)
    if req.uniform_size(side, "janus") != (side, side):
        raise ValueError(f"janus: images must be {side}x{side} (vision_config.image_size)")
    n_tokens = (side // cfg_size(vc.patch_size)) ** 2
    pool = TokenPool(config)
    start = pool.structural(config, "image_start_token_id")
    end = pool.structural(config, "image_end_token_id")

    def add_image(s, k):
        s.special(start).image(config.image_token_id, n_tokens).special(end)

    prefix = [pool.bos_id] if pool.bos_id is not None else []
    out = collate(interleaved_samples(req, pool, add_image, prefix=prefix), req, pool)
    out["pixel_values"] = req.pixels(req.batch_size * req.images_per_sample, vc.num_channels, side, side)
    return out
