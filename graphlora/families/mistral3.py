"""Mistral 3: Pixtral vision tower + a patch merger (``spatial_merge_size``), Pixtral token layout
with one ``[IMG]`` per ``patch_size * spatial_merge_size`` pixels. ``image_sizes`` is required;
:func:`mistral3_prologue` passes it as a list of tuples for tracing (static values)."""

from __future__ import annotations

from ._common import InputRequest
from .pixtral import image_sizes_prologue, pixtral_inputs


def mistral3_inputs(config, req: InputRequest) -> dict:
    return pixtral_inputs(config, req, merge=config.spatial_merge_size)


def mistral3_prologue(model, call: dict) -> dict:
    """Mistral 3: ``image_sizes`` as a list of ``(h, w)`` tuples (the patch merger reshapes by them)."""
    return image_sizes_prologue(model, call)
