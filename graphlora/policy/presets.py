"""The presets shipped with graphlora: policy files in ``graphlora/presets/`` named by their stem.

Reads the folder's listing (the files themselves are read by :func:`graphlora.policy.source.load_preset`,
through the ordinary file reader). Guarantees: :func:`preset_names` is sorted; :func:`preset_path` names an
existing preset file or raises a :class:`~graphlora.errors.PolicyError` that suggests the closest name.
"""

from __future__ import annotations

from pathlib import Path

from graphlora.errors import PolicyError
from graphlora.policy.messages import closest

__all__ = ["PRESETS_DIR", "preset_names", "preset_path", "unknown_preset_message"]

#: graphlora/presets/, beside this package (it ships as package data of ``graphlora``).
PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


def unknown_preset_message(name: str) -> str:
    """The message for an ``extends`` (or preset name) that names no preset and is not a file name."""
    close = closest(name, preset_names())
    guess = f" (did you mean {close!r}?)" if close else ""
    return (
        f"unknown preset {name!r}{guess}: the presets are {', '.join(preset_names())}; "
        "a file is named by a path ending in .yaml, .yml or .toml"
    )


def preset_names() -> list[str]:
    """Names of the presets shipped with graphlora (``extends: <name>``), sorted."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The file of the preset ``name``; PolicyError (with the closest name) if there is none."""
    if name not in preset_names():
        raise PolicyError(unknown_preset_message(name), "extends")
    return PRESETS_DIR / f"{name}.yaml"
