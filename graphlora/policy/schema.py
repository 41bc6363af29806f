"""The LoRA policy schema: the pydantic models :class:`Policy`, :class:`Rule` and :class:`RuleMatch`.

Reads nothing and writes nothing: these models validate a policy's values (strict types, no unknown keys,
frozen instances) whether they come from Python, a YAML or TOML file (``graphlora.policy.source``) or a
saved adapter. A policy says which linears of a VLM get LoRA, with which hyper-parameters. A policy file
holds the Policy fields plus the two :data:`FILE_KEYS` (``version``, at most :data:`SUPPORTED_VERSION`,
and ``extends``).

The field names and defaults are Unsloth's ``FastVisionModel.get_peft_model`` vocabulary (``r=16``,
``lora_alpha=16``, ``lora_dropout=0``, ``finetune_*_layers/modules``, ``random_state=3407``), plus what
Unsloth cannot express: the projector, cross-attention, per-tower layer ranges and ordered rules.

Selection semantics (documented in docs/policy.md, implemented by passes/select_lora_sites_pass.py):

1. Candidates are the labelled linears (component, role, layer).
2. The flags choose: ``vision`` sites need ``finetune_vision_layers``; ``language`` sites need
   ``finetune_language_layers``; attention roles need ``finetune_attention_modules`` and MLP roles
   ``finetune_mlp_modules``; ``cross_attention`` sites follow ``finetune_cross_attention``, or when it is
   None the language and attention flags (Unsloth's behaviour); ``projector`` sites follow
   ``finetune_projector`` alone; the ``head`` and ``other`` components are never chosen by flags.
3. ``vision_layers`` / ``language_layers`` keep only the listed layer positions of that tower.
4. ``target_modules`` narrows what the flags chose (``"all-linear"`` keeps all; a list keeps sites
   whose module path equals a name or ends with ``"." + name``; any other string is a regular
   expression that must match the whole module path).
5. ``rules`` apply in order; a later rule overrides an earlier one for the same setting.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from graphlora.labels import COMPONENTS, ROLES

#: The newest policy file version this graphlora reads (and the one it writes).
SUPPORTED_VERSION = 1

#: The keys of a policy file that are not :class:`Policy` fields.
FILE_KEYS = ("version", "extends")

# A layer selection: explicit positions, or a Python-style slice over the tower's blocks ("-4:", ":8:2").
LayerSelection = Union[list[int], str]

_SLICE_RE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?$")


def parse_layer_selection(selection: LayerSelection) -> list[int] | slice:
    """Turn a layer selection into a list of positions or a ``slice``; raise ValueError if malformed."""
    if isinstance(selection, list):
        return list(selection)
    m = _SLICE_RE.match(selection)
    if not m:
        raise ValueError(
            f"bad layer range {selection!r}: expected a Python slice such as '-4:', ':8' or '0:12:2', "
            "or a list of layer positions"
        )
    start, stop, step = (int(g) if g is not None else None for g in m.groups())
    if step == 0:
        raise ValueError(f"bad layer range {selection!r}: the step cannot be zero")
    return slice(start, stop, step)


def resolve_layers(selection: LayerSelection, num_layers: int) -> list[int]:
    """The absolute positions a selection picks out of ``num_layers`` blocks (negative = from the end)."""
    parsed = parse_layer_selection(selection)
    if isinstance(parsed, slice):
        return list(range(num_layers))[parsed]
    out = []
    for i in parsed:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(f"layer {i} is out of range for a tower with {num_layers} layers")
        out.append(j)
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _check_layers(value: LayerSelection | None) -> LayerSelection | None:
    if value is not None:
        parse_layer_selection(value)
    return value


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"bad regular expression {value!r}: {e}") from None
    return value


class RuleMatch(_Strict):
    """What a rule applies to; every given field must match (AND). Lists mean any-of."""

    component: Union[Literal[COMPONENTS], list[Literal[COMPONENTS]], None] = Field(  # type: ignore[valid-type]
        default=None, description="The site's component, or a list of components (any of them matches)."
    )
    role: Union[Literal[ROLES], list[Literal[ROLES]], None] = Field(  # type: ignore[valid-type]
        default=None, description="The site's role, or a list of roles (any of them matches)."
    )
    layers: LayerSelection | None = Field(
        default=None, description="Layer positions within the site's own tower (list or slice string)."
    )
    name: str | None = Field(default=None, description="Regular expression matched against the whole module path.")

    _layers = field_validator("layers")(classmethod(lambda cls, v: _check_layers(v)))
    _name = field_validator("name")(classmethod(lambda cls, v: _check_regex(v)))

    @model_validator(mode="after")
    def _not_empty(self) -> "RuleMatch":
        if self.component is None and self.role is None and self.layers is None and self.name is None:
            raise ValueError("a rule's match needs at least one of: component, role, layers, name")
        return self


class Rule(_Strict):
    """An ordered override: sites matching ``match`` get the given settings."""

    match: RuleMatch = Field(description="Which sites the rule applies to; every given key must match.")
    target: bool | None = Field(default=None, description="true adds the matched sites, false removes them.")
    r: Annotated[int, Field(gt=0)] | None = Field(default=None, description="LoRA rank of the matched sites.")
    alpha: Annotated[float, Field(gt=0)] | None = Field(default=None, description="LoRA alpha of the matched sites.")
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = Field(
        default=None, description="LoRA dropout of the matched sites."
    )
    allow_unmatched: bool = Field(default=False, description="Do not fail when the rule matches no site.")


class Policy(_Strict):
    """Which linears get LoRA and how. Unsloth's names and defaults; see the module docstring."""

    r: Annotated[int, Field(gt=0)] = Field(default=16, description="LoRA rank of every site (rules may override).")
    lora_alpha: Annotated[float, Field(gt=0)] = Field(
        default=16.0, description="LoRA alpha: the update is scaled by lora_alpha / r (rules may override)."
    )
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.0, description="Dropout on the LoRA branch's input, in [0, 1)."
    )
    bias: Literal["none"] = Field(default="none", description="Bias training; only 'none' is supported.")
    target_modules: Union[str, list[str]] = Field(
        default="all-linear",
        description="Narrows the flags' choice: 'all-linear' keeps all; a list keeps module paths equal to or "
        "ending with '.' + a name; any other string is a regular expression matched against the whole path.",
    )
    finetune_vision_layers: bool = Field(default=True, description="Put LoRA on the vision tower's linears.")
    finetune_language_layers: bool = Field(default=True, description="Put LoRA on the language model's linears.")
    finetune_attention_modules: bool = Field(default=True, description="Put LoRA on attention linears (attn.* roles).")
    finetune_mlp_modules: bool = Field(default=True, description="Put LoRA on MLP linears (mlp.* roles).")
    finetune_projector: bool = Field(
        default=False, description="Put LoRA on the vision-to-language projector (Unsloth never does)."
    )
    finetune_cross_attention: bool | None = Field(
        default=None,
        description="Put LoRA on cross-attention linears; null follows the language and attention flags.",
    )
    vision_layers: LayerSelection | None = Field(
        default=None,
        description="Vision layers to keep: a slice such as '-4:' or '0:12:2', or a list of positions; null keeps all.",
    )
    language_layers: LayerSelection | None = Field(
        default=None,
        description="Language layers to keep: a slice such as ':8' or a list of positions; null keeps all.",
    )
    use_rslora: bool = Field(default=False, description="Scale by lora_alpha / sqrt(r) instead of lora_alpha / r.")
    random_state: int = Field(default=3407, description="Seed of the LoRA weight initialisation.")
    trust_labels: Literal["structure", "names"] | None = Field(
        default=None,
        description="Which labels decide where the graph's structure and the module-name rules disagree on a linear: "
        "'structure' or 'names'; null (the default) raises an error when a disagreement changes what the policy "
        "selects, and warns otherwise.",
    )
    modules_to_save: list[str] | None = Field(
        default=None, description="Modules trained in full and saved with the adapter (PEFT's modules_to_save)."
    )
    lora_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="dtype of the LoRA A and B weights."
    )
    rules: list[Rule] = Field(
        default_factory=list,
        description="Ordered overrides applied after the flags; a later rule wins over an earlier one.",
    )

    _vl = field_validator("vision_layers", "language_layers")(classmethod(lambda cls, v: _check_layers(v)))

    @field_validator("target_modules")
    @classmethod
    def _check_target_modules(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            if value != "all-linear":
                _check_regex(value)
        elif not value:
            raise ValueError("target_modules is an empty list: it would select nothing (use 'all-linear')")
        return value

    # -- derived values -------------------------------------------------------------------------
    def scale(self, r: int | None = None, alpha: float | None = None) -> float:
        """LoRA scale ``alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``)."""
        r = self.r if r is None else r
        alpha = self.lora_alpha if alpha is None else alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def canonical_json(self) -> str:
        """A stable JSON form (sorted keys, every field): equal policies give equal strings."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """sha256 of :meth:`canonical_json`: identifies the policy a model was rewritten with."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()
