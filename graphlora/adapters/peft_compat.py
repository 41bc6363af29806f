"""PEFT's rules, re-stated: what a ``LoraConfig`` selects, where PEFT keeps the tensors, what it rewrites.

* Matching: ``target_modules`` (a list of names matched as path suffixes, a regular expression matched
  whole, or ``"all-linear"``), ``target_parameters`` (names matched as suffixes), ``rank_pattern`` /
  ``alpha_pattern`` lookup, and ``modules_to_save`` (which keeps LoRA off a module and everything in it).
* Layout: where PEFT keeps a site's ``lora_A`` / ``lora_B`` (:func:`peft_lora_path`).
* Conversion: what the installed PEFT changes in a config before it loads the adapter
  (:func:`peft_load_rewrites`), the one place that imports PEFT, and only when it is installed.

The same suffix rule (:func:`matches_module_suffix`) is how graphlora's own policy matches the
``target_modules`` and ``modules_to_save`` lists, so that a policy and its saved adapter agree.
Nothing here reads or writes a file.
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Any, Iterable

import torch

from graphlora.lora import EXPERT_LAYOUTS, Site

if TYPE_CHECKING:  # pragma: no cover
    from graphlora.model import GraphLoraModel


def matches_module_suffix(path: str, name: str) -> bool:
    """PEFT's rule for one name of a list: ``path`` equals ``name`` or ends with ``"." + name``.

    Whole dotted segments only: ``q_proj`` and ``self_attn.q_proj`` match ``layers.0.self_attn.q_proj``;
    ``proj`` and ``attn.q_proj`` do not. ``path`` is a module path or a parameter path."""
    return path == name or path.endswith("." + name)


def peft_list_match(name: str, entries: Iterable[str]) -> bool:
    """PEFT's list matching of ``target_modules`` / ``target_parameters``: equal, or ends with ``"." + entry``."""
    return any(matches_module_suffix(name, e) for e in entries)


def peft_targets_module(target_modules: Any, name: str, linear_names: set[str]) -> bool:
    """PEFT's ``target_modules``: ``"all-linear"`` (``linear_names``), a regular expression matched whole, or a list."""
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            return name in linear_names
        return re.fullmatch(target_modules, name) is not None
    return peft_list_match(name, target_modules)


def peft_pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first pattern P (in order) such that the key
    matches ``(.*\\.)?(P)$`` from its start."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


def peft_excluded_by_modules_to_save(name: str, modules_to_save: Iterable[str] | None) -> bool:
    """PEFT never puts an adapter on (or inside) a ``modules_to_save`` module."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save or ())


def peft_modules_to_save_hits(model: torch.nn.Module, name: str) -> list[str]:
    """Module paths PEFT wraps for a ``modules_to_save`` entry: those that end with it (no dot required)."""
    return [path for path, _ in model.named_modules() if path and path.endswith(name)]


def is_inside(path: str, container: str) -> bool:
    """``path`` is the module ``container`` or one of its submodules."""
    return path == container or path.startswith(container + ".")


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """The ``nn.Linear`` module paths of ``model`` (what ``target_modules: all-linear`` starts from)."""
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def modules_to_save_paths(model: torch.nn.Module, names: list[str] | None) -> list[str]:
    """The module paths graphlora copied for ``policy.modules_to_save`` (same matching as rewrite)."""
    paths: set[str] = set()
    for name in names or []:
        paths.update(p for p, _ in model.named_modules() if p and matches_module_suffix(p, name))
    return sorted(paths)


def peft_lora_path(lora_model: "GraphLoraModel", site: Site) -> str:
    """Where PEFT keeps the site's ``lora_A`` / ``lora_B`` (without ``base_model.model.``).

    A Linear or a 2-D parameter: graphlora's own holder path. An expert parameter: PEFT wraps the owning module in
    one ``lora.ParamWrapper`` per targeted parameter, the first parameter (in the module's registration order)
    innermost, so the i-th of k sits under ``k - 1 - i`` ``base_layer`` segments."""
    if site.weight_layout not in EXPERT_LAYOUTS:
        return site.module
    owner_path, _, attr = site.name.rpartition(".")
    adapted = {s.name for s in lora_model.sites if s.weight_layout in EXPERT_LAYOUTS}
    original = lora_model.base_model  # the model PEFT would wrap (the mirror may register parameters in another order)
    owner = original.get_submodule(owner_path) if owner_path else original
    order = [name for name in owner._parameters if f"{owner_path}.{name}" in adapted]
    depth = len(order) - 1 - order.index(attr)
    return owner_path + ".base_layer" * depth


_PEFT_CONVERTED_FIELDS = ("target_modules", "target_parameters", "rank_pattern", "alpha_pattern")


def peft_load_rewrites(config: dict[str, Any], model: torch.nn.Module) -> dict[str, tuple[Any, Any]]:
    """What the installed PEFT changes in ``config`` before it loads the adapter on ``model``: field -> (written, used).

    PEFT (>= 0.18 under transformers 5) rewrites the config of some MoE model types as if the adapter came from
    transformers 4 (``convert_peft_config_for_transformers``): target_modules ending in ``gate_proj``/``up_proj``
    become expert parameters with a doubled rank, even when they name dense or shared-expert linears
    (huggingface/peft#3711). The check runs PEFT's own conversion on a copy, so a PEFT that fixes it reports
    nothing. Empty when PEFT (or its conversion) is not installed or changes nothing.
    """
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        return {}
    fields = {k: copy.deepcopy(v) for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    try:
        peft_config = LoraConfig(**fields)
        before = {k: _comparable(getattr(peft_config, k, None)) for k in _PEFT_CONVERTED_FIELDS}
        convert_peft_config_for_transformers(peft_config, model=model, conversions=None)
    except Exception:  # noqa: BLE001 - a PEFT internal that changed shape: no claim either way
        return {}
    after = {k: _comparable(getattr(peft_config, k, None)) for k in _PEFT_CONVERTED_FIELDS}
    return {k: (before[k], after[k]) for k in _PEFT_CONVERTED_FIELDS if before[k] != after[k]}


def _comparable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, list, tuple)):
        return sorted(value)
    return value or None
