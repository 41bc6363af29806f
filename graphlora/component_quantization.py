"""Per-component quantization from labels: which linears to load in 4 or 8 bits, decided by graphlora's labels.

``graphlora.quantization_config(model_or_config, language="nf4", vision=None, projector=None, head=None)``
returns the transformers ``BitsAndBytesConfig`` that loads the model with those components quantized and
the others in float. The model is built from its config on the meta device (no weights are read) and
labelled as ``rewrite()`` labels it (structure, not names); every linear whose component stays in float
goes into ``llm_int8_skip_modules`` as its exact module path (escaped: transformers reads the entries as
anchored regular expressions). A linear the labelling does not see (not run by the example forward) is
kept in float and listed in :attr:`QuantizationPlan.unlabelled`.

transformers loads one bitsandbytes format per model, so the quantized components share it (``nf4``,
``fp4`` or ``int8``); asking for two is an error.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from graphlora.errors import GraphLoraError
from graphlora.labels import Component
from graphlora.quantized import QuantFormat
from graphlora.text_table import format_table

#: The choices per component: a format, or None / "none" for float.
FORMAT_CHOICES = ("nf4", "fp4", "int8", "none")


class QuantizationPlanError(GraphLoraError, ValueError):
    """A per-component quantization request that cannot be loaded (unknown format, two formats at once)."""


@dataclasses.dataclass(frozen=True)
class QuantizationPlan:
    """Every linear of a model with its component and the format it is loaded in (None: float)."""

    formats: dict[str, QuantFormat | None]
    components: dict[str, str]
    unlabelled: tuple[str, ...]
    compute_dtype: torch.dtype
    double_quant: bool

    @property
    def format(self) -> QuantFormat | None:
        """The one format of the quantized linears (None when nothing is quantized)."""
        return next((f for f in self.formats.values() if f is not None), None)

    def skip_modules(self) -> list[str]:
        """``llm_int8_skip_modules``: the exact paths of the linears kept in float, escaped for transformers'
        anchored regular-expression matching."""
        return [re.escape(path) for path, fmt in self.formats.items() if fmt is None]

    def bnb_config(self):
        """The ``transformers.BitsAndBytesConfig`` that loads the model as planned."""
        import transformers

        if self.format is None:
            raise QuantizationPlanError("the plan quantizes no linear: load the model without a quantization_config")
        if self.format is QuantFormat.INT8:
            return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=self.skip_modules())
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.format.value, bnb_4bit_compute_dtype=self.compute_dtype,
            bnb_4bit_use_double_quant=self.double_quant, llm_int8_skip_modules=self.skip_modules())

    def table(self) -> str:
        """Linears per component and the format each component is loaded in."""
        counts: dict[tuple[str, str], int] = {}
        for path, fmt in self.formats.items():
            key = (self.components.get(path, "unlabelled"), fmt.value if fmt is not None else "float")
            counts[key] = counts.get(key, 0) + 1
        rows = [("component", "linears", "loaded as")] + [(c, str(n), f) for (c, f), n in sorted(counts.items())]
        return "\n".join(format_table(rows, align="lrl"))


def _format(component: str, choice: str | None) -> QuantFormat | None:
    if choice is None or choice == "none":
        return None
    if isinstance(choice, str) and choice.lower() in ("nf4", "fp4", "int8"):
        return QuantFormat(choice.lower())
    raise QuantizationPlanError(f"{component}={choice!r}: the format must be one of {', '.join(FORMAT_CHOICES)} "
                                "or None")


def _meta_model(model: Any) -> torch.nn.Module:
    """A model on the meta device for ``model`` (a module, a transformers config, or a directory with config.json)."""
    import transformers

    if isinstance(model, torch.nn.Module):
        return model
    if isinstance(model, (str, Path)):
        from graphlora.model_spec import load_model_spec

        return load_model_spec(str(model), meta=True)[0]
    if isinstance(model, transformers.PretrainedConfig):
        from graphlora.model_spec import ModelSpecError, model_from_config

        try:
            return model_from_config(model, meta=True)
        except ModelSpecError as e:
            raise QuantizationPlanError(str(e)) from None
    raise TypeError(f"quantization_plan() takes a model, a transformers config or a directory, not "
                    f"{type(model).__name__}")


def quantization_plan(model: Any, *, language: str | None = "nf4", vision: str | None = None,
                      projector: str | None = None, cross_attention: str | None = None, head: str | None = None,
                      other: str | None = None, compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True,
                      example_inputs: dict | None = None) -> QuantizationPlan:
    """Decide per component (graphlora's labels) which linears are quantized; see the module docstring.

    ``cross_attention`` defaults to nothing (float): Mllama's cross-attention layers sit in the language
    model but are their own component. ``example_inputs`` go to the labelling forward (synthesised from the
    config for known families when None).
    """
    choices = {Component.LANGUAGE: language, Component.VISION: vision, Component.PROJECTOR: projector,
               Component.CROSS_ATTENTION: cross_attention, Component.HEAD: head, Component.OTHER: other}
    wanted = {str(c): _format(str(c), choice) for c, choice in choices.items()}
    formats_asked = {f for f in wanted.values() if f is not None}
    if len(formats_asked) > 1:
        raise QuantizationPlanError(
            "transformers' BitsAndBytesConfig loads one format per model; asked for "
            + ", ".join(f"{c}={f.value}" for c, f in wanted.items() if f is not None))
    from graphlora.explainer import explain

    meta = _meta_model(model)
    rows = explain(meta, None, example_inputs)
    components = {row.name: row.component for row in rows}
    linears = [name for name, m in meta.named_modules() if isinstance(m, torch.nn.Linear)]
    formats = {name: wanted.get(components[name]) if name in components else None for name in linears}
    unlabelled = tuple(name for name in linears if name not in components)
    return QuantizationPlan(formats, {n: components[n] for n in linears if n in components}, unlabelled,
                            compute_dtype, double_quant)


def quantization_config(model: Any, **choices: Any):
    """The ``BitsAndBytesConfig`` of :func:`quantization_plan` (same arguments)."""
    return quantization_plan(model, **choices).bnb_config()
