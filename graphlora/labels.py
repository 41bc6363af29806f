"""The label vocabulary and the only functions that read or write labels on graph nodes.

Labels live in ``node.meta["custom"]`` under keys prefixed ``graphlora.``; that field survives
re-tracing and ``print_readable`` shows it. Passes never touch ``node.meta`` directly: they call
:func:`set_labels` / :func:`get_labels` (annotation) and :func:`set_site_step` / :func:`get_site_step`
(nodes made by the LoRA insertion pass), so the on-graph format is defined in one place.

The vocabulary is fixed (renaming breaks policy files and saved reports):

* component: ``vision``, ``projector``, ``cross_attention``, ``language``, ``head``, ``other``
* role: ``attn.q``, ``attn.k``, ``attn.v``, ``attn.qkv``, ``attn.o``, ``mlp.gate``, ``mlp.up``,
  ``mlp.gate_up``, ``mlp.down``, ``other``
* layer: position of the node's block in its tower's execution order (0-based), ``None`` outside blocks.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any

import torch.fx


class Component(str, Enum):
    VISION = "vision"
    PROJECTOR = "projector"
    CROSS_ATTENTION = "cross_attention"
    LANGUAGE = "language"
    HEAD = "head"
    OTHER = "other"

    def __str__(self) -> str:  # "vision", not "Component.VISION"
        return self.value


class Role(str, Enum):
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

    def __str__(self) -> str:
        return self.value

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

#: The fixed node sequence the LoRA insertion pass emits for one site, in graph order.
#: (``base`` is the original linear; the others are new nodes.) See docs/graph-format.md.
LORA_STEPS: tuple[str, ...] = ("base", "cast_in", "dropout", "lora_a", "lora_b", "scale", "add", "cast_out")
#: The step tag of a node that computes a whole branch (the fused op).
FUSED_STEP = "fused"
#: The step tag of the nodes that add an expert site's LoRA to its parameter (``W + s delta(A, B)``).
PARAM_STEP = "param_lora"


#: Kinds of trainable matmul. Only ``linear`` and ``param_matmul`` sites can carry LoRA today.
#: ``param_slice``: a matmul on a slice of a packed 2-D parameter (nn.MultiheadAttention's ``in_proj_weight``).
MATMUL_KINDS = ("linear", "param_linear", "param_matmul", "expert_matmul", "param_slice")


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
    kind: str = "linear"
    weight: str = ""  # FQN of the weight parameter


def _custom(node: torch.fx.Node) -> dict[str, Any]:
    return node.meta.setdefault("custom", {})


def set_labels(node: torch.fx.Node, labels: NodeLabels) -> None:
    meta = _custom(node)
    meta[_COMPONENT] = str(labels.component)
    meta[_ROLE] = str(labels.role)
    meta[_LAYER] = labels.layer
    meta[_MODULE] = labels.module
    meta[_KIND] = labels.kind
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
        kind=meta.get(_KIND, "linear"),
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


# ---------------------------------------------------------------------------------------------
# Site decisions (written by the selection passes, read by the insertion pass and reports)
# ---------------------------------------------------------------------------------------------
_DECISION = _PREFIX + "decision"


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


def set_decision(node: torch.fx.Node, decision: SiteDecision) -> None:
    _custom(node)[_DECISION] = dataclasses.asdict(decision)


def get_decision(node: torch.fx.Node) -> SiteDecision | None:
    meta = node.meta.get("custom") or {}
    raw = meta.get(_DECISION)
    return SiteDecision(**raw) if raw is not None else None


def labelled_nodes(graph: torch.fx.Graph) -> list[tuple[torch.fx.Node, NodeLabels]]:
    """Every node that carries labels, in graph order."""
    out = []
    for node in graph.nodes:
        labels = get_labels(node)
        if labels is not None:
            out.append((node, labels))
    return out
