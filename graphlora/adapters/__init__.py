"""Adapters and merging, interoperable with PEFT (docs/adapters.md).

* ``save_adapter`` writes PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, keys
  ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``) plus the resolved graphlora policy
  (``graphlora_policy.yaml``). ``PeftModel.from_pretrained`` re-injects exactly the saved sites.
* ``graphlora.load_adapter`` reads adapters saved by graphlora or by ``PeftModel.save_pretrained``: it
  builds the policy that selects exactly the adapter's modules with their ranks and alphas, rewrites the
  model and copies the tensors in. Every PEFT config feature graphlora cannot honour is refused by name.
* ``merge`` / ``unmerge`` fold ``s * B A`` into the base weights in place and restore them bit-exactly
  from saved copies; ``save_merged`` writes a plain transformers checkpoint without touching the live model.

Files are written all or nothing (no reader ever sees a half-written file); nothing is pickled:
safetensors, JSON and YAML only.

One job per module; they import each other, never this package:

* ``format``: file names, tensor key prefix, metadata keys, ``AdapterError``.
* ``peft_compat``: PEFT's matching, layout and config-conversion rules.
* ``config``: ``adapter_config.json``, written for a model and checked when read.
* ``weights``: ``adapter_model.safetensors``, out of a live model and back into it.
* ``atomic_io``: write-then-rename, all or nothing.
* ``save``: ``save_adapter``.
* ``merging``: ``merge`` / ``unmerge`` / ``save_merged``.
* ``load``: ``load_adapter`` (public as ``graphlora.load_adapter``). Not imported here: it imports the
  rewriter and ``graphlora.model``, and ``GraphLoraModel``'s adapter methods import this package.
"""

from graphlora.adapters.config import adapter_config, check_adapter_config
from graphlora.adapters.format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    POLICY_NAME,
    AdapterError,
    AdapterExistsError,
)
from graphlora.adapters.merging import MergeState, is_merged, merge, merged_state_dict, save_merged, unmerge
from graphlora.adapters.save import save_adapter
from graphlora.adapters.weights import load_adapter_weights

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "POLICY_NAME",
    "AdapterError",
    "AdapterExistsError",
    "MergeState",
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
