"""``adapter_config.json``: the PEFT ``LoraConfig`` graphlora writes for a model, and the checks on one it reads.

* Writing (:func:`adapter_config`): ``target_modules`` / ``target_parameters``, ``rank_pattern`` /
  ``alpha_pattern`` and ``modules_to_save`` chosen so that PEFT's matching rules select exactly the
  model's sites with their ranks and alphas; what a ``LoraConfig`` cannot say (per-site dropout, a site
  inside a ``modules_to_save`` module, a suffix that would also select other modules) is refused naming
  the sites.
* :func:`numeric_record`: the fields that change the numbers, normalised, as recorded in the weights file.
* Reading (:func:`read_adapter_config`, :func:`check_adapter_config`): every PEFT config feature graphlora
  cannot honour is refused by field name.
"""

from __future__ import annotations

import collections
import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphlora.adapters.format import ADAPTER_CONFIG_NAME, AdapterError, shorten
from graphlora.adapters.peft_compat import (
    is_inside,
    matches_module_suffix,
    modules_to_save_paths,
    peft_excluded_by_modules_to_save,
    peft_load_rewrites,
    peft_pattern_value,
)
from graphlora.lora import EXPERT_LAYOUTS, Site

if TYPE_CHECKING:  # pragma: no cover
    from graphlora.model import GraphLoraModel


#: Config fields recorded in the weights file, so that a config that does not belong with the weights
#: (an interrupted save, a hand edit) is caught on load.
NUMERIC_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                   "target_parameters", "modules_to_save")


def _number(value: float) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() else value


def _check_peft_can_represent(lora_model: "GraphLoraModel", mts_paths: list[str]) -> float:
    """Refuse (naming the sites) what a PEFT LoraConfig cannot say; return the one dropout value."""
    sites = lora_model.sites
    by_dropout: dict[float, list[str]] = collections.defaultdict(list)
    for site in sites:
        by_dropout[site.dropout].append(site.name)
    if len(by_dropout) > 1:
        detail = "; ".join(f"dropout {d}: {shorten(names, 3)}" for d, names in sorted(by_dropout.items()))
        raise AdapterError(
            "cannot save a PEFT adapter: PEFT has one lora_dropout for all modules, but these sites differ "
            f"({detail}). Give every site the same dropout (rules[].dropout) before saving."
        )
    dropout = next(iter(by_dropout)) if by_dropout else lora_model.policy.lora_dropout
    for site in sites:
        if site.kind != "linear":
            if dropout:
                raise AdapterError(
                    f"cannot save a PEFT adapter: site {site.name} is a raw parameter matmul ({site.kind}), which PEFT "
                    f"represents with target_parameters (lora.ParamWrapper), and PEFT refuses lora_dropout != 0 "
                    f"there (the adapter has lora_dropout={dropout}). Set lora_dropout: 0 to save it."
                )
            owner_param = lora_model.get_parameter(site.name)
            if owner_param.dim() != 2 and site.weight_layout not in EXPERT_LAYOUTS:
                raise AdapterError(f"cannot save a PEFT adapter: site {site.name} adapts a {owner_param.dim()}-D "
                                   "parameter, which graphlora does not write for PEFT")
        for path in mts_paths:
            if is_inside(site.module, path) or peft_excluded_by_modules_to_save(site.module, [path]):
                raise AdapterError(
                    f"cannot save a PEFT adapter: site {site.name} lies inside modules_to_save module {path}; PEFT "
                    "never puts LoRA on (or inside) a modules_to_save module"
                )
    return dropout


def _target_fields(lora_model: "GraphLoraModel", mts_paths: list[str],
                   as_parameters: frozenset[str] = frozenset()) -> tuple[Any, list[str] | None]:
    """(target_modules, target_parameters) that make PEFT adapt exactly the sites.

    A linear site in ``as_parameters`` is written as the target parameter ``<path>.weight`` (PEFT's ParamWrapper on
    the Linear's weight: the same update, the same tensor keys) instead of a target module."""
    original = lora_model.base_model
    module_names = [n for n, _ in original.named_modules() if n]
    linear = sorted(s.name for s in lora_model.sites if s.kind == "linear" and s.name not in as_parameters)
    params = sorted([s.name for s in lora_model.sites if s.kind != "linear"] + [f"{n}.weight" for n in as_parameters])
    target_modules: Any = linear
    for name in linear:
        hits = [n for n in module_names if matches_module_suffix(n, name)]
        if hits != [name]:
            # A full path that is also the suffix of another module path (PEFT matches suffixes): an
            # anchored regular expression (PEFT fullmatches a string) is exact.
            target_modules = "(?:" + "|".join(re.escape(n) for n in linear) + ")"
            break
    param_names = [f"{m}.{p}" if m else p for m, mod in original.named_modules()
                   for p, _ in mod.named_parameters(recurse=False)]
    for name in params:
        hits = [n for n in param_names if matches_module_suffix(n, name)]
        if hits != [name]:
            raise AdapterError(
                f"cannot save a PEFT adapter: target_parameters entry {name} would also match {shorten(hits)} "
                "(PEFT matches parameter names by suffix and has no regular expressions for them)"
            )
    for path in mts_paths:
        module = original.get_submodule(path)
        hits = [n for n, m in original.named_modules(remove_duplicate=False) if n.endswith(path) and m is not module]
        if hits:
            raise AdapterError(
                f"cannot save a PEFT adapter: modules_to_save entry {path} would also select {shorten(hits)} "
                "(PEFT matches modules_to_save by name suffix)"
            )
    return target_modules, (params or None)


def _patterns(sites: list[Site], default: Any, attr: str, keys: dict[str, str]) -> dict[str, Any]:
    """``rank_pattern`` / ``alpha_pattern`` entries for sites whose value differs from the default.

    ``keys``: site name -> the name PEFT matches the patterns against (the module path, or the parameter path of a
    target parameter). Plain names are written when PEFT's pattern lookup then gives every site its own value
    (checked here); otherwise anchored, escaped regular expressions."""
    values = {keys[s.name]: getattr(s, attr) for s in sites}
    differing = {n: v for n, v in values.items() if v != default}
    if all(peft_pattern_value(differing, n, default) == v for n, v in values.items()):
        return differing
    return {"^" + re.escape(n): v for n, v in differing.items()}


def adapter_config(lora_model: "GraphLoraModel", task_type: str | None = "auto") -> dict[str, Any]:
    """The ``adapter_config.json`` content :func:`save_adapter` writes (PEFT LoraConfig fields).

    Where the installed PEFT would rewrite the config before loading it (:func:`peft_load_rewrites`: its
    transformers-v4 MoE conversion takes dense ``gate_proj``/``up_proj`` linears for experts), the linears it
    would take are written as target parameters (``<path>.weight``), which the conversion leaves alone, if that
    makes the config load as written; otherwise it is written as is (``save_adapter`` then warns)."""
    return peft_safe_adapter_config(lora_model, task_type)[0]


def peft_safe_adapter_config(lora_model: "GraphLoraModel", task_type: str | None
                             ) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """:func:`adapter_config` and what the installed PEFT would still rewrite in it (empty: it loads as written)."""
    config = _adapter_config(lora_model, task_type, frozenset())
    changes = peft_load_rewrites(config, lora_model.base_model)
    if not changes or "target_modules" not in changes or config["lora_dropout"]:
        return config, changes  # (PEFT's ParamWrapper refuses dropout)
    written, used = changes["target_modules"]
    linear = {s.name for s in lora_model.sites if s.kind == "linear"}
    taken = linear if isinstance(written, str) else linear & (set(written) - set(used or ()))
    retry = _adapter_config(lora_model, task_type, frozenset(taken))
    retry_changes = peft_load_rewrites(retry, lora_model.base_model)
    return (retry, retry_changes) if not retry_changes else (config, changes)


def _adapter_config(lora_model: "GraphLoraModel", task_type: str | None, as_parameters: frozenset[str]) -> dict[str, Any]:
    policy = lora_model.policy
    original = lora_model.base_model
    mts_paths = modules_to_save_paths(original, policy.modules_to_save)
    dropout = _check_peft_can_represent(lora_model, mts_paths)
    target_modules, target_parameters = _target_fields(lora_model, mts_paths, as_parameters)
    keys = {s.name: f"{s.name}.weight" if s.name in as_parameters else s.name for s in lora_model.sites}
    rank_pattern = _patterns(lora_model.sites, policy.r, "r", keys)
    alpha_pattern = {k: _number(v) for k, v in
                     _patterns(lora_model.sites, float(policy.lora_alpha), "alpha", keys).items()}
    if task_type == "auto":
        can_generate = getattr(original, "can_generate", None)
        task_type = "CAUSAL_LM" if callable(can_generate) and can_generate() else None
    config_obj = getattr(original, "config", None)
    name_or_path = getattr(config_obj, "_name_or_path", None) or None
    cls = type(original)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": name_or_path,
        "revision": None,
        "auto_mapping": {"base_model_class": cls.__name__, "parent_library": cls.__module__},
        "inference_mode": True,
        "r": int(policy.r),
        "lora_alpha": _number(policy.lora_alpha),
        "lora_dropout": float(dropout),
        "use_rslora": bool(policy.use_rslora),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": mts_paths or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
    }
    if target_parameters:
        config["target_parameters"] = target_parameters
    return config


def numeric_record(config: dict[str, Any]) -> dict[str, Any]:
    """The config's :data:`NUMERIC_FIELDS`, normalised (sorted lists, numbers as written), for comparison."""
    out = {}
    for key in NUMERIC_FIELDS:
        value = config.get(key)
        if isinstance(value, (list, tuple, set)):
            value = sorted(value)
        if key in ("rank_pattern", "alpha_pattern"):
            value = {k: _number(v) for k, v in (value or {}).items()}
        if key == "lora_alpha" and value is not None:
            value = _number(value)
        if key in ("target_parameters", "modules_to_save") and not value:
            value = None
        out[key] = value
    return out


#: LoraConfig fields that only describe the file or PEFT's wrapper, or only matter when PEFT creates
#: new adapter weights: reading a trained adapter does not depend on them.
_IGNORED_FIELDS = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "megatron_core", "qalora_group_size", "runtime_config", "eva_config",
}
#: Fields graphlora honours.
_SUPPORTED_FIELDS = {"r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern",
                     "target_modules", "target_parameters", "modules_to_save", "init_lora_weights"}
#: Fields that must keep their neutral value: (neutral test, why graphlora refuses another value).
_REFUSED_FIELDS: dict[str, tuple[Any, str]] = {
    "use_dora": (lambda v: not v, "DoRA (a magnitude vector on top of LoRA) is not supported"),
    "fan_in_fan_out": (lambda v: not v, "fan_in_fan_out=True (Conv1D-style [in, out] weights) is not supported"),
    "bias": (lambda v: v in (None, "none"), "only bias='none' is supported (trained biases are not saved by graphlora)"),
    "lora_bias": (lambda v: not v, "a bias on lora_B is not supported"),
    "layers_to_transform": (lambda v: v is None or v == [], "layers_to_transform is not supported (graphlora "
                            "selects layers with its policy)"),
    "layers_pattern": (lambda v: not v, "layers_pattern is not supported"),
    "exclude_modules": (lambda v: not v, "exclude_modules is not supported"),
    "megatron_config": (lambda v: not v, "Megatron parallel layers are not supported"),
    "loftq_config": (lambda v: not v, "LoftQ (quantised base weights) is not supported"),
    "use_qalora": (lambda v: not v, "QA-LoRA is not supported"),
    "trainable_token_indices": (lambda v: not v, "trainable tokens are not supported"),
    "layer_replication": (lambda v: not v, "layer replication is not supported"),
    "alora_invocation_tokens": (lambda v: not v, "activated LoRA (aLoRA) is not supported"),
    "velora_config": (lambda v: not v, "VeLoRA is not supported"),
    "monteclora_config": (lambda v: not v, "MonteCLoRA is not supported"),
    "use_bdlora": (lambda v: not v, "block-diagonal LoRA is not supported"),
    "arrow_config": (lambda v: not v, "Arrow routing is not supported"),
    "kasa_config": (lambda v: not v, "KaSA is not supported"),
    "ensure_weight_tying": (lambda v: not v, "ensure_weight_tying (adapters tied across tied weights) is not supported"),
    "corda_config": (lambda v: not v, "CorDA is not supported"),
    "lora_ga_config": (lambda v: not v, "LoRA-GA is not supported"),
}
#: init_lora_weights values that only shape the initial adapter (the base weights stay untouched).
_INIT_OK = (True, False, "gaussian", "eva", "orthogonal")


def _is_neutral(value: Any) -> bool:
    return value is None or value is False or value == "" or value == [] or value == {}


def check_adapter_config(config: dict[str, Any], path: str = ADAPTER_CONFIG_NAME) -> None:
    """Refuse, by field name, every PEFT config feature graphlora does not support."""
    problems = []
    peft_type = config.get("peft_type")
    if peft_type not in (None, "LORA"):
        raise AdapterError(f"{path}: peft_type {peft_type!r} is not LoRA; graphlora reads LoRA adapters only")
    for key, value in config.items():
        if key in _IGNORED_FIELDS or key in _SUPPORTED_FIELDS:
            continue
        if key in _REFUSED_FIELDS:
            neutral, why = _REFUSED_FIELDS[key]
            if not neutral(value):
                problems.append(f"{key}={value!r}: {why}")
        elif not _is_neutral(value):
            problems.append(f"{key}={value!r}: a field this graphlora does not know")
    init = config.get("init_lora_weights", True)
    if init not in _INIT_OK and init != "mica":
        problems.append(f"init_lora_weights={init!r}: this initialisation changes the base weights "
                        "(PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA), so the adapter only works on a modified base model; "
                        "save it from PEFT with path_initial_model_for_weight_conversion to get a plain LoRA")
    if problems:
        raise AdapterError(f"{path}: unsupported PEFT config: " + "; ".join(problems))
    if init == "mica":
        warnings.warn(f"{path}: init_lora_weights='mica' trains only lora_A in PEFT; graphlora loads the adapter "
                      "with both lora_A and lora_B trainable", stacklevel=3)
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"{path}: {key} must be a positive number, not {value!r}")
    if config.get("target_modules") is None and not config.get("target_parameters"):
        raise AdapterError(f"{path}: neither target_modules nor target_parameters is set")
    if isinstance(config.get("target_parameters"), str):
        raise AdapterError(f"{path}: target_parameters must be a list of parameter names")


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """The JSON object in ``directory/adapter_config.json``; a missing or unreadable file is an error naming it."""
    path = directory / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{path}: no such file (not an adapter directory)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: cannot be read: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config
