"""What a dump is asked for: output formats, the ``--only`` node filter, ``--after`` stage names, the policy.

Reads the caller's arguments only (no graph, no model). Guarantees that every malformed request is
refused with a :class:`DumpError` naming the bad value and the accepted ones, before anything is traced.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from graphlora.errors import GraphLoraError
from graphlora.labels import COMPONENTS, ROLES
from graphlora.pipeline import STAGES

#: Output formats, in the order they are written. ``summary.txt`` is written whatever the formats.
FORMATS: tuple[str, ...] = ("text", "dot", "json", "html")
#: Keys ``--only`` filters on.
FILTER_KEYS: tuple[str, ...] = ("component", "role", "layer", "module")


class DumpError(GraphLoraError, ValueError):
    """A dump request that cannot be served (unknown format, pass, filter key ...)."""


@dataclasses.dataclass(frozen=True)
class NodeFilter:
    """Which labelled nodes to show: every given key must match (``--only component=vision,layer=0-3``).

    A value may list alternatives separated by ``|`` (``role=attn.q|attn.v``); ``layer`` takes numbers
    and inclusive ranges (``layer=0-3|30``); ``module`` takes shell-style patterns (``*.q_proj``).
    """

    component: frozenset[str] | None = None
    role: frozenset[str] | None = None
    layer: tuple[tuple[int, int], ...] | None = None
    module: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, spec: "NodeFilter | str | Mapping[str, Any] | Sequence[str] | None") -> "NodeFilter | None":
        """A filter from ``"component=vision,layer=3"``, a dict, a list of such strings, or None."""
        if spec is None or isinstance(spec, NodeFilter):
            return spec
        items: list[tuple[str, Any]] = []
        if isinstance(spec, str):
            spec = [spec]
        if isinstance(spec, Mapping):
            items = list(spec.items())
        else:
            for text in spec:
                for part in str(text).replace("&", ",").split(","):
                    part = part.strip()
                    if not part:
                        continue
                    key, sep, value = part.partition("=")
                    if not sep or not value.strip():
                        raise DumpError(f"--only {part!r}: expected KEY=VALUE with KEY one of {', '.join(FILTER_KEYS)}")
                    items.append((key.strip(), value.strip()))
        fields: dict[str, Any] = {}
        for key, value in items:
            if key not in FILTER_KEYS:
                raise DumpError(f"--only: unknown key {key!r}; filter keys are {', '.join(FILTER_KEYS)}")
            values = _alternatives(value)
            if key == "component":
                bad = [v for v in values if v not in COMPONENTS]
                if bad:
                    raise DumpError(f"--only component={bad[0]!r}: components are {', '.join(COMPONENTS)}")
                fields[key] = frozenset(values) if key not in fields else fields[key] & frozenset(values)
            elif key == "role":
                bad = [v for v in values if v not in ROLES]
                if bad:
                    raise DumpError(f"--only role={bad[0]!r}: roles are {', '.join(ROLES)}")
                fields[key] = frozenset(values) if key not in fields else fields[key] & frozenset(values)
            elif key in fields:
                raise DumpError(f"--only: {key} given twice; separate alternatives with '|' ({key}=a|b)")
            elif key == "layer":
                fields[key] = tuple(_layer_range(v) for v in values)
            else:
                fields[key] = tuple(values)
        return cls(**fields) if fields else None

    def matches(self, component: str | None, role: str | None, layer: int | None, module: str | None) -> bool:
        if self.component is not None and component not in self.component:
            return False
        if self.role is not None and role not in self.role:
            return False
        if self.layer is not None and (layer is None or not any(lo <= layer <= hi for lo, hi in self.layer)):
            return False
        if self.module is not None and not any(fnmatch.fnmatchcase(module or "", p) for p in self.module):
            return False
        return True

    def describe(self) -> str:
        """Canonical text form (``component=vision,layer=0-3``)."""
        parts = []
        if self.component is not None:
            parts.append("component=" + "|".join(c for c in COMPONENTS if c in self.component))
        if self.role is not None:
            parts.append("role=" + "|".join(r for r in ROLES if r in self.role))
        if self.layer is not None:
            parts.append("layer=" + "|".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.layer))
        if self.module is not None:
            parts.append("module=" + "|".join(self.module))
        return ",".join(parts)


def _alternatives(value: Any) -> list[str]:
    if isinstance(value, (list, tuple, set, frozenset)):
        return [str(v).strip() for v in value]
    return [v.strip() for v in str(value).split("|") if v.strip()]


def _layer_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise DumpError(f"--only layer={text!r}: expected a layer number or a range like 0-3") from None


def available_stages() -> list[str]:
    """``record``, ``export`` and the name of every pass of the pipeline, in order (``--after`` accepts these)."""
    return list(STAGES)


def parse_formats(formats: str | Iterable[str] | None) -> tuple[str, ...]:
    """The formats asked for, in :data:`FORMATS` order (None or ``all``: every one)."""
    if formats is None:
        return FORMATS
    if isinstance(formats, str):
        formats = formats.split(",")
    wanted = [f.strip().lower() for f in formats if f.strip()]
    if "all" in wanted:
        return FORMATS
    bad = [f for f in wanted if f not in FORMATS]
    if bad:
        raise DumpError(f"unknown dump format {bad[0]!r}; formats are {', '.join(FORMATS)} (or all)")
    return tuple(f for f in FORMATS if f in wanted)


def resolve_policy(policy) -> tuple[Any, str]:
    """(policy for rewrite, label for the summary); a preset name stands for its file."""
    if isinstance(policy, str) and not Path(policy).exists():
        from graphlora.policy import preset_names, preset_path

        if policy in preset_names():
            return preset_path(policy), f"preset {policy}"
    if policy is None:
        return None, "the default policy"
    if isinstance(policy, (str, os.PathLike)):
        return policy, str(policy)
    if isinstance(policy, Mapping):
        return policy, "a dict"
    return policy, type(policy).__name__

