"""Adapters and merging, interoperable with PEFT (docs/adapters.md).

* :func:`save_adapter` writes PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, keys
  ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``) plus the resolved graphlora policy
  (``graphlora_policy.yaml``). ``PeftModel.from_pretrained`` re-injects exactly the saved sites.
* :func:`load_adapter` reads adapters saved by graphlora or by ``PeftModel.save_pretrained``: it builds
  the policy that selects exactly the adapter's modules with their ranks and alphas, rewrites the model
  and copies the tensors in. Every PEFT config feature graphlora cannot honour is refused by name.
* :func:`merge` / :func:`unmerge` fold ``s * B A`` into the base weights in place and restore them
  bit-exactly from saved copies; :func:`save_merged` writes a plain transformers checkpoint without
  touching the live model.

Files are written to temporary files in the target directory and moved into place with ``os.replace``
as one all-or-nothing step (previous files are kept as hard-linked backups until the step succeeds).
Nothing is pickled: safetensors, JSON and YAML only. This module does not import PEFT.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

from graphlora.errors import GraphLoraError, PeftConversionWarning
from graphlora.lora import EXPERT_LAYOUTS, Site, param_delta

if TYPE_CHECKING:  # pragma: no cover
    from graphlora.model import GraphLoraModel

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
POLICY_NAME = "graphlora_policy.yaml"
PEFT_PREFIX = "base_model.model."

#: safetensors metadata keys written by graphlora (strings; PEFT ignores them).
META_CONFIG = "graphlora.adapter_config"  # JSON of the config fields that change the numbers
META_POLICY_SHA = "graphlora.policy_sha256"  # sha256 of graphlora_policy.yaml
META_VERSION = "graphlora.version"

#: Config fields recorded in the weights file, so that a config that does not belong with the weights
#: (an interrupted save, a hand edit) is caught on load.
NUMERIC_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                   "target_parameters", "modules_to_save")

_MERGED_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class AdapterError(GraphLoraError, ValueError):
    """An adapter cannot be saved, read or applied; the message names the file, key, site or config field."""


class AdapterExistsError(AdapterError, FileExistsError):
    """The target directory already holds an adapter (or a checkpoint) and ``overwrite`` is False."""


# =====================================================================================================
# PEFT semantics (re-stated here; graphlora does not import PEFT)
# =====================================================================================================
def peft_list_match(name: str, entries: Iterable[str]) -> bool:
    """PEFT's list matching of ``target_modules`` / ``target_parameters``: equal, or ends with ``"." + entry``."""
    return any(name == e or name.endswith("." + e) for e in entries)


def peft_targets_module(target_modules: Any, name: str, linear_names: set[str]) -> bool:
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


# =====================================================================================================
# small helpers
# =====================================================================================================
def _number(value: float) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() else value


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


def _weight_name(site: Site) -> str:
    """The parameter a site adapts: ``<module>.weight`` for a Linear, the parameter path otherwise."""
    return f"{site.name}.weight" if site.kind == "linear" else site.name


def modules_to_save_paths(model: torch.nn.Module, names: list[str] | None) -> list[str]:
    """The module paths graphlora copied for ``policy.modules_to_save`` (same matching as rewrite)."""
    paths: set[str] = set()
    for name in names or []:
        paths.update(p for p, _ in model.named_modules() if p and (p == name or p.endswith("." + name)))
    return sorted(paths)


def shorten(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... ({len(items) - limit} more)" if len(items) > limit else "")


def is_inside(path: str, container: str) -> bool:
    return path == container or path.startswith(container + ".")


# =====================================================================================================
# all-or-nothing file writes
# =====================================================================================================
def _temp_path(directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".graphlora-tmp", dir=directory)
    os.close(fd)
    return Path(tmp)


def _fsync(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    except OSError:  # pragma: no cover - best effort
        pass


def _write_text_temp(directory: Path, name: str, text: str) -> Path:
    tmp = _temp_path(directory, name)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_safetensors_temp(directory: Path, name: str, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str]) -> Path:
    import safetensors.torch

    tmp = _temp_path(directory, name)
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        _fsync(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _backup(final: Path, token: str) -> Path:
    backup = final.with_name(f".{final.name}.{token}.graphlora-backup")
    try:
        os.link(final, backup)  # no copy of the data; the old inode survives the replace
    except OSError:
        shutil.copy2(final, backup)
    return backup


def _commit(directory: Path, staged: dict[str, Path], remove: Iterable[str] = ()) -> None:
    """Move ``staged`` temporary files onto their names in ``directory`` and delete ``remove``, all or nothing.

    Existing files are hard-linked to backups first; if anything fails (or the call is interrupted by an
    exception such as KeyboardInterrupt), the files already replaced are put back and new ones removed.
    Temporary files never outlive the call.
    """
    token = uuid.uuid4().hex[:8]
    remove = [n for n in remove if n not in staged and (directory / n).exists()]
    backups: dict[str, Path] = {}
    done: list[str] = []  # names already replaced or removed, in order
    try:
        for name in list(staged) + remove:
            if (directory / name).exists():
                backups[name] = _backup(directory / name, token)
        for name, tmp in staged.items():
            os.replace(tmp, directory / name)
            done.append(name)
        for name in remove:
            os.unlink(directory / name)
            done.append(name)
    except BaseException:
        for name in reversed(done):
            final = directory / name
            if name in backups:
                os.replace(backups.pop(name), final)
            elif final.exists():
                final.unlink()
        raise
    finally:
        for tmp in staged.values():
            if tmp.exists():
                tmp.unlink()
        for backup in backups.values():
            if backup.exists():
                backup.unlink()


# =====================================================================================================
# save_adapter
# =====================================================================================================
def linear_module_names(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


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
        hits = [n for n in module_names if n == name or n.endswith("." + name)]
        if hits != [name]:
            # A full path that is also the suffix of another module path (PEFT matches suffixes): an
            # anchored regular expression (PEFT fullmatches a string) is exact.
            target_modules = "(?:" + "|".join(re.escape(n) for n in linear) + ")"
            break
    param_names = [f"{m}.{p}" if m else p for m, mod in original.named_modules()
                   for p, _ in mod.named_parameters(recurse=False)]
    for name in params:
        hits = [n for n in param_names if n == name or n.endswith("." + name)]
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
    return _peft_safe_adapter_config(lora_model, task_type)[0]


def _peft_safe_adapter_config(lora_model: "GraphLoraModel", task_type: str | None
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


def adapter_tensors(lora_model: "GraphLoraModel") -> dict[str, torch.Tensor]:
    """The tensors of the adapter with PEFT's keys and layouts (copies, on CPU)."""
    out: dict[str, torch.Tensor] = {}
    for site in lora_model.sites:
        module = lora_model.get_submodule(site.module)
        a, b = module.lora_A.weight.detach(), module.lora_B.weight.detach()
        if site.kind != "linear" and site.weight_layout == "in_out":
            # PEFT's ParamWrapper adds B' A' to the parameter as stored ([in, out] here); graphlora's delta
            # is (B A)^T, so B' = A^T and A' = B^T.
            a, b = b.T, a.T
        path = peft_lora_path(lora_model, site)
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.to("cpu").contiguous().clone()
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.to("cpu").contiguous().clone()
    for path in modules_to_save_paths(lora_model.base_model, lora_model.policy.modules_to_save):
        for key, value in lora_model.get_submodule(path).state_dict().items():
            out[f"{PEFT_PREFIX}{path}.{key}"] = value.detach().to("cpu").contiguous().clone()
    return out


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


def _warn_if_peft_rewrites(changes: dict[str, tuple[Any, Any]], model: torch.nn.Module) -> None:
    if not changes:
        return
    import peft

    said = "; ".join(f"{k}: {written!r} -> {used!r}" for k, (written, used) in changes.items())
    warnings.warn(
        f"PEFT {peft.__version__} will not load this adapter as written: on model_type "
        f"{getattr(model.config, 'model_type', '?')!r} it rewrites the config first ({said}; its transformers-v4 MoE "
        "conversion, huggingface/peft#3711), so PeftModel.from_pretrained fails or adapts other weights. "
        "graphlora.load_adapter reads the file as written.",
        PeftConversionWarning,
        stacklevel=3,
    )


def save_adapter(lora_model: "GraphLoraModel", directory: str | os.PathLike, overwrite: bool = False, *,
                 task_type: str | None = "auto") -> Path:
    """Write the adapter in PEFT's format, plus ``graphlora_policy.yaml``; return the directory.

    ``task_type="auto"`` writes ``"CAUSAL_LM"`` for a model that can generate, else null. Existing adapter
    files are replaced only with ``overwrite=True``; other files in the directory are left alone.
    """
    from graphlora.policy import dump_policy

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ours = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, POLICY_NAME)
    existing = [n for n in ours + (PICKLED_WEIGHTS_NAME,) if (directory / n).exists()]
    if existing and not overwrite:
        raise AdapterExistsError(f"{directory} already holds {', '.join(existing)}; pass overwrite=True to replace "
                                 "the adapter")
    config, peft_changes = _peft_safe_adapter_config(lora_model, task_type)
    _warn_if_peft_rewrites(peft_changes, lora_model.base_model)
    tensors = adapter_tensors(lora_model)
    policy_text = dump_policy(lora_model.policy, "yaml")
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    from graphlora import __version__

    metadata = {
        "format": "pt",
        META_VERSION: __version__,
        META_CONFIG: json.dumps(numeric_record(config), sort_keys=True),
        META_POLICY_SHA: hashlib.sha256(policy_text.encode()).hexdigest(),
    }
    staged: dict[str, Path] = {}
    try:
        staged[ADAPTER_WEIGHTS_NAME] = _write_safetensors_temp(directory, ADAPTER_WEIGHTS_NAME, tensors, metadata)
        staged[POLICY_NAME] = _write_text_temp(directory, POLICY_NAME, policy_text)
        staged[ADAPTER_CONFIG_NAME] = _write_text_temp(directory, ADAPTER_CONFIG_NAME, config_text)
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    _commit(directory, staged)  # the config last: it is what marks the directory as an adapter
    return directory


# =====================================================================================================
# load_adapter
# =====================================================================================================
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


def read_adapter_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of ``adapter_model.safetensors``; a truncated or corrupt file is an error naming it."""
    from safetensors import safe_open

    path = directory / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        if (directory / PICKLED_WEIGHTS_NAME).exists():
            raise AdapterError(f"{directory / PICKLED_WEIGHTS_NAME}: pickled adapter weights are not read (graphlora "
                               "never unpickles); re-save the adapter with safetensors")
        raise AdapterError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError / OSError with a terse message
        size = path.stat().st_size
        raise AdapterError(f"{path}: not a readable safetensors file ({size} bytes; truncated or corrupt?): "
                           f"{type(e).__name__}: {e}") from None
    return tensors, metadata


def check_metadata(config: dict[str, Any], metadata: dict[str, str], directory: Path) -> None:
    recorded = metadata.get(META_CONFIG)
    if recorded is None:
        return
    try:
        recorded_fields = json.loads(recorded)
    except json.JSONDecodeError:
        raise AdapterError(f"{directory / ADAPTER_WEIGHTS_NAME}: metadata {META_CONFIG} is not JSON") from None
    now = numeric_record(config)
    differ = [k for k in NUMERIC_FIELDS if recorded_fields.get(k) != now.get(k)]
    if differ:
        raise AdapterError(
            f"{directory / ADAPTER_CONFIG_NAME} does not belong with {directory / ADAPTER_WEIGHTS_NAME}: they were not "
            f"saved together (an interrupted save, or an edit): {', '.join(differ)} differ"
        )


def load_adapter_weights(lora_model: "GraphLoraModel", directory: str | os.PathLike) -> None:
    """Copy the adapter tensors saved in ``directory`` (by :func:`save_adapter`) into the live ``lora_model``.

    For resuming training (``GraphLoraTrainerMixin``) and reloading a best checkpoint: unlike
    :func:`load_adapter` nothing is rewritten; the adapter must be this model's. The saved config must agree
    with the model's on every field that changes the numbers (ranks, alphas, targets, modules_to_save), and
    the weights file must hold exactly the model's adapter keys with the model's shapes; anything else is an
    :class:`AdapterError` naming the fields or keys. Values are cast to each parameter's dtype and device.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    check_adapter_config(config, str(directory / ADAPTER_CONFIG_NAME))
    tensors, metadata = read_adapter_tensors(directory)
    check_metadata(config, metadata, directory)
    saved, ours = numeric_record(config), numeric_record(adapter_config(lora_model, task_type=None))
    differ = [k for k in NUMERIC_FIELDS if saved.get(k) != ours.get(k)]
    if differ:
        detail = "; ".join(f"{k}: saved {saved.get(k)!r}, model {ours.get(k)!r}" for k in differ[:3])
        raise AdapterError(f"{directory / ADAPTER_CONFIG_NAME} is not this model's adapter ({shorten(differ)} differ: "
                           f"{detail}); load it with graphlora.load_adapter(original_model, directory) instead")
    # key -> (live tensor, transposed?) in PEFT's keys and layouts, as adapter_tensors writes them.
    targets: dict[str, tuple[torch.Tensor, bool]] = {}
    for site in lora_model.sites:
        module = lora_model.get_submodule(site.module)
        a, b = module.lora_A.weight, module.lora_B.weight
        path = peft_lora_path(lora_model, site)
        if site.kind != "linear" and site.weight_layout == "in_out":
            targets[f"{PEFT_PREFIX}{path}.lora_A.weight"] = (b, True)
            targets[f"{PEFT_PREFIX}{path}.lora_B.weight"] = (a, True)
        else:
            targets[f"{PEFT_PREFIX}{path}.lora_A.weight"] = (a, False)
            targets[f"{PEFT_PREFIX}{path}.lora_B.weight"] = (b, False)
    for path in modules_to_save_paths(lora_model.base_model, lora_model.policy.modules_to_save):
        for key, value in lora_model.get_submodule(path).state_dict(keep_vars=True).items():
            targets[f"{PEFT_PREFIX}{path}.{key}"] = (value, False)
    weights = directory / ADAPTER_WEIGHTS_NAME
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    shapes = {k: tuple(t.T.shape if transposed else t.shape) for k, (t, transposed) in targets.items()}
    wrong = [f"{k} {list(tensors[k].shape)} (model: {list(shape)})"
             for k, shape in shapes.items() if k in tensors and tuple(tensors[k].shape) != shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {shorten(missing, 4)}")
    if unexpected:
        problems.append(f"{len(unexpected)} key(s) this model does not have: {shorten(unexpected, 4)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {shorten(wrong, 4)}")
    if problems:
        raise AdapterError(f"{weights} does not fit this model: " + "; ".join(problems))
    with torch.no_grad():
        for key, (target, transposed) in targets.items():
            value = tensors[key]
            target.copy_(value.T if transposed else value)


# =====================================================================================================
# merge / unmerge
# =====================================================================================================
@dataclasses.dataclass
class MergeState:
    """Copies of the base weights taken by :func:`merge` (restored bit-exactly by :func:`unmerge`)."""

    originals: dict[str, torch.Tensor]
    adapters_enabled: bool


def _merge_state(lora_model: "GraphLoraModel") -> MergeState | None:
    return lora_model.merge_state


def is_merged(lora_model: "GraphLoraModel") -> bool:
    return _merge_state(lora_model) is not None


def _merged_weight(lora_model: "GraphLoraModel", site: Site, base: torch.Tensor) -> torch.Tensor:
    """``W + s B A`` (transposed for a ``[in, out]`` parameter), computed in fp32, in W's dtype; a new tensor."""
    delta = param_delta(lora_model.get_submodule(site.module), site.scale, base, site.weight_layout)
    return (base.detach().float() + delta.to(base.device)).to(base.dtype)


def _tied_names(root: torch.nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = collections.defaultdict(list)
    for name, p in root.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    return names


def merge(lora_model: "GraphLoraModel") -> None:
    """Fold ``s * B A`` into the adapted base weights, in place (see GraphLoraModel.merge)."""
    if is_merged(lora_model):
        warnings.warn("merge(): the adapter is already merged; nothing to do", stacklevel=3)
        return
    if not lora_model.adapters_enabled:
        raise AdapterError("merge() inside disable_adapter(): leave the block first")
    tied = _tied_names(lora_model)
    todo = []
    for site in lora_model.sites:
        name = _weight_name(site)
        weight = lora_model.get_parameter(name)
        if len(tied[id(weight)]) > 1:
            raise AdapterError(f"merge(): site {site.name} adapts {name}, which is shared with "
                               f"{', '.join(n for n in tied[id(weight)] if n != name)} (tied weights): merging would "
                               "change those too. Use save_merged(), which unties them in the checkpoint")
        todo.append((name, weight, site))
    originals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        try:
            for name, weight, site in todo:
                merged = _merged_weight(lora_model, site, weight)
                originals[name] = weight.detach().clone()
                weight.copy_(merged)
        except BaseException:
            for name, original in originals.items():
                lora_model.get_parameter(name).copy_(original)
            raise
    lora_model.merge_state = MergeState(originals, lora_model.adapters_enabled)
    lora_model.adapters_enabled = False  # run the programs traced without the LoRA branch


def unmerge(lora_model: "GraphLoraModel") -> None:
    """Restore the base weights saved by :func:`merge`, bit-exactly."""
    state = _merge_state(lora_model)
    if state is None:
        warnings.warn("unmerge(): the adapter is not merged; nothing to do", stacklevel=3)
        return
    with torch.no_grad():
        for name, original in state.originals.items():
            weight = lora_model.get_parameter(name)
            if weight.shape != original.shape:
                raise AdapterError(f"unmerge(): {name} changed shape since merge() ({list(original.shape)} -> "
                                   f"{list(weight.shape)})")
            # After .to(dtype/device) the saved copy is converted the same way the weight was.
            weight.copy_(original.to(device=weight.device, dtype=weight.dtype))
    lora_model.merge_state = None
    lora_model.adapters_enabled = state.adapters_enabled


# =====================================================================================================
# save_merged
# =====================================================================================================
def merged_state_dict(lora_model: "GraphLoraModel") -> dict[str, torch.Tensor]:
    """The original model's state dict with ``W + s B A`` for every site and the ``modules_to_save`` copies
    in place of the originals; merged tensors are new (the live model is not touched)."""
    original = lora_model.base_model
    state = original.state_dict()
    for path in modules_to_save_paths(original, lora_model.policy.modules_to_save):
        for key, value in lora_model.get_submodule(path).state_dict().items():
            full = f"{path}.{key}"
            if full in state:
                state[full] = value
    saved = _merge_state(lora_model)
    for site in lora_model.sites:
        name = _weight_name(site)
        live = lora_model.get_parameter(name)
        base = saved.originals[name].to(device=live.device, dtype=live.dtype) if saved else live
        state[name] = _merged_weight(lora_model, site, base)
    return state


def _untie_if_needed(lora_model: "GraphLoraModel", state: dict[str, torch.Tensor], config) -> None:
    """Tied weights that no longer agree in ``state`` (one of them merged, or replaced by a modules_to_save
    copy) are written separately, and ``tie_word_embeddings`` is turned off in the checkpoint's config."""
    original = lora_model.base_model
    diverged = []
    for names in _tied_names(original).values():
        names = [n for n in names if n in state]
        if len(names) > 1 and len({state[n].data_ptr() for n in names}) > 1:
            diverged.append(names)
    if not diverged:
        return
    out_emb = original.get_output_embeddings() if hasattr(original, "get_output_embeddings") else None
    head = {f"{n}.weight" for n, m in original.named_modules() if out_emb is not None and m is out_emb}
    configs = [config] + [c for c in (getattr(config, "text_config", None),) if c is not None]
    tie_flags = [c for c in configs if getattr(c, "tie_word_embeddings", False)]
    for names in diverged:
        if not (head & set(names)) or not tie_flags:
            raise AdapterError(f"save_merged(): the tied weights {', '.join(names)} differ after merging, and "
                               "graphlora only knows how to untie input and output embeddings (tie_word_embeddings)")
        for n in names:
            state[n] = state[n].clone()  # no storage shared any more: every name is written
    for c in tie_flags:
        c.tie_word_embeddings = False


def save_merged(lora_model: "GraphLoraModel", directory: str | os.PathLike, overwrite: bool = False, *,
                max_shard_size: int | str = "50GB") -> Path:
    """Write a plain transformers checkpoint of the merged model (see GraphLoraModel.save_merged)."""
    original = lora_model.base_model
    if not hasattr(original, "save_pretrained") or not hasattr(original, "config"):
        raise AdapterError(f"save_merged() needs a transformers PreTrainedModel, not {type(original).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(n for n in os.listdir(directory) if n in _MERGED_FILES or _SHARD_RE.fullmatch(n))
    if existing and not overwrite:
        raise AdapterExistsError(f"{directory} already holds a checkpoint ({', '.join(existing)}); pass overwrite=True")
    state = merged_state_dict(lora_model)
    config = copy.deepcopy(original.config)
    _untie_if_needed(lora_model, state, config)
    tmp = Path(tempfile.mkdtemp(prefix=".graphlora-merged-", dir=directory))
    live_config = original.__dict__.get("config")
    live_generation = original.__dict__.get("generation_config")
    try:
        # save_pretrained writes (and stamps dtype/architectures on) the model's config: hand it a copy.
        original.__dict__["config"] = config
        if live_generation is not None:
            original.__dict__["generation_config"] = copy.deepcopy(live_generation)
        try:
            original.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)
        finally:
            original.__dict__["config"] = live_config
            if live_generation is not None:
                original.__dict__["generation_config"] = live_generation
        written = sorted(p.name for p in tmp.iterdir() if p.is_file())
        stale = [n for n in existing if n not in written and (n.endswith(".safetensors") or n.endswith(".index.json"))]
        _commit(directory, {n: tmp / n for n in written}, remove=stale)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


__all__ = [
    "AdapterError",
    "AdapterExistsError",
    "adapter_config",
    "check_adapter_config",
    "is_merged",
    "load_adapter_weights",
    "merge",
    "merged_state_dict",
    "save_adapter",
    "save_merged",
    "unmerge",
]
