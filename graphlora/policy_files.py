"""Policy files: one schema, two syntaxes (YAML and TOML), errors that point at a file line.

The format is documented in docs/policy.md. In short:

* a file holds the :class:`~graphlora.policy.Policy` keys, plus an optional integer ``version`` (1 today)
  and an optional ``extends`` (a preset name, or a path relative to the file that names it);
* ``extends`` merges key by key: the child's keys replace the parent's, except ``rules``, whose lists
  concatenate (the parent's rules first, so the child's rules win);
* YAML is read strictly: duplicate keys are errors, only ``true`` / ``false`` are booleans, no tags,
  no YAML 1.1 sexagesimal numbers, octals or timestamps;
* every error is one line ``FILE:LINE: KEY.PATH: message`` and all of a file's errors are reported at once
  (:class:`PolicyFileError`, a :class:`~graphlora.errors.PolicyError`).

Public API: :func:`load_policy_file`, :func:`load_policy_source` (a :class:`PolicySource` that maps key
paths back to file lines), :func:`parse_policy_text`, :func:`dump_policy`, :func:`policy_json_schema`,
:func:`write_policy_schema`, :func:`preset_names`, :func:`load_preset`, :func:`format_site_diff`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ValidationError

from graphlora.errors import PolicyError
from graphlora.policy import Policy
from graphlora.policy.messages import (
    Abort,
    Issues,
    PolicyFileError,
    PolicyIssue,
    closest,
    describe_value,
    validation_issues,
)
from graphlora.policy.schema import FILE_KEYS, SUPPORTED_VERSION
from graphlora.policy.key_paths import KeyPath, format_key_path, parse_key_path
from graphlora.policy.toml_positions import TomlLineScanner, read_toml  # noqa: F401 (TomlLineScanner: re-exported)
from graphlora.policy.yaml_reader import StrictYamlLoader, read_yaml  # noqa: F401 (StrictYamlLoader: re-exported)

__all__ = [
    "SUPPORTED_VERSION",
    "PolicyIssue",
    "PolicyFileError",
    "PolicySource",
    "as_policy",
    "load_policy",
    "load_policy_file",
    "load_policy_source",
    "parse_policy_text",
    "dump_policy",
    "policy_json_schema",
    "write_policy_schema",
    "preset_names",
    "preset_path",
    "load_preset",
    "format_key_path",
    "parse_key_path",
    "format_site_diff",
]

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
SCHEMA_PATH = Path(__file__).resolve().parent / "policy.schema.json"

_YAML_SUFFIXES = (".yaml", ".yml")
_TOML_SUFFIXES = (".toml",)


# ---------------------------------------------------------------------------------------------------
# Reading files, extends, merging
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _File:
    path: Path  # resolved
    display: str  # as shown in messages
    lines: dict[KeyPath, int]
    broken: set[KeyPath] = dataclasses.field(default_factory=set)  # keys with a syntax-level error


@dataclasses.dataclass
class _Merged:
    data: dict[str, Any]
    top: dict[str, _File]  # top-level key -> file that set it
    rules: list[tuple[_File, int]]  # merged rules index -> (file, index in that file)
    files: list[_File]  # the root first, then its parents


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _YAML_SUFFIXES:
        return "yaml"
    if suffix in _TOML_SUFFIXES:
        return "toml"
    raise PolicyFileError(
        [PolicyIssue(str(path), None, None, f"unknown policy file type {path.suffix!r}: use .yaml, .yml or .toml")]
    )


def _parse_text(
    text: str, fmt: str, display: str, issues: Issues
) -> tuple[dict[str, Any], dict[KeyPath, int], set[KeyPath]]:
    if text.startswith("\ufeff"):
        text = text[1:]
    data, lines, broken = read_yaml(text, display, issues) if fmt == "yaml" else read_toml(text, display, issues)
    if data is None:  # an empty YAML document ("---")
        data = {}
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the value {data!r}"
        issues.add(display, lines.get((), 1), None, f"a policy file must hold a mapping of policy keys, not {kind}")
        raise Abort
    return data, lines, broken


def _check_version(data: dict[str, Any], file: _File, issues: Issues) -> None:
    if "version" not in data:
        return
    version = data.pop("version")
    line = file.lines.get(("version",))
    if isinstance(version, bool) or not isinstance(version, int):
        issues.add(
            file.display, line, ("version",), f"expected an integer (this graphlora writes {SUPPORTED_VERSION}), "
            f"got {describe_value(version)}"
        )
    elif version > SUPPORTED_VERSION:
        issues.add(
            file.display,
            line,
            ("version",),
            f"policy file version {version} is newer than this graphlora supports (version {SUPPORTED_VERSION}); "
            "upgrade graphlora",
        )
        raise Abort
    elif version < 1:
        issues.add(file.display, line, ("version",), f"bad version {version}: versions start at 1")


def _resolve_extends(value: Any, file: _File, issues: Issues) -> tuple[Path, str] | None:
    line = file.lines.get(("extends",))
    if not isinstance(value, str) or not value.strip():
        issues.add(
            file.display, line, ("extends",), f"expected a preset name or a relative path, got {describe_value(value)}"
        )
        return None
    if value in preset_names():
        path = preset_path(value)
        return path, str(path)
    if not (value.lower().endswith(_YAML_SUFFIXES + _TOML_SUFFIXES) or "/" in value or "\\" in value):
        issues.add(file.display, line, ("extends",), _unknown_preset_message(value))
        return None
    ref = Path(value)
    if ref.is_absolute():
        return ref, value
    display = os.path.normpath(os.path.join(os.path.dirname(file.display), value))
    return file.path.parent / ref, display


def _load_merged(
    path: Path, display: str, issues: Issues, chain: list[_File], text: str | None = None, fmt: str | None = None
) -> _Merged | None:
    """Read one file and, recursively, what it extends. None when the file cannot be read or parsed."""
    fmt = fmt or _format_of(path)
    if text is None:
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as e:
            issues.add(display, None, None, f"cannot read policy file: {e.strerror or e}")
            return None
        except UnicodeDecodeError as e:
            issues.add(display, None, None, f"cannot read policy file: not UTF-8 text ({e.reason})")
            return None
    file = _File(path.resolve() if path.name else path, display, {})
    try:
        data, file.lines, file.broken = _parse_text(text, fmt, display, issues)
    except Abort:
        return None
    try:
        _check_version(data, file, issues)
    except Abort:
        return None
    parent: _Merged | None = None
    if "extends" in data:
        target = _resolve_extends(data.pop("extends"), file, issues)
        if target is not None:
            parent_path, parent_display = target
            ring = [f.path for f in chain] + [file.path]
            if parent_path.resolve() in ring:
                start = ring.index(parent_path.resolve())
                names = [f.display for f in chain + [file]][start:] + [parent_display]
                issues.add(
                    file.display, file.lines.get(("extends",)), ("extends",), "extends cycle: " + " -> ".join(names)
                )
            else:
                if not parent_path.is_file():
                    issues.add(
                        file.display,
                        file.lines.get(("extends",)),
                        ("extends",),
                        f"cannot read {parent_display!r}: "
                        + ("not a file" if parent_path.exists() else "no such file"),
                    )
                else:
                    try:
                        parent = _load_merged(parent_path, parent_display, issues, chain + [file])
                    except PolicyFileError as e:  # e.g. an unknown suffix
                        issues.items.extend(
                            PolicyIssue(file.display, file.lines.get(("extends",)), "extends", i.message)
                            for i in e.issues
                        )
    own = _Merged(
        data,
        {k: file for k in data},
        [(file, j) for j in range(len(data["rules"]))] if isinstance(data.get("rules"), list) else [],
        [file],
    )
    return own if parent is None else _merge(parent, own, file)


def _merge(parent: _Merged, child: _Merged, file: _File) -> _Merged:
    """The child's keys replace the parent's; ``rules`` lists concatenate, the parent's first."""
    data = dict(parent.data)
    top = dict(parent.top)
    rules = list(parent.rules)
    for key, value in child.data.items():
        if key == "rules" and isinstance(value, list) and isinstance(data.get("rules"), list):
            data["rules"] = data["rules"] + value
            rules += child.rules
        else:
            data[key] = value
            if key == "rules":
                rules = list(child.rules)
        top[key] = file
    return _Merged(data, top, rules, [file] + parent.files)


def _local(merged: _Merged, path: KeyPath) -> tuple[_File, KeyPath] | None:
    """The file that wrote ``path`` (a key path of the merged policy) and the key path inside that file."""
    if not path:
        return merged.files[0], ()
    top = path[0]
    if top in FILE_KEYS:  # per file, not merged: the file read's own
        return merged.files[0], path
    if not isinstance(top, str) or top not in merged.top:
        return None
    if top == "rules" and len(path) >= 2:
        if not isinstance(path[1], int) or not 0 <= path[1] < len(merged.rules):
            return None
        file, j = merged.rules[path[1]]
        return file, ("rules", j) + path[2:]
    return merged.top[top], path


def _where(merged: _Merged, path: KeyPath) -> tuple[_File, int | None] | None:
    """The file and line where ``path`` is written, or where its nearest written ancestor is."""
    found = _local(merged, path)
    if found is None:
        return None
    file, local = found
    if not local:
        return file, file.lines.get((), 1)
    for k in range(len(local), 0, -1):
        if local[:k] in file.lines:
            return file, file.lines[local[:k]]
    return file, None


def _load(path: str | Path, text: str | None = None, fmt: str | None = None) -> "PolicySource":
    path = Path(path)
    issues = Issues()
    merged = _load_merged(path, str(path), issues, [], text=text, fmt=fmt)
    if merged is None:
        issues.raise_if_any()
        raise AssertionError("unreachable")  # pragma: no cover
    policy: Policy | None = None
    try:
        policy = Policy.model_validate(merged.data)
    except ValidationError as e:
        for key_path, message in validation_issues(e, merged.data):
            found = _local(merged, key_path)
            if found and any(found[1][: len(b)] == b for b in found[0].broken):
                continue  # already reported (a tag, a merge key, a duplicate): the value means nothing
            where = _where(merged, key_path)
            file, line = where if where else (merged.files[0], None)
            issues.add(file.display, line, key_path, message)
    if issues.items:  # grouped by file (the file read first, then its parents), by line within a file
        rank = {f.display: n for n, f in enumerate(merged.files)}
        for item in issues.items:
            rank.setdefault(item.file, len(rank))
        issues.items.sort(key=lambda i: (rank[i.file], i.line or 0))
        issues.raise_if_any()
    assert policy is not None
    return PolicySource(policy=policy, path=path, _merged=merged)


@dataclasses.dataclass(frozen=True)
class PolicySource:
    """A policy and where each of its keys was written (following ``extends``)."""

    policy: Policy
    path: Path
    _merged: _Merged = dataclasses.field(repr=False, compare=False)

    @property
    def files(self) -> list[Path]:
        """The file read and the files it extends, in that order (presets included)."""
        return [f.path for f in self._merged.files]

    def locate(self, key_path: str | Iterable[str | int]) -> str | None:
        """``"FILE:LINE"`` where ``key_path`` (``"rules[2]"``, ``"rules[2].match"``, ``"r"``) is written.

        After ``extends`` the answer is in the file that defined the key (``rules`` indices count the
        merged list, the parent's rules first). A key left at its default is written nowhere: None. A key
        inside a written key (``rules[0].match.layers`` when the rule names no layers) falls back to the
        nearest written ancestor.
        """
        try:
            path = parse_key_path(key_path) if isinstance(key_path, str) else tuple(key_path)
        except ValueError:
            return None
        where = _where(self._merged, path)
        if where is None or where[1] is None:
            return None
        return f"{where[0].display}:{where[1]}"


def load_policy_source(path: str | Path) -> PolicySource:
    """Read a YAML or TOML policy file (following ``extends``); raise :class:`PolicyFileError`."""
    return _load(path)


def load_policy_file(path: str | Path) -> Policy:
    """Read a YAML or TOML policy file (following ``extends``) into a :class:`Policy`."""
    return _load(path).policy


def parse_policy_text(text: str, fmt: str, name: str | Path = "<policy>") -> PolicySource:
    """Read a policy from a string (``fmt`` is ``"yaml"`` or ``"toml"``); ``name`` is shown in messages and
    a relative ``extends`` is resolved against its folder."""
    fmt = fmt.lower()
    if fmt == "yml":
        fmt = "yaml"
    if fmt not in ("yaml", "toml"):
        raise ValueError(f"unknown policy format {fmt!r}: expected 'yaml' or 'toml'")
    return _load(Path(name), text=text, fmt=fmt)


# ---------------------------------------------------------------------------------------------------
# pydantic errors -> located one-line messages
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------
def _unknown_preset_message(name: str) -> str:
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
    if name not in preset_names():
        raise PolicyError(_unknown_preset_message(name), "extends")
    return PRESETS_DIR / f"{name}.yaml"


def load_preset(name: str) -> Policy:
    """The policy of a shipped preset (see docs/policy.md)."""
    return load_policy_file(preset_path(name))


# ---------------------------------------------------------------------------------------------------
# Writing YAML and TOML
# ---------------------------------------------------------------------------------------------------
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
    return _format_of(path), path


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


# ---------------------------------------------------------------------------------------------------
# JSON Schema
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# Site diffs
# ---------------------------------------------------------------------------------------------------
_SITE_FIELDS = ("name", "component", "role", "layer", "r", "alpha")


def _site_record(site: Any) -> dict[str, Any]:
    get = site.get if isinstance(site, dict) else (lambda k: getattr(site, k, None))
    record = {k: get(k) for k in _SITE_FIELDS}
    if record["name"] is None:
        raise ValueError(f"a site record needs a name: {site!r}")
    for k in ("component", "role"):
        if record[k] is not None:
            record[k] = str(record[k])
    return record


def _natural_key(name: str) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _number(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return "-" if x is None else str(x)


def format_site_diff(before: Iterable[Any], after: Iterable[Any], labels: tuple[str, str] = ("before", "after")) -> str:
    """A git-diff-like text of the LoRA sites added (``+``), removed (``-``) and changed (``~``, r or alpha,
    or labels) between two site lists; "" when they select the same sites with the same settings.

    Sites are objects with ``name``, ``component``, ``role``, ``layer``, ``r``, ``alpha`` attributes, or dicts
    with those keys, matched by ``name``. Lines are sorted by name (numbers in names compare as numbers)."""

    def index(sites: Iterable[Any], label: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for site in sites:
            record = _site_record(site)
            if record["name"] in out:
                raise ValueError(f"site {record['name']!r} appears twice in the {label} list")
            out[record["name"]] = record
        return out

    old, new = index(before, labels[0]), index(after, labels[1])
    rows: list[tuple[str, dict[str, Any], str]] = []
    for name in sorted(set(old) | set(new), key=_natural_key):
        a, b = old.get(name), new.get(name)
        if a is None:
            rows.append(("+", b, f"r={_number(b['r'])} alpha={_number(b['alpha'])}"))  # type: ignore[index]
        elif b is None:
            rows.append(("-", a, f"r={_number(a['r'])} alpha={_number(a['alpha'])}"))
        elif a != b:
            changes = []
            for k in ("component", "role", "layer", "r", "alpha"):
                if a[k] == b[k]:
                    if k in ("r", "alpha"):
                        changes.append(f"{k}={_number(a[k])}")
                else:
                    changes.append(f"{k}={_number(a[k])}->{_number(b[k])}")
            rows.append(("~", b, " ".join(changes)))
    if not rows:
        return ""
    widths = [max(len(str(row[1][k] if row[1][k] is not None else "-")) for row in rows) for k in _SITE_FIELDS[:3]]
    added = sum(1 for r in rows if r[0] == "+")
    removed = sum(1 for r in rows if r[0] == "-")
    changed = len(rows) - added - removed
    out = [f"--- {labels[0]}: {len(old)} sites", f"+++ {labels[1]}: {len(new)} sites"]
    for mark, rec, settings in rows:
        cols = [str(rec[k]) if rec[k] is not None else "-" for k in _SITE_FIELDS[:3]]
        layer = "-" if rec["layer"] is None else str(rec["layer"])
        text = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
        out.append(f"{mark} {text}  layer {layer.ljust(3)} {settings}".rstrip())
    out.append(f"{added} added, {removed} removed, {changed} changed")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # python -m graphlora.policy_files: regenerate the shipped JSON Schema
    print(write_policy_schema())


def as_policy(policy: "Policy | dict[str, Any] | str | Path | None") -> Policy:
    """Accept a Policy, a dict of its fields, a path to a policy file, or None (the defaults)."""
    if policy is None:
        return Policy()
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, dict):
        return Policy.model_validate(policy)
    if isinstance(policy, (str, Path)):
        return load_policy(policy)
    raise TypeError(f"policy must be a Policy, a dict, or a path to a policy file, not {type(policy).__name__}")


def load_policy(path: str | Path) -> Policy:
    """Read a policy file (YAML or TOML). See docs/policy.md for the format."""
    return load_policy_file(path)
