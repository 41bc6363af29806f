"""Key paths: how a place in a policy is named, ``rules[1].match.layers`` <-> ``("rules", 1, "match", "layers")``.

Reads and writes only strings and tuples. Guarantees: ``parse_key_path(format_key_path(p)) == p`` for
every path that starts with a key and whose keys (str) hold no ``.``, ``[`` or ``]`` (list indices are
int); a malformed string is a ValueError. Messages, ``PolicySource.locate`` and the line tables of the
YAML and TOML readers all use these tuples as keys.
"""

from __future__ import annotations

import re
from typing import Iterable

__all__ = ["KeyPath", "format_key_path", "parse_key_path"]

KeyPath = tuple  # of str (mapping keys) and int (list indices)

_KEY_PATH_TOKEN = re.compile(r"\[(\d+)\]|\.?([^.\[\]]+)")


def format_key_path(path: Iterable[str | int]) -> str:
    """``("rules", 1, "match", "layers")`` -> ``"rules[1].match.layers"``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_key_path(key_path: str) -> KeyPath:
    """``"rules[1].match.layers"`` -> ``("rules", 1, "match", "layers")``; ValueError if malformed."""
    parts: list[str | int] = []
    pos = 0
    while pos < len(key_path):
        m = _KEY_PATH_TOKEN.match(key_path, pos)
        if not m or (m.group(2) is not None and key_path[pos] == "." and pos == 0):
            raise ValueError(f"malformed key path {key_path!r}")
        parts.append(int(m.group(1)) if m.group(1) is not None else m.group(2))
        pos = m.end()
    return tuple(parts)
