"""Mistral 3: Pixtral vision tower + a patch merger (``spatial_merge_size``), Pixtral token layout
with one ``[IMG]`` per ``patch_size * spatial_merge_size`` pixels. ``image_sizes`` is required."""

from __future__ import annotations

from ._common import InputRequest
from .pixtral import pixtral_inputs


def mistral3_inputs(config, req: InputRequest) -> dict:
    return pixtral_inputs(config, req, merge=config.spatial_merge_size)
