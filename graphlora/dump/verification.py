"""The dump's line on the eager comparison: ``verification against eager: ...`` and its details.

Reads what ``rewrite()`` recorded (``lora_model.verification``: each traced unit against eager,
outputs and LoRA gradients). When it recorded no comparison that ran, runs
:func:`graphlora.verify.compare_outputs` itself: the rewritten program (LoRA B is zero) against the
original model on the example batch, loss and logits. On the meta device nothing can be compared
(:data:`META_NOTE`). Returns the line for ``summary.txt`` and the details for ``summary.json``, and
logs the line as progress; a comparison that fails to run is reported in the line, never raised.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import torch

from graphlora.dump.progress import first_line, say
from graphlora.verify import compare_outputs

META_NOTE = "verification against eager skipped on the meta device"


def verification_line(model: torch.nn.Module, lora_model, inputs: Mapping[str, Any], *, meta: bool,
                      verify: bool) -> tuple[str, dict]:
    """(the summary's verification line, its details) for this dump, logging the line."""
    if meta:
        say(META_NOTE)
        return META_NOTE, {}
    if not verify:
        return "verification against eager: not requested", {}
    checks = _rewrite_checks(lora_model)
    if checks:
        # rewrite() compared its traced program(s) with eager already (outputs and LoRA gradients).
        line, details = _describe_rewrite_checks(checks)
        say(line)
        return line, details
    t0 = time.perf_counter()
    line, details = _verify_against_eager(model, lora_model, inputs)
    say(f"{line} ({time.perf_counter() - t0:.1f} s)")
    return line, details


def _rewrite_checks(lora_model) -> list:
    """The eager comparisons rewrite() made (``lora_model.verification``), when it records them."""
    checks = getattr(lora_model, "verification", None)
    if not isinstance(checks, (list, tuple)) or not checks:
        return []
    if not all(hasattr(c, "passed") and hasattr(c, "describe") for c in checks):
        return []
    if all(getattr(c, "note", "") for c in checks):  # every check was skipped: compare here instead
        return []
    return list(checks)


def _describe_rewrite_checks(checks: list) -> tuple[str, dict]:
    details = {"rewrite": [dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c.describe() for c in checks]}
    compared = [c for c in checks if not getattr(c, "note", "")]
    failed = [c for c in compared if not c.passed]
    units = [getattr(c, "unit", "") for c in compared]
    where = "the whole model" if units == [""] else f"{len(units)} traced unit{'s' if len(units) != 1 else ''}"
    if failed:
        return "verification against eager: MISMATCH (" + "; ".join(c.describe() for c in failed) + ")", details
    return f"verification against eager: ok (outputs and LoRA gradients of {where} match eager)", details


def _verify_against_eager(model: torch.nn.Module, lora_model, inputs: Mapping[str, Any]) -> tuple[str, dict]:
    """Run the rewritten program (LoRA B = 0) and the original model on the same batch and compare."""
    observer = lora_model.observer
    lora_model.observer = None  # a re-trace here is not part of the dump
    try:
        check = compare_outputs("", lambda: lora_model(**inputs), lambda: model(**inputs))
    except Exception as e:  # noqa: BLE001 - report, do not fail the dump
        return f"verification against eager failed to run: {type(e).__name__}: {first_line(e)}", {}
    finally:
        lora_model.observer = observer
    details: dict[str, Any] = dict(check.outputs)
    if not details:
        return "verification against eager: no loss or logits to compare", details
    names = " and ".join(details)
    if check.passed:
        return f"verification against eager: ok ({names} match the original model)", details
    note = " (the model is in training mode: dropout may explain it)" if model.training else ""
    return f"verification against eager: MISMATCH in {names}{note}", details
