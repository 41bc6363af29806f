"""The JSON Schema of a policy file, and the shipped copy ``graphlora/policy.schema.json``.

Reads the :class:`~graphlora.policy.schema.Policy` model and the preset names; writes the schema file only
when asked (:func:`write_policy_schema`, or ``python -m graphlora.policy``). Guarantees: the schema holds
``version`` and ``extends`` first, then every Policy field with its description; no other key is allowed.
The shipped file sits beside the package, where editors' ``$schema`` lines point (a test fails while it is
stale).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from graphlora.policy.presets import preset_names
from graphlora.policy.schema import SUPPORTED_VERSION, Policy

__all__ = ["SCHEMA_PATH", "policy_json_schema", "write_policy_schema"]

#: graphlora/policy.schema.json (package data of ``graphlora``).
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "policy.schema.json"


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema of a policy file: the Policy fields plus ``version`` and ``extends``.

    YAML editors can use it (``# yaml-language-server: $schema=<path>/policy.schema.json``), and TOML
    editors through Taplo / Even Better TOML's schema association."""
    schema = Policy.model_json_schema()
    properties = {
        "version": {
            "type": "integer",
            "minimum": 1,
            "maximum": SUPPORTED_VERSION,
            "default": SUPPORTED_VERSION,
            "title": "Version",
            "description": f"Version of the policy file format; this graphlora reads versions up to {SUPPORTED_VERSION}.",
        },
        "extends": {
            "type": "string",
            "title": "Extends",
            "description": "A preset name (" + ", ".join(preset_names()) + ") or a path (relative to this file) "
            "of a policy file to start from. This file's keys replace the parent's; rules lists concatenate, "
            "the parent's rules first.",
            "examples": preset_names(),
        },
        **schema["properties"],
    }
    out: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "graphlora policy file",
        "description": "Which linears of a vision-language model get LoRA, and how. See docs/policy.md.",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if "$defs" in schema:
        out["$defs"] = schema["$defs"]
    return out


def _schema_text() -> str:
    return json.dumps(policy_json_schema(), indent=2, ensure_ascii=False) + "\n"


def write_policy_schema(path: str | Path | None = None) -> Path:
    """Write :func:`policy_json_schema` (by default over the shipped ``graphlora/policy.schema.json``)."""
    path = Path(path) if path is not None else SCHEMA_PATH
    path.write_text(_schema_text(), encoding="utf-8")
    return path
