"""How a rewritten model runs: its trace mode, and one record per part saying how that part runs.

Reads: nothing but a module's forward hooks (:func:`captures_below`). Writes: nothing; the planners
(graphlora/planner.py, block_planner.py, region_planner.py) store these records on the model
(``lora_model.trace_mode``, ``lora_model.regions``).

Guarantees: :data:`TRACE_MODE_CHOICES` is the one list of values ``rewrite(trace_mode=...)`` accepts;
:func:`captures_below` is the one test, shared by block and region planning, of whether a module's
inner modules record outputs through transformers' hooks (such a module cannot be a program: inside
it the hooks would not fire).
"""

from __future__ import annotations

import dataclasses
import enum

import torch

from graphlora.verify import Verification


class TraceMode(enum.StrEnum):
    """How a rewritten model runs (``lora_model.trace_mode``)."""

    BLOCKS = "blocks"
    WHOLE = "whole"
    REGIONAL = "regional"


#: ``rewrite(trace_mode=...)`` values: a mode; "auto" (block programs when the model has repeated blocks, else
#: "whole_or_regional"); "whole_or_regional" (one whole-model program, regional tracing when it does not export
#: or differs from eager). "whole" and "regional" never fall back.
AUTO = "auto"
WHOLE_OR_REGIONAL = "whole_or_regional"
TRACE_MODE_CHOICES = (AUTO,) + tuple(m.value for m in TraceMode) + (WHOLE_OR_REGIONAL,)


class RegionMode(enum.StrEnum):
    """How one part of the model runs (``RegionInfo.mode``)."""

    GRAPH = "graph"  # a traced program
    EAGER = "eager"  # eagerly, with module-level LoRA
    SPLIT = "split"  # not traced itself: its children were tried one by one


@dataclasses.dataclass
class RegionInfo:
    """How one part of the model runs: a traced ``graph`` or ``eager`` (with module-level LoRA).

    ``path`` is ``""`` for the whole model (whole-model tracing; in blocks and regional mode the glue),
    else a submodule's path (a block or a region). ``reason`` says why a part is eager or which block
    class program runs it; ``verification`` how its trace compared with eager.
    """

    path: str
    mode: RegionMode
    reason: str = ""
    verification: Verification | None = None

    def describe(self) -> str:
        where = self.path or "<whole model>"
        text = f"{where}: {self.mode}"
        if self.reason:
            text += f" ({self.reason})"
        return text


def _captured_key(hook) -> str | None:
    """The output key a transformers output-capturing hook records ("hidden_states" ...), else None."""
    if getattr(hook, "__module__", "") != "transformers.utils.output_capturing":
        return None
    code, cells = getattr(hook, "__code__", None), getattr(hook, "__closure__", None) or ()
    names = code.co_freevars if code is not None else ()
    for name, cell in zip(names, cells):
        if name == "key":
            return cell.cell_contents
    return "unknown"


def captures_below(module: torch.nn.Module) -> bool:
    """Whether a strict descendant records outputs through transformers' capturing hooks.

    Attention maps (only recorded for ``output_attentions=True``) do not count: they are not
    returned for modules inside traced programs (docs/tracing.md).
    """
    for name, sub in module.named_modules():
        if name and any(_captured_key(h) not in (None, "attentions") for h in sub._forward_hooks.values()):
            return True
    return False


__all__ = ["RegionInfo", "TRACE_MODE_CHOICES", "TraceMode", "captures_below"]
