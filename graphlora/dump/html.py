"""The self-contained HTML page of ``graphlora dump`` (``dump.html``), rendered with jinja2.

Reads the summary text, the component map (a networkx DiGraph), its SVG from Graphviz when there is
one, the node-table rows and the stage timings; returns the page as a string. The markup lives in
``templates/`` (package data): ``dump.html.j2`` the page, ``dump.css`` and ``dump.js`` inlined into
it verbatim, ``component_map.svg.j2`` the map drawn here when Graphviz is not installed (one band per
component, boxes as ``<g class="node">`` with a ``<title>`` like Graphviz's, so the page's click
handler works on both).

Guarantees: every value from the model or the user is escaped by jinja2's autoescape; the page needs
no network (inline CSS and JavaScript, a Content-Security-Policy that forbids every fetch). The filter
lives in the URL fragment (``dump.html#component=vision&layer=0-3&lora=yes&q=q_proj``), so a filtered
view can be bookmarked and opened by a headless browser; clicking a box of the map filters the table
to that group. The rows are in the page (readable without JavaScript); the script keeps them in
memory and puts back only the rows that match. Colours come from :mod:`graphlora.dump.colours`.
"""

from __future__ import annotations

import functools
import html
import math
import re
from typing import Any, Mapping, Sequence

import jinja2
from markupsafe import Markup

from graphlora.dump.colours import STATUS_COLOURS, STATUS_LEGEND, component_colour, status_colour
from graphlora.labels import COMPONENTS, ROLES


def _finalize(value: Any) -> Any:
    """What ``{{ value }}`` prints: None as nothing (an absent value is an empty cell), markup (our CSS,
    JavaScript, SVG, a macro's output) as it is, anything else escaped once, quotes included, with the
    standard library's entity names (``&quot;``, ``&#x27;``: the page reads as it always did)."""
    if value is None:
        return ""
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape(str(value), quote=True))


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("graphlora.dump", "templates"),
        autoescape=True,  # whatever _finalize lets through unescaped is still escaped
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
    )


def _static(name: str) -> Markup:
    """A file of ``templates/`` as it is (our own CSS or JavaScript, inlined unescaped)."""
    env = _environment()
    source, _, _ = env.loader.get_source(env, name)
    return Markup(source)


def _clean_svg(svg: str) -> str:
    """Graphviz's SVG without the XML prolog, doctype and comments (to inline it)."""
    svg = re.sub(r"<\?xml[^>]*\?>", "", svg)
    svg = re.sub(r"<!DOCTYPE[^>]*>", "", svg, flags=re.S)
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    return svg.strip()


def simple_svg(graph) -> str:
    """A plain SVG of the component map (used when Graphviz is not installed).

    One band per component (vision, projector, cross_attention, language, head), boxes in execution
    order wrapping every 12, arrows for the dataflow edges.
    """
    per_row, box_w, box_h, gap_x, gap_y, pad = 12, 128, 44, 26, 22, 16
    by_component: dict[str, list[str]] = {}
    for name, attrs in graph.nodes(data=True):
        by_component.setdefault(attrs.get("component", "other"), []).append(name)
    order = [c for c in COMPONENTS if c in by_component] + [c for c in by_component if c not in COMPONENTS]
    pos: dict[str, tuple[float, float]] = {}
    bands = []
    y = pad
    width = pad * 2 + 110 + per_row * (box_w + gap_x)
    for comp in order:
        names = by_component[comp]
        rows = math.ceil(len(names) / per_row)
        band_h = rows * (box_h + gap_y) + gap_y
        bands.append(dict(name=comp, x=pad, y=y, width=width - 2 * pad, height=band_h,
                          colour=component_colour(comp)))
        for i, name in enumerate(names):
            col, row = i % per_row, i // per_row
            pos[name] = (pad + 110 + col * (box_w + gap_x), y + gap_y + row * (box_h + gap_y))
        y += band_h + pad
    edges = []
    for src, dst in graph.edges():
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        cx1, cy1, cx2, cy2 = x1 + box_w / 2, y1 + box_h / 2, x2 + box_w / 2, y2 + box_h / 2
        dx, dy = cx2 - cx1, cy2 - cy1
        if dx == 0 and dy == 0:
            continue
        # From border to border of the two boxes, along the line between their centres.
        t = min((box_w / 2) / abs(dx) if dx else math.inf, (box_h / 2) / abs(dy) if dy else math.inf)
        edges.append(dict(src=src, dst=dst, x1=f"{cx1 + dx * t:.1f}", y1=f"{cy1 + dy * t:.1f}",
                          x2=f"{cx2 - dx * t:.1f}", y2=f"{cy2 - dy * t:.1f}"))
    boxes = []
    for name, attrs in graph.nodes(data=True):
        x, y0 = pos[name]
        line2 = f"{attrs.get('linears', 0)} lin, {attrs.get('sites', 0)} LoRA"
        if attrs.get("fused"):
            line2 += f", {attrs['fused']} fused"
        if attrs.get("skipped"):
            line2 += f", {attrs['skipped']} skip"
        boxes.append(dict(name=name, x=x, y=y0, width=box_w, height=box_h, cx=x + box_w / 2,
                          colour=status_colour(attrs), line2=line2))
    svg = _environment().get_template("component_map.svg.j2").render(
        width=width, height=y, bands=bands, edges=edges, boxes=boxes)
    return svg.rstrip("\n")


def _row_view(row: Mapping[str, Any]) -> dict[str, list[tuple[str, Any]]]:
    """One node-table row as the template's ``table_row`` takes it: its data attributes and its cells."""
    layer = "" if row.get("layer") is None else str(row["layer"])
    lora = row.get("lora", "")
    fusion = row.get("fusion") or ""
    lora_cell = {"yes": "LoRA", "no": "no", "skipped": "skipped", "fused": "fused"}.get(lora, lora)
    alpha = row.get("alpha")
    attrs = [
        ("data-node", row.get("node")), ("data-component", row.get("component") or ""),
        ("data-role", row.get("role") or ""), ("data-layer", layer), ("data-lora", lora),
        ("data-fusion", fusion), ("data-module", row.get("module") or ""),
    ]
    cells = [
        ("mono", row.get("node")), ("mono", row.get("module")), ("", row.get("component")), ("", row.get("role")),
        ("", layer), ("lora", lora_cell), ("", "" if row.get("r") is None else row["r"]),
        ("", "" if alpha is None else f"{alpha:g}"), ("fused" if fusion.startswith("fused") else "", fusion or "-"),
        ("", row.get("reason")), ("mono", " ".join(row.get("branch") or [])),
    ]
    return dict(attrs=attrs, cells=cells)


def render_html(*, title: str, summary: str, svg: str | None, graph, rows: Sequence[Mapping[str, Any]],
                stages: Sequence[Mapping[str, Any]], filter_text: str = "", meta_note: str = "") -> str:
    """The whole page as a string (see the module docstring)."""
    # The map is markup we made: Graphviz's drawing of our DOT text, or our own template's.
    map_svg = Markup(_clean_svg(svg) if svg else simple_svg(graph))
    return _environment().get_template("dump.html.j2").render(
        title=title,
        summary=summary,
        css=_static("dump.css"),
        js=_static("dump.js"),
        map_svg=map_svg,
        renderer="Graphviz" if svg else "graphlora (Graphviz not installed)",
        legend=[(STATUS_COLOURS[status], label) for status, label in STATUS_LEGEND],
        components=[c for c in COMPONENTS if any(r.get("component") == c for r in rows)],
        roles=[r for r in ROLES if any(row.get("role") == r for row in rows)],
        stages=[(f"{int(s['index']):02d}", s["name"], f"{float(s['seconds']):.2f}", int(s["nodes"])) for s in stages],
        rows=[_row_view(r) for r in rows],
        filter_text=filter_text,
        meta_note=meta_note,
    )
