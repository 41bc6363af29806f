"""GLM-4V (GLM-4.1V): the Qwen2-VL pixel/grid format with GLM wrapper tokens
``<|begin_of_image|> <|image|> * n <|end_of_image|>`` (``image_start/end_token_id``)."""

from __future__ import annotations

from ._common import InputRequest
from .qwen_vl import vision_grid_inputs


def glm4v_inputs(config, req: InputRequest) -> dict:
    return vision_grid_inputs(config, req, start_id=config.image_start_token_id, end_id=config.image_end_token_id)
