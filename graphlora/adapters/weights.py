"""``adapter_model.safetensors``: the LoRA tensors in PEFT's keys and layouts.

:func:`adapter_tensors` takes them out of a live model (CPU copies; a raw ``[in, out]`` parameter's
factors transposed and swapped into PEFT's ``ParamWrapper`` layout); :func:`read_adapter_tensors` reads
the file (never a pickled one) and :func:`check_metadata` checks that it was saved together with the
config beside it; :func:`load_adapter_weights` copies a file back into the model it was saved from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from graphlora.adapters.config import (
    NUMERIC_FIELDS,
    adapter_config,
    check_adapter_config,
    numeric_record,
    read_adapter_config,
)
from graphlora.adapters.format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    META_CONFIG,
    PEFT_PREFIX,
    PICKLED_WEIGHTS_NAME,
    AdapterError,
    shorten,
)
from graphlora.adapters.peft_compat import modules_to_save_paths, peft_lora_path

if TYPE_CHECKING:  # pragma: no cover
    from graphlora.model import GraphLoraModel


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
    """Refuse a config whose numeric fields differ from those recorded in the weights file (when recorded)."""
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
