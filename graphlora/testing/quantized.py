"""Tiny bitsandbytes-quantized VLMs for tests and benchmarks (CPU: bitsandbytes runs 4- and 8-bit layers there).

bitsandbytes quantizes 4-bit weights in blocks of 64 and its CPU kernels need every quantized linear's
in-features to be a multiple of that block, so the zoo's tiny widths (32) are doubled first
(:func:`widen_config`). Tests save such a model with random weights and load it back through transformers'
``from_pretrained`` with :func:`bnb_config`, as a user loads a checkpoint.
"""

from __future__ import annotations

import torch
import transformers

from graphlora.testing.zoo import build_tiny_config, build_tiny_model

#: Config fields that are a width (scaled by :func:`widen_config`).
WIDTH_FIELDS = ("hidden_size", "intermediate_size", "embed_dim", "out_hidden_size", "projection_dim",
                "vision_output_dim", "projector_hidden_size", "head_dim", "text_hidden_size",
                "vision_hidden_size", "alignment_intermediate_size")


def widen_config(config: transformers.PretrainedConfig, factor: int = 2) -> transformers.PretrainedConfig:
    """Scale every width of ``config`` and its sub-configs by ``factor`` (heads stay: head widths scale too;
    Qwen's multimodal RoPE sections scale with the head width). Returns ``config``."""
    seen: set[int] = set()

    def visit(cfg) -> None:
        if id(cfg) in seen:
            return
        seen.add(id(cfg))
        for key in WIDTH_FIELDS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                setattr(cfg, key, value * factor)
        for key in ("rope_parameters", "rope_scaling"):
            rope = getattr(cfg, key, None)
            if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list) and id(rope) not in seen:
                seen.add(id(rope))  # rope_scaling and rope_parameters may be one dict
                rope["mrope_section"] = [s * factor for s in rope["mrope_section"]]
        for value in list(vars(cfg).values()):
            if isinstance(value, transformers.PretrainedConfig):
                visit(value)

    visit(config)
    return config


def build_wide_tiny_model(name: str, *, seed: int = 0) -> torch.nn.Module:
    """The zoo's tiny ``name`` with doubled widths (random fp32 weights, eval mode)."""
    return build_tiny_model(name, seed=seed, config=widen_config(build_tiny_config(name)))


def bnb_config(bits: int = 4, quant_type: str = "nf4", double_quant: bool = False,
               compute_dtype: torch.dtype = torch.float32,
               skip_modules: list[str] | None = None) -> transformers.BitsAndBytesConfig:
    """A ``BitsAndBytesConfig`` for 4-bit (``quant_type`` nf4/fp4) or 8-bit loading."""
    if bits == 8:
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant=double_quant,
                                           bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)
