"""GLM-4V (GLM-4.1V) and its MoE variant GLM-4.5V (``glm4v_moe``, same vision tower and tokens): the Qwen2-VL
pixel/grid format with GLM wrapper tokens
``<|begin_of_image|> <|image|> * n <|end_of_image|>`` (``image_start/end_token_id``)."""

from __future__ import annotations

from ._common import InputRequest
from .qwen_vl import grid_prologue, vision_grid_inputs


def glm4v_inputs(config, req: InputRequest) -> dict:
    return vision_grid_inputs(config, req, start_id=config.image_start_token_id, end_id=config.image_end_token_id)


def glm4v_prologue(model, call: dict) -> dict:
    """GLM-4V: M-RoPE ``position_ids``, ``image_position_ids``, ``image_cu_seqlens`` (see
    :func:`graphlora.families.qwen_vl.grid_prologue`). The vision embeddings' bicubic resampling of
    the learned position table is computed in the graph from ``image_grid_thw`` and the positions
    with static-shape ops, so nothing else is needed."""
    return grid_prologue(model, call)
