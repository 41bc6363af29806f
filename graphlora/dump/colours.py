"""The colours of the component map, one table for the DOT file and the HTML page.

A component (vision, projector ...) has a band or cluster colour; a group box is coloured by its
LoRA status: green when it has LoRA sites not all fused, blue when all its sites are fused, orange
when it has only skipped sites, grey when it has no LoRA. Both ``render.component_map_dot`` and
``html.render_html`` (its legend and the drawing made without Graphviz) read these.
"""

from __future__ import annotations

from typing import Any, Mapping

#: Band / cluster colour of each component.
COMPONENT_COLOURS: dict[str, str] = {
    "vision": "#dbe9f6", "projector": "#f3e1f7", "cross_attention": "#fde9d9",
    "language": "#e2f0d9", "head": "#fff2cc", "other": "#eeeeee",
}
#: Band colour of a component missing from :data:`COMPONENT_COLOURS`.
DEFAULT_COMPONENT_COLOUR = "#eeeeee"

#: Box colour of each LoRA status (:func:`status_of`).
STATUS_COLOURS: dict[str, str] = {
    "lora": "#9fd8a4", "fused": "#7fc7e8", "skipped": "#f6c28b", "none": "#f2f2f2",
}
#: The legend of the statuses, in the order the page shows it.
STATUS_LEGEND: tuple[tuple[str, str], ...] = (
    ("lora", "has LoRA sites"), ("fused", "all sites fused"), ("skipped", "only skipped sites"), ("none", "no LoRA"),
)


def component_colour(component: str) -> str:
    return COMPONENT_COLOURS.get(component, DEFAULT_COMPONENT_COLOUR)


def status_of(attrs: Mapping[str, Any]) -> str:
    """``lora``, ``fused``, ``skipped`` or ``none`` for a component-map node's attributes."""
    if attrs.get("sites"):
        return "lora" if attrs.get("fused", 0) < attrs["sites"] else "fused"
    if attrs.get("skipped"):
        return "skipped"
    return "none"


def status_colour(attrs: Mapping[str, Any]) -> str:
    return STATUS_COLOURS[status_of(attrs)]
