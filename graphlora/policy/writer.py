"""Writing a policy as a YAML or TOML policy file: PyYAML's safe dumper and tomli_w do the writing.

Reads a :class:`~graphlora.policy.schema.Policy` (or a dict of its fields); writes text, and the file when
given a path. Guarantees: the text starts with ``version``, holds every field that is not None (TOML has no
null) or, with ``minimal=True``, those that differ from the defaults, in the fields' order; a rule holds only
the keys it sets; each key is on a line of its own (a rule's ``match`` is a block in YAML, a ``[rules.match]``
table in TOML); reading the text back through :mod:`graphlora.policy.source` gives the same policy,
infinite numbers included, and strings that look like numbers, booleans, null or dates stay strings.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import tomli_w
import yaml
from pydantic import BaseModel

from graphlora.policy.schema import SUPPORTED_VERSION, Policy
from graphlora.policy.source import file_format
from graphlora.policy.yaml_reader import PLAIN_SCALAR_RESOLVERS

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


class _PolicyDumper(yaml.SafeDumper):
    """The dumper of ``yaml.safe_dump``, made to write what the strict reader reads back unchanged.

    * A string is written plain only where neither the strict reader (:data:`PLAIN_SCALAR_RESOLVERS`) nor a
      YAML 1.1 reader would take it for something else: ``1e3``, ``0o17``, ``-.5`` (numbers to the strict
      reader) and ``yes``, ``y``, ``2024-01-01`` (YAML 1.1) are quoted.
    * A string holding a line break is double-quoted, with the break escaped: one line per key, and PyYAML
      would fold a U+0085 break written inside single quotes into a space.
    * Lists of scalars are written inline (``[0, -1]``), mappings and lists of rules as blocks, list items
      indented under their key; no line is wrapped; no anchors.
    """

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True


for _tag, _pattern, _first in PLAIN_SCALAR_RESOLVERS:
    _PolicyDumper.add_implicit_resolver(_tag, _pattern, _first)
# YAML 1.1's one-letter booleans, which PyYAML's own resolvers leave out
_PolicyDumper.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))

_LINE_BREAK = re.compile("[\n\r\x85\u2028\u2029]")


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if _LINE_BREAK.search(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _represent_list(dumper: yaml.SafeDumper, value: list) -> yaml.SequenceNode:
    flow = not any(isinstance(item, (dict, list)) for item in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)


_PolicyDumper.add_representer(str, _represent_str)
_PolicyDumper.add_representer(list, _represent_list)


def _yaml_text(data: dict[str, Any]) -> str:
    # yaml.safe_dump with our SafeDumper subclass (safe_dump itself takes no Dumper)
    return yaml.dump(
        data, Dumper=_PolicyDumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=math.inf
    )


def _toml_table(name: str, table: dict[str, Any], array: bool) -> str:
    """``[[name]]`` (``array``) or ``[name]``, its keys and values as tomli_w writes them, then its
    sub-tables as ``[name.key]``: the layout tomli_w itself uses for a table it does not inline."""
    keys = {k: v for k, v in table.items() if not isinstance(v, dict)}
    text = "\n" + (f"[[{name}]]\n" if array else f"[{name}]\n") + tomli_w.dumps(keys)
    for key, value in table.items():
        if isinstance(value, dict):
            text += _toml_table(f"{name}.{key}", value, array=False)
    return text


def _toml_text(data: dict[str, Any]) -> str:
    """The root keys by tomli_w, then one ``[[rules]]`` table per rule. tomli_w alone would put short rules
    inline, several keys on one line, and a rule's keys would lose the lines that messages point at."""
    rules = data.get("rules")
    as_tables = isinstance(rules, list) and bool(rules) and all(isinstance(r, dict) for r in rules)
    root = {k: v for k, v in data.items() if not (k == "rules" and as_tables)}
    tables = [_toml_table("rules", rule, array=True) for rule in rules] if as_tables else []
    return tomli_w.dumps(root) + "".join(tables)


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
    text = _yaml_text(data) if fmt == "yaml" else _toml_text(data)
    if path is not None:
        path.write_text(text, encoding="utf-8")
    return text
