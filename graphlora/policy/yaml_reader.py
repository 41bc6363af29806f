"""The strict YAML reader of policy files: YAML 1.2-like plain scalars, every key's line, no tags.

:func:`read_yaml` reads a policy file's text and returns (value, lines, broken): the Python value of its
one document, the line of every key path (``("rules", 0, "match")`` -> 7), and the key paths whose value
is meaningless because of a problem already reported. Guarantees: duplicate keys, explicit tags, merge
keys (``<<``), recursive aliases, a second document and documents that aliases blow up past
100,000 nodes are located issues, never values; only ``true`` / ``false`` are booleans; YAML 1.1's
sexagesimal numbers, octals, timestamps and yes/no/on/off are strings (see :class:`StrictYamlLoader`).
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

from graphlora.policy.key_paths import KeyPath
from graphlora.policy.messages import Abort, Issues

__all__ = ["PLAIN_SCALAR_RESOLVERS", "StrictYamlLoader", "read_yaml"]


class StrictYamlLoader(yaml.SafeLoader):
    """A SafeLoader with YAML 1.2-like plain scalars and a record of explicit tags.

    Plain scalars resolve to: ``true`` / ``false`` (booleans; not yes/no/on/off/True), decimal, ``0x`` and
    ``0o`` integers, decimal floats with ``.inf`` / ``.nan``, and ``null`` / ``~`` / empty; everything else
    (``-4:``, ``1:30``, ``2024-01-01``, ``yes``) is a string. Explicit tags are recorded so the reader can
    refuse them; documents are turned into Python values by :func:`read_yaml`, not by the constructor.
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

#: How the strict reader types a plain (unquoted) scalar: (tag, pattern, possible first characters); any other
#: plain scalar is a string. The writer quotes every string that these would read as something else.
PLAIN_SCALAR_RESOLVERS = (
    ("tag:yaml.org,2002:bool", _YAML_BOOL, list("tf")),
    ("tag:yaml.org,2002:int", _YAML_INT, list("-+0123456789")),
    ("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+.0123456789")),
    ("tag:yaml.org,2002:null", _YAML_NULL, ["~", "n", "N", ""]),
)
for _tag, _pattern, _first in PLAIN_SCALAR_RESOLVERS:
    StrictYamlLoader.add_implicit_resolver(_tag, _pattern, _first)

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
    def __init__(self, loader: StrictYamlLoader, display: str, issues: Issues) -> None:
        self.loader, self.display, self.issues = loader, display, issues
        self.lines: dict[KeyPath, int] = {}
        self.broken: set[KeyPath] = set()
        self.active: set[int] = set()
        self.count = 0

    def value(self, node: yaml.Node, path: KeyPath) -> Any:
        self.count += 1
        if self.count > _MAX_YAML_NODES:
            self.issues.add(self.display, node.start_mark.line + 1, path, "the document is too large")
            raise Abort
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


def read_yaml(text: str, display: str, issues: Issues) -> tuple[Any, dict[KeyPath, int], set[KeyPath]]:
    """(value, key path -> line, broken key paths) of one YAML document; problems go to ``issues`` under
    the name ``display``, and a syntax error raises :class:`Abort`."""
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
        raise Abort from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        issues.add(display, line, None, f"syntax error: character {e.character!r} is not allowed in YAML")
        raise Abort from None
    except yaml.YAMLError as e:  # pragma: no cover - every PyYAML error above is marked or a ReaderError
        issues.add(display, None, None, f"syntax error: {e}")
        raise Abort from None
    finally:
        loader.dispose()
    if root is None:
        return {}, {}, set()
    reader = _YamlReader(loader, display, issues)
    reader.lines[()] = root.start_mark.line + 1
    return reader.value(root, ()), reader.lines, reader.broken
