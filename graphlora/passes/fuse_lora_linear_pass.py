"""Replace each LoRA branch by one fused ``graphlora::lora_linear`` op (grouped when sites share x).

Reads: the LoRA branches tagged by ``insert_lora_branches`` (``graphlora.site`` / ``graphlora.lora_step``
/ ``graphlora.base_node``), checked step by step against the fixed sequence of docs/graph-format.md.
Writes: for each eligible branch, ``torch.ops.graphlora.lora_linear(x, W, b, A, B, s, p, seed)`` in
place of its nodes; branches that read the same ``x`` with the same dropout (q/k/v, gate/up) become one
``torch.ops.graphlora.lora_linear_group`` (one read of x for all down-projections) and ``getitem``
nodes. A dropout seed is drawn per call (``aten.randint``) when the program trains with dropout > 0.
Fused nodes carry the site's labels and decision, and ``graphlora.lora_step = "fused"``.
``GraphMeta.fusion = {site: {"fused": bool, "reason": str}}`` records every
site, with the reason a branch was left as it is. Guarantees: the program computes the same function
as before (the op follows PEFT's numerics; masks come from graphlora's counter-based generator).
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

import graphlora.ops  # noqa: F401 - registers torch.ops.graphlora.*
from graphlora.fusion_default import QUANTIZED_BASE_REASON
from graphlora.fx_utils import propagate_fake_value
from graphlora.labels import (LORA_STEPS, PARAM_STEP, get_base_node, get_decision, get_labels, get_site_step, graph_meta,
                              set_base_node, set_decision, set_fusion_group, set_labels, set_site_step)
from graphlora.structure import QUANTIZED_LINEAR_OPS
from graphlora.trace import fake_mode_of

aten = torch.ops.aten
_SEED_HIGH = 2**31 - 1
_FUSABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def collect_branches(graph: torch.fx.Graph) -> dict[str, dict[str, torch.fx.Node]]:
    """base node name -> {step: node} for every LoRA branch of the graph."""
    branches: dict[str, dict[str, torch.fx.Node]] = defaultdict(dict)
    for node in graph.nodes:
        tag = get_site_step(node)
        if tag is None:
            continue
        base = get_base_node(node)
        branches[base][tag[1]] = node
    return dict(branches)


def _branch_problem(steps: dict[str, torch.fx.Node]) -> str | None:
    """Why this branch does not have the exact shape the fused op implements (None if it does)."""
    if PARAM_STEP in steps:
        return "an expert parameter's LoRA: added to the weight (W + s delta), not a branch on an activation"
    if any(step not in steps for step in LORA_STEPS):
        return "the branch is incomplete (an earlier pass changed it)"
    base, cast_in, drop, la, lb, sc, add, out = (steps[s] for s in LORA_STEPS)
    if base.target in QUANTIZED_LINEAR_OPS:
        return QUANTIZED_BASE_REASON
    if base.target != aten.linear.default:
        return f"its base op is {base.target} (a raw parameter matmul), not a linear"
    x = base.args[0]
    if (cast_in.args[0] is not x or drop.args[0] is not cast_in or la.args[0] is not drop
            or lb.args[0] is not la or sc.args[0] is not lb or add.args[0] is not base or add.args[1] is not sc
            or out.args[0] is not add):
        return "the branch was rewired by an earlier pass"
    if set(base.users) != {add} or set(cast_in.users) != {drop}:
        return "intermediate values of the branch are used elsewhere"
    if not isinstance(sc.args[1], (int, float)):
        return "the scale is not a constant"
    x_val, out_val = x.meta.get("val"), out.meta.get("val")
    if not isinstance(x_val, torch.Tensor) or x_val.dtype not in _FUSABLE_DTYPES:
        return f"x has dtype {getattr(x_val, 'dtype', None)}"
    if out_val is None or out_val.dtype != x_val.dtype:
        return f"the output dtype {getattr(out_val, 'dtype', None)} differs from x's {x_val.dtype}"
    return None


class FuseLoraLinearPass(PassBase):
    name = "fuse_lora_linear"

    def __init__(self, autocast: bool = False, horizontal: bool = True, skip_reason: str | None = None):
        super().__init__()
        self.autocast = autocast
        self.horizontal = horizontal
        #: When set, no branch is fused and every site is reported with this reason (the op has no fast
        #: kernels on the program's device: its reference implementation is slower than the unfused branch).
        self.skip_reason = skip_reason

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        report: dict[str, dict] = {}
        eligible = []
        for steps in collect_branches(graph).values():
            site = get_site_step(steps.get("base") or next(iter(steps.values())))[0]
            problem = self.skip_reason or (
                "autocast is on: the fused op has no autocast rule, so the unfused branch runs"
                if self.autocast else _branch_problem(steps))
            if problem is not None:
                report[site] = {"fused": False, "reason": problem}
                continue
            eligible.append((site, steps))

        groups: dict[tuple, list] = defaultdict(list)
        for site, steps in eligible:
            drop = steps["dropout"]
            p, train = float(drop.args[1]), bool(drop.args[2])
            groups[(steps["base"].args[0], p if train else 0.0)].append((site, steps))

        fake_mode = fake_mode_of(graph)
        for (_, p), members in groups.items():
            # x is read now, not when grouping: when one site feeds another (Mistral 3's patch merger into
            # the projector), fusing the first replaces the node the second reads.
            x = members[0][1]["base"].args[0]
            if self.horizontal and len(members) >= 2:
                self._fuse_group(graph, x, p, members, fake_mode)
                for site, _ in members:
                    report[site] = {"fused": True, "reason": f"grouped with {len(members) - 1} site(s) reading the same input"}
            else:
                for site, steps in members:
                    self._fuse_one(graph, x, p, site, steps, fake_mode)
                    report[site] = {"fused": True, "reason": "fused"}
        graph_meta(graph_module).fusion = report
        return PassResult(graph_module, bool(eligible))

    # -- rewriting ---------------------------------------------------------------------------
    @staticmethod
    def _operands(steps):
        base = steps["base"]
        weight = base.args[1]
        bias = base.args[2] if len(base.args) > 2 else None
        return weight, bias, steps["lora_a"].args[1], steps["lora_b"].args[1], float(steps["scale"].args[1])

    @staticmethod
    def _seed(graph, x, p, fake_mode):
        if p <= 0.0:
            return None
        device = x.meta["val"].device
        seed = graph.call_function(aten.randint.low, (0, _SEED_HIGH, [1]), {"dtype": torch.int64, "device": device})
        propagate_fake_value(seed, fake_mode)
        return seed

    @staticmethod
    def _retag(new: torch.fx.Node, site: str, steps) -> None:
        base = steps["base"]
        labels, decision = get_labels(base), get_decision(base)
        if labels is not None:
            set_labels(new, labels)
        if decision is not None:
            set_decision(new, decision)
        set_site_step(new, site, "fused")
        set_base_node(new, base.name)
        new.meta["nn_module_stack"] = dict(base.meta.get("nn_module_stack", {}))

    @staticmethod
    def _erase(graph, steps) -> None:
        for step in reversed(LORA_STEPS):  # users before their inputs
            graph.erase_node(steps[step])

    def _fuse_one(self, graph, x, p, site, steps, fake_mode) -> None:
        weight, bias, lora_a, lora_b, scale = self._operands(steps)
        with graph.inserting_before(steps["cast_out"]):
            seed = self._seed(graph, x, p, fake_mode)
            fused = graph.call_function(torch.ops.graphlora.lora_linear.default,
                                        (x, weight, bias, lora_a, lora_b, scale, p, seed))
        propagate_fake_value(fused, fake_mode)
        self._retag(fused, site, steps)
        steps["cast_out"].replace_all_uses_with(fused)
        self._erase(graph, steps)

    def _fuse_group(self, graph, x, p, members, fake_mode) -> None:
        operands = [self._operands(steps) for _, steps in members]
        weights, biases, lora_as, lora_bs, scales = (list(t) for t in zip(*operands))
        anchor = x.next
        while anchor.op == "placeholder":  # x is a graph input: start after the placeholders
            anchor = anchor.next
        with graph.inserting_before(anchor):  # every operand exists once x does
            seed = self._seed(graph, x, p, fake_mode)
            group = graph.call_function(torch.ops.graphlora.lora_linear_group.default,
                                        (x, weights, biases, lora_as, lora_bs, scales, p, seed))
            outs = [graph.call_function(operator.getitem, (group, i)) for i in range(len(members))]
        propagate_fake_value(group, fake_mode)
        set_fusion_group(group, [site for site, _ in members])
        for out, (site, steps) in zip(outs, members):
            propagate_fake_value(out, fake_mode)
            self._retag(out, site, steps)
            steps["cast_out"].replace_all_uses_with(out)
        for _, steps in members:
            self._erase(graph, steps)
