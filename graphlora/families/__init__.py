"""Per-family registry of VLM recipes, keyed by ``config.model_type``.

A :class:`FamilyRecipe` holds what graphlora needs to know about one transformers model family.
Today that is how to synthesize a training batch from the config alone
(:func:`synthesize_inputs`): token ids with the image-placeholder layout the family's processor
would produce, pixel tensors and every other image argument of ``forward``, and labels.

It also holds the family's **eager prologue** (:func:`get_prologue`), used when tracing: a function
``prologue(model, call) -> call`` that computes the data-dependent metadata of a call eagerly
(M-RoPE positions, vision sequence boundaries, static ``image_sizes``) and returns the keyword
arguments to trace instead, so that torch.export sees no shape that depends on tensor values.
``docs/tracing.md`` lists what each family's prologue computes.

Adding a family: write ``recipe(config, req) -> dict`` in ``graphlora/families/<family>.py``
(see ``_common.py`` for the building blocks and ``llava.py`` for the simplest example) and add
one ``FamilyRecipe`` line to ``_RECIPES`` below (with ``prologue=`` if the model does not export
whole from the plain call).

Device notes: inputs are built on CPU in float32 from a local generator seeded with ``seed``,
then floating tensors are cast to the model's floating dtype and everything is moved to the
model's device. A model on the ``meta`` device gets **CPU** tensors (real values, so the token
layout stays inspectable); pass ``device="meta"`` to get meta tensors instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import aya_vision, cohere2_vision, deepseek_vl, gemma3, glm4v, got_ocr2, idefics2, idefics3, internvl, janus
from . import lfm2_vl, llama4, llava, llava_onevision, mistral3, mllama, ovis2, paligemma, phi4_multimodal, qwen_vl
from ._common import IGNORE_INDEX, InputRequest, as_size
from ._packed_vision import install_block_diagonal_vision_attention

__all__ = [
    "FamilyRecipe",
    "IGNORE_INDEX",
    "UnsupportedFamilyError",
    "get_prologue",
    "get_recipe",
    "check_not_refused",
    "prepare_for_tracing",
    "refused_model_types",
    "supported_model_types",
    "synthesize_inputs",
]

DEFAULT_TEXT_LEN = 8


class UnsupportedFamilyError(ValueError):
    """The model's ``config.model_type`` has no recipe."""


@dataclass(frozen=True)
class FamilyRecipe:
    """What graphlora knows about one model family.

    ``synthesize_inputs(config, req: InputRequest) -> dict`` returns CPU tensors: the keyword
    arguments of ``model.forward`` for one batch (see :func:`synthesize_inputs`).

    ``prologue(model, call) -> dict`` (optional; ``None`` = trace the call as it is): the keyword
    arguments to trace instead of ``call``, with data-dependent metadata computed eagerly and passed
    as inputs. Contract: ``model(**prologue(model, call))`` equals ``model(**call)``; the input dict
    is not modified; applying it to its own output changes nothing; a call it does not apply to
    (text only, KV cache) comes back unchanged. ``model`` is the module that will be traced (its
    side effects, if any, are documented per family and never change the numbers).

    ``prepare(model)`` (optional): installs export-friendly, numerically identical module
    implementations on the module objects of the model to trace (graphlora's mirror); idempotent.
    The prologue calls it too, so wiring the prologue alone is enough.
    """

    model_type: str
    synthesize_inputs: Callable[..., dict]
    prologue: Callable[[torch.nn.Module, dict], dict] | None = None
    prepare: Callable[[torch.nn.Module], Any] | None = None


_packed = install_block_diagonal_vision_attention

_RECIPES: dict[str, FamilyRecipe] = {
    r.model_type: r
    for r in [
        # CLIP/SigLIP tower, or a Pixtral tower ("pixtral"; its image_sizes need the prologue)
        FamilyRecipe("llava", llava.llava_inputs, prologue=llava.llava_prologue),
        FamilyRecipe("llava_next", llava.llava_next_inputs, prologue=llava.llava_prologue),
        FamilyRecipe("mistral3", mistral3.mistral3_inputs, prologue=mistral3.mistral3_prologue),
        FamilyRecipe("aya_vision", aya_vision.aya_vision_inputs),
        FamilyRecipe("llava_onevision", llava_onevision.llava_onevision_inputs,
                     prologue=llava_onevision.llava_onevision_prologue),
        FamilyRecipe("cohere2_vision", cohere2_vision.cohere2_vision_inputs),
        FamilyRecipe("deepseek_vl", deepseek_vl.deepseek_vl_inputs),
        FamilyRecipe("internvl", internvl.internvl_inputs),
        FamilyRecipe("paligemma", paligemma.paligemma_inputs),
        FamilyRecipe("gemma3", gemma3.gemma3_inputs),
        FamilyRecipe("idefics3", idefics3.idefics3_inputs),
        FamilyRecipe("smolvlm", idefics3.idefics3_inputs),
        FamilyRecipe("idefics2", idefics2.idefics2_inputs),
        FamilyRecipe("got_ocr2", got_ocr2.got_ocr2_inputs),
        FamilyRecipe("ovis2", ovis2.ovis2_inputs),
        FamilyRecipe("qwen2_vl", qwen_vl.qwen_vl_inputs, prologue=qwen_vl.qwen2_vl_prologue, prepare=_packed),
        FamilyRecipe("qwen2_5_vl", qwen_vl.qwen_vl_inputs, prologue=qwen_vl.qwen2_5_vl_prologue, prepare=_packed),
        FamilyRecipe("qwen3_vl", qwen_vl.qwen_vl_inputs, prologue=qwen_vl.qwen3_vl_prologue, prepare=_packed),
        # the MoE variants share their dense sibling's vision tower, token layout and M-RoPE
        FamilyRecipe("qwen3_vl_moe", qwen_vl.qwen_vl_inputs, prologue=qwen_vl.qwen3_vl_prologue, prepare=_packed),
        FamilyRecipe("glm4v", glm4v.glm4v_inputs, prologue=glm4v.glm4v_prologue, prepare=_packed),
        FamilyRecipe("glm4v_moe", glm4v.glm4v_inputs, prologue=glm4v.glm4v_prologue, prepare=_packed),
        FamilyRecipe("mllama", mllama.mllama_inputs),
        FamilyRecipe("llama4", llama4.llama4_inputs),
        # No prologue: no input-level fix exports Phi-4 (see docs/tracing.md); regional fallback planned.
        FamilyRecipe("phi4_multimodal", phi4_multimodal.phi4_multimodal_inputs),
        FamilyRecipe("lfm2_vl", lfm2_vl.lfm2_vl_inputs),
        FamilyRecipe("janus", janus.janus_inputs),
    ]
}


def _timm_tower(tower: str) -> str:
    return (f"its vision tower ({tower}) is a timm model (transformers' TimmWrapperModel, built by the timm package), "
            "and graphlora has no tiny config, label truth or tests for timm towers, so it cannot promise that a "
            "policy's vision LoRA lands where the policy says")


#: Families transformers 5.24 builds that graphlora refuses, with what is missing (docs/models.md lists them;
#: rewrite() raises UnsupportedModelError with the reason).
_REFUSED: dict[str, str] = {
    "gemma3n": _timm_tower("MobileNetV5, whose attention projections are 1x1 convolutions, while graphlora adapts "
                           "linears and matmuls only") + "; its text decoder (AltUp, Laurel, per-layer embeddings) is "
                           "not covered either",
    "perception_lm": _timm_tower("a Perception Encoder ViT"),
    "fast_vlm": _timm_tower("FastViT-HD: convolutional stages, then attention stages"),
    "florence2": "its language model is an encoder-decoder (BART), and graphlora's labels and input synthesis assume "
    "a decoder-only one: decoder inputs (decoder_input_ids, labels shifted right) carry no modality, the decoder's "
    "cross-attention to the encoder output is not recognised as cross-attention, and the per-stage block lists of "
    "its DaViT vision tower are not found as blocks",
}


def refused_model_types() -> dict[str, str]:
    """``model_type`` -> why graphlora refuses it (families transformers can build but graphlora does not support)."""
    return dict(_REFUSED)


def check_not_refused(model: torch.nn.Module) -> None:
    """Raise :class:`~graphlora.errors.UnsupportedModelError` with the reason if ``model`` is a refused family."""
    from graphlora.errors import UnsupportedModelError

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _REFUSED:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type!r}) is not supported: {_REFUSED[model_type]}. "
            "Supported families are listed in docs/models.md."
        )


def _config_of(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "model_type"):
        raise TypeError(f"expected a transformers model or config, got {type(model_or_config).__name__}")
    return config


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values that have a recipe, sorted."""
    return sorted(_RECIPES)


def get_recipe(model_or_config) -> FamilyRecipe:
    """The recipe for a model (or config), by ``config.model_type``."""
    model_type = _config_of(model_or_config).model_type
    if model_type in _REFUSED:
        raise UnsupportedFamilyError(f"model_type {model_type!r} is not supported: {_REFUSED[model_type]}")
    try:
        return _RECIPES[model_type]
    except KeyError:
        raise UnsupportedFamilyError(
            f"model_type {model_type!r} is not supported; supported model types: "
            + ", ".join(supported_model_types())
        ) from None


def _recipe_or_none(model_or_config) -> FamilyRecipe | None:
    config = getattr(model_or_config, "config", model_or_config)
    return _RECIPES.get(getattr(config, "model_type", None))


def get_prologue(model_or_config) -> Callable[[torch.nn.Module, dict], dict] | None:
    """The family's eager prologue for tracing, or ``None`` (trace calls as they are).

    Also ``None`` for a model type without a recipe, or a module without a transformers config:
    graphlora traces those without a prologue.
    """
    recipe = _recipe_or_none(model_or_config)
    return None if recipe is None else recipe.prologue


def prepare_for_tracing(model: torch.nn.Module) -> bool:
    """Run the family's ``prepare`` hook on ``model`` (the module to trace); whether there was one."""
    recipe = _recipe_or_none(model)
    if recipe is None or recipe.prepare is None:
        return False
    recipe.prepare(model)
    return True


def _dtype_and_device(model) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def _normalise_sizes(image_size, images_per_sample: int):
    """``image_size`` -> one ``(h, w)`` or ``None`` per image of a sample."""
    if isinstance(image_size, list):
        sizes = tuple(as_size(s) for s in image_size)
        if images_per_sample not in (1, len(sizes)):
            raise ValueError(f"image_size lists {len(sizes)} sizes but images_per_sample={images_per_sample}")
        return sizes
    size = None if image_size is None else as_size(image_size)
    return (size,) * images_per_sample


def synthesize_inputs(
    model,
    *,
    batch_size: int = 2,
    text_len: int | None = None,
    with_labels: bool = True,
    images_per_sample: int = 1,
    image_size: int | tuple[int, int] | Sequence[int | tuple[int, int]] | None = None,
    seed: int = 0,
    pad_tokens: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Keyword arguments of ``model.forward`` for one synthetic training batch.

    Reads only ``model.config`` (plus the model's dtype and device). Deterministic under ``seed``.

    - ``text_len``: plain text tokens per sample besides the image tokens (default 8), split
      before/between/after the images; the image tokens follow the family's processor layout.
      A BOS is prepended where the family's processor puts it inside its layout (Gemma 3,
      PaliGemma, Mllama). ``text_len=0`` leaves no token in the loss (NaN loss).
    - ``image_size``: pixel size of each image, ``int`` or ``(h, w)``; a **list** gives one size per
      image of a sample (``images_per_sample`` is then ``len(list)``), e.g. two images with
      different grids for Qwen2-VL. ``None`` = the family default (usually the vision tower's
      ``image_size``). Families that tile images (LLaVA-NeXT, Idefics3/SmolVLM, Mllama, Llama 4,
      Phi-4) read it as the original image size and tile it as their processor would.
    - ``labels`` (when ``with_labels``): ``input_ids`` with -100 at image placeholders, the
      structural image tokens around them, padding, and (PaliGemma) the prompt prefix.
    - ``pad_tokens``: make the batch ragged: sample 0 gets that many extra text tokens, the other
      samples that many right-padding tokens (attention_mask 0).
    - ``device``: override the output device (default: the model's; CPU for a meta model).
    """
    config = _config_of(model)
    recipe = get_recipe(config)
    sizes = _normalise_sizes(image_size, images_per_sample)
    generator = torch.Generator().manual_seed(seed)
    req = InputRequest(
        batch_size=batch_size,
        text_len=DEFAULT_TEXT_LEN if text_len is None else text_len,
        with_labels=with_labels,
        images_per_sample=len(sizes),
        image_sizes=sizes,
        generator=generator,
        pad_tokens=pad_tokens,
    )
    if batch_size < 1 or req.images_per_sample < 1 or req.text_len < 0:
        raise ValueError("batch_size and images_per_sample must be >= 1 and text_len >= 0")
    inputs = recipe.synthesize_inputs(config, req)

    dtype, model_device = _dtype_and_device(model) if isinstance(model, torch.nn.Module) else (torch.float32, None)
    if device is None:
        device = model_device if model_device is not None and model_device.type != "meta" else torch.device("cpu")
    return {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
        for k, v in inputs.items()
    }
