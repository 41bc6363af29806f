"""``save_adapter``: write a model's adapter in PEFT's format, plus its graphlora policy.

Writes ``adapter_model.safetensors`` (with graphlora's metadata: the config's numeric fields and the
sha256 of the policy file), ``graphlora_policy.yaml`` and, last, ``adapter_config.json``, as one
all-or-nothing step (graphlora/adapters/atomic_io.py); nothing is pickled. Existing adapter files are
replaced only with ``overwrite=True`` (else ``AdapterExistsError``); other files in the directory are left
alone. Warns (``PeftConversionWarning``) when the installed PEFT would rewrite the config before loading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from graphlora.adapters.atomic_io import commit, write_safetensors_temp, write_text_temp
from graphlora.adapters.config import numeric_record, peft_safe_adapter_config
from graphlora.adapters.format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    META_CONFIG,
    META_POLICY_SHA,
    META_VERSION,
    PICKLED_WEIGHTS_NAME,
    POLICY_NAME,
    AdapterExistsError,
)
from graphlora.adapters.weights import adapter_tensors
from graphlora.errors import PeftConversionWarning

if TYPE_CHECKING:  # pragma: no cover
    from graphlora.model import GraphLoraModel


def _warn_if_peft_rewrites(changes: dict[str, tuple[Any, Any]], model: torch.nn.Module) -> None:
    """Warn when :func:`graphlora.adapters.peft_compat.peft_load_rewrites` found changes (``changes``)."""
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
    config, peft_changes = peft_safe_adapter_config(lora_model, task_type)
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
        staged[ADAPTER_WEIGHTS_NAME] = write_safetensors_temp(directory, ADAPTER_WEIGHTS_NAME, tensors, metadata)
        staged[POLICY_NAME] = write_text_temp(directory, POLICY_NAME, policy_text)
        staged[ADAPTER_CONFIG_NAME] = write_text_temp(directory, ADAPTER_CONFIG_NAME, config_text)
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    commit(directory, staged)  # the config last: it is what marks the directory as an adapter
    return directory
