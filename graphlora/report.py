"""Human-readable reports of a rewrite: one row per matmul (``explain``) and per-component totals."""

from __future__ import annotations

import collections
import dataclasses

from graphlora.labels import COMPONENTS, get_decision, labelled_nodes
from graphlora.text_table import format_table
from graphlora.trace import Program


@dataclasses.dataclass(frozen=True)
class ExplainRow:
    """What graphlora decided for one linear (or other trainable matmul) and why."""

    name: str
    component: str
    role: str
    layer: int | None
    targeted: bool
    r: int | None
    alpha: float | None
    reason: str
    skipped: bool = False
    #: ``component/role`` by the module-name rules where they disagree with the structural labels, else None.
    names_say: str | None = None
    #: The base layer's quantization (``nf4 (double quant, compute bfloat16)``, ``int8 (threshold 6)``), else None.
    quantization: str | None = None


def explain_program(program: Program) -> list[ExplainRow]:
    """One row per labelled module of a traced program (a module called twice is one row)."""
    rows: dict[str, ExplainRow] = {}
    for node, labels in labelled_nodes(program.graph_module.graph):
        decision = get_decision(node)
        targeted = bool(decision and decision.targeted)
        previous = rows.get(labels.module)
        if previous is not None and (previous.targeted or not targeted):
            continue
        rows[labels.module] = ExplainRow(
            name=labels.module,
            component=str(labels.component),
            role=str(labels.role),
            layer=labels.layer,
            targeted=targeted,
            r=decision.r if targeted else None,
            alpha=decision.alpha if targeted else None,
            reason=decision.reason if decision else "not decided",
            skipped=bool(decision and decision.skipped),
        )
    return list(rows.values())


def format_explain(rows: list[ExplainRow]) -> str:
    """A fixed-width table of explain rows (with a ``names say`` column when names and structure disagree, and a
    ``quantization`` column when any base layer is quantized)."""
    disagree = any(row.names_say for row in rows)
    quantized = any(row.quantization for row in rows)
    header = ("module", "component", "role", "layer", "lora", "r", "alpha") + (("names say",) if disagree else ()) + \
        (("quantization",) if quantized else ()) + ("reason",)
    table = [header]
    for row in rows:
        table.append((
            row.name, row.component, row.role, "-" if row.layer is None else str(row.layer),
            "yes" if row.targeted else ("skipped" if row.skipped else "no"),
            "-" if row.r is None else str(row.r),
            "-" if row.alpha is None else f"{row.alpha:g}",
        ) + ((row.names_say or "-",) if disagree else ()) + ((row.quantization or "float",) if quantized else ())
            + (row.reason,))
    return "\n".join(format_table(table, pad_last=False))


def component_table(lora_model) -> str:
    """Sites per component with trainable parameter counts, and the model's trainable/total totals."""
    rows = lora_model.explain_rows()
    linears = collections.Counter(r.component for r in rows)
    sites = collections.Counter(s.component for s in lora_model.sites)
    skipped = collections.Counter(s.component for s in lora_model.skipped_sites)
    lora_params: collections.Counter = collections.Counter()
    for site in lora_model.sites:
        module = lora_model.get_submodule(site.module)
        lora_params[site.component] += module.lora_A.weight.numel() + module.lora_B.weight.numel()
    header = ("component", "linears", "lora sites", "skipped", "lora params")
    table = [header]
    for comp in COMPONENTS:
        if linears[comp] or sites[comp]:
            table.append((comp, str(linears[comp]), str(sites[comp]), str(skipped[comp]), f"{lora_params[comp]:,}"))
    table.append(("total", str(sum(linears.values())), str(len(lora_model.sites)),
                  str(len(lora_model.skipped_sites)), f"{sum(lora_params.values()):,}"))
    lines = format_table(table, align="l" + "r" * (len(header) - 1))
    trainable, total = lora_model.trainable_parameters()
    lines.append(f"trainable params: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)")
    return "\n".join(lines)
