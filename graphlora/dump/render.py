"""The text outputs of a dump: stage files and their diffs, ``summary.txt``, the component map in DOT.

Reads the recorder's :class:`~graphlora.dump.stages.Stage` snapshots, the summary numbers and the
component map; returns strings (writing them is ``run.dump``'s job). Stage files carry no timings, so
a diff shows only what a pass changed. :func:`run_graphviz` turns the DOT text into SVG when
Graphviz's ``dot`` is installed (None otherwise); it is the only thing here that runs a program.
"""

from __future__ import annotations

import collections
import difflib
import shutil
import subprocess
from typing import Any, Mapping

from graphlora.dump.colours import component_colour, status_colour
from graphlora.dump.options import NodeFilter
from graphlora.dump.stages import Stage
from graphlora.labels import COMPONENTS
from graphlora.text_table import format_table


def render_stage(stage: Stage, title: str, include: set[str] | None, flt: NodeFilter | None, total: int) -> str:
    """The text of ``NN_<stage>.txt``: the nodes ``include`` keeps (all when None), placeholders first."""
    lines = [
        f"# graphlora dump of {title}: stage {stage.index:02d} {stage.name} ({total} stages)",
        f"# {stage.num_nodes} nodes",
    ]
    nodes = stage.nodes if include is None else [n for n in stage.nodes if n.name in include]
    if flt is not None:
        lines.append(f"# filter --only {flt.describe()}: {len(nodes)} of {stage.num_nodes} nodes shown "
                     "(labels of the final stage)")
    lines.append("class GraphModule(torch.nn.Module):")
    placeholders = [n for n in nodes if n.op == "placeholder"]
    lines.append("    def forward(")
    lines.append("        self,")
    for n in placeholders:
        lines.extend(f"        # {note}" for note in n.notes)
        lines.append(f"        {n.code}")
    lines.append("    ):")
    for n in nodes:
        if n.op == "placeholder":
            continue
        lines.extend(f"        # {note}" for note in n.notes)
        lines.append(f"        {n.code}")
    return "\n".join(lines) + "\n"


def diff_text(before: str, after: str, before_name: str, after_name: str) -> str:
    """The text of ``NN_<stage>.diff``: the unified diff (2 lines of context) between two stage files."""
    a = before.splitlines()
    b = after.splitlines()
    return "\n".join(difflib.unified_diff(a, b, fromfile=before_name, tofile=after_name, lineterm="", n=2)) + "\n"


def format_summary(head: list[str], numbers: dict[str, Any]) -> str:
    """The text of ``summary.txt``: ``head`` lines, the per-component table, the skipped sites."""
    header = ("component", "linears", "lora sites", "fused", "skipped", "trainable params")
    table = [header]
    for c in numbers["components"]:
        table.append((c["component"], str(c["linears"]), str(c["sites"]), str(c["fused"]), str(c["skipped"]),
                      f"{c['trainable_params']:,}"))
    t = numbers["total"]
    table.append(("total", str(t["linears"]), str(t["sites"]), str(t["fused"]), str(t["skipped"]),
                  f"{t['trainable_params']:,}"))
    lines = list(head) + [""]
    lines += [line.rstrip() for line in format_table(table, align="l" + "r" * (len(header) - 1))]
    trainable, total = numbers["trainable_params"], numbers["total_params"]
    lines.append(f"trainable params: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)")
    if trainable != t["trainable_params"]:
        lines.append(f"  (LoRA matrices {t['trainable_params']:,}; modules_to_save copies "
                     f"{trainable - t['trainable_params']:,})")
    skipped = numbers["skipped_sites"]
    lines.append("")
    lines.append(f"skipped sites ({len(skipped)})" + (":" if skipped else ""))
    for s in skipped:
        layer = "-" if s["layer"] is None else s["layer"]
        lines.append(f"  {s['name']} [{s['component']} {s['role']} layer {layer}]: {s['reason']}")
    return "\n".join(lines) + "\n"


def _dot_quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _node_label(name: str, attrs: Mapping[str, Any]) -> str:
    n = attrs.get("linears", 0)
    text = f"{name}\\n{n} linear{'' if n == 1 else 's'}, {attrs.get('sites', 0)} LoRA"
    if attrs.get("fused"):
        text += f", {attrs['fused']} fused"
    if attrs.get("skipped"):
        text += f"\\n{attrs['skipped']} skipped"
    return text


def component_map_dot(graph, title: str) -> str:
    """Hand-written DOT text for the component map (clusters per component)."""
    lines = [
        "digraph graphlora_component_map {",
        f"  graph [rankdir=TB, newrank=true, fontname=\"Helvetica\", fontsize=12, labelloc=t, "
        f"label={_dot_quote(title)}];",
        "  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\", fontsize=10];",
        "  edge [color=\"#555555\", arrowsize=0.6];",
    ]
    by_component: dict[str, list[str]] = collections.defaultdict(list)
    for name, attrs in graph.nodes(data=True):
        by_component[attrs.get("component", "other")].append(name)
    for comp in [c for c in COMPONENTS if c in by_component] + [c for c in by_component if c not in COMPONENTS]:
        lines.append(f"  subgraph {_dot_quote('cluster_' + comp)} {{")
        colour = component_colour(comp)
        lines.append(f"    label={_dot_quote(comp)}; style=filled; color={_dot_quote(colour)};")
        for name in by_component[comp]:
            attrs = graph.nodes[name]
            tooltip = (f"{name}: {attrs.get('linears', 0)} linears, {attrs.get('sites', 0)} LoRA sites, "
                       f"{attrs.get('fused', 0)} fused, {attrs.get('skipped', 0)} skipped, "
                       f"{attrs.get('lora_params', 0):,} LoRA params")
            lines.append(f"    {_dot_quote(name)} [label=\"{_node_label(name, attrs)}\", "
                         f"fillcolor={_dot_quote(status_colour(attrs))}, tooltip={_dot_quote(tooltip)}];")
        lines.append("  }")
    for src, dst, attrs in graph.edges(data=True):
        tooltip = f"{src} -> {dst}: {attrs.get('tensors', 1)} tensor uses"
        lines.append(f"  {_dot_quote(src)} -> {_dot_quote(dst)} [tooltip={_dot_quote(tooltip)}];")
    # Invisible edges keep the reading order vision -> projector -> language (+ cross-attention) -> head:
    # without them the first language layers, which read only the token embeddings, float to the top.
    order = lambda name: graph.nodes[name].get("order") or 0  # noqa: E731
    steps = [["vision"], ["projector"], ["cross_attention", "language"], ["head"]]
    previous = None
    for step in steps:
        names = sorted((n for c in step for n in by_component.get(c, [])), key=order)
        if not names:
            continue
        if previous is not None and not graph.has_edge(previous, names[0]):
            lines.append(f"  {_dot_quote(previous)} -> {_dot_quote(names[0])} [style=invis];")
        previous = names[-1]
    lines.append("}")
    return "\n".join(lines) + "\n"


def run_graphviz(dot_text: str, timeout: float = 120.0) -> str | None:
    """SVG from Graphviz's ``dot`` (None when it is not installed or fails)."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0 or "<svg" not in done.stdout:
        return None
    return done.stdout

