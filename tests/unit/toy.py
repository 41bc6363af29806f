"""A hand-made two-tower "VLM" small enough to export in about a second, and helpers that run graphlora's passes on it.

The toy has what the passes look for and nothing else: a vision tower of repeated attention + MLP blocks
(q/k/v/o and gate/up/down ``nn.Linear``), a projector from the vision width to the text stream, a language
tower of the same blocks over token embeddings with the image features in front, and an output head. Its
module names are the ones the name rules know (``vision_tower``, ``multi_modal_projector``,
``language_model``, ``lm_head``), unless a test renames the vision tower.

:class:`ToyConfig` switches on the variants some passes need: the projector reading an earlier vision layer
(the last vision block then reaches no loss), a raw-parameter projector (``x @ W`` or ``F.linear(x, W)``), packed vision attention
through ``graphlora::segment_attention``, a ``.float()`` on the logits that export records as a dtype assert.

:func:`export_toy` exports through graphlora's own tracer (``graphlora.trace.export_call`` and
``Program.from_exported``, as the runtime does) and returns a :class:`Toy` whose graph carries the
``GraphMeta`` the tracer writes. Exports are cached per configuration and deep-copied, so every test gets
its own graph to rewrite.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import graphlora.ops  # noqa: F401 - registers torch.ops.graphlora.*
from graphlora.labels import Component, MatmulKind, NodeLabels, Role, get_decision, graph_meta, labelled_nodes
from graphlora.lora import attach_lora
from graphlora.name_rules import WRAPPER_PREFIX
from graphlora.pass_manager import PassManager, PassRecord
from graphlora.passes.insert_lora_branches_pass import BranchSpec
from graphlora.pipeline import Pipeline
from graphlora.policy import Policy, as_policy
from graphlora.trace import Program, export_call, record_loss_outputs

aten = torch.ops.aten
LINEAR = aten.linear.default


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    width: int = 8
    heads: int = 2
    mlp_width: int = 16
    vocab: int = 32
    vision_layers: int = 2
    language_layers: int = 2
    #: attribute and class name of the vision tower (names the name rules do not know make them disagree)
    vision_name: str = "vision_tower"
    vision_class: str = "VisionTower"
    #: which vision block's output the projector reads (-2: the last block reaches only an extra output)
    feature_layer: int = -1
    #: the projector: an nn.Linear ("linear"), a raw [in, out] parameter used as ``x @ W`` ("matmul"), or a raw
    #: [out, in] parameter used as ``F.linear(x, W)`` ("functional")
    projector: str = "linear"
    #: vision attention through graphlora::segment_attention over a packed sequence (batch 1, cu_seqlens input)
    packed_vision: bool = False
    #: with packed_vision: also return the last vision block's log-sum-exp
    expose_lse: bool = False
    #: ``logits.float()``, as transformers' heads do (export records the dtype it saw in an assert)
    float_logits: bool = False
    #: pass labels: the model returns a loss (the training signal) before the logits
    with_loss: bool = True
    batch: int = 2
    text_len: int = 5
    image_tokens: int = 3


class Attention(nn.Module):
    def __init__(self, cfg: ToyConfig, packed: bool = False):
        super().__init__()
        w = cfg.width
        self.heads, self.packed = cfg.heads, packed
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(w, w) for _ in range(4))

    def forward(self, x, cu_seqlens=None):
        b, n, w = x.shape
        q, k, v = (p(x).view(b, n, self.heads, w // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        lse = None
        if self.packed:
            out, lse = torch.ops.graphlora.segment_attention(q, k, v, cu_seqlens, (w // self.heads) ** -0.5)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, w)), lse


class MLP(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_width, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_width, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_width, cfg.width, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ToyConfig, packed: bool = False):
        super().__init__()
        self.self_attn = Attention(cfg, packed)
        self.mlp = MLP(cfg)

    def forward(self, hidden_states, cu_seqlens=None):
        attn, lse = self.self_attn(hidden_states, cu_seqlens)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(hidden_states), lse


class VisionTower(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg, packed=cfg.packed_vision) for _ in range(cfg.vision_layers))

    def forward(self, pixel_values, cu_seqlens=None):
        states, lse = [], None
        h = pixel_values
        for layer in self.layers:
            h, lse = layer(h, cu_seqlens)
            states.append(h)
        return states, lse


class LanguageModel(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.width)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.language_layers))

    def forward(self, input_ids, image_features):
        h = torch.cat([image_features, self.embed_tokens(input_ids)], dim=1)
        for layer in self.layers:
            h, _ = layer(h)
        return h


class ToyVLM(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        tower_class = VisionTower if cfg.vision_class == "VisionTower" else type(cfg.vision_class, (VisionTower,), {})
        self.add_module(cfg.vision_name, tower_class(cfg))
        if cfg.projector == "matmul":
            self.mm_input_projection_weight = nn.Parameter(torch.randn(cfg.width, cfg.width) * 0.3)  # [in, out]
        elif cfg.projector == "functional":
            self.mm_projector_weight = nn.Parameter(torch.randn(cfg.width, cfg.width) * 0.3)  # [out, in]
        else:
            self.multi_modal_projector = nn.Linear(cfg.width, cfg.width)
        self.language_model = LanguageModel(cfg)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def get_output_embeddings(self):  # graphlora.pipeline.head_paths asks for it, as for a transformers model
        return self.lm_head

    def forward(self, input_ids, pixel_values, cu_seqlens=None, labels=None):
        cfg = self.cfg
        states, lse = getattr(self, cfg.vision_name)(pixel_values, cu_seqlens)
        features = states[cfg.feature_layer]
        if cfg.projector == "matmul":
            image = features @ self.mm_input_projection_weight
        elif cfg.projector == "functional":
            image = F.linear(features, self.mm_projector_weight)
        else:
            image = self.multi_modal_projector(features)
        if image.shape[0] != input_ids.shape[0]:  # packed images: the one packed sequence serves each sample
            image = image.expand(input_ids.shape[0], -1, -1)
        logits = self.lm_head(self.language_model(input_ids, image))
        if cfg.float_logits:
            logits = logits.float()
        out: dict[str, torch.Tensor] = {}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        out["logits"] = logits
        if cfg.feature_layer != -1:
            out["vision_hidden_states"] = states[-1]
        if cfg.expose_lse:
            out["vision_lse"] = lse
        return out


def build_model(cfg: ToyConfig = ToyConfig()) -> ToyVLM:
    """The toy with seeded weights (equal for equal configurations), frozen, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ToyVLM(cfg)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def example_inputs(cfg: ToyConfig = ToyConfig()) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batch = 1 if cfg.packed_vision else cfg.batch
    images = 2 if cfg.packed_vision else 1  # packed: two images of image_tokens patches in one sequence
    inputs = {
        "input_ids": torch.randint(0, cfg.vocab, (batch, cfg.text_len), generator=g),
        "pixel_values": torch.randn(1 if cfg.packed_vision else batch, images * cfg.image_tokens, cfg.width,
                                    generator=g),
    }
    if cfg.packed_vision:
        inputs["cu_seqlens"] = torch.arange(0, images + 1, dtype=torch.int32) * cfg.image_tokens
    if cfg.with_loss:
        tokens = inputs["pixel_values"].shape[1] + cfg.text_len
        inputs["labels"] = torch.randint(0, cfg.vocab, (batch, tokens), generator=g)
    return inputs


@functools.cache
def _exported(cfg: ToyConfig) -> torch.export.ExportedProgram:
    # Static shapes: the passes read no symbolic size, and a dynamic text length doubles the export time.
    return export_call(build_model(cfg), example_inputs(cfg), {}, dynamic=False)


@dataclasses.dataclass
class Toy:
    """A fresh toy model, its exported program (graph + GraphMeta from the tracer) and its example inputs."""

    cfg: ToyConfig
    model: ToyVLM
    program: Program
    inputs: dict[str, torch.Tensor]

    @property
    def gm(self) -> torch.fx.GraphModule:
        return self.program.graph_module

    def run(self, model: nn.Module | None = None) -> Any:
        """Run the program with ``model``'s parameters (the toy's own by default), as the runtime does."""
        return self.program(model if model is not None else self.model, self.program.flatten_inputs(self.inputs))


def export_toy(cfg: ToyConfig = ToyConfig()) -> Toy:
    ep = copy.deepcopy(_exported(cfg))
    program = Program.from_exported(ep, tuple(sorted(example_inputs(cfg))))
    record_loss_outputs(program.graph_module, program.out_spec)
    return Toy(cfg, build_model(cfg), program, example_inputs(cfg))


# ---------------------------------------------------------------------------------------------
# Running passes from graphlora.pipeline
# ---------------------------------------------------------------------------------------------
def policy_of(policy: Policy | dict | None) -> Policy:
    return as_policy(policy if policy is not None else {})


def analysis_passes(toy: Toy, names: Iterable[str], policy: Policy | dict | None = None) -> list:
    """The passes called ``names`` from the pipeline's analysis list for the toy, in pipeline order."""
    wanted = set(names)
    passes = [p for p in Pipeline(policy_of(policy)).analysis(toy.model, WRAPPER_PREFIX) if p.name in wanted]
    missing = wanted - {p.name for p in passes}
    assert not missing, f"not analysis passes: {sorted(missing)}"
    return passes


def run_analysis(toy: Toy, names: Sequence[str], policy: Policy | dict | None = None) -> list[PassRecord]:
    """Run the named analysis passes on the toy's graph through the pass manager (lint + label invariants)."""
    return PassManager(analysis_passes(toy, names, policy))(toy.gm)


#: What each analysis pass needs to have run before it on a fresh export.
ANALYSIS_DEPENDENCIES = {
    "strip_tensor_metadata_asserts": (),
    "label_by_structure": (),
    "cross_check_labels": ("label_by_structure",),
    "select_lora_sites": ("label_by_structure",),
    "settle_label_disagreements": ("label_by_structure", "cross_check_labels", "select_lora_sites"),
    "mark_unreachable_sites": ("label_by_structure", "select_lora_sites"),
    "plan_lora_sites": ("label_by_structure", "select_lora_sites", "mark_unreachable_sites"),
}


def run_before(toy: Toy, name: str, policy: Policy | dict | None = None) -> list[PassRecord]:
    """Run only the passes ``name`` depends on."""
    deps = ANALYSIS_DEPENDENCIES[name]
    return run_analysis(toy, deps, policy) if deps else []


def attach_planned_lora(toy: Toy, policy: Policy | dict | None = None, seed: int = 0,
                        random_b: bool = True) -> dict[str, BranchSpec]:
    """Give every site of ``GraphMeta.site_plan`` that is targeted and not refused its LoRA matrices on the toy
    model (as the planner does: ``<owner>.lora_A`` / ``lora_B``), B random unless ``random_b`` is False; return
    the insertion pass's branch table."""
    policy = policy_of(policy)
    generator = torch.Generator().manual_seed(seed)
    branches = {}
    for entry in graph_meta(toy.gm).site_plan:
        decision = entry.decision
        if not decision.targeted or entry.refusal is not None:
            continue
        owner = toy.model.get_submodule(entry.owner) if entry.owner else toy.model
        attach_lora(owner, entry.in_features, entry.out_features, decision.r, torch.float32, generator,
                    torch.device("cpu"))
        if random_b:
            with torch.no_grad():
                owner.lora_B.weight.copy_(torch.randn(owner.lora_B.weight.shape, generator=generator) * 0.1)
        prefix = entry.owner + "." if entry.owner else ""
        branches[entry.labels.module] = BranchSpec(policy.scale(decision.r, decision.alpha), decision.dropout or 0.0,
                                                   prefix + "lora_A.weight", prefix + "lora_B.weight", entry.layout)
    return branches


def prepare_transform(toy: Toy, policy: Policy | dict | None = None, random_b: bool = True) -> dict[str, BranchSpec]:
    """The whole analysis list, then LoRA matrices for the planned sites: what the transform passes read."""
    names = [p.name for p in Pipeline(policy_of(policy)).analysis(toy.model, WRAPPER_PREFIX)]
    run_analysis(toy, names, policy)
    return attach_planned_lora(toy, policy, random_b=random_b)


def transform_passes(toy: Toy, branches: dict[str, BranchSpec], policy: Policy | dict | None = None,
                     training: bool = False, fuse: bool | str = True, autocast: bool = False,
                     refused: frozenset[str] = frozenset()) -> list:
    """The pipeline's transform list for the toy's program (insert, then fuse unless ``fuse`` is False), on CPU."""
    return Pipeline(policy_of(policy), fuse=fuse).transform(toy.program, branches, toy.model, training,
                                                            refused, autocast, "cpu")


# ---------------------------------------------------------------------------------------------
# Reading graphs
# ---------------------------------------------------------------------------------------------
def count(gm: torch.fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def labels_by_site(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """site -> NodeLabels of its (first) labelled node."""
    out: dict[str, Any] = {}
    for _, labels in labelled_nodes(gm.graph):
        out.setdefault(labels.module, labels)
    return out


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model by path (what the structural labels must cover), LoRA matrices excluded."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith((".lora_A", ".lora_B"))}


def merged_model(toy: Toy, branches: dict[str, BranchSpec]) -> nn.Module:
    """A copy of the toy whose site weights are ``W + s B A``: the eager meaning of a LoRA branch (no dropout)."""
    merged = copy.deepcopy(toy.model)
    with torch.no_grad():
        for site, spec in branches.items():
            a, b = toy.model.get_parameter(spec.a_fqn), toy.model.get_parameter(spec.b_fqn)
            delta = spec.scale * (b @ a)
            if spec.layout == "in_out":  # a raw x @ W parameter: W is [in, out]
                merged.get_parameter(site).add_(delta.t())
            else:
                merged.get_submodule(site).weight.add_(delta)
    return merged


#: The role each linear of the toy's blocks plays, by its attribute name (the toy's own wiring).
BLOCK_ROLES = {"q_proj": Role.ATTN_Q, "k_proj": Role.ATTN_K, "v_proj": Role.ATTN_V, "o_proj": Role.ATTN_O,
               "gate_proj": Role.MLP_GATE, "up_proj": Role.MLP_UP, "down_proj": Role.MLP_DOWN}


def expected_labels(toy: Toy) -> dict[str, NodeLabels]:
    """The labels the toy's construction implies for each trainable matmul: blocks of the vision tower and of the
    language model by their position, the projector, the head."""
    cfg = toy.cfg
    out: dict[str, NodeLabels] = {}
    for tower, component, n in ((cfg.vision_name, Component.VISION, cfg.vision_layers),
                                ("language_model", Component.LANGUAGE, cfg.language_layers)):
        for layer in range(n):
            for path, module in toy.model.get_submodule(f"{tower}.layers.{layer}").named_modules():
                if isinstance(module, nn.Linear):
                    site = f"{tower}.layers.{layer}.{path}"
                    out[site] = NodeLabels(component, BLOCK_ROLES[path.rsplit(".", 1)[-1]], layer, site,
                                           MatmulKind.LINEAR, site + ".weight")
    raw = {"matmul": ("mm_input_projection_weight", MatmulKind.PARAM_MATMUL),
           "functional": ("mm_projector_weight", MatmulKind.PARAM_LINEAR)}
    if cfg.projector in raw:
        name, kind = raw[cfg.projector]
        out[name] = NodeLabels(Component.PROJECTOR, Role.OTHER, None, name, kind, name)
    else:
        out["multi_modal_projector"] = NodeLabels(Component.PROJECTOR, Role.OTHER, None, "multi_modal_projector",
                                                  MatmulKind.LINEAR, "multi_modal_projector.weight")
    out["lm_head"] = NodeLabels(Component.HEAD, Role.OTHER, None, "lm_head", MatmulKind.LINEAR, "lm_head.weight")
    return out


# ---------------------------------------------------------------------------------------------
# Regions: one block exported alone, labelled from the whole model's tables
# ---------------------------------------------------------------------------------------------
def block_input(toy: Toy, path: str) -> torch.Tensor:
    """The hidden states the block at ``path`` receives in an eager run of the toy on its example inputs."""
    seen = []
    handle = toy.model.get_submodule(path).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            toy.model(**toy.inputs)
    finally:
        handle.remove()
    return seen[0]


def export_region(toy: Toy, path: str) -> Toy:
    """The block at ``path`` exported alone (as the runtime exports a region or block class)."""
    inputs = {"hidden_states": block_input(toy, path)}
    ep = export_call(toy.model.get_submodule(path), inputs, {}, dynamic=False, class_forward=True)
    return Toy(toy.cfg, toy.model, Program.from_exported(ep, ("hidden_states",)), inputs)


def site_tables(gm: torch.fx.GraphModule) -> tuple[dict[str, NodeLabels], dict[str, Any], dict[str, int]]:
    """(labels, decisions, towers) by site from an analysed whole-model graph, as the planner keeps them."""
    labels, decisions = {}, {}
    for node, lab in labelled_nodes(gm.graph):
        labels.setdefault(lab.module, lab)
        decision = get_decision(node)
        if decision is not None and (decision.targeted or lab.module not in decisions):
            decisions[lab.module] = decision
    return labels, decisions, dict(graph_meta(gm).towers)
