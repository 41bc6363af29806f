"""Structural analysis of a traced VLM: what each trainable matmul computes from, and where it sits.

Everything here reads the graph (dataflow, op types, module-stack *shape*) and never module names:

* **sources** — which user inputs carry pixels (floating inputs other than ``inputs_embeds``; audio
  inputs are their own modality) and which carry the token stream (``input_ids`` / ``inputs_embeds``,
  the token-id inputs of the HF forward API);
* **dependencies** — for every node, the set of modalities it is computed from;
* **trainable matmuls** — ``aten.linear`` (and graphlora's quantized linear ops) and ``matmul``/``mm``/``bmm`` nodes whose weight is a
  parameter placeholder (possibly viewed/transposed/cast), with their kind (nn.Linear, F.linear on a
  parameter, raw parameter matmul, 3-D expert matmul);
* **blocks** — repeated modules: the outermost module of a node's module stack that is an integer-indexed
  child (a ModuleList / Sequential element) and contains more than a single leaf;
* **attention cores** — ``scaled_dot_product_attention`` calls, or the eager ``q @ k^T -> softmax ->
  @ v`` pattern, whose q/k/v inputs and output say which projections are q, k, v, qkv and o;
* **MLP wiring** — which projections feed a later projection through activations and products (up,
  gate, gate_up -> down).
"""

from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict, deque
from typing import Iterable

import torch
import torch.fx

import graphlora.ops.quantized_linear  # noqa: F401 - registers torch.ops.graphlora.linear_4bit / linear_8bit
import graphlora.ops.segment_attention  # noqa: F401 - registers torch.ops.graphlora.segment_attention

aten = torch.ops.aten

IMAGE, TEXT, AUDIO = "image", "text", "audio"

#: bitsandbytes layers of the mirror (graphlora/quantized.py): ``op(x, weight, bias, ...)`` like ``aten.linear``.
QUANTIZED_LINEAR_OPS = {torch.ops.graphlora.linear_4bit.default, torch.ops.graphlora.linear_8bit.default}
LINEAR_OPS = {aten.linear.default} | QUANTIZED_LINEAR_OPS
MATMUL_OPS = {aten.matmul.default, aten.mm.default, aten.bmm.default}
#: Ops through which a parameter stays "the weight" of a matmul.
WEIGHT_VIEW_OPS = {
    aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default, aten.reshape.default,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.expand.default, aten.contiguous.default,
    aten.type_as.default, aten.clone.default, aten.alias.default,
}
#: Ops that take part of a parameter: the result is a slice of the weight, not a computed activation.
WEIGHT_SLICE_OPS = {aten.slice.Tensor, aten.narrow.default, aten.select.int, aten.split.Tensor,
                    aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int, aten.unflatten.int}
#: ``bias + a @ b`` (nn.MultiheadAttention's masked scores: ``baddbmm(mask, q, k^T)``): operands at 1 and 2.
BIAS_MATMUL_OPS = {aten.baddbmm.default}
SDPA_OPS = {aten.scaled_dot_product_attention.default, torch.ops.graphlora.segment_attention.default}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
ACTIVATION_OPS = {
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
    aten.gelu_.default if hasattr(aten, "gelu_") else aten.gelu.default, aten.silu_.default, aten.relu_.default,
    aten.hardswish.default, aten.mish.default, aten.elu.default, aten.leaky_relu.default,
}
PRODUCT_OPS = {aten.mul.Tensor}
#: Ops that route tokens (MoE routers): a projection feeding these is not an MLP up/gate projection.
ROUTING_OPS = {aten.topk.default, aten.sort.default, aten.argmax.default, aten.argsort.default,
               aten.scatter.src, aten.scatter.value, aten.scatter_add.default}
#: A 1-D convolution over the sequence; depthwise (one filter per channel) it is the token mixer of a gated
#: short-convolution layer (LFM2's ShortConv: ``out(C * conv(B * x))`` with ``B, C, x`` chunks of one in-projection).
CONV1D_OPS = {aten.conv1d.default}
SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
             aten.slice.Tensor, aten.narrow.default}


def is_grouped_mm(target) -> bool:
    """A grouped matmul of MoE experts, operands ``(tokens, W^T, offs)``: ``aten._grouped_mm`` or transformers' CPU
    stand-in (``torch.ops.transformers.grouped_mm_fallback``, registered when its MoE integration loads)."""
    if target is aten._grouped_mm.default:
        return True
    return isinstance(target, torch._ops.OpOverload) and target.name().rpartition("::")[2].startswith("grouped_mm")


# ---------------------------------------------------------------------------------------------
# Sources and dependencies
# ---------------------------------------------------------------------------------------------
def input_modality(name: str, value: object) -> str | None:
    """The modality a user input carries: pixels (any floating input), tokens, audio, or None (masks, ids...)."""
    lowered = name.lower()
    if lowered.startswith("input_ids") or lowered.startswith("inputs_embeds"):
        return TEXT
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        return None
    if "audio" in lowered or "input_features" in lowered or "speech" in lowered:
        return AUDIO
    return IMAGE


#: Ops that read a tensor's shape, not its values (an exported graph's dynamic sizes).
SHAPE_OPS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}


def dependencies(graph: torch.fx.Graph, user_inputs: dict[torch.fx.Node, str | None]) -> dict[torch.fx.Node, frozenset]:
    """For every node, the modalities it is (transitively) computed from.

    A tensor's size is not computed from its values: learned latents expanded to the image batch
    (``latents.expand(pixels.shape[0], ...)``, a ``sym_size`` in an exported graph) read no pixels."""
    deps: dict[torch.fx.Node, frozenset] = {}
    empty: frozenset = frozenset()
    for node in graph.nodes:
        if node.op == "placeholder":
            kind = user_inputs.get(node)
            deps[node] = frozenset([kind]) if kind else empty
            continue
        if node.op == "call_function" and node.target in SHAPE_OPS:
            deps[node] = empty
            continue
        acc: set = set()
        for inp in node.all_input_nodes:
            acc |= deps.get(inp, empty)
        deps[node] = frozenset(acc) if acc else empty
    return deps


def vocabulary_sizes(graph: torch.fx.Graph, user_inputs: dict[torch.fx.Node, str | None]) -> set[int]:
    """Rows of the embedding tables that the token inputs index (the vocabulary, as the head's width)."""
    tokens = {n for n, kind in user_inputs.items() if kind == TEXT}
    sizes = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default and len(node.args) >= 2:
            # aten.embedding(weight, indices); a recorded F.embedding(indices, weight): the float 2-D one is the table
            pair = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
            tables = [a for a in pair if isinstance(v := a.meta.get("val"), torch.Tensor) and v.is_floating_point()
                      and v.ndim == 2]
            indices = [a for a in pair if a not in tables]
            if len(tables) == 1 and indices and ancestors(indices) & tokens:
                sizes.add(int(tables[0].meta["val"].shape[0]))
    return sizes


# ---------------------------------------------------------------------------------------------
# Trainable matmuls
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Matmul:
    """A matmul with a trainable weight: the unit graphlora labels and may adapt."""

    node: torch.fx.Node
    #: "linear" (nn.Linear), "param_linear" (F.linear on a parameter), "param_matmul", "expert_matmul",
    #: "param_slice" (a matmul on a slice of a packed 2-D parameter)
    kind: str
    weight: str  # FQN of the weight parameter
    module: str  # module path the op was called from (innermost stack entry)
    x: torch.fx.Node  # the activation input
    #: The site name: the Linear's path for ``linear`` (and for a Linear's weight used by F.linear elsewhere,
    #: as nn.MultiheadAttention does with ``out_proj``), else the parameter's path.
    site: str = ""


def param_behind(arg, param_of: dict[torch.fx.Node, str]) -> tuple[str, bool] | None:
    """``(parameter FQN, sliced)`` when ``arg`` is a view/cast of a parameter, or of a slice of one (the q, k or v
    rows of a packed in-projection, one expert of a 3-D expert tensor), else None."""
    node, sliced = arg, False
    for _ in range(10):
        if not isinstance(node, torch.fx.Node):
            return None
        if node in param_of:
            return param_of[node], sliced
        if node.op == "call_function" and node.args:
            if node.target in WEIGHT_VIEW_OPS:
                node = node.args[0]
                continue
            if node.target in WEIGHT_SLICE_OPS or (node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node)
                                                   and node.args[0].target in WEIGHT_SLICE_OPS):
                node, sliced = node.args[0], True
                continue
        return None
    return None


def trainable_matmuls(gm: torch.fx.GraphModule, param_of: dict[torch.fx.Node, str], stack_prefix: str,
                      module_classes: dict[str, type]) -> list[Matmul]:
    """Every matmul whose weight operand is a parameter, in graph order."""
    from graphlora.name_rules import module_stack

    out = []
    value_of = {fqn: p.meta.get("val") for p, fqn in param_of.items()}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in LINEAR_OPS:
            found = param_behind(node.args[1], param_of)
            if found is None:
                continue
            x = node.args[0]
        elif node.target in MATMUL_OPS or is_grouped_mm(node.target):
            a, b = node.args[0], node.args[1]
            found, x = param_behind(b, param_of), a
            if found is None:
                found, x = param_behind(a, param_of), b
            if found is None:
                continue
        else:
            continue
        weight, sliced = found
        stack = module_stack(node.meta, stack_prefix)
        module = stack[-1].path if stack else ""
        owner = weight.rpartition(".")[0]
        param_val = value_of.get(weight)
        site = weight
        if param_val is not None and param_val.ndim >= 3:
            kind = "expert_matmul"
        elif sliced:
            kind = "param_slice"
        elif node.target in LINEAR_OPS:
            is_linear_weight = weight.rpartition(".")[2] == "weight" and \
                issubclass(module_classes.get(owner, object), torch.nn.Linear)
            kind = "linear" if is_linear_weight and owner == module else "param_linear"
            if is_linear_weight:
                site = owner
        else:
            kind = "param_matmul"
        out.append(Matmul(node, kind, weight, module, x, site))
    return out


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------
def block_of(node: torch.fx.Node, stack_prefix: str) -> tuple[str, str] | None:
    """``(list_path, block_path)`` of the outermost repeated block a node sits in, or None.

    A block is an integer-indexed module (ModuleList/Sequential element) that is not the innermost
    entry of the stack (a bare Linear in a Sequential is not a block).
    """
    from graphlora.name_rules import module_stack

    stack = module_stack(node.meta, stack_prefix)
    for depth, entry in enumerate(stack[:-1]):
        if entry.segment.isdigit():
            return entry.path.rsplit(".", 1)[0], entry.path
    return None


# ---------------------------------------------------------------------------------------------
# Graph walks
# ---------------------------------------------------------------------------------------------
def _walk(starts, step, barrier: set[torch.fx.Node]) -> tuple[set[torch.fx.Node], set[torch.fx.Node]]:
    """Breadth-first walk from ``starts`` along ``step`` (inputs or users), stopping at barrier nodes.

    Returns (non-barrier nodes visited, barrier nodes reached).
    """
    visited, found, seen = set(), set(), set()
    queue = deque(starts)
    while queue:
        n = queue.popleft()
        if n in seen:
            continue
        seen.add(n)
        if n in barrier:
            found.add(n)
            continue
        visited.add(n)
        queue.extend(step(n))
    return visited, found


def ancestors(nodes) -> set[torch.fx.Node]:
    """``nodes`` and every node they (transitively) read."""
    return _walk(nodes, lambda n: n.all_input_nodes, set())[0]


def nearest_upstream(start: torch.fx.Node, barrier: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Barrier nodes reached walking backwards from ``start`` (``start`` itself included if a barrier)."""
    return _walk([start], lambda n: n.all_input_nodes, barrier)[1]


def nearest_downstream(start: torch.fx.Node, barrier: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Barrier nodes reached walking forwards from ``start``'s users (not ``start`` itself)."""
    return _walk(start.users, lambda n: n.users, barrier)[1]


def downstream_until(start: torch.fx.Node, barrier: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Nodes downstream of ``start`` reached without crossing a barrier node (barriers excluded)."""
    return _walk(start.users, lambda n: n.users, barrier)[0]


def nodes_between(src: torch.fx.Node, dst: torch.fx.Node, barrier: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Nodes on paths from ``src`` to ``dst`` that do not cross another barrier node."""
    forward, queue = set(), deque(src.users)
    while queue:
        n = queue.popleft()
        if n in forward or (n in barrier and n is not dst):
            continue
        forward.add(n)
        if n is not dst:
            queue.extend(n.users)
    backward, queue = set(), deque([dst])
    while queue:
        n = queue.popleft()
        if n in backward:
            continue
        backward.add(n)
        queue.extend(i for i in n.all_input_nodes if i in forward)
    return forward & backward


# ---------------------------------------------------------------------------------------------
# Attention cores
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionCore:
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    out: torch.fx.Node


def _through_elementwise(node: torch.fx.Node, targets: set, up: bool, limit: int = 6) -> torch.fx.Node | None:
    """Follow single-input chains (casts, scales, masks) to a node whose op is in ``targets``."""
    current = node
    for _ in range(limit):
        if current.op == "call_function" and current.target in targets:
            return current
        nxt = current.all_input_nodes if up else list(current.users)
        tensors = [n for n in nxt if isinstance(n.meta.get("val"), torch.Tensor)]
        if not tensors:
            return None
        current = tensors[0]
    return None


def _depthwise_conv1d(node: torch.fx.Node) -> bool:
    """``conv1d(x, weight [C, 1, K], groups=C)`` with ``K > 1``: each channel mixed over neighbouring positions."""
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    shape = getattr(weight.meta.get("val"), "shape", None) if isinstance(weight, torch.fx.Node) else None
    return shape is not None and len(shape) == 3 and shape[1] == 1 and shape[2] > 1 and groups == shape[0]


def _conv_mixer(node: torch.fx.Node) -> AttentionCore:
    """A gated short convolution as a token-mixing core: ``y = C * conv(B * x)`` is linear attention with a fixed
    local kernel in place of ``softmax(q k^T)`` (C the query, B the key, x the value): what reaches the convolution
    is the value slot, the gate multiplied into its result the query slot, the result's reader the output."""
    gate, previous, current = None, None, node
    for _ in range(6):  # through the slice / cast after the convolution, to the gating product
        if current.op == "call_function" and current.target in PRODUCT_OPS:
            others = [a for a in current.all_input_nodes if a is not previous]
            gate = others[0] if len(others) == 1 else None
            break
        users = [u for u in current.users if isinstance(u.meta.get("val"), torch.Tensor)]
        if len(users) != 1:
            break
        previous, current = current, users[0]
    return AttentionCore(gate, None, node.args[0], node)


def attention_cores(graph: torch.fx.Graph) -> list[AttentionCore]:
    """Token-mixing cores: ``scaled_dot_product_attention``, eager ``softmax(q k^T) v``, depthwise 1-D convolutions."""
    cores = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in CONV1D_OPS and _depthwise_conv1d(node):
            cores.append(_conv_mixer(node))
        elif node.target in SDPA_OPS:
            q, k, v = node.args[:3]
            cores.append(AttentionCore(q, k, v, node))
        elif node.target in SOFTMAX_OPS:
            scores = _through_elementwise(node.args[0], MATMUL_OPS | BIAS_MATMUL_OPS, up=True)
            probs_user = _through_elementwise(node, MATMUL_OPS, up=False)
            if scores is None or probs_user is None or len(probs_user.args) < 2:
                continue
            q_at = 1 if scores.target in BIAS_MATMUL_OPS else 0
            if len(scores.args) < q_at + 2:
                continue
            cores.append(AttentionCore(scores.args[q_at], scores.args[q_at + 1], probs_user.args[1], probs_user))
    return cores


def attention_roles(cores: list[AttentionCore], matmul_nodes: set[torch.fx.Node],
                    claims=None) -> dict[torch.fx.Node, str]:
    """q / k / v / qkv / o for matmuls feeding or fed by an attention core (no other matmul between).

    ``claims(core, matmul)``, when given, says whether a core may claim a matmul (e.g. only projections inside
    the module that runs the core)."""
    slots: dict[torch.fx.Node, set[str]] = defaultdict(set)
    out_role: dict[torch.fx.Node, str] = {}
    for core in cores:
        for slot, arg in (("q", core.q), ("k", core.k), ("v", core.v)):
            if isinstance(arg, torch.fx.Node):
                for m in nearest_upstream(arg, matmul_nodes):
                    if claims is None or claims(core, m):
                        slots[m].add(slot)
        for m in nearest_downstream(core.out, matmul_nodes):
            if claims is None or claims(core, m):
                out_role.setdefault(m, "o")
    roles: dict[torch.fx.Node, str] = {}
    for m, found in slots.items():
        roles[m] = "attn.qkv" if len(found) > 1 else f"attn.{next(iter(found))}"
    for m in out_role:
        roles.setdefault(m, "attn.o")
    return roles


def mlp_roles(block_matmuls: list[torch.fx.Node], taken: set[torch.fx.Node], matmul_nodes: set[torch.fx.Node]) -> dict[torch.fx.Node, str]:
    """up / gate / gate_up / down for the block's matmuls that are not attention projections."""
    roles: dict[torch.fx.Node, str] = {}
    free = [m for m in block_matmuls if m not in taken]
    free_set = set(free)
    for down in free:
        feeders = [f for f in nearest_upstream(down.args[0], matmul_nodes) if f in free_set and f is not down]
        # A router (its scores pass through top-k / scatter) gates which expert runs: role other.
        routers = [f for f in feeders
                   if any(n.op == "call_function" and n.target in ROUTING_OPS for n in downstream_until(f, matmul_nodes))]
        feeders = [f for f in feeders if f not in routers]
        if not feeders:
            continue
        roles[down] = "mlp.down"
        activated = {}
        gated = {}
        for f in feeders:
            between = nodes_between(f, down, matmul_nodes)
            activated[f] = any(n.op == "call_function" and n.target in ACTIVATION_OPS for n in between)
            # A single feeder split in two halves that meet in a product: a fused gate+up projection
            # (x * sigmoid(x), QuickGELU, also multiplies a value by itself, but splits nothing).
            split = any(n.op == "call_function" and n.target in SPLIT_OPS for n in between)
            gated[f] = split and any(n.op == "call_function" and n.target in PRODUCT_OPS
                                     and sum(1 for a in n.all_input_nodes if a in between or a is f) >= 2
                                     for n in between)
        if len(feeders) == 1:
            f = feeders[0]
            roles[f] = "mlp.gate_up" if gated[f] else "mlp.up"
        else:
            act = [f for f in feeders if activated[f]]
            for f in feeders:
                if len(act) == 1:
                    roles[f] = "mlp.gate" if f is act[0] else "mlp.up"
                else:
                    roles.setdefault(f, "mlp.up")
    return roles


def reachable_to(roots: Iterable[torch.fx.Node], barrier: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Barrier nodes reached walking backwards from ``roots``."""
    found = set()
    for r in roots:
        found |= nearest_upstream(r, barrier)
    return found
