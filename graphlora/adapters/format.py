"""What an adapter directory holds, by name, and the errors raised when one cannot be used.

An adapter directory holds ``adapter_config.json`` (a PEFT ``LoraConfig``), ``adapter_model.safetensors``
(the tensors, under ``base_model.model.<path>`` keys as PEFT writes them) and ``graphlora_policy.yaml``
(the resolved graphlora policy). The safetensors metadata keys below are strings graphlora adds to the
weights file (PEFT ignores them) so that a reader can tell whether the three files were saved together.
``adapter_model.bin`` is PEFT's pickled format: graphlora only names it, to refuse it. Nothing here reads
or writes a file.
"""

from __future__ import annotations

from graphlora.errors import GraphLoraError


ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
POLICY_NAME = "graphlora_policy.yaml"
PEFT_PREFIX = "base_model.model."

#: safetensors metadata keys written by graphlora (strings; PEFT ignores them).
META_CONFIG = "graphlora.adapter_config"  # JSON of the config fields that change the numbers
META_POLICY_SHA = "graphlora.policy_sha256"  # sha256 of graphlora_policy.yaml
META_VERSION = "graphlora.version"


class AdapterError(GraphLoraError, ValueError):
    """An adapter cannot be saved, read or applied; the message names the file, key, site or config field."""


class AdapterExistsError(AdapterError, FileExistsError):
    """The target directory already holds an adapter (or a checkpoint) and ``overwrite`` is False."""


def shorten(items: list[str], limit: int = 8) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are (for messages)."""
    shown = ", ".join(items[:limit])
    return shown + (f" ... ({len(items) - limit} more)" if len(items) > limit else "")
