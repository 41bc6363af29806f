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
import datetime
import difflib
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import yaml
from pydantic import BaseModel, ValidationError

from graphlora.errors import PolicyError
from graphlora.policy import Policy
from graphlora.policy.toml_positions import TomlLineScanner

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 with the tomli backport
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ModuleNotFoundError:
        _toml = None  # type: ignore[assignment]

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

#: The newest policy file version this graphlora reads (and the one it writes).
SUPPORTED_VERSION = 1

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
SCHEMA_PATH = Path(__file__).resolve().parent / "policy.schema.json"

_YAML_SUFFIXES = (".yaml", ".yml")
_TOML_SUFFIXES = (".toml",)
_FILE_KEYS = ("version", "extends")  # keys of a policy file that are not Policy fields

KeyPath = tuple  # of str (mapping keys) and int (list indices)


# ---------------------------------------------------------------------------------------------------
# Key paths
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PolicyIssue:
    """One problem in a policy file: where it is and what is wrong."""

    file: str
    line: int | None
    key_path: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key_path}: {self.message}" if self.key_path else f"{where}: {self.message}"


class PolicyFileError(PolicyError):
    """A policy file is malformed. The message holds one line per problem (see :class:`PolicyIssue`);
    ``key_path`` is the first problem's key path; ``issues`` lists them all."""

    def __init__(self, issues: list[PolicyIssue]):
        self.issues = list(issues)
        first = self.issues[0] if self.issues else None
        super().__init__("\n".join(map(str, self.issues)), first.key_path if first else None)


class _Abort(Exception):
    """Stop reading: the issues gathered so far are all there is to say."""


class _Issues:
    def __init__(self) -> None:
        self.items: list[PolicyIssue] = []

    def add(self, file: str, line: int | None, path: KeyPath | None, message: str) -> None:
        self.items.append(PolicyIssue(file, line, format_key_path(path) if path else None, message))

    def raise_if_any(self) -> None:
        if self.items:
            raise PolicyFileError(self.items)


# ---------------------------------------------------------------------------------------------------
# Strict YAML
# ---------------------------------------------------------------------------------------------------
class StrictYamlLoader(yaml.SafeLoader):
    """A SafeLoader with YAML 1.2-like plain scalars and a record of explicit tags.

    Plain scalars resolve to: ``true`` / ``false`` (booleans; not yes/no/on/off/True), decimal, ``0x`` and
    ``0o`` integers, decimal floats with ``.inf`` / ``.nan``, and ``null`` / ``~`` / empty; everything else
    (``-4:``, ``1:30``, ``2024-01-01``, ``yes``) is a string. Explicit tags are recorded so the reader can
    refuse them; documents are turned into Python values by :func:`_yaml_value`, not by the constructor.
    """

    yaml_implicit_resolvers: dict = {}  # our own table: nothing inherited from YAML 1.1

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.explicit_tags: dict[int, str] = {}

    def compose_node(self, parent, index):  # type: ignore[override]
        event = self.peek_event()
        tag = None if isinstance(event, yaml.AliasEvent) else getattr(event, "tag", None)
        node = super().compose_node(parent, index)
        if tag is not None:
            self.explicit_tags[id(node)] = tag
        return node


_YAML_BOOL = re.compile(r"^(?:true|false)$")
_YAML_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_YAML_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_YAML_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
StrictYamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _YAML_BOOL, list("tf"))
StrictYamlLoader.add_implicit_resolver("tag:yaml.org,2002:int", _YAML_INT, list("-+0123456789"))
StrictYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+.0123456789"))
StrictYamlLoader.add_implicit_resolver("tag:yaml.org,2002:null", _YAML_NULL, ["~", "n", "N", ""])

_MAX_YAML_NODES = 100_000  # aliases can multiply a small file into a huge value


def _yaml_scalar(node: yaml.ScalarNode) -> Any:
    tag, text = node.tag, node.value
    if tag == "tag:yaml.org,2002:bool":
        return text == "true"
    if tag == "tag:yaml.org,2002:int":
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-")
        if digits.startswith(("0x", "0o")):
            return sign * int(digits[2:], 16 if digits[1] == "x" else 8)
        return sign * int(digits, 10)
    if tag == "tag:yaml.org,2002:float":
        low = text.lower()
        if "inf" in low:
            return -math.inf if low.startswith("-") else math.inf
        if "nan" in low:
            return math.nan
        return float(text)
    if tag == "tag:yaml.org,2002:null":
        return None
    return text


def _show_tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:") :] if tag.startswith("tag:yaml.org,2002:") else tag


class _YamlReader:
    def __init__(self, loader: StrictYamlLoader, display: str, issues: _Issues) -> None:
        self.loader, self.display, self.issues = loader, display, issues
        self.lines: dict[KeyPath, int] = {}
        self.broken: set[KeyPath] = set()
        self.active: set[int] = set()
        self.count = 0

    def value(self, node: yaml.Node, path: KeyPath) -> Any:
        self.count += 1
        if self.count > _MAX_YAML_NODES:
            self.issues.add(self.display, node.start_mark.line + 1, path, "the document is too large")
            raise _Abort
        tag = self.loader.explicit_tags.get(id(node))
        if tag is not None:
            self.issues.add(
                self.display, node.start_mark.line + 1, path, f"YAML tags are not allowed (found {_show_tag(tag)!r})"
            )
            self.broken.add(path)
        if isinstance(node, yaml.ScalarNode):
            return _yaml_scalar(node) if tag is None else node.value
        if id(node) in self.active:
            self.issues.add(self.display, node.start_mark.line + 1, path, "recursive YAML alias")
            self.broken.add(path)
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                out_list = []
                for i, item in enumerate(node.value):
                    self.lines.setdefault(path + (i,), item.start_mark.line + 1)
                    out_list.append(self.value(item, path + (i,)))
                return out_list
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    self.issues.add(self.display, line, path, "a key must be a plain name, not a list or mapping")
                    self.broken.add(path)
                    continue
                key = key_node.value
                if key == "<<" and key_node.style is None:
                    self.issues.add(
                        self.display, line, path, "YAML merge keys ('<<') are not supported: use extends"
                    )
                    self.broken.add(path)
                    continue
                if key in out:
                    first = self.lines.get(path + (key,))
                    self.issues.add(
                        self.display, line, path + (key,), f"duplicate key {key!r} (first defined on line {first})"
                    )
                    self.broken.add(path + (key,))
                    continue
                self.lines[path + (key,)] = line
                out[key] = self.value(value_node, path + (key,))
            return out
        finally:
            self.active.discard(id(node))


def _read_yaml(text: str, display: str, issues: _Issues) -> tuple[Any, dict[KeyPath, int], set[KeyPath]]:
    loader = StrictYamlLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "malformed YAML"
        if problem == "mapping values are not allowed here":
            problem += " (quote values that contain ': ' or end with ':', e.g. vision_layers: \"-4:\")"
        if e.context == "expected a single document in the stream":
            problem = "a policy file holds one YAML document, found a second one"
        issues.add(display, mark.line + 1 if mark else None, None, f"syntax error: {problem}")
        raise _Abort from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        issues.add(display, line, None, f"syntax error: character {e.character!r} is not allowed in YAML")
        raise _Abort from None
    except yaml.YAMLError as e:  # pragma: no cover - every PyYAML error above is marked or a ReaderError
        issues.add(display, None, None, f"syntax error: {e}")
        raise _Abort from None
    finally:
        loader.dispose()
    if root is None:
        return {}, {}, set()
    reader = _YamlReader(loader, display, issues)
    reader.lines[()] = root.start_mark.line + 1
    return reader.value(root, ()), reader.lines, reader.broken


# ---------------------------------------------------------------------------------------------------
# TOML: tomllib reads the values; the scanner (toml_positions.py) finds the line of every key path
# ---------------------------------------------------------------------------------------------------
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column \d+\)|\s*\(at end of document\)")


def _read_toml(text: str, display: str, issues: _Issues) -> tuple[Any, dict[KeyPath, int], set[KeyPath]]:
    if _toml is None:  # pragma: no cover - Python 3.10 without tomli
        issues.add(display, None, None, "reading TOML policy files needs Python 3.11+ or the tomli package")
        raise _Abort
    try:
        data = _toml.loads(text)
    except _toml.TOMLDecodeError as e:
        try:
            duplicates = TomlLineScanner(text).scan().duplicates
        except Exception:  # the scanner assumes valid TOML; on broken input it may give up
            duplicates = []
        for line, path, first in duplicates[:1]:  # like tomllib, stop at the first: later ones may follow from it
            issues.add(display, line, path, f"duplicate key {path[-1]!r} (first defined on line {first})")
        if not duplicates:
            message = str(e)
            m = re.search(r"\(at line (\d+), column \d+\)", message)
            line = int(m.group(1)) if m else (text.count("\n") + 1 if "end of document" in message else None)
            problem = _TOML_POSITION.sub("", message)
            issues.add(display, line, None, "syntax error: " + problem[:1].lower() + problem[1:])
        raise _Abort from None
    try:
        lines = TomlLineScanner(text).scan().lines
    except Exception:  # pragma: no cover - a scanner bug must not hide the policy: messages lose lines
        lines = {}
    return data, lines, set()


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
    text: str, fmt: str, display: str, issues: _Issues
) -> tuple[dict[str, Any], dict[KeyPath, int], set[KeyPath]]:
    if text.startswith("\ufeff"):
        text = text[1:]
    data, lines, broken = _read_yaml(text, display, issues) if fmt == "yaml" else _read_toml(text, display, issues)
    if data is None:  # an empty YAML document ("---")
        data = {}
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the value {data!r}"
        issues.add(display, lines.get((), 1), None, f"a policy file must hold a mapping of policy keys, not {kind}")
        raise _Abort
    return data, lines, broken


def _check_version(data: dict[str, Any], file: _File, issues: _Issues) -> None:
    if "version" not in data:
        return
    version = data.pop("version")
    line = file.lines.get(("version",))
    if isinstance(version, bool) or not isinstance(version, int):
        issues.add(
            file.display, line, ("version",), f"expected an integer (this graphlora writes {SUPPORTED_VERSION}), "
            f"got {_describe_value(version)}"
        )
    elif version > SUPPORTED_VERSION:
        issues.add(
            file.display,
            line,
            ("version",),
            f"policy file version {version} is newer than this graphlora supports (version {SUPPORTED_VERSION}); "
            "upgrade graphlora",
        )
        raise _Abort
    elif version < 1:
        issues.add(file.display, line, ("version",), f"bad version {version}: versions start at 1")


def _resolve_extends(value: Any, file: _File, issues: _Issues) -> tuple[Path, str] | None:
    line = file.lines.get(("extends",))
    if not isinstance(value, str) or not value.strip():
        issues.add(
            file.display, line, ("extends",), f"expected a preset name or a relative path, got {_describe_value(value)}"
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
    path: Path, display: str, issues: _Issues, chain: list[_File], text: str | None = None, fmt: str | None = None
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
    except _Abort:
        return None
    try:
        _check_version(data, file, issues)
    except _Abort:
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
    if top in _FILE_KEYS:  # per file, not merged: the file read's own
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
    issues = _Issues()
    merged = _load_merged(path, str(path), issues, [], text=text, fmt=fmt)
    if merged is None:
        issues.raise_if_any()
        raise AssertionError("unreachable")  # pragma: no cover
    policy: Policy | None = None
    try:
        policy = Policy.model_validate(merged.data)
    except ValidationError as e:
        for key_path, message in _validation_issues(e, merged.data):
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
def _closest(word: Any, options: Iterable[str]) -> str | None:
    """The option ``word`` was most likely meant to be (difflib), or None."""
    if not isinstance(word, str):
        return None
    options = list(options)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not close:
        lowered = {o.lower(): o for o in options}
        close = [lowered[word.lower()]] if word.lower() in lowered else []
    return close[0] if close else None


def _did_you_mean(word: Any, options: Iterable[str]) -> str | None:
    close = _closest(word, options)
    return f"; did you mean {close!r}?" if close else None


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (datetime.date, datetime.time)):
        return f"the date/time {value.isoformat()}"
    return f"a {type(value).__name__}"


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """Strip ``Annotated`` and ``Optional``; return the bare type and its constraints."""
    metadata: list[Any] = []
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            base, *extra = typing.get_args(annotation)
            for item in extra:
                metadata.extend(getattr(item, "metadata", [item]))
            annotation = base
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return Union[tuple(args)], metadata  # type: ignore[return-value]
            annotation = args[0]
        else:
            return annotation, metadata


def _constraint_text(metadata: list[Any]) -> str:
    words = []
    for m in metadata:
        for attr, word in (("gt", "greater than"), ("ge", "at least"), ("lt", "less than"), ("le", "at most")):
            bound = getattr(m, attr, None)
            if bound is not None:
                words.append(f"{word} {bound}")
    return (" " + " and ".join(words)) if words else ""


def _describe_type(annotation: Any, metadata: Iterable[Any] = ()) -> str:
    annotation, extra = _unwrap(annotation)
    metadata = list(metadata) + extra
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer" + _constraint_text(metadata)
    if annotation is float:
        return "a number" + _constraint_text(metadata)
    if annotation is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        item = _unwrap(item)[0]
        if typing.get_origin(item) is Literal:
            return "a list of values from " + ", ".join(repr(a) for a in typing.get_args(item))
        return "a list of " + {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(
            item, "mappings"
        )
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping of " + ", ".join(annotation.model_fields)
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        lists = [a for a in args if typing.get_origin(a) is list]
        scalars = [a for a in args if typing.get_origin(a) is not list]
        if len(lists) == 1 and len(scalars) == 1 and typing.get_args(lists[0])[0] == scalars[0]:
            return _describe_type(scalars[0]) + ", or a list of them"
        return " or ".join(_describe_type(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))  # pragma: no cover


_LAYERS_TEXT = "a layer range such as '-4:', ':8' or '0:12:2', or a list of layer positions (integers)"
_FIELD_TEXT = {
    "vision_layers": _LAYERS_TEXT,
    "language_layers": _LAYERS_TEXT,
    "layers": _LAYERS_TEXT,
    "target_modules": "'all-linear', a regular expression, or a list of module names",
}


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _list_item(annotation: Any) -> Any:
    annotation, _ = _unwrap(annotation)
    candidates = [annotation] + list(typing.get_args(annotation))
    for a in candidates:
        if typing.get_origin(a) is list:
            return typing.get_args(a)[0]
    return Any


def _field_of(path: KeyPath) -> tuple[KeyPath, type[BaseModel] | None, str | None]:
    """The longest prefix of ``path`` that names a model field, with the model and the field name."""
    model: type[BaseModel] | None = Policy
    owner, name, end = None, None, 0
    for i, part in enumerate(path):
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            break
        owner, name, end = model, part, i + 1
        model = _model_in(model.model_fields[part].annotation)
    return path[:end], owner, name


def _model_at(path: KeyPath) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Policy
    for part in path:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _model_in(model.model_fields[part].annotation)
    return model


def _get(data: Any, path: KeyPath) -> Any:
    for part in path:
        data = data[part]
    return data


def _key_path_of(loc: tuple, data: Any, kind: str) -> KeyPath:
    """pydantic's ``loc`` minus the union-branch tags (``"str"``, ``"list[int]"``) that are not keys."""
    out: list[str | int] = []
    current = data
    for n, part in enumerate(loc):
        last = n == len(loc) - 1
        if isinstance(part, int) and isinstance(current, list) and 0 <= part < len(current):
            out.append(part)
            current = current[part]
        elif isinstance(part, str) and isinstance(current, dict) and part in current:
            out.append(part)
            current = current[part]
        elif last and kind in ("missing", "extra_forbidden"):
            out.append(part)
        # anything else is a union branch tag
    return tuple(out)


def _hint(expected: Any, value: Any) -> str:
    bare, _ = _unwrap(expected)
    if isinstance(value, str):
        if bare is bool and value.lower() in {"yes", "no", "on", "off", "y", "n", "true", "false"}:
            return " (only true and false are booleans in a policy file)"
        if bare in (int, float) and re.fullmatch(r"\s*[-+]?\d+(\.\d*)?([eE][-+]?\d+)?\s*", value):
            return " (write the number without quotes)"
        literals = [a for a in [bare, *typing.get_args(bare)] if typing.get_origin(a) is Literal]
        if literals:
            return _did_you_mean(value, typing.get_args(literals[0])) or ""
    return ""


def _validation_issues(exc: ValidationError, data: dict[str, Any]) -> list[tuple[KeyPath, str]]:
    out: list[tuple[KeyPath, str]] = []
    groups: dict[KeyPath, list[tuple[KeyPath, dict[str, Any]]]] = {}
    for err in exc.errors():
        kind = err["type"]
        path = _key_path_of(err["loc"], data, kind)
        if kind == "extra_forbidden":
            model = _model_at(path[:-1])
            fields = list(model.model_fields) if model else []
            if model is Policy:
                fields = list(_FILE_KEYS) + fields
            hint = _did_you_mean(path[-1], fields)
            out.append((path, f"unknown key {path[-1]!r}" + (hint or f"; expected one of: {', '.join(fields)}")))
        elif kind == "missing":
            out.append((path, f"missing required key {path[-1]!r}"))
        else:
            groups.setdefault(_field_of(path)[0], []).append((path, err))
    for field_path, errs in groups.items():
        value_errors = [(p, e) for p, e in errs if e["type"] in ("value_error", "assertion_error")]
        if value_errors or not field_path:
            seen = set()
            for p, e in value_errors or errs:
                message = re.sub(r"^(Value|Assertion) error, ", "", e["msg"])
                if (p, message) not in seen:
                    seen.add((p, message))
                    out.append((p, message))
            continue
        _, owner, name = _field_of(field_path)
        assert owner is not None and name is not None
        field = owner.model_fields[name]
        value = _get(data, field_path)
        items = sorted({p[: len(field_path) + 1] for p, _ in errs if len(p) > len(field_path)}, key=str)
        if isinstance(value, list) and items and all(isinstance(p[-1], int) for p in items):
            item_type = _list_item(field.annotation)
            for p in items:
                item = value[p[-1]]
                got = _describe_value(item) + _hint(item_type, item)
                out.append((p, f"expected {_describe_type(item_type)}, got {got}"))
        else:
            expected = _FIELD_TEXT.get(name) or _describe_type(field.annotation, field.metadata)
            got = _describe_value(value) + _hint(field.annotation, value)
            out.append((field_path, f"expected {expected}, got {got}"))
    return out


# ---------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------
def _unknown_preset_message(name: str) -> str:
    close = _closest(name, preset_names())
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
