"""The self-contained HTML page of ``graphlora dump`` (``dump.html``).

One file, no network: inline CSS and JavaScript, a Content-Security-Policy that forbids every fetch,
the component map inline (Graphviz's SVG when ``dot`` is installed, else a simple SVG drawn here),
and a node table that filters as you type. The filter lives in the URL fragment
(``dump.html#component=vision&layer=0-3&lora=yes&q=q_proj``), so a filtered view can be bookmarked
and opened by a headless browser; clicking a box of the map filters the table to that group.

The rows are rendered into the page (readable without JavaScript); the script keeps them in memory
and puts back only the rows that match.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any, Mapping, Sequence

from graphlora.labels import COMPONENTS, ROLES

_COLOURS = {
    "lora": "#9fd8a4", "fused": "#7fc7e8", "skipped": "#f6c28b", "none": "#f2f2f2",
}
_BAND = {
    "vision": "#dbe9f6", "projector": "#f3e1f7", "cross_attention": "#fde9d9",
    "language": "#e2f0d9", "head": "#fff2cc", "other": "#eeeeee",
}

_CSS = """
body { font: 14px/1.4 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #222; }
header { background: #2d3e50; color: #fff; padding: 12px 20px; }
header h1 { margin: 0; font-size: 20px; }
header p { margin: 4px 0 0; }
.note { color: #ffd27f; }
section { padding: 8px 20px; }
h2 { font-size: 17px; border-bottom: 1px solid #ccc; padding-bottom: 4px; }
#component-map { overflow: auto; max-height: 70vh; border: 1px solid #ddd; background: #fff; }
#component-map g.node { cursor: pointer; }
#component-map g.node:hover polygon, #component-map g.node:hover path, #component-map g.node:hover rect { stroke: #d00; stroke-width: 2; }
.legend span { display: inline-block; padding: 1px 8px; margin-right: 6px; border: 1px solid #999; border-radius: 4px; }
pre { background: #f7f7f7; padding: 8px; overflow: auto; }
.controls { position: sticky; top: 0; background: #fff; padding: 6px 0; display: flex; flex-wrap: wrap; gap: 6px; align-items: center; border-bottom: 1px solid #ddd; }
.controls input[type=search] { width: 22em; }
#count { color: #555; margin-left: 8px; }
table { border-collapse: collapse; }
#node-table th, #node-table td { border-bottom: 1px solid #eee; padding: 2px 6px; text-align: left; vertical-align: top; font-size: 13px; }
#node-table th { background: #f0f0f0; position: sticky; top: 38px; }
#node-table td.mono { font-family: Menlo, Consolas, monospace; font-size: 12px; }
tr[data-lora=yes] td.lora { background: #d9f2dc; }
tr[data-lora=skipped] td.lora { background: #fde3c8; }
tr[data-lora=fused] td.lora, td.fused { background: #d6eef9; }
#stages td { padding: 1px 10px 1px 0; }
"""

_JS = r"""
(function () {
  "use strict";
  var tbody = document.getElementById("node-rows");
  var all = Array.prototype.slice.call(tbody.querySelectorAll("tr"));
  var keys = ["component", "role", "layer", "lora", "module", "q"];
  var controls = {};
  keys.forEach(function (k) { controls[k] = document.getElementById("f-" + k); });

  function parseHash() {
    var out = {};
    var h = window.location.hash.replace(/^#/, "");
    if (!h) { return out; }
    h.split("&").forEach(function (part) {
      var i = part.indexOf("=");
      if (i <= 0) { return; }
      var k = decodeURIComponent(part.slice(0, i)), v = decodeURIComponent(part.slice(i + 1).replace(/\+/g, " "));
      if (keys.indexOf(k) >= 0) { out[k] = v; }
    });
    return out;
  }
  function current() {
    var f = {};
    keys.forEach(function (k) { var c = controls[k]; if (c && c.value.trim()) { f[k] = c.value.trim(); } });
    return f;
  }
  function alternatives(v) { return v.split("|").map(function (s) { return s.trim(); }).filter(Boolean); }
  function layerOk(spec, value) {
    if (value === "") { return false; }
    var n = parseInt(value, 10);
    return alternatives(spec).some(function (alt) {
      var m = alt.match(/^(\d+)\s*-\s*(\d+)$/);
      if (m) { return n >= parseInt(m[1], 10) && n <= parseInt(m[2], 10); }
      return parseInt(alt, 10) === n;
    });
  }
  function globOk(spec, value) {
    return alternatives(spec).some(function (alt) {
      var re = new RegExp("^" + alt.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$");
      return re.test(value);
    });
  }
  function matches(tr, f) {
    var d = tr.dataset;
    if (f.component && alternatives(f.component).indexOf(d.component) < 0) { return false; }
    if (f.role && alternatives(f.role).indexOf(d.role) < 0) { return false; }
    if (f.layer && !layerOk(f.layer, d.layer)) { return false; }
    if (f.lora) {
      var want = alternatives(f.lora);
      var status = d.lora, fused = d.fusion.indexOf("fused") === 0;
      if (!want.some(function (w) { return w === status || (w === "fused" && fused); })) { return false; }
    }
    if (f.module && !globOk(f.module, d.module)) { return false; }
    if (f.q && tr.textContent.toLowerCase().indexOf(f.q.toLowerCase()) < 0) { return false; }
    return true;
  }
  function render() {
    var f = current();
    var shown = all.filter(function (tr) { return matches(tr, f); });
    while (tbody.firstChild) { tbody.removeChild(tbody.firstChild); }
    var frag = document.createDocumentFragment();
    shown.forEach(function (tr) { frag.appendChild(tr); });
    tbody.appendChild(frag);
    var sites = shown.filter(function (tr) { return tr.dataset.lora === "yes"; }).length;
    var count = document.getElementById("count");
    count.textContent = shown.length + " of " + all.length + " nodes shown, " + sites + " with LoRA";
    count.setAttribute("data-shown", String(shown.length));
    count.setAttribute("data-total", String(all.length));
    document.body.setAttribute("data-filter", keys.filter(function (k) { return f[k]; }).map(function (k) { return k + "=" + f[k]; }).join("&"));
  }
  function toControls(f) {
    keys.forEach(function (k) {
      var c = controls[k];
      if (!c) { return; }
      var v = f[k] || "";
      if (c.tagName === "SELECT" && v && !Array.prototype.some.call(c.options, function (o) { return o.value === v; })) {
        var o = document.createElement("option"); o.value = v; o.textContent = v; c.appendChild(o);
      }
      c.value = v;
    });
  }
  function toHash() {
    var f = current();
    var h = keys.filter(function (k) { return f[k]; }).map(function (k) { return k + "=" + encodeURIComponent(f[k]).replace(/%7C/g, "|"); }).join("&");
    if (window.history && window.history.replaceState) {
      window.history.replaceState(null, "", h ? "#" + h : window.location.pathname + window.location.search);
    }
  }
  keys.forEach(function (k) {
    var c = controls[k];
    if (c) { c.addEventListener("input", function () { toHash(); render(); }); c.addEventListener("change", function () { toHash(); render(); }); }
  });
  document.getElementById("f-clear").addEventListener("click", function () { toControls({}); toHash(); render(); });
  window.addEventListener("hashchange", function () { toControls(parseHash()); render(); });
  Array.prototype.forEach.call(document.querySelectorAll("#component-map g.node"), function (g) {
    var t = g.querySelector("title");
    if (!t) { return; }
    g.addEventListener("click", function () {
      var parts = t.textContent.split("/");
      var f = current();
      f.component = parts[0];
      if (parts.length > 1) { f.layer = parts[1]; } else { delete f.layer; }
      toControls(f); toHash(); render();
      document.getElementById("nodes").scrollIntoView();
    });
  });
  toControls(parseHash());
  render();
})();
"""


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _clean_svg(svg: str) -> str:
    """Graphviz's SVG without the XML prolog, doctype and comments (to inline it)."""
    svg = re.sub(r"<\?xml[^>]*\?>", "", svg)
    svg = re.sub(r"<!DOCTYPE[^>]*>", "", svg, flags=re.S)
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    return svg.strip()


def _fill(attrs: Mapping[str, Any]) -> str:
    if attrs.get("sites"):
        return _COLOURS["lora"] if attrs.get("fused", 0) < attrs["sites"] else _COLOURS["fused"]
    if attrs.get("skipped"):
        return _COLOURS["skipped"]
    return _COLOURS["none"]


def simple_svg(graph) -> str:
    """A plain SVG of the component map (used when Graphviz is not installed).

    One band per component (vision, projector, cross_attention, language, head), boxes in execution
    order wrapping every 12, arrows for the dataflow edges. Each box is a ``<g class="node">`` with a
    ``<title>``, like Graphviz's output, so the page's click handler works on both.
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
        bands.append((comp, y, band_h))
        for i, name in enumerate(names):
            col, row = i % per_row, i // per_row
            pos[name] = (pad + 110 + col * (box_w + gap_x), y + gap_y + row * (box_h + gap_y))
        y += band_h + pad
    height = y
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="11">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
    ]
    for comp, y0, h in bands:
        parts.append(f'<rect x="{pad}" y="{y0}" width="{width - 2 * pad}" height="{h}" rx="6" '
                     f'fill="{_BAND.get(comp, "#eeeeee")}" stroke="none"/>')
        parts.append(f'<text x="{pad + 8}" y="{y0 + 18}" font-size="13" font-weight="bold">{_e(comp)}</text>')
    for src, dst in graph.edges():
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        cx1, cy1, cx2, cy2 = x1 + box_w / 2, y1 + box_h / 2, x2 + box_w / 2, y2 + box_h / 2
        dx, dy = cx2 - cx1, cy2 - cy1
        if dx == 0 and dy == 0:
            continue
        t = min((box_w / 2) / abs(dx) if dx else math.inf, (box_h / 2) / abs(dy) if dy else math.inf)
        sx, sy, ex, ey = cx1 + dx * t, cy1 + dy * t, cx2 - dx * t, cy2 - dy * t
        parts.append(f'<g class="edge"><title>{_e(src)}-&gt;{_e(dst)}</title><line x1="{sx:.1f}" y1="{sy:.1f}" '
                     f'x2="{ex:.1f}" y2="{ey:.1f}" stroke="#555" stroke-opacity="0.6" marker-end="url(#arrow)"/></g>')
    for name, attrs in graph.nodes(data=True):
        x, y0 = pos[name]
        line2 = f"{attrs.get('linears', 0)} lin, {attrs.get('sites', 0)} LoRA"
        if attrs.get("fused"):
            line2 += f", {attrs['fused']} fused"
        if attrs.get("skipped"):
            line2 += f", {attrs['skipped']} skip"
        parts.append(
            f'<g class="node"><title>{_e(name)}</title>'
            f'<rect x="{x}" y="{y0}" width="{box_w}" height="{box_h}" rx="6" fill="{_fill(attrs)}" stroke="#333"/>'
            f'<text x="{x + box_w / 2}" y="{y0 + 17}" text-anchor="middle" font-weight="bold">{_e(name)}</text>'
            f'<text x="{x + box_w / 2}" y="{y0 + 33}" text-anchor="middle">{_e(line2)}</text></g>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _row_html(row: Mapping[str, Any]) -> str:
    layer = "" if row.get("layer") is None else str(row["layer"])
    lora = row.get("lora", "")
    fusion = row.get("fusion") or ""
    lora_cell = {"yes": "LoRA", "no": "no", "skipped": "skipped", "fused": "fused"}.get(lora, lora)
    branch = row.get("branch") or []
    attrs = {
        "data-node": row.get("node"), "data-component": row.get("component") or "", "data-role": row.get("role") or "",
        "data-layer": layer, "data-lora": lora, "data-fusion": fusion, "data-module": row.get("module") or "",
    }
    attr_text = " ".join(f'{k}="{_e(v)}"' for k, v in attrs.items())
    alpha = row.get("alpha")
    cells = [
        ("mono", row.get("node")), ("mono", row.get("module")), ("", row.get("component")), ("", row.get("role")),
        ("", layer), ("lora", lora_cell), ("", "" if row.get("r") is None else row["r"]),
        ("", "" if alpha is None else f"{alpha:g}"), ("fused" if fusion.startswith("fused") else "", fusion or "-"),
        ("", row.get("reason")), ("mono", " ".join(branch)),
    ]
    tds = "".join(f'<td class="{cls}">{_e(v)}</td>' if cls else f"<td>{_e(v)}</td>" for cls, v in cells)
    return f"<tr {attr_text}>{tds}</tr>"


def render_html(*, title: str, summary: str, svg: str | None, graph, rows: Sequence[Mapping[str, Any]],
                stages: Sequence[Mapping[str, Any]], filter_text: str = "", meta_note: str = "") -> str:
    """The whole page as a string (see the module docstring)."""
    map_svg = _clean_svg(svg) if svg else simple_svg(graph)
    renderer = "Graphviz" if svg else "graphlora (Graphviz not installed)"
    components = [c for c in COMPONENTS if any(r.get("component") == c for r in rows)]
    roles = [r for r in ROLES if any(row.get("role") == r for row in rows)]
    comp_opts = "".join(f'<option value="{_e(c)}">{_e(c)}</option>' for c in components)
    role_opts = "".join(f'<option value="{_e(r)}">{_e(r)}</option>' for r in roles)
    stage_rows = "".join(
        f"<tr><td>{int(s['index']):02d}</td><td>{_e(s['name'])}</td><td>{float(s['seconds']):.2f} s</td>"
        f"<td>{int(s['nodes'])} nodes</td></tr>" for s in stages
    )
    notes = []
    if meta_note:
        notes.append(f'<p class="note">Meta device: {_e(meta_note)}.</p>')
    if filter_text:
        notes.append(f'<p class="note">Dump filter (--only): {_e(filter_text)}</p>')
    legend = "".join(
        f'<span style="background:{colour}">{_e(label)}</span>'
        for label, colour in (("has LoRA sites", _COLOURS["lora"]), ("all sites fused", _COLOURS["fused"]),
                              ("only skipped sites", _COLOURS["skipped"]), ("no LoRA", _COLOURS["none"]))
    )
    body_rows = "\n".join(_row_html(r) for r in rows)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>graphlora dump: {_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>graphlora dump</h1>
<p>{_e(title)}</p>
{''.join(notes)}
</header>
<section id="map">
<h2>Component map</h2>
<p class="legend">{legend} Click a box to filter the node table. Rendered by {_e(renderer)}.</p>
<div id="component-map">
{map_svg}
</div>
</section>
<section id="summary">
<h2>Summary</h2>
<pre id="summary-text">{_e(summary)}</pre>
<details><summary>Stages</summary><table id="stages">{stage_rows}</table></details>
</section>
<section id="nodes">
<h2>Nodes</h2>
<div class="controls">
<input id="f-q" type="search" placeholder="search node, module, reason">
<select id="f-component"><option value="">all components</option>{comp_opts}</select>
<select id="f-role"><option value="">all roles</option>{role_opts}</select>
<input id="f-layer" type="text" size="8" placeholder="layer: 0-3">
<select id="f-lora"><option value="">any LoRA status</option><option value="yes">LoRA</option><option value="no">no LoRA</option><option value="skipped">skipped</option><option value="fused">fused</option></select>
<input id="f-module" type="text" size="18" placeholder="module glob: *.q_proj">
<button id="f-clear" type="button">clear</button>
<span id="count">{len(rows)} nodes</span>
</div>
<table id="node-table">
<thead><tr><th>node</th><th>module</th><th>component</th><th>role</th><th>layer</th><th>LoRA</th><th>r</th><th>alpha</th><th>fusion</th><th>reason</th><th>LoRA branch nodes</th></tr></thead>
<tbody id="node-rows">
{body_rows}
</tbody>
</table>
</section>
<script>{_JS}</script>
</body>
</html>
"""
