"""PaliGemma (SigLIP + one Linear projector + Gemma text), prefix-LM training format.

``PaliGemmaProcessor`` with a ``suffix``: ``<image>*(n*k) <bos> prompt \\n suffix <eos>`` with all
images first, ``n = (S/patch)^2``. ``token_type_ids`` is 0 on the prefix (images, prompt, newline)
and 1 on the suffix; the prefix attends bidirectionally, and labels are -100 on the whole prefix.
``text_len`` tokens are split into prompt (half) and suffix. Images must have the tower's size.
The ``\\n`` id is ``config.newline_token_id`` when set, else Gemma's 108 (if free).
"""

from __future__ import annotations

from ._common import InputRequest, Sample, TokenPool, cfg_size, collate

GEMMA_NEWLINE = 108


def paligemma_inputs(config, req: InputRequest) -> dict:
    vc = config.vision_config
    side = cfg_size(vc.image_size)
    if req.uniform_size(side, "paligemma") != (side, side):
        raise ValueError(f"paligemma: images must be {side}x{side} (vision_config.image_size)")
    n = (side // cfg_size(vc.patch_size)) ** 2

    pool = TokenPool(config)
    newline = pool.structural(config, "newline_token_id", GEMMA_NEWLINE)
    eos = config.get_text_config().eos_token_id
    eos = [eos] if isinstance(eos, int) else []
    n_prompt = req.text_len // 2
    n_suffix = max(req.text_len - n_prompt - len(eos), 1)

    samples = []
    for _ in range(req.batch_size):
        s = Sample().image(config.image_token_id, n * req.images_per_sample, type_id=0)
        s.text([pool.bos_id] if pool.bos_id is not None else [], loss=False)
        s.text(pool.draw(n_prompt, req.generator), loss=False).special(newline)
        s.text(pool.draw(n_suffix, req.generator) + eos, type_id=1)
        samples.append(s)
    out = collate(samples, req, pool, token_type_ids=True)  # 1 on the suffix, 0 elsewhere
    out["pixel_values"] = req.pixels(req.batch_size * req.images_per_sample, vc.num_channels, side, side)
    return out
