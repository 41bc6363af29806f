"""MODEL SPEC: one grammar for naming a model on every command line.

* a built-in tiny model name (``graphlora.testing.zoo.tiny_model_names()``, e.g. ``llava``);
* ``module:function`` or ``path/to/file.py:function``, a callable returning ``(model, example_inputs)``
  (``example_inputs`` may be None: graphlora then synthesises them from the config);
* a local directory holding a transformers ``config.json`` (no weights needed: the model is built
  from the config with random weights, or on the meta device with ``meta=True``; nothing is downloaded).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from graphlora.errors import GraphLoraError


class ModelSpecError(GraphLoraError, ValueError):
    """A MODEL SPEC that names nothing loadable."""


def _from_callable(spec: str) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    target, _, func_name = spec.rpartition(":")
    if target.endswith(".py") or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise ModelSpecError(f"MODEL SPEC {spec!r}: no such file {target}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules.setdefault(path.stem, module)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelSpecError(f"MODEL SPEC {spec!r}: cannot import module {target!r}: {e}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ModelSpecError(f"MODEL SPEC {spec!r}: {target} has no callable {func_name!r}")
    result = fn()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise ModelSpecError(f"MODEL SPEC {spec!r}: {func_name}() must return (model, example_inputs)")
    return result


def _from_config_dir(path: Path, meta: bool) -> tuple[torch.nn.Module, None]:
    import transformers

    config_file = path / "config.json"
    try:
        json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelSpecError(f"MODEL SPEC {str(path)!r}: cannot read {config_file}: {e}") from None
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    try:
        return model_from_config(config, meta), None
    except ModelSpecError as e:
        raise ModelSpecError(f"MODEL SPEC {str(path)!r}: {e}") from None


def model_from_config(config, meta: bool) -> torch.nn.Module:
    """A model of ``config`` with random weights (on the meta device: no memory) through the first transformers
    auto class that knows its model type; :class:`ModelSpecError` naming what each auto class said otherwise."""
    import transformers

    errors = []
    for auto in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        cls = getattr(transformers, auto, None)
        if cls is None:
            continue
        try:
            if meta:
                with torch.device("meta"):
                    return cls.from_config(config)
            return cls.from_config(config)
        except (ValueError, KeyError) as e:
            errors.append(f"{auto}: {e}")
    raise ModelSpecError(f"no transformers model class for model_type {config.model_type!r} ({'; '.join(errors)})")


def load_model_spec(spec: str, *, meta: bool = False) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """Resolve a MODEL SPEC to ``(model, example_inputs or None)``; see the module docstring."""
    from graphlora.testing import zoo

    if spec in zoo.tiny_model_names():
        model = zoo.build_tiny_model(spec)
        return model, zoo.tiny_example_inputs(spec, model)
    path = Path(spec)
    if path.is_dir():
        return _from_config_dir(path, meta)
    if ":" in spec:
        return _from_callable(spec)
    raise ModelSpecError(
        f"MODEL SPEC {spec!r} is neither a built-in tiny model ({', '.join(zoo.tiny_model_names())}), "
        "a module:function returning (model, example_inputs), nor a directory holding a config.json"
    )
