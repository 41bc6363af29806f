"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE (and GLM-4V / GLM-4.5V, which share the layout; see
``glm4v.py``).

Images are cut into ``patch x patch`` pixel patches (times ``temporal_patch_size`` frames: a still
image is repeated), grouped ``spatial_merge_size**2`` at a time by the merger. Per image:
``<|vision_start|> <|image_pad|> * (h/patch * w/patch / merge**2) <|vision_end|>``.

- ``pixel_values`` ``[sum_i t*h_i*w_i, C * temporal_patch * patch * patch]``: flattened patches of
  all images, sample-major (the processor's patch order inside an image does not matter for
  random pixels).
- ``image_grid_thw`` ``[B*k, 3]`` = ``(1, h/patch, w/patch)`` per image.
- ``mm_token_type_ids`` (1 on ``<|image_pad|>``): required by transformers 5 to build the 3-D
  M-RoPE positions (``get_rope_index``) whenever ``image_grid_thw`` is passed.

Images of a sample may differ in size (``image_size=[(32, 32), (32, 64)]``); sizes must be
multiples of ``patch * merge`` pixels. The default image is ``2 * patch * merge`` pixels square.

Tracing (``*_prologue``, see ``docs/tracing.md``): the vision tower and M-RoPE derive shapes and
indices from ``image_grid_thw`` *values* (``tolist``, ``repeat_interleave``, per-image loops), which
torch.export cannot follow. The prologue computes them eagerly and passes them in as keyword
arguments transformers 5.24 accepts (``image_position_ids``, ``image_cu_seqlens``, ...), and makes
the packed vision attention use a block-diagonal mask instead of a split (``_packed_vision``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ._packed_vision import install_block_diagonal_vision_attention
from ._common import InputRequest, TokenPool, cfg_size, check_divisible, collate, interleaved_samples


def vision_grid_inputs(config, req: InputRequest, *, start_id: int, end_id: int) -> dict:
    """Shared by the Qwen-VL family and GLM-4V (which only differ in the wrapper tokens)."""
    vc = config.vision_config
    patch, merge = cfg_size(vc.patch_size), vc.spatial_merge_size
    temporal = cfg_size(vc.temporal_patch_size)
    sizes = req.sizes(2 * patch * merge)
    for s in sizes:
        check_divisible(config.model_type, s, patch * merge)
    grids = [(1, h // patch, w // patch) for h, w in sizes]

    pool = TokenPool(config)

    def add_image(s, k):
        _, gh, gw = grids[k]
        s.special(start_id).image(config.image_token_id, gh * gw // merge**2).special(end_id)

    out = collate(interleaved_samples(req, pool, add_image), req, pool, token_type_ids=True)
    out["mm_token_type_ids"] = out.pop("token_type_ids")
    all_grids = grids * req.batch_size  # sample-major
    n_patches = sum(t * h * w for t, h, w in all_grids)
    out["pixel_values"] = req.pixels(n_patches, vc.in_channels * temporal * patch * patch)
    out["image_grid_thw"] = torch.tensor(all_grids, dtype=torch.long)
    return out


def qwen_vl_inputs(config, req: InputRequest) -> dict:
    return vision_grid_inputs(
        config, req, start_id=config.vision_start_token_id, end_id=config.vision_end_token_id
    )


# --------------------------------------------------------------------------------------------
# eager prologue (tracing)
# --------------------------------------------------------------------------------------------

#: modality -> (pixel argument, grid argument) of the Qwen-VL / GLM-4V forwards
_MODALITIES = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*Model`` (holding ``visual`` and ``compute_3d_position_ids``) of a Qwen-VL-like model."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and hasattr(candidate, "compute_3d_position_ids") and hasattr(candidate, "visual"):
            return candidate
    raise TypeError(f"{type(model).__name__} is not a Qwen-VL / GLM-4V model (no .model.visual)")


def grid_vision_kwargs(
    visual: torch.nn.Module, grid_thw: torch.Tensor, *, windows: bool = False, interpolation: bool = False
) -> dict[str, Any]:
    """What the vision tower's ``forward`` would derive from ``grid_thw``, computed eagerly.

    Keys without the modality prefix, as the vision tower reads them from its ``**kwargs``
    (``transformers.vision_utils.get_vision_*``): ``position_ids`` ``[patches, 2]`` (rotary h/w
    coordinates), ``cu_seqlens`` ``[frames + 1]`` (int32 patch-count boundaries), Qwen2.5-VL
    ``window_index`` ``[patches / merge**2]`` and ``cu_window_seqlens`` (window boundaries), Qwen3-VL
    ``interp_indices`` / ``interp_weights`` ``[patches, 4]`` (bilinear taps into the learned position
    table). With a flash-attention tower, also ``max_seqlen`` (and ``max_window_seqlen``) as Python
    ints: those become static values of the trace.
    """
    from transformers.utils.generic import get_max_seqlen, is_flash_attention_requested
    from transformers.vision_utils import (
        get_vision_attention_seqlens,
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
        get_vision_window_index,
    )

    config = visual.config
    out: dict[str, Any] = {}
    if interpolation:
        out["interp_indices"], out["interp_weights"] = get_vision_interpolation_indices_and_weights(
            grid_thw,
            num_grid_per_side=visual.num_grid_per_side,
            mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners,
            spatial_merge_size=config.spatial_merge_size,
        )
    out["position_ids"] = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
    out["cu_seqlens"], _ = get_vision_attention_seqlens(grid_thw, config)
    flash = is_flash_attention_requested(config)
    if flash:
        out["max_seqlen"] = int(get_max_seqlen(out["cu_seqlens"], config))
    if windows:
        out["window_index"], out["cu_window_seqlens"] = get_vision_window_index(
            grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        if flash:
            out["max_window_seqlen"] = int(get_max_seqlen(out["cu_window_seqlens"], config))
    return out


def _has_cache(call: dict) -> bool:
    return call.get("cache") is not None or call.get("past_key_values") is not None


def _position_ids(base: torch.nn.Module, call: dict) -> torch.Tensor | None:
    """``compute_3d_position_ids`` exactly as the forward would call it (same arguments)."""
    params = inspect.signature(base.compute_3d_position_ids).parameters
    args = {
        "input_ids": call.get("input_ids"),
        "inputs_embeds": call.get("inputs_embeds"),
        "image_grid_thw": call.get("image_grid_thw"),
        "video_grid_thw": call.get("video_grid_thw"),
        "attention_mask": call.get("attention_mask"),
        "cache": None,
        "mm_token_type_ids": call.get("mm_token_type_ids"),
        "second_per_grid_ts": call.get("second_per_grid_ts"),
    }
    return base.compute_3d_position_ids(**{k: v for k, v in args.items() if k in params})


def grid_prologue(
    model: torch.nn.Module, call: dict[str, Any], *, windows: bool = False, interpolation: bool = False
) -> dict[str, Any]:
    """Eager prologue shared by Qwen2-VL, Qwen2.5-VL, Qwen3-VL and GLM-4V.

    Returns a new dict: ``call`` plus

    * ``position_ids`` ``[3, B, L]``: the language model's M-RoPE positions (``get_rope_index``,
      through ``compute_3d_position_ids``, which also records ``rope_deltas`` on the model as the
      forward does); left out when the model would not compute them (text-only call);
    * per modality with pixels (``image``, ``video``): ``<modality>_<key>`` for every key of
      :func:`grid_vision_kwargs` (``image_position_ids``, ``image_cu_seqlens``, ...).

    Values the caller already passed are kept (idempotent). A call with a KV cache is returned
    unchanged (incremental decoding runs eagerly and relies on the model's ``rope_deltas``).
    Side effect: installs the block-diagonal packed vision attention on ``model``
    (:func:`~graphlora.families._packed_vision.install_block_diagonal_vision_attention`; same numbers).
    """
    out = dict(call)
    if _has_cache(call):
        return out
    install_block_diagonal_vision_attention(model)
    base = _base_model(model)
    with torch.no_grad():
        for modality, (pixel_key, grid_key) in _MODALITIES.items():
            grid = call.get(grid_key)
            if call.get(pixel_key) is None or grid is None:
                continue
            metadata = grid_vision_kwargs(base.visual, grid, windows=windows, interpolation=interpolation)
            for key, value in metadata.items():
                if out.get(f"{modality}_{key}") is None:
                    out[f"{modality}_{key}"] = value
        if out.get("position_ids") is None:
            position_ids = _position_ids(base, call)
            if position_ids is not None:
                out["position_ids"] = position_ids
    return out


def qwen2_vl_prologue(model: torch.nn.Module, call: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-VL: M-RoPE ``position_ids``, ``image_position_ids``, ``image_cu_seqlens``."""
    return grid_prologue(model, call)


def qwen2_5_vl_prologue(model: torch.nn.Module, call: dict[str, Any]) -> dict[str, Any]:
    """Qwen2.5-VL: as Qwen2-VL plus ``image_window_index`` and ``image_cu_window_seqlens``."""
    return grid_prologue(model, call, windows=True)


def qwen3_vl_prologue(model: torch.nn.Module, call: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-VL: as Qwen2-VL plus ``image_interp_indices`` and ``image_interp_weights``."""
    return grid_prologue(model, call, interpolation=True)
