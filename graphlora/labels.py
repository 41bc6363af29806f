"""The label vocabulary and the only module that reads or writes graphlora's metadata on graphs.

Node metadata lives in ``node.meta["custom"]`` under keys prefixed ``graphlora.``; that field survives
re-tracing and ``print_readable`` shows it. Graph-level facts (placeholders, towers, loss outputs, the
label cross-check, the site plan, the fusion report) live in one :class:`GraphMeta` under
``graph_module.meta["graphlora"]``. Nothing else touches these keys: passes, the dump and the adapters
call the accessors here (:func:`set_labels` / :func:`get_labels`, :func:`set_site_step`,
:func:`set_base_node`, :func:`graph_meta` ...), so the on-graph format is defined in one place
(docs/graph-format.md lists every key). tests/unit/test_metadata_contract.py fails on a raw key elsewhere.

The vocabulary is fixed (renaming breaks policy files and saved reports):

* component: ``vision``, ``projector``, ``cross_attention``, ``language``, ``head``, ``other``
* role: ``attn.q``, ``attn.k``, ``attn.v``, ``attn.qkv``, ``attn.o``, ``mlp.gate``, ``mlp.up``,
  ``mlp.gate_up``, ``mlp.down``, ``other``
* layer: position of the node's block in its tower's execution order (0-based), ``None`` outside blocks.
"""

from __future__ import annotations

import dataclasses
from enum import StrEnum
from typing import Any

import torch.fx


class Component(StrEnum):
    VISION = "vision"
    PROJECTOR = "projector"
    CROSS_ATTENTION = "cross_attention"
    LANGUAGE = "language"
    HEAD = "head"
    OTHER = "other"


class Role(StrEnum):
    ATTN_Q = "attn.q"
    ATTN_K = "attn.k"
    ATTN_V = "attn.v"
    ATTN_QKV = "attn.qkv"
    ATTN_O = "attn.o"
    MLP_GATE = "mlp.gate"
    MLP_UP = "mlp.up"
    MLP_GATE_UP = "mlp.gate_up"
    MLP_DOWN = "mlp.down"
    OTHER = "other"

    @property
    def is_attention(self) -> bool:
        return self.value.startswith("attn.")

    @property
    def is_mlp(self) -> bool:
        return self.value.startswith("mlp.")


COMPONENTS: tuple[str, ...] = tuple(c.value for c in Component)
ROLES: tuple[str, ...] = tuple(r.value for r in Role)

#: The tower whose layer numbering a component's layer index refers to.
TOWER_OF_COMPONENT = {
    Component.VISION: "vision",
    Component.LANGUAGE: "language",
    Component.CROSS_ATTENTION: "language",
}

_PREFIX = "graphlora."
_COMPONENT = _PREFIX + "component"
_ROLE = _PREFIX + "role"
_LAYER = _PREFIX + "layer"
_MODULE = _PREFIX + "module"
_KIND = _PREFIX + "kind"
_WEIGHT = _PREFIX + "weight"
_SITE = _PREFIX + "site"
_STEP = _PREFIX + "lora_step"
_NAME_LABELS = _PREFIX + "name_labels"
_BASE_NODE = _PREFIX + "base_node"
_GROUP = _PREFIX + "group"
_DECISION = _PREFIX + "decision"
#: Every node-level key, in the order the dump lists them.
NODE_KEYS: tuple[str, ...] = (_COMPONENT, _ROLE, _LAYER, _MODULE, _KIND, _WEIGHT, _DECISION, _SITE, _STEP,
                              _BASE_NODE, _GROUP, _NAME_LABELS)
#: The graph-level key: one :class:`GraphMeta`.
GRAPH_KEY = "graphlora"

#: The fixed node sequence the LoRA insertion pass emits for one site, in graph order.
#: (``base`` is the original linear; the others are new nodes.) See docs/graph-format.md.
LORA_STEPS: tuple[str, ...] = ("base", "cast_in", "dropout", "lora_a", "lora_b", "scale", "add", "cast_out")
#: The step tag of a node that computes a whole branch (the fused op).
FUSED_STEP = "fused"
#: The step tag of the nodes that add an expert site's LoRA to its parameter (``W + s delta(A, B)``).
PARAM_STEP = "param_lora"


class MatmulKind(StrEnum):
    """Kinds of trainable matmul (``NodeLabels.kind``)."""

    LINEAR = "linear"  # an nn.Linear call: the site is the module
    PARAM_LINEAR = "param_linear"  # F.linear on a parameter that is not an nn.Linear's weight
    PARAM_MATMUL = "param_matmul"  # x @ W on a raw 2-D parameter
    EXPERT_MATMUL = "expert_matmul"  # a batched matmul on a 3-D (experts, in, out) parameter
    PARAM_SLICE = "param_slice"  # a matmul on a slice of a packed 2-D parameter (MultiheadAttention's in_proj)


class SkipCause(StrEnum):
    """Why a site the policy chose was not adapted (:class:`graphlora.lora.SkippedSite.cause`)."""

    UNREACHABLE = "unreachable"  # its output never reaches the loss (or logits): it gets no gradient
    UNSUPPORTED_LAYOUT = "unsupported_layout"  # the planner cannot place LoRA matrices for this weight
    EXPERT_DROPOUT = "expert_dropout"  # dropout asked for an expert parameter's LoRA (added to the weight)
    REFUSED = "refused"  # the LoRA matrices could not be attached (the message says why)
    EAGER_GLUE = "eager_glue"  # a raw parameter in the eager code between traced regions


MATMUL_KINDS: tuple[str, ...] = tuple(k.value for k in MatmulKind)


@dataclasses.dataclass(frozen=True)
class NodeLabels:
    """Labels of one trainable matmul node: component, role, layer, and which site it is.

    ``module`` is the site name: the module path for an ``nn.Linear``
    (``model.language_model.layers.0.self_attn.q_proj``), the parameter path for other matmuls
    (``model.multi_modal_projector.mm_input_projection_weight``).
    """

    component: Component
    role: Role
    layer: int | None
    module: str
    kind: MatmulKind = MatmulKind.LINEAR
    weight: str = ""  # FQN of the weight parameter


def _custom(node: torch.fx.Node) -> dict[str, Any]:
    return node.meta.setdefault("custom", {})


def set_labels(node: torch.fx.Node, labels: NodeLabels) -> None:
    meta = _custom(node)
    meta[_COMPONENT] = str(labels.component)
    meta[_ROLE] = str(labels.role)
    meta[_LAYER] = labels.layer
    meta[_MODULE] = labels.module
    meta[_KIND] = str(labels.kind)
    meta[_WEIGHT] = labels.weight


def get_labels(node: torch.fx.Node) -> NodeLabels | None:
    meta = node.meta.get("custom") or {}
    if _COMPONENT not in meta:
        return None
    return NodeLabels(
        component=Component(meta[_COMPONENT]),
        role=Role(meta[_ROLE]),
        layer=meta[_LAYER],
        module=meta[_MODULE],
        kind=MatmulKind(meta.get(_KIND, "linear")),
        weight=meta.get(_WEIGHT, ""),
    )


def set_name_labels(node: torch.fx.Node, component: Component, role: Role) -> None:
    """The (component, role) the module-name rules give the node (the cross-check of the structural labels)."""
    _custom(node)[_NAME_LABELS] = [str(component), str(role)]


def get_name_labels(node: torch.fx.Node) -> tuple[Component, Role] | None:
    found = (node.meta.get("custom") or {}).get(_NAME_LABELS)
    return (Component(found[0]), Role(found[1])) if found else None


def set_site_step(node: torch.fx.Node, site: str, step: str) -> None:
    """Tag ``node`` as step ``step`` (one of :data:`LORA_STEPS`) of the LoRA branch of ``site``."""
    if step not in LORA_STEPS and step not in (FUSED_STEP, PARAM_STEP):
        raise ValueError(f"unknown LoRA step {step!r}; expected one of {LORA_STEPS + (FUSED_STEP,)}")
    meta = _custom(node)
    meta[_SITE] = site
    meta[_STEP] = step


def get_site_step(node: torch.fx.Node) -> tuple[str, str] | None:
    """``(site, step)`` for a node of a LoRA branch, else None."""
    meta = node.meta.get("custom") or {}
    if _SITE not in meta:
        return None
    return meta[_SITE], meta[_STEP]


def clear_site_step(node: torch.fx.Node) -> None:
    meta = node.meta.get("custom") or {}
    meta.pop(_SITE, None)
    meta.pop(_STEP, None)


def set_base_node(node: torch.fx.Node, base: str) -> None:
    """Record that ``node`` belongs to the LoRA branch of the base matmul named ``base``."""
    _custom(node)[_BASE_NODE] = base


def get_base_node(node: torch.fx.Node) -> str:
    """The name of the base matmul whose LoRA branch ``node`` belongs to, or ``""``."""
    return str((node.meta.get("custom") or {}).get(_BASE_NODE) or "")


def set_fusion_group(node: torch.fx.Node, sites: list[str]) -> None:
    """Tag a fused group node (one kernel for several sites) with the sites it computes."""
    _custom(node)[_GROUP] = list(sites)


def get_fusion_group(node: torch.fx.Node) -> list[str] | None:
    found = (node.meta.get("custom") or {}).get(_GROUP)
    return list(found) if found else None


def node_metadata(node: torch.fx.Node) -> dict[str, Any]:
    """Every graphlora key on ``node`` (without the ``graphlora.`` prefix) -> its raw value, for display."""
    custom = node.meta.get("custom") or {}
    return {k.removeprefix(_PREFIX): v for k, v in custom.items() if isinstance(k, str) and k.startswith(_PREFIX)}


def has_metadata(node: torch.fx.Node) -> bool:
    """Whether any graphlora key is on ``node``."""
    return any(isinstance(k, str) and k.startswith(_PREFIX) for k in (node.meta.get("custom") or {}))


#: Node keys the dump knows how to show (without the prefix); any other graphlora key is a bug.
KNOWN_NODE_FIELDS: frozenset[str] = frozenset(k.removeprefix(_PREFIX) for k in NODE_KEYS)


# ---------------------------------------------------------------------------------------------
# Site decisions (written by the selection passes, read by the insertion pass and reports)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SiteDecision:
    """What the policy decided for one labelled matmul.

    ``targeted`` sites get a LoRA branch with ``r``, ``alpha`` and ``dropout``; ``reason`` names the
    flag or rule that decided. ``skipped`` marks sites the policy chose that can never receive a
    gradient (they are reported, not adapted).
    """

    targeted: bool
    reason: str
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    skipped: bool = False
    cause: SkipCause | None = None  # set with ``skipped``


def set_decision(node: torch.fx.Node, decision: SiteDecision) -> None:
    raw = dataclasses.asdict(decision)
    raw["cause"] = str(decision.cause) if decision.cause is not None else None
    _custom(node)[_DECISION] = raw


def get_decision(node: torch.fx.Node) -> SiteDecision | None:
    meta = node.meta.get("custom") or {}
    raw = meta.get(_DECISION)
    if raw is None:
        return None
    cause = raw.get("cause")
    return SiteDecision(**{**raw, "cause": SkipCause(cause) if cause is not None else None})


def labelled_nodes(graph: torch.fx.Graph) -> list[tuple[torch.fx.Node, NodeLabels]]:
    """Every node that carries labels, in graph order."""
    out = []
    for node in graph.nodes:
        labels = get_labels(node)
        if labels is not None:
            out.append((node, labels))
    return out


# ---------------------------------------------------------------------------------------------
# Graph-level facts (one GraphMeta under graph_module.meta["graphlora"])
# ---------------------------------------------------------------------------------------------
class PlaceholderKind(StrEnum):
    """What feeds a placeholder of a traced program."""

    PARAM = "param"
    BUFFER = "buffer"
    CONSTANT = "constant"
    USER = "user"


@dataclasses.dataclass
class GraphMeta:
    """graphlora's facts about one graph module.

    Written by the tracer (``placeholders``, ``logits_outputs``, ``loss_outputs``), the labelling passes
    (``towers``, ``label_check``), the planning pass (``site_plan``) and the fusion pass (``fusion``).
    """

    #: placeholder name -> (what feeds it, its target: parameter/buffer FQN, or the input's name)
    placeholders: dict[str, tuple[PlaceholderKind, str]] = dataclasses.field(default_factory=dict)
    #: tower ("vision", "language") -> number of blocks, in execution order
    towers: dict[str, int] = dataclasses.field(default_factory=dict)
    #: flat output indices of the logits, if the model returns them
    logits_outputs: list[int] | None = None
    #: flat output indices that carry the training signal (``loss``, else ``logits``); None: every output
    loss_outputs: list[int] | None = None
    #: how messages name those outputs
    loss_output_names: str = "the model's outputs"
    #: the cross-check of structural labels against name labels: {"checked", "disagreements", ...}
    label_check: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: graphlora.passes.plan_lora_sites_pass.SitePlan entries, in graph order
    site_plan: list[Any] = dataclasses.field(default_factory=list)
    #: site -> {"fused": bool, "reason": str}
    fusion: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def param_placeholders(self, graph: torch.fx.Graph) -> dict[torch.fx.Node, str]:
        """Placeholder node -> the FQN of the parameter that feeds it."""
        return {node: target for node, (kind, target) in self._placeholder_nodes(graph) if kind == PlaceholderKind.PARAM}

    def user_placeholders(self, graph: torch.fx.Graph) -> dict[torch.fx.Node, str]:
        """Placeholder node -> the user input's name, for the placeholders fed by the caller."""
        return {node: node.name for node, (kind, _) in self._placeholder_nodes(graph) if kind == PlaceholderKind.USER}

    def _placeholder_nodes(self, graph: torch.fx.Graph):
        nodes = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        return [(nodes[name], entry) for name, entry in self.placeholders.items() if name in nodes]


def graph_meta(graph_module: torch.fx.GraphModule) -> GraphMeta:
    """The :class:`GraphMeta` of ``graph_module`` (created empty on first use)."""
    meta = graph_module.meta.get(GRAPH_KEY)
    if meta is None:
        meta = graph_module.meta[GRAPH_KEY] = GraphMeta()
    return meta
