"""Reading policy files: one schema, two syntaxes (YAML and TOML), ``extends``, and where each key is written.

Reads a policy file (or a string) and the files it extends; writes nothing. The format is documented in
docs/policy.md. In short:

* a file holds the :class:`~graphlora.policy.schema.Policy` keys, plus an optional integer ``version``
  (1 today) and an optional ``extends`` (a preset name, or a path relative to the file that names it);
* ``extends`` merges key by key: the child's keys replace the parent's, except ``rules``, whose lists
  concatenate (the parent's rules first, so the child's rules win);
* the syntax is chosen by the suffix; YAML goes through the strict reader (:mod:`.yaml_reader`), TOML
  through tomllib and the key-position scanner (:mod:`.toml_positions`).

Guarantees: a file gives a :class:`Policy` or a :class:`~graphlora.policy.messages.PolicyFileError` holding
every problem of the file and its parents, one line ``FILE:LINE: KEY.PATH: message`` each, grouped by file
(the file read first) and ordered by line. A :class:`PolicySource` maps a key path of the merged policy back
to the file and line that wrote it (:func:`_where`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError

from graphlora.policy.key_paths import KeyPath, parse_key_path
from graphlora.policy.messages import Abort, Issues, PolicyFileError, PolicyIssue, describe_value, validation_issues
from graphlora.policy.presets import preset_names, preset_path, unknown_preset_message
from graphlora.policy.schema import FILE_KEYS, SUPPORTED_VERSION, Policy
from graphlora.policy.toml_positions import read_toml
from graphlora.policy.yaml_reader import read_yaml

__all__ = [
    "PolicySource",
    "as_policy",
    "file_format",
    "load_policy",
    "load_policy_file",
    "load_policy_source",
    "load_preset",
    "parse_policy_text",
]

_YAML_SUFFIXES = (".yaml", ".yml")
_TOML_SUFFIXES = (".toml",)


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


def file_format(path: Path) -> str:
    """``"yaml"`` or ``"toml"`` by the suffix of ``path``; PolicyFileError for any other suffix."""
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
        issues.add(file.display, line, ("extends",), unknown_preset_message(value))
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
    fmt = fmt or file_format(path)
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


def load_preset(name: str) -> Policy:
    """The policy of a shipped preset (see docs/policy.md)."""
    return load_policy_file(preset_path(name))


def load_policy(path: str | Path) -> Policy:
    """Read a policy file (YAML or TOML). See docs/policy.md for the format."""
    return load_policy_file(path)


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
