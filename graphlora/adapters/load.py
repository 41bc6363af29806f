"""``graphlora.load_adapter``: rewrite a model with an adapter saved by graphlora or PEFT, and load it.

Reads ``adapter_config.json``, ``adapter_model.safetensors`` and, when present, ``graphlora_policy.yaml``
(the format and PEFT's matching rules are the other modules of this package); writes nothing. Plans the
adapter's sites by PEFT's rules (``target_modules`` and ``target_parameters``, ranks and alphas), rewrites
the model with the saved policy when it selects exactly those sites (else with a policy built from the
adapter), checks the rewrite's sites against the plan and copies the tensors in. A site the rewrite could
not adapt is an error naming it, except one whose output never reaches the model's outputs
(``SkippedSite.cause`` is ``SkipCause.UNREACHABLE``) and whose ``lora_B`` is zero: it is left out, with a
warning.

The package's ``__init__`` does not import this module (it imports the rewriter, which imports
``graphlora.model``, which uses the package); ``graphlora.load_adapter`` is the public name.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from graphlora.adapters.config import check_adapter_config, read_adapter_config
from graphlora.adapters.format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    META_POLICY_SHA,
    PEFT_PREFIX,
    POLICY_NAME,
    AdapterError,
    shorten,
)
from graphlora.adapters.peft_compat import (
    is_inside,
    linear_module_names,
    modules_to_save_paths,
    peft_excluded_by_modules_to_save,
    peft_list_match,
    peft_modules_to_save_hits,
    peft_pattern_value,
    peft_targets_module,
)
from graphlora.adapters.weights import check_metadata, read_adapter_tensors
from graphlora.errors import GraphLoraError
from graphlora.labels import SkipCause
from graphlora.lora import LORA_DTYPES
from graphlora.model import GraphLoraModel
from graphlora.policy import Policy
from graphlora.rewriter import rewrite


@dataclasses.dataclass
class _Entry:
    """One LoRA site of an adapter file."""

    name: str  # graphlora site name: module path, or parameter path for target_parameters
    owner: str  # module whose path prefixes the lora_A / lora_B keys
    kind: str  # "linear" (target_modules) or "param" (target_parameters)
    r: int
    alpha: float
    key_a: str
    key_b: str
    experts: int = 1  # a 3-D (expert) parameter: A has r rows per expert, B r columns per expert


@dataclasses.dataclass
class _Plan:
    entries: list[_Entry]
    modules_to_save: dict[str, list[str]]  # module path -> its tensor keys
    lora_dtype: str


def _plan(model: torch.nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> _Plan:
    """Which sites and tensors the adapter holds, checked against its config and the model."""
    target_modules = config.get("target_modules")
    target_parameters = list(config.get("target_parameters") or [])
    mts_names = list(config.get("modules_to_save") or [])
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    modules = dict(model.named_modules())
    linear_names = linear_module_names(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None:
        linear_names -= {n for n, m in modules.items() if m is out_emb}

    # modules_to_save (PEFT matching), their expected tensor keys
    mts: dict[str, list[str]] = {}
    for name in mts_names:
        hits = peft_modules_to_save_hits(model, name)
        for hit in hits:
            if any(is_inside(hit, other) and hit != other for other in hits + list(mts)):
                raise AdapterError(f"{path}: modules_to_save entry {name!r} selects nested modules ({hit} inside "
                                   "another); graphlora cannot load that")
            mts[hit] = [f"{PEFT_PREFIX}{hit}.{k}" for k in modules[hit].state_dict()]

    # the modules PEFT would adapt, by its rules
    expected: dict[str, _Entry] = {}

    def add(name: str, owner: str, kind: str, experts: int = 1, pattern_key: str | None = None):
        if owner in expected:
            raise AdapterError(f"{path}: {expected[owner].name} and {name} both put LoRA on module {owner}; graphlora "
                               "holds one adapter per module")
        r = peft_pattern_value(rank_pattern, pattern_key or name, config["r"])
        alpha = peft_pattern_value(alpha_pattern, pattern_key or name, config["lora_alpha"])
        key = f"{PEFT_PREFIX}{owner}"
        expected[owner] = _Entry(name, owner, kind, int(r), float(alpha), f"{key}.lora_A.weight", f"{key}.lora_B.weight",
                                 experts)

    for name, module in modules.items():
        if not name or not peft_targets_module(target_modules, name, linear_names):
            continue
        if peft_excluded_by_modules_to_save(name, mts_names):
            continue
        if not isinstance(module, torch.nn.Linear):
            raise AdapterError(f"{path}: target_modules selects {name}, a {type(module).__name__}; graphlora can put "
                               "LoRA only on nn.Linear modules and raw parameter matmuls")
        add(name, name, "linear")
    for owner, module in modules.items():
        matched = [(f"{owner}.{pname}" if owner else pname, param) for pname, param in module.named_parameters(recurse=False)
                   if peft_list_match(f"{owner}.{pname}" if owner else pname, target_parameters)]
        # PEFT wraps the module once per targeted parameter, the first (registration order) innermost: the i-th of k
        # keeps its lora_A / lora_B under k - 1 - i ``base_layer`` segments.
        for i, (full, param) in enumerate(matched):
            if owner in linear_names and full == f"{owner}.weight" and len(matched) == 1:
                # a Linear's weight as a target parameter (graphlora writes it so where PEFT's MoE conversion would
                # misread a target module): the same update as LoRA on the Linear, under the same keys
                add(owner, owner, "linear", pattern_key=full)
                continue
            add(full, owner + ".base_layer" * (len(matched) - 1 - i), "param",
                int(param.shape[0]) if param.dim() == 3 else 1)

    # the file's keys against the expectation
    lora_keys: dict[str, dict[str, str]] = collections.defaultdict(dict)
    other: list[str] = []
    for key in tensors:
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        if m:
            lora_keys[m[1]][m[2]] = key
        else:
            other.append(key)
    missing = [k for e in expected.values() for k in (e.key_a, e.key_b) if k not in tensors]
    missing += [k for keys in mts.values() for k in keys if k not in tensors]
    mts_keys = {k for keys in mts.values() for k in keys}
    unexpected = sorted([k for owner, parts in lora_keys.items() if owner not in expected for k in parts.values()]
                        + [k for k in other if k not in mts_keys])
    if missing:
        raise AdapterError(f"{path}: missing keys (the config's targets have no tensors): {shorten(sorted(missing))}")
    if unexpected:
        raise AdapterError(f"{path}: unexpected keys (not selected by {ADAPTER_CONFIG_NAME}'s target_modules, "
                           f"target_parameters or modules_to_save): {shorten(unexpected)}")
    if not expected:
        raise AdapterError(f"{path}: the adapter's targets select no module of this model")

    dtypes = set()
    for e in expected.values():
        a, b = tensors[e.key_a], tensors[e.key_b]
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(f"{path}: {e.key_a} {list(a.shape)} and {e.key_b} {list(b.shape)} must be matrices")
        if a.shape[0] != e.r * e.experts or b.shape[1] != e.r * e.experts:
            per = f" x {e.experts} experts" if e.experts > 1 else ""
            raise AdapterError(
                f"{path}: rank mismatch for {e.name}: {ADAPTER_CONFIG_NAME} says r={e.r}{per}, but {e.key_a} has shape "
                f"{list(a.shape)} (rank {a.shape[0]}) and {e.key_b} has shape {list(b.shape)} (rank {b.shape[1]})"
            )
        dtypes.add(a.dtype)
        dtypes.add(b.dtype)
    names = {v: k for k, v in LORA_DTYPES.items()}
    lora_dtype = names.get(next(iter(dtypes))) if len(dtypes) == 1 else None
    return _Plan(list(expected.values()), mts, lora_dtype or "float32")


def _policy_for(plan: _Plan, config: dict[str, Any]) -> "Policy":
    """A policy whose flags select nothing and whose rules select exactly the adapter's sites."""
    from graphlora.policy import Policy, Rule, RuleMatch

    groups: dict[tuple[int, float], list[str]] = collections.defaultdict(list)
    for e in plan.entries:
        groups[(e.r, e.alpha)].append(e.name)
    rules = [
        Rule(match=RuleMatch(name="(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")"),
             target=True, r=r, alpha=alpha, allow_unmatched=True)
        for (r, alpha), names in sorted(groups.items())
    ]
    return Policy(
        r=int(config["r"]), lora_alpha=float(config["lora_alpha"]), lora_dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        finetune_vision_layers=False, finetune_language_layers=False, finetune_attention_modules=False,
        finetune_mlp_modules=False, finetune_projector=False, finetune_cross_attention=False,
        modules_to_save=sorted(plan.modules_to_save) or None, lora_dtype=plan.lora_dtype, rules=rules,
    )


def _disagreements(lora_model: "GraphLoraModel", plan: _Plan, config: dict[str, Any]) -> list[str]:
    """How a model rewritten with the saved policy differs from the adapter (empty: consistent)."""
    out = []
    sites = {s.name: s for s in lora_model.sites}
    wanted = {e.name: e for e in plan.entries}
    for name in sorted(set(wanted) - set(sites)):
        out.append(f"{name} is in the adapter but not adapted")
    for name in sorted(set(sites) - set(wanted)):
        out.append(f"{name} is adapted but not in the adapter")
    for name in sorted(set(sites) & set(wanted)):
        s, e = sites[name], wanted[name]
        if (s.r, float(s.alpha)) != (e.r, e.alpha):
            out.append(f"{name}: r={s.r}, alpha={s.alpha} vs the adapter's r={e.r}, alpha={e.alpha}")
    policy = lora_model.policy
    if bool(policy.use_rslora) != bool(config.get("use_rslora", False)):
        out.append("use_rslora differs")
    if {s.dropout for s in lora_model.sites} - {float(config.get("lora_dropout") or 0.0)}:
        out.append("lora_dropout differs")
    if modules_to_save_paths(lora_model.base_model, policy.modules_to_save) != sorted(plan.modules_to_save):
        out.append("modules_to_save differs")
    return out


def _saved_policy(directory: Path, metadata: dict[str, str]) -> "Policy | None":
    path = directory / POLICY_NAME
    if not path.is_file():
        return None
    from graphlora.policy import parse_policy_text

    text = path.read_text(encoding="utf-8")
    sha = metadata.get(META_POLICY_SHA)
    if sha is not None and sha != hashlib.sha256(text.encode()).hexdigest():
        warnings.warn(f"{path} was not saved together with {ADAPTER_WEIGHTS_NAME} (edited, or an interrupted save); "
                      "it is ignored and the policy is rebuilt from the adapter", stacklevel=3)
        return None
    try:
        return parse_policy_text(text, "yaml", name=path).policy
    except GraphLoraError as e:
        warnings.warn(f"{path} cannot be read ({e}); the policy is rebuilt from the adapter", stacklevel=3)
        return None


def _copy_in(lora_model: "GraphLoraModel", plan: _Plan, tensors: dict[str, torch.Tensor], path: Path) -> None:
    sites = {s.name: s for s in lora_model.sites}
    with torch.no_grad():
        for e in plan.entries:
            site = sites.get(e.name)
            if site is None:
                continue  # dropped (unreachable, zero B); warned about
            module = lora_model.get_submodule(site.module)
            target_a, target_b = module.lora_A.weight, module.lora_B.weight
            transposed = site.kind != "linear" and site.weight_layout == "in_out"
            # The shapes the file must hold (PEFT's layout) for this site.
            want = {e.key_a: tuple(target_b.T.shape if transposed else target_a.shape),
                    e.key_b: tuple(target_a.T.shape if transposed else target_b.shape)}
            for key, shape in want.items():
                if tuple(tensors[key].shape) != shape:
                    raise AdapterError(f"{path}: {key} has shape {list(tensors[key].shape)}, but {site.name} of this "
                                       f"model needs {list(shape)}")
            a, b = tensors[e.key_a], tensors[e.key_b]
            if transposed:
                a, b = b.T, a.T
            target_a.copy_(a)
            target_b.copy_(b)
        for mpath, keys in plan.modules_to_save.items():
            state = lora_model.get_submodule(mpath).state_dict(keep_vars=True)
            for key in keys:
                local = key[len(PEFT_PREFIX) + len(mpath) + 1:]
                target = state[local]
                if tuple(tensors[key].shape) != tuple(target.shape):
                    raise AdapterError(f"{path}: {key} has shape {list(tensors[key].shape)}, but the model's "
                                       f"{mpath}.{local} is {list(target.shape)}")
                target.data.copy_(tensors[key])


def _check_sites(lora_model: "GraphLoraModel", plan: _Plan, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every adapter module must be a site of the rewritten model, of the right kind."""
    sites = {s.name: s for s in lora_model.sites}
    skipped = {s.name: s for s in lora_model.skipped_sites}
    dropped = []
    for e in plan.entries:
        site = sites.get(e.name)
        if site is None:
            if e.name in skipped:
                reason = skipped[e.name].reason
                if skipped[e.name].cause == SkipCause.UNREACHABLE and not tensors[e.key_b].any():
                    dropped.append(e.name)  # no effect on any output, and B = 0: dropping it is exact
                    continue
                raise AdapterError(f"{path}: the adapter has LoRA for {e.name}, which graphlora cannot adapt: {reason}")
            raise AdapterError(f"{path}: the adapter has LoRA for {e.name}, which the traced graph does not use as a "
                               "matmul weight (not called for these example inputs, or not a linear/matmul)")
        if (site.kind == "linear") != (e.kind == "linear"):
            raise AdapterError(f"{path}: {e.name} is a {site.kind} site in graphlora but a "
                               f"{'target_modules' if e.kind == 'linear' else 'target_parameters'} entry in the adapter")
        if (site.r, float(site.alpha)) != (e.r, e.alpha):  # pragma: no cover - the policy sets them
            raise AdapterError(f"{path}: {e.name} got r={site.r}, alpha={site.alpha}; the adapter says r={e.r}, alpha={e.alpha}")
    extra = sorted(set(sites) - {e.name for e in plan.entries})
    if extra:  # pragma: no cover - the policy selects by exact name
        raise AdapterError(f"{path}: the rewrite adapted {shorten(extra)}, which the adapter does not hold")
    if dropped:
        warnings.warn(f"{path}: LoRA for {shorten(dropped)} is left out: those modules never reach the model's "
                      "outputs and their lora_B is zero, so the outputs are unchanged", stacklevel=3)


def load_adapter(model: torch.nn.Module, directory: str | os.PathLike, example_inputs: dict[str, Any] | None = None,
                 **rewrite_kwargs: Any) -> "GraphLoraModel":
    """Rewrite ``model`` with the LoRA adapter saved in ``directory`` (by graphlora or by PEFT) and load it.

    The sites are exactly the adapter's modules with their ranks and alphas; ``graphlora_policy.yaml`` is
    used when present and consistent with the adapter (else a policy is built from ``adapter_config.json``).
    ``example_inputs`` and ``rewrite_kwargs`` go to :func:`graphlora.rewrite`. Errors name the file and keys.
    """
    if isinstance(model, GraphLoraModel):
        raise AdapterError("load_adapter() takes the original model, not a GraphLoraModel (use lora_model.base_model)")
    if "policy" in rewrite_kwargs:
        raise TypeError("load_adapter() builds the policy from the adapter; do not pass policy=")
    directory = Path(directory)
    config = read_adapter_config(directory)
    check_adapter_config(config, str(directory / ADAPTER_CONFIG_NAME))
    tensors, metadata = read_adapter_tensors(directory)
    check_metadata(config, metadata, directory)
    weights_path = directory / ADAPTER_WEIGHTS_NAME
    plan = _plan(model, config, tensors, weights_path)

    lora_model = None
    saved = _saved_policy(directory, metadata)
    if saved is not None:
        try:
            candidate = rewrite(model, saved, example_inputs, **rewrite_kwargs)
        except GraphLoraError as e:
            warnings.warn(f"{directory / POLICY_NAME} does not apply to this model ({e}); the policy is rebuilt from "
                          "the adapter", stacklevel=2)
        else:
            problems = _disagreements(candidate, plan, config)
            if problems:
                warnings.warn(f"{directory / POLICY_NAME} does not select the adapter's sites ({shorten(problems, 3)}); "
                              "the policy is rebuilt from the adapter", stacklevel=2)
            else:
                lora_model = candidate
    if lora_model is None:
        lora_model = rewrite(model, _policy_for(plan, config), example_inputs, **rewrite_kwargs)
    _check_sites(lora_model, plan, tensors, weights_path)
    _copy_in(lora_model, plan, tensors, weights_path)
    return lora_model


__all__ = ["load_adapter"]
