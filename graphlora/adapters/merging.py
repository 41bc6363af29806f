"""Merging: fold ``s * B A`` into the base weights, restore them, or write a merged checkpoint.

:func:`merge` changes the adapted base weights in place (refusing tied weights) after keeping copies;
:func:`unmerge` restores them bit-exactly from those copies. :func:`save_merged` writes a plain
transformers checkpoint (``save_pretrained`` of the merged state dict, ``modules_to_save`` copies in place
of the originals) without touching the live model, all or nothing (graphlora/adapters/atomic_io.py);
tied input/output embeddings that no longer agree are written separately with ``tie_word_embeddings``
turned off in the checkpoint's config.

(The module is not named ``merge.py``: ``graphlora.adapters.merge`` is the function, and a submodule of
that name would make ``import graphlora.adapters.merge as m`` or ``mock.patch("graphlora.adapters.merge.X")``
reach the function instead of the module.)
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from graphlora.adapters.atomic_io import commit
from graphlora.adapters.format import AdapterError, AdapterExistsError
from graphlora.adapters.peft_compat import modules_to_save_paths
from graphlora.lora import Site, param_delta

if TYPE_CHECKING:  # pragma: no cover
    from graphlora.model import GraphLoraModel


_MERGED_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


@dataclasses.dataclass
class MergeState:
    """Copies of the base weights taken by :func:`merge` (restored bit-exactly by :func:`unmerge`)."""

    originals: dict[str, torch.Tensor]
    adapters_enabled: bool


def _merge_state(lora_model: "GraphLoraModel") -> MergeState | None:
    return lora_model.merge_state


def is_merged(lora_model: "GraphLoraModel") -> bool:
    return _merge_state(lora_model) is not None


def _weight_name(site: Site) -> str:
    """The parameter a site adapts: ``<module>.weight`` for a Linear, the parameter path otherwise."""
    return f"{site.name}.weight" if site.kind == "linear" else site.name


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
    if lora_model.quantized:
        first = next(iter(lora_model.quantized.values()))
        raise AdapterError(
            f"merge(): the base model is quantized ({len(lora_model.quantized)} bitsandbytes layers, e.g. {first.path}: "
            f"{first.describe()}); merging in place would have to re-quantize W + s B A and lose the adapter's "
            "change in rounding. Use save_merged(directory), which writes a 16-bit merged checkpoint")
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
def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters that are not quantized (its 16/32-bit dtype)."""
    for p in model.parameters():
        if p.dtype.is_floating_point and type(p) is torch.nn.Parameter:
            return p.dtype
    return torch.float32


def _dequantized_state(lora_model: "GraphLoraModel", state: dict[str, torch.Tensor],
                       dtype: torch.dtype) -> None:
    """Replace every quantized layer's packed weight and quantization-state entries in ``state`` by its
    dequantized ``[out, in]`` weight in ``dtype``."""
    from graphlora.quantized import dequantized_weight

    for path in lora_model.quantized:
        prefix = f"{path}.weight."
        for key in [k for k in state if k.startswith(prefix) or k in (f"{path}.SCB", f"{path}.weight_format")]:
            del state[key]
        state[f"{path}.weight"] = dequantized_weight(lora_model.get_submodule(path)).to(dtype)


def merged_state_dict(lora_model: "GraphLoraModel", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The original model's state dict with ``W + s B A`` for every site and the ``modules_to_save`` copies
    in place of the originals; merged tensors are new (the live model is not touched). A quantized model's
    layers are dequantized first and written in ``dtype`` (default: the model's unquantized float dtype)."""
    original = lora_model.base_model
    state = original.state_dict()
    if lora_model.quantized:
        _dequantized_state(lora_model, state, dtype or _float_dtype(original))
    for path in modules_to_save_paths(original, lora_model.policy.modules_to_save):
        for key, value in lora_model.get_submodule(path).state_dict().items():
            full = f"{path}.{key}"
            if full in state:
                state[full] = value
    saved = _merge_state(lora_model)
    for site in lora_model.sites:
        name = _weight_name(site)
        if site.module in lora_model.quantized:
            state[name] = _merged_weight(lora_model, site, state[name])  # the dequantized weight
            continue
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
                max_shard_size: int | str = "50GB", dtype: torch.dtype | None = None) -> Path:
    """Write a plain transformers checkpoint of the merged model (see GraphLoraModel.save_merged). A quantized
    model is written dequantized, in ``dtype`` (default: its unquantized float dtype), with no quantization
    config: ``from_pretrained`` loads it as a float model (Unsloth's ``merged_16bit``)."""
    original = lora_model.base_model
    if not hasattr(original, "save_pretrained") or not hasattr(original, "config"):
        raise AdapterError(f"save_merged() needs a transformers PreTrainedModel, not {type(original).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(n for n in os.listdir(directory) if n in _MERGED_FILES or _SHARD_RE.fullmatch(n))
    if existing and not overwrite:
        raise AdapterExistsError(f"{directory} already holds a checkpoint ({', '.join(existing)}); pass overwrite=True")
    state = merged_state_dict(lora_model, dtype)
    config = copy.deepcopy(original.config)
    _untie_if_needed(lora_model, state, config)
    quantizer_attrs = {}
    if lora_model.quantized:  # a float checkpoint: no quantization config, and no quantizer rewriting the state
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            config.__dict__.pop(attr, None)
        quantizer_attrs = {"hf_quantizer": None, "is_quantized": False}
    tmp = Path(tempfile.mkdtemp(prefix=".graphlora-merged-", dir=directory))
    live_config = original.__dict__.get("config")
    live_generation = original.__dict__.get("generation_config")
    live_quantizer = {attr: original.__dict__[attr] for attr in quantizer_attrs if attr in original.__dict__}
    try:
        # save_pretrained writes (and stamps dtype/architectures on) the model's config: hand it a copy.
        original.__dict__["config"] = config
        original.__dict__.update(quantizer_attrs)
        if live_generation is not None:
            original.__dict__["generation_config"] = copy.deepcopy(live_generation)
        try:
            original.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)
        finally:
            original.__dict__["config"] = live_config
            for attr in quantizer_attrs:
                original.__dict__.pop(attr, None)
            original.__dict__.update(live_quantizer)
            if live_generation is not None:
                original.__dict__["generation_config"] = live_generation
        written = sorted(p.name for p in tmp.iterdir() if p.is_file())
        stale = [n for n in existing if n not in written and (n.endswith(".safetensors") or n.endswith(".index.json"))]
        commit(directory, {n: tmp / n for n in written}, remove=stale)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
