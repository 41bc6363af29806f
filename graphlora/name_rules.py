"""Labels from module paths and classes.

These rules read the ``nn_module_stack`` of a node (the chain of modules, outermost first, that the
op was called from: attribute path + class) and say which component, role and block the node belongs
to. They know the names used by the transformers VLM families (see docs/labels.md). The innermost
module that says something wins: ``model.visual.merger`` is a projector although it sits inside the
vision tower, ``...layers.3.cross_attn.q_proj`` is cross-attention although it sits in a language
layer.
"""

from __future__ import annotations

import dataclasses
import re

from graphlora.labels import Component, Role

#: The attribute of the export wrapper that holds the user's model (graphlora.trace wraps it so that
#: keyword inputs export): module paths in an exported whole model's nn_module_stack start with
#: WRAPPER_PREFIX.
WRAPPER_ATTR = "m"
WRAPPER_PREFIX = WRAPPER_ATTR + "."

# -- component keywords, matched against each path segment (attribute name) -----------------------
_PROJECTOR_SEGMENT = re.compile(
    r"^(multi_modal_projector|mm_projector|connector|merger|projector|vision_projection|"
    r"multi_modal_projection|(img|image|visual|vision)_projection(_\w+)?|vision_adapter|mlp1|aligner|"
    r"head_linear|visual_embeddings_table)$"  # Ovis2: visual-vocabulary logits, then their expected text embedding
)
_VISION_SEGMENT = re.compile(r"(vision|visual|image|img|patch|siglip|clip)")
_LANGUAGE_SEGMENT = re.compile(r"(language|text|decoder|llm|transformer_lm)")
_CROSS_ATTN_SEGMENT = re.compile(r"^(cross_attn|cross_attention|crossattention|encoder_attn)$")

_PROJECTOR_CLASS = re.compile(r"(Projector|Connector|PatchMerger|Merger|MultiModalProjection|Adapter|Aligner)$")
_VISION_CLASS = re.compile(r"(Vision|Visual|Siglip|CLIP|Pixtral|ViT|Image)")
_CROSS_ATTN_CLASS = re.compile(r"CrossAttention$")  # the attention module, not "CrossAttentionDecoderLayer"

# -- role keywords: leaf attribute name -> role; parent context disambiguates ----------------------
_ATTN_PARENT_SEGMENT = re.compile(r"^(self_attn|attn|attention|self_attention|cross_attn|cross_attention|mixer)$")
_ATTN_PARENT_CLASS = re.compile(r"Attention")
_MLP_PARENT_SEGMENT = re.compile(r"^(mlp|ffn|feed_forward|feedforward|ff|mlp_block)$")
_MLP_PARENT_CLASS = re.compile(r"(MLP|Mlp|FeedForward|FFN)")

_ATTN_LEAF = {
    "q_proj": Role.ATTN_Q, "query": Role.ATTN_Q, "q": Role.ATTN_Q, "wq": Role.ATTN_Q, "q_lin": Role.ATTN_Q,
    "k_proj": Role.ATTN_K, "key": Role.ATTN_K, "k": Role.ATTN_K, "wk": Role.ATTN_K, "k_lin": Role.ATTN_K,
    "v_proj": Role.ATTN_V, "value": Role.ATTN_V, "v": Role.ATTN_V, "wv": Role.ATTN_V, "v_lin": Role.ATTN_V,
    "qkv": Role.ATTN_QKV, "qkv_proj": Role.ATTN_QKV, "wqkv": Role.ATTN_QKV, "in_proj": Role.ATTN_QKV,
    "in_proj_weight": Role.ATTN_QKV,  # nn.MultiheadAttention's packed q/k/v parameter
    "query_key_value": Role.ATTN_QKV, "c_attn": Role.ATTN_QKV,
    "o_proj": Role.ATTN_O, "out_proj": Role.ATTN_O, "proj": Role.ATTN_O, "dense": Role.ATTN_O, "wo": Role.ATTN_O,
    "o": Role.ATTN_O, "out_lin": Role.ATTN_O, "c_proj": Role.ATTN_O, "projection_layer": Role.ATTN_O,
}
_MLP_LEAF = {
    "gate_proj": Role.MLP_GATE, "w1": Role.MLP_GATE, "gate": Role.MLP_GATE, "wi_0": Role.MLP_GATE,
    "up_proj": Role.MLP_UP, "w3": Role.MLP_UP, "fc1": Role.MLP_UP, "linear_fc1": Role.MLP_UP, "up": Role.MLP_UP,
    "c_fc": Role.MLP_UP, "dense_h_to_4h": Role.MLP_UP, "wi_1": Role.MLP_UP, "lin1": Role.MLP_UP, "wi": Role.MLP_UP,
    "down_proj": Role.MLP_DOWN, "w2": Role.MLP_DOWN, "fc2": Role.MLP_DOWN, "linear_fc2": Role.MLP_DOWN,
    "down": Role.MLP_DOWN, "dense_4h_to_h": Role.MLP_DOWN, "c_proj": Role.MLP_DOWN, "lin2": Role.MLP_DOWN,
    "wo": Role.MLP_DOWN,
    "gate_up_proj": Role.MLP_GATE_UP,
}


@dataclasses.dataclass(frozen=True)
class StackEntry:
    """One module of a node's module stack: its path (relative to the model) and class name."""

    path: str
    cls: str

    @property
    def segment(self) -> str:
        return self.path.rsplit(".", 1)[-1] if self.path else ""


def _class_name(cls: object) -> str:
    name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return str(name).rsplit(".", 1)[-1]


def module_stack(node_meta: dict, strip_prefix: str = "") -> list[StackEntry]:
    """The node's module stack, outermost first, paths relative to the traced model."""
    stack = node_meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        if strip_prefix and path.startswith(strip_prefix):
            path = path[len(strip_prefix):]
        elif strip_prefix and path + "." == strip_prefix:
            path = ""
        out.append(StackEntry(path, _class_name(cls)))
    return out


def component_by_name(stack: list[StackEntry], head_paths: frozenset[str]) -> Component:
    """Component from the module names and classes of the stack.

    The innermost module that names a tower wins (``AyaVisionModel.language_model`` is language), but
    projector and cross-attention modules keep their label against tower words inside them
    (``multi_modal_projector.patch_merger`` is a projector).
    """
    if stack and stack[-1].path in head_paths:
        return Component.HEAD
    found: Component | None = None
    in_block = False
    for entry in stack:
        seg = entry.segment.lower()
        if seg.isdigit():
            in_block = True
        if _PROJECTOR_SEGMENT.match(seg) or _PROJECTOR_CLASS.search(entry.cls):
            found = Component.PROJECTOR
        elif _CROSS_ATTN_SEGMENT.match(seg) or _CROSS_ATTN_CLASS.search(entry.cls):
            found = Component.CROSS_ATTENTION
        elif found in (Component.PROJECTOR, Component.CROSS_ATTENTION):
            continue
        elif _LANGUAGE_SEGMENT.search(seg):
            found = Component.LANGUAGE
        elif _VISION_SEGMENT.search(seg) or _VISION_CLASS.search(entry.cls):
            found = Component.VISION
    if found is None:
        # A plain decoder (``model.layers.N``) with no tower names is the language model.
        found = Component.LANGUAGE if in_block else Component.OTHER
    return found


def role_by_name(stack: list[StackEntry], component: Component) -> Role:
    """Role from the leaf name, disambiguated by whether an ancestor is an attention or MLP module."""
    if component in (Component.HEAD, Component.OTHER) or not stack:
        return Role.OTHER
    leaf = stack[-1].segment.lower()
    parents = stack[:-1]
    in_attn = any(_ATTN_PARENT_SEGMENT.match(e.segment.lower()) or _ATTN_PARENT_CLASS.search(e.cls) for e in parents)
    in_mlp = any(_MLP_PARENT_SEGMENT.match(e.segment.lower()) or _MLP_PARENT_CLASS.search(e.cls) for e in parents)
    # A projector's linears have no role, except in the attention / MLP of its repeated blocks (a resampler's layers).
    if component == Component.PROJECTOR and not ((in_attn or in_mlp) and any(e.segment.isdigit() for e in parents)):
        return Role.OTHER
    if in_attn and not in_mlp and leaf in _ATTN_LEAF:
        return _ATTN_LEAF[leaf]
    if in_mlp and not in_attn and leaf in _MLP_LEAF:
        return _MLP_LEAF[leaf]
    if in_attn and in_mlp:  # e.g. an attention module nested in a "mlp"-named block: innermost decides
        for e in reversed(parents):
            if _ATTN_PARENT_SEGMENT.match(e.segment.lower()) or _ATTN_PARENT_CLASS.search(e.cls):
                return _ATTN_LEAF.get(leaf, Role.OTHER)
            if _MLP_PARENT_SEGMENT.match(e.segment.lower()) or _MLP_PARENT_CLASS.search(e.cls):
                return _MLP_LEAF.get(leaf, Role.OTHER)
    # No telling parent: unambiguous leaf names still decide.
    if leaf in _ATTN_LEAF and leaf not in _MLP_LEAF and leaf not in ("proj", "dense", "o", "q", "k", "v"):
        return _ATTN_LEAF[leaf]
    if leaf in _MLP_LEAF and leaf not in _ATTN_LEAF and leaf not in ("gate", "up", "down", "wi"):
        return _MLP_LEAF[leaf]
    return Role.OTHER


def block_path(stack: list[StackEntry]) -> str | None:
    """The path of the outermost repeated block (a ModuleList element) the node sits in, if any."""
    for entry in stack:
        if entry.segment.isdigit():
            return entry.path
    return None
