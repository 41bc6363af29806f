"""Writing a policy as a YAML or TOML policy file.

Reads a :class:`~graphlora.policy.schema.Policy` (or a dict of its fields); writes text, and the file when
given a path. Guarantees: the text starts with ``version``, holds every field that is not None (or, with
``minimal=True``, those that differ from the defaults; a rule holds only the keys it sets), and reading it
back through :mod:`graphlora.policy.source` gives the same policy.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from graphlora.policy.schema import SUPPORTED_VERSION, Policy
from graphlora.policy.source import file_format

__all__ = ["dump_policy"]


def _file_dict(policy: Policy, minimal: bool) -> dict[str, Any]:
    """The keys a policy file holds for ``policy``: ``version``, then every field that is not None (or, with
    ``minimal``, every field that differs from its default). Rules hold only the keys they set."""
    out: dict[str, Any] = {"version": SUPPORTED_VERSION}
    defaults = Policy()
    for name in Policy.model_fields:
        value = getattr(policy, name)
        if value is None or (minimal and value == getattr(defaults, name)):
            continue
        if name == "rules":
            out[name] = [_rule_dict(rule) for rule in value]
        else:
            out[name] = list(value) if isinstance(value, list) else value
    return out


def _rule_dict(rule: BaseModel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in type(rule).model_fields.items():
        value = getattr(rule, name)
        if isinstance(value, BaseModel):
            out[name] = _rule_dict(value)
        elif value is not None and not (not field.is_required() and value == field.default):
            out[name] = list(value) if isinstance(value, list) else value
    return out


_YAML_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*")
_YAML_RESERVED = {"true", "false", "null", "yes", "no", "on", "off", "y", "n"}
_YAML_PRINTABLE = re.compile(r"[\x20-\x7e\xa0-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]*")


def _yaml_str(s: str) -> str:
    if _YAML_PLAIN.fullmatch(s) and s.lower() not in _YAML_RESERVED:
        return s
    if _YAML_PRINTABLE.fullmatch(s) and s == s.strip(" "):
        return "'" + s.replace("'", "''") + "'"
    out = []
    for ch in s:
        if ch in '\\"':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        elif ord(ch) <= 0xFF:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def _float_text(x: float, inf: str, nan: str) -> str:
    if math.isnan(x):
        return nan
    if math.isinf(x):
        return inf if x > 0 else "-" + inf
    return repr(x)


def _yaml_scalar_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _float_text(v, ".inf", ".nan")
    if isinstance(v, str):
        return _yaml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_yaml_scalar_text(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to YAML")  # pragma: no cover


def _yaml_lines(d: dict[str, Any], indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    for key, value in d.items():
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            lines += _yaml_lines(value, indent + 2)
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            lines.append(f"{pad}{key}:")
            for item in value:
                sub = _yaml_lines(item, indent + 4) or [" " * (indent + 4) + "{}"]
                lines.append(f"{pad}  - " + sub[0][indent + 4 :])
                lines += sub[1:]
        elif isinstance(value, dict):
            lines.append(f"{pad}{key}: {{}}")
        else:
            lines.append(f"{pad}{key}: {_yaml_scalar_text(value)}")
    return lines


_TOML_ESCAPE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")  # controls, and what editors show as breaks


def _toml_str(s: str) -> str:
    if "\\" in s and "'" not in s and not _TOML_ESCAPE.search(s):
        return "'" + s + "'"
    out = []
    for ch in s:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif _TOML_ESCAPE.match(ch):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _float_text(v, "inf", "nan")
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")  # pragma: no cover


def _toml_text(d: dict[str, Any]) -> str:
    lines: list[str] = []
    tables: list[tuple[str, list[dict[str, Any]]]] = []
    for key, value in d.items():
        if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, items in tables:
        for item in items:
            lines += ["", f"[[{key}]]"] + [f"{k} = {_toml_value(x)}" for k, x in item.items()]
    return "\n".join(lines) + "\n"


def _format_for(path_or_format: str | Path) -> tuple[str, Path | None]:
    if isinstance(path_or_format, str) and path_or_format.lower() in ("yaml", "yml", "toml"):
        return ("toml" if path_or_format.lower() == "toml" else "yaml"), None
    path = Path(path_or_format)
    return file_format(path), path


def dump_policy(policy: Policy | dict[str, Any], path_or_format: str | Path, *, minimal: bool = False) -> str:
    """The policy as a YAML or TOML file; ``path_or_format`` is ``"yaml"``, ``"toml"`` or a path (whose
    suffix picks the syntax, and which is then written). Reading the text back gives the same policy.

    Every field is written (None-valued ones are left out: TOML has no null), so the file shows the whole
    effective policy; ``minimal=True`` writes only the fields that differ from the defaults."""
    if isinstance(policy, dict):
        policy = Policy.model_validate(policy)
    fmt, path = _format_for(path_or_format)
    data = _file_dict(policy, minimal)
    text = "\n".join(_yaml_lines(data, 0)) + "\n" if fmt == "yaml" else _toml_text(data)
    if path is not None:
        path.write_text(text, encoding="utf-8")
    return text
