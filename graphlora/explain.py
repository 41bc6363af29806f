"""``graphlora.explain(model, policy)``: what the policy does to each linear, without training anything."""

from __future__ import annotations

from typing import Any

import torch

from graphlora.report import ExplainRow, explain_program


def explain(model: torch.nn.Module, policy: Any = None, example_inputs: dict[str, Any] | None = None) -> list[ExplainRow]:
    """Rows with ``name, component, role, layer, targeted, r, alpha, reason`` for every linear.

    The model is rewritten on the side (its parameters are frozen as by :func:`graphlora.rewrite`);
    the returned rows are the decisions of that rewrite.
    """
    from graphlora.rewrite import rewrite

    lora_model = rewrite(model, policy, example_inputs)
    return explain_program(lora_model.programs()[0])
