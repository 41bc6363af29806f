"""What a policy file's problems say: located one-line issues, did-you-mean, and pydantic's errors retold.

Writes no file. :class:`PolicyIssue` is one problem (file, line, key path, message) and prints as
``FILE:LINE: KEY.PATH: message``; :class:`PolicyFileError` (a :class:`~graphlora.errors.PolicyError`) holds
every problem of a file, one line each. :class:`Issues` gathers them while a file is read (:class:`Abort`
stops reading when nothing more can be said). :func:`validation_issues` turns a pydantic
``ValidationError`` on the merged policy data into ``(key path, message)`` pairs: unknown keys with the
nearest known name, wrong types as "expected X, got Y" with a hint for the usual mistakes (quoted numbers,
YAML 1.1 booleans, near-miss literals). Every message is one line.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import re
import types
import typing
from typing import Any, Iterable, Literal, Union

from pydantic import BaseModel, ValidationError

from graphlora.errors import PolicyError
from graphlora.policy.key_paths import KeyPath, format_key_path
from graphlora.policy.schema import FILE_KEYS, Policy

__all__ = [
    "Abort",
    "Issues",
    "PolicyFileError",
    "PolicyIssue",
    "closest",
    "describe_value",
    "did_you_mean",
    "validation_issues",
]


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


class Abort(Exception):
    """Stop reading: the issues gathered so far are all there is to say."""


class Issues:
    """The problems found so far while reading a policy (and the files it extends)."""

    def __init__(self) -> None:
        self.items: list[PolicyIssue] = []

    def add(self, file: str, line: int | None, path: KeyPath | None, message: str) -> None:
        self.items.append(PolicyIssue(file, line, format_key_path(path) if path else None, message))

    def raise_if_any(self) -> None:
        if self.items:
            raise PolicyFileError(self.items)


# ---------------------------------------------------------------------------------------------------
# pydantic errors -> located one-line messages
# ---------------------------------------------------------------------------------------------------
def closest(word: Any, options: Iterable[str]) -> str | None:
    """The option ``word`` was most likely meant to be (difflib), or None."""
    if not isinstance(word, str):
        return None
    options = list(options)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not close:
        lowered = {o.lower(): o for o in options}
        close = [lowered[word.lower()]] if word.lower() in lowered else []
    return close[0] if close else None


def did_you_mean(word: Any, options: Iterable[str]) -> str | None:
    close = closest(word, options)
    return f"; did you mean {close!r}?" if close else None


def describe_value(value: Any) -> str:
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
            return did_you_mean(value, typing.get_args(literals[0])) or ""
    return ""


def validation_issues(exc: ValidationError, data: dict[str, Any]) -> list[tuple[KeyPath, str]]:
    out: list[tuple[KeyPath, str]] = []
    groups: dict[KeyPath, list[tuple[KeyPath, dict[str, Any]]]] = {}
    for err in exc.errors():
        kind = err["type"]
        path = _key_path_of(err["loc"], data, kind)
        if kind == "extra_forbidden":
            model = _model_at(path[:-1])
            fields = list(model.model_fields) if model else []
            if model is Policy:
                fields = list(FILE_KEYS) + fields
            hint = did_you_mean(path[-1], fields)
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
                got = describe_value(item) + _hint(item_type, item)
                out.append((p, f"expected {_describe_type(item_type)}, got {got}"))
        else:
            expected = _FIELD_TEXT.get(name) or _describe_type(field.annotation, field.metadata)
            got = describe_value(value) + _hint(field.annotation, value)
            out.append((field_path, f"expected {expected}, got {got}"))
    return out
