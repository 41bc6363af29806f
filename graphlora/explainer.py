"""``graphlora.explain(model, policy)``: what the policy does to each linear, without training anything."""

from __future__ import annotations

from typing import Any

import torch

from graphlora.report import ExplainRow


def explain(model: torch.nn.Module, policy: Any = None, example_inputs: dict[str, Any] | None = None) -> list[ExplainRow]:
    """Rows with ``name, component, role, layer, targeted, r, alpha, reason`` for every linear.

    The model is rewritten on the side and the returned rows are the decisions of that rewrite; the
    model's parameters keep their ``requires_grad`` flags.
    """
    from graphlora.rewriter import rewrite

    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        lora_model = rewrite(model, policy, example_inputs)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return lora_model.explain_rows()
