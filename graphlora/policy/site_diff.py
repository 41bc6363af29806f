"""A git-diff-like text of two LoRA site lists: what ``graphlora policy diff A B --model SPEC`` prints.

Reads site objects (or dicts) with ``name``, ``component``, ``role``, ``layer``, ``r``, ``alpha``; writes a
string. Guarantees: sites are matched by name (a name twice in one list is a ValueError); the text is ""
when both lists select the same sites with the same settings; rows are sorted by name with numbers in
names compared as numbers.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from graphlora.text_table import format_table

__all__ = ["format_site_diff"]

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
    added = sum(1 for r in rows if r[0] == "+")
    removed = sum(1 for r in rows if r[0] == "-")
    changed = len(rows) - added - removed
    out = [f"--- {labels[0]}: {len(old)} sites", f"+++ {labels[1]}: {len(new)} sites"]
    columns = format_table([[str(rec[k]) if rec[k] is not None else "-" for k in _SITE_FIELDS[:3]] for _, rec, _ in rows])
    for (mark, rec, settings), text in zip(rows, columns):
        layer = "-" if rec["layer"] is None else str(rec["layer"])
        out.append(f"{mark} {text}  layer {layer.ljust(3)} {settings}".rstrip())
    out.append(f"{added} added, {removed} removed, {changed} changed")
    return "\n".join(out) + "\n"
