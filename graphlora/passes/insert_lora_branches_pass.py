"""Insert the LoRA branch ``y + s * B(A(dropout(x)))`` after every targeted linear.

Reads: the site decisions on labelled ``aten.linear`` nodes; the site table (site name -> scale and
dropout) and the live LoRA parameters ``<site>.lora_A.weight`` / ``<site>.lora_B.weight``. Writes, for
each targeted node ``y = aten.linear(x, W, b)``, the fixed node sequence (docs/graph-format.md)::

    cast_in  = aten.to.dtype(x, lora_dtype)          # PEFT casts x to lora_A's dtype
    dropout  = aten.dropout(cast_in, p, training)    # identity when p == 0 or in eval mode
    lora_a   = aten.linear(dropout, A)
    lora_b   = aten.linear(lora_a, B)
    scale    = aten.mul.Tensor(lora_b, s)
    add      = aten.add.Tensor(y, scale)             # in the promoted dtype, as PEFT
    cast_out = aten.to.dtype(add, y.dtype)           # replaces y for all of y's users

every node tagged ``graphlora.site`` = site name and ``graphlora.lora_step`` = its step (the base linear
is step ``base``), and placeholders for LoRA parameters the program lacks. Guarantees: each targeted
node has exactly one branch (sites refused at rewrite time, listed in ``skipped_sites``, get none); nodes carry fake values; the branch matches the eager ``W + s B A``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graphlora import structure
from graphlora.errors import GraphLoraError
from graphlora.fx_utils import propagate_fake_value
from graphlora.labels import LORA_STEPS, PARAM_STEP, get_decision, graph_meta, labelled_nodes, set_base_node, set_site_step
from graphlora.lora import EXPERT_LAYOUTS
from graphlora.trace import Program, fake_mode_of

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class BranchSpec:
    """What the insertion pass needs to know about one site."""

    scale: float
    dropout: float
    a_fqn: str
    b_fqn: str
    layout: str = "out_in"  # the site's weight layout; expert layouts adapt the parameter itself


class InsertLoraBranchesPass(PassBase):
    name = "insert_lora_branches"

    def __init__(self, program: Program, branches: dict[str, BranchSpec], live: torch.nn.Module, training: bool,
                 refused: frozenset[str] = frozenset()):
        super().__init__()
        self.program = program
        self.branches = branches
        self.refused = refused  # sites the policy chose that were refused (reported in skipped_sites)
        self.live = live
        self.training = training

    def _param_node(self, fqn: str, fake_mode) -> torch.fx.Node:
        node = self._params.get(fqn)
        if node is None:
            node = self.program.add_param_placeholder(fqn, self.live.get_parameter(fqn), fake_mode)
            self._params[fqn] = node
        return node

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        fake_mode = fake_mode_of(graph)
        self._params = {fqn: node for node, fqn in graph_meta(graph_module).param_placeholders(graph).items()}
        targets = [(n, lab) for n, lab in labelled_nodes(graph) if (d := get_decision(n)) is not None and d.targeted]
        adapted_params: set[str] = set()
        for node, labels in targets:
            site = labels.module
            spec = self.branches.get(site)
            if spec is None and site in self.refused:
                continue
            if spec is None:
                raise GraphLoraError(
                    f"this trace selects {site}, which got no LoRA parameters when the model was rewritten; "
                    "rewrite the model with example inputs that exercise it"
                )
            if spec.layout in EXPERT_LAYOUTS:
                if site not in adapted_params:  # one weight, however many matmuls read (slices of) it
                    adapted_params.add(site)
                    self._adapt_parameter(graph, site, self._weight_placeholder(node, site), spec, fake_mode)
                continue
            a_node, b_node = self._param_node(spec.a_fqn, fake_mode), self._param_node(spec.b_fqn, fake_mode)
            x = node.args[0]
            y_dtype = node.meta["val"].dtype
            lora_dtype = a_node.meta["val"].dtype
            with graph.inserting_before(node.next):  # inserting_after(node) repeatedly would reverse the order
                cast_in = graph.call_function(aten.to.dtype, (x, lora_dtype))
                dropout = graph.call_function(aten.dropout.default, (cast_in, spec.dropout, self.training))
                lora_a = graph.call_function(aten.linear.default, (dropout, a_node))
                lora_b = graph.call_function(aten.linear.default, (lora_a, b_node))
                scale = graph.call_function(aten.mul.Tensor, (lora_b, spec.scale))
                add = graph.call_function(aten.add.Tensor, (node, scale))
                cast_out = graph.call_function(aten.to.dtype, (add, y_dtype))
            node.replace_all_uses_with(cast_out, delete_user_cb=lambda user: user is not add)
            for step, n in zip(LORA_STEPS, (node, cast_in, dropout, lora_a, lora_b, scale, add, cast_out)):
                set_site_step(n, site, step)
                set_base_node(n, node.name)
                if step != "base":
                    n.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
                    propagate_fake_value(n, fake_mode)
        return PassResult(graph_module, bool(targets))

    def _weight_placeholder(self, node: torch.fx.Node, site: str) -> torch.fx.Node:
        """The parameter placeholder a matmul's weight operand is (a view or slice of); placeholder targets are
        relative to the traced module (a block program's), labels are not."""
        param_of = {ph: fqn for fqn, ph in self._params.items()}
        for arg in node.args[:2]:
            found = structure.param_behind(arg, param_of)
            if found is not None:
                return self._params[found[0]]
        raise GraphLoraError(f"expert site {site}: its matmul {node.name} reads no parameter placeholder")

    def _adapt_parameter(self, graph: torch.fx.Graph, site: str, weight: torch.fx.Node, spec: BranchSpec,
                         fake_mode) -> None:
        """Every use of the weight placeholder reads ``W + s delta(A, B)`` instead (PEFT's ParamWrapper), with
        ``delta`` as :func:`graphlora.lora.param_delta` computes it."""
        a_node, b_node = self._param_node(spec.a_fqn, fake_mode), self._param_node(spec.b_fqn, fake_mode)
        w_val = weight.meta["val"]
        experts = int(w_val.shape[0])
        first_use = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first_use):
            a3 = graph.call_function(aten.view.default, (a_node, [experts, -1, int(a_node.meta["val"].shape[-1])]))
            b2 = graph.call_function(aten.view.default, (b_node, [int(b_node.meta["val"].shape[0]), -1, experts]))
            b3 = graph.call_function(aten.permute.default, (b2, [2, 0, 1]))
            delta = graph.call_function(aten.bmm.default, (b3, a3))
            steps = [a3, b2, b3, delta]
            if spec.layout == "experts_t":
                delta = graph.call_function(aten.transpose.int, (delta, 1, 2))
                steps.append(delta)
            scaled = graph.call_function(aten.mul.Tensor, (delta, spec.scale))
            cast = graph.call_function(aten.to.dtype, (scaled, w_val.dtype))
            adapted = graph.call_function(aten.add.Tensor, (weight, cast))
            steps += [scaled, cast, adapted]
        weight.replace_all_uses_with(adapted, delete_user_cb=lambda user: user is not adapted)
        for n in steps:
            set_site_step(n, site, PARAM_STEP)
            set_base_node(n, weight.name)
            propagate_fake_value(n, fake_mode)
