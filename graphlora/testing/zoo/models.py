"""The zoo's tiny models and their example inputs.

Reads: a family's row of the config table (graphlora/testing/zoo/configs.py) and, for inputs, the family's
recipe (``graphlora.families.synthesize_inputs``). Writes: new model objects only; the global RNG state is
left as it was.

Guarantees: :func:`build_tiny_model` gives random fp32 weights in eval() mode, the same for the same seed,
and re-draws every parameter that transformers initialises to exactly zero and that would otherwise block
the gradient into the vision path (Gemma 3's projector matrix, Mllama's tanh gates, zero-centred RMSNorm
scales...): a random tiny model must prove that the vision tower is alive. Biases stay zero (they never
block a gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.utils import ModelOutput

from graphlora.families import synthesize_inputs
from graphlora.testing.zoo.configs import build_tiny_config, tiny_family

__all__ = [
    "TinyLlama4ForConditionalGeneration",
    "build_tiny_model",
    "revive_zero_parameters",
    "tiny_example_inputs",
]

# --------------------------------------------------------------------------------------------
# fixture classes
# --------------------------------------------------------------------------------------------


@dataclass
class _MoeCausalLMOutputWithImages(MoeCausalLMOutputWithPast):
    """``MoeCausalLMOutputWithPast`` plus the ``image_outputs`` field Llama 4's wrapper reads."""

    image_outputs: Any = None


class _Llama4ForCausalLMWithImageOutputs(transformers.Llama4ForCausalLM):
    """Llama 4's text model, returning an output that has an (empty) ``image_outputs`` field."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        return _MoeCausalLMOutputWithImages(**out) if isinstance(out, ModelOutput) else out


class TinyLlama4ForConditionalGeneration(transformers.Llama4ForConditionalGeneration):
    """``Llama4ForConditionalGeneration`` whose forward does not crash at the end.

    transformers 5.24 ends ``Llama4ForConditionalGeneration.forward`` with
    ``image_outputs=outputs.image_outputs`` where ``outputs`` is the text model's
    ``MoeCausalLMOutputWithPast``, which has no such field (AttributeError after the loss is
    computed). The mend swaps the class of ``language_model`` for a subclass (no new state, same
    parameter names and module classes below it) whose output carries ``image_outputs=None``.
    The returned ``image_outputs`` is therefore ``None``; loss and logits are untouched.
    """

    def __init__(self, config):
        super().__init__(config)
        self.language_model.__class__ = _Llama4ForCausalLMWithImageOutputs


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _model_class(name: str) -> type:
    cls_name = tiny_family(name).model_class
    return globals().get(cls_name) or getattr(transformers, cls_name)


def build_tiny_model(name: str, *, seed: int = 0, layers: int | None = None, config=None) -> torch.nn.Module:
    """A tiny model with random fp32 weights in eval() mode; same seed -> same weights.

    ``layers``: layers per tower (default: the family's tiny config); ``config``: a config of the family
    built (and changed) by the caller instead. The global RNG state is left untouched.
    """
    if config is None:
        config = build_tiny_config(name, layers=layers)
    elif layers is not None:
        raise TypeError("build_tiny_model() takes layers= or config=, not both")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(name)(config)
    revive_zero_parameters(model, seed=seed)
    # .float(), not .to(torch.float32): the latter would also cast Llama 4's complex RoPE buffer
    return model.float().eval()


@torch.no_grad()
def revive_zero_parameters(model: torch.nn.Module, *, seed: int = 0) -> list[str]:
    """Re-draw every exactly-all-zero floating parameter that is not a bias; returns their names.

    Small parameters (<= 4 values: tanh gates and the like) get uniform values in [-0.5, 0.5]
    so the gate is clearly open; the rest normal(0, 0.02).
    """
    generator = torch.Generator().manual_seed(seed + 1)
    revived = []
    for name, p in model.named_parameters():
        if not p.is_floating_point() or name.endswith("bias") or p.numel() == 0 or bool(p.any()):
            continue
        if p.numel() <= 4:
            value = torch.rand(p.shape, generator=generator) - 0.5
        else:
            value = torch.randn(p.shape, generator=generator) * 0.02
        p.copy_(value.to(p.dtype))
        revived.append(name)
    return revived


def tiny_example_inputs(name: str, model, *, batch_size: int = 2, **kw) -> dict:
    """:func:`graphlora.families.synthesize_inputs` for a tiny model (``name`` is checked)."""
    tiny_family(name)
    return synthesize_inputs(model, batch_size=batch_size, **kw)
