"""Label every trainable matmul with component, role and layer, from the graph's structure.

Reads: the graph (dataflow, op types), ``GraphMeta.placeholders`` (which
placeholders are parameters and user inputs), ``GraphMeta.logits_outputs``, and
the *shape* of each node's module stack (integer-indexed children = repeated blocks) — never module
names. Writes: :class:`graphlora.labels.NodeLabels` (component, role, layer, site name, kind, weight)
on every ``aten.linear`` / parameter ``matmul`` node; ``GraphMeta.towers``.

Rules (graphlora/structure.py has the analyses):

* modality of a matmul = the user inputs its activation is computed from: pixels (floating inputs),
  tokens (``input_ids`` / ``inputs_embeds``), audio;
* a repeated block (ModuleList element holding an attention core, a convolution mixer included) belongs to
  the language tower when any of its matmuls reads the token stream, else to the vision tower (audio:
  ``other``); ``layer`` = the block's position in its tower's execution order (Mllama's local then global vision stacks: one sequence);
* inside a language block, a projection that reads pixels but not tokens is a cross-attention key or
  value: every matmul of the attention module that holds it is ``cross_attention``;
* a pixel-only block list whose attention queries read no input (learned latents) while its keys read pixels is a
  resampler (Idefics2's perceiver): ``projector``, with the attention and MLP roles of its blocks, no layer;
* pixel-only matmuls outside blocks are ``projector`` when they reach the text stream without feeding a
  vision block (between the encoder and the merge), ``vision`` otherwise (patch embeddings before the
  blocks; a pooling head whose result never meets the text); a matmul that reads no modality is ``vision``
  when it feeds the vision blocks (a position table resized by image metadata), else ``other``;
* the matmul(s) that produce ``logits`` with no other matmul in between are the ``head``; when no output is
  named ``logits``, the matmul(s) nearest to an output whose width is the vocabulary (the rows of the
  embedding the token ids index);
* roles: projections feeding an attention core's q/k/v (``scaled_dot_product_attention``, eager
  ``q k^T -> softmax -> v``, or a gated depthwise 1-D convolution ``C * conv(B * x)``, linear attention
  with a fixed local kernel) are q/k/v (qkv when several), the one fed by its output is o; inside a
  block, a projection fed by others through activations/products is ``mlp.down``, its feeders
  ``mlp.gate`` (the activated one), ``mlp.up`` or ``mlp.gate_up`` (one output split in two halves);
  vision and language matmuls outside the blocks get the MLP roles their module's wiring gives.

Guarantees: every trainable matmul carries labels.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graphlora import structure
from graphlora.labels import Component, NodeLabels, Role, graph_meta, set_labels
from graphlora.name_rules import WRAPPER_PREFIX, module_stack


_RESAMPLER = "resampler"  # list kind of a learned-query resampler's blocks (besides the modalities)


class LabelByStructurePass(PassBase):
    name = "label_by_structure"

    def __init__(self, module_classes: dict[str, type], stack_prefix: str = WRAPPER_PREFIX):
        super().__init__()
        self.module_classes = module_classes
        self.stack_prefix = stack_prefix

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        meta = graph_meta(graph_module)
        param_of = meta.param_placeholders(graph)
        user_inputs = {node: structure.input_modality(name, node.meta.get("val"))
                       for node, name in meta.user_placeholders(graph).items()}
        deps = structure.dependencies(graph, user_inputs)
        matmuls = structure.trainable_matmuls(graph_module, param_of, self.stack_prefix, self.module_classes)
        mm_nodes = {m.node for m in matmuls}

        # Tower blocks are repeated modules that hold an attention core; repeated modules without one
        # (Qwen3-VL's deepstack mergers, a Sequential of Linears) are not layers of a tower.
        cores = structure.attention_cores(graph)
        lists_with_attention = {blk[0] for core in cores if (blk := structure.block_of(core.out, self.stack_prefix))}
        blocks = {m.node: blk if (blk := structure.block_of(m.node, self.stack_prefix)) and blk[0] in lists_with_attention
                  else None for m in matmuls}
        list_kind: dict[str, str] = {}
        for m in matmuls:
            blk = blocks[m.node]
            if blk is None:
                continue
            d = deps[m.x]
            current = list_kind.get(blk[0])
            if structure.TEXT in d:
                list_kind[blk[0]] = structure.TEXT
            elif current != structure.TEXT:
                if structure.IMAGE in d:
                    list_kind[blk[0]] = structure.IMAGE
                elif structure.AUDIO in d and current is None:
                    list_kind[blk[0]] = structure.AUDIO

        # A learned-query resampler (Idefics2's perceiver): a pixel-only block list whose attention queries are computed
        # from no input (a learned parameter) while its keys read the pixels. It compresses the vision features into a
        # fixed number of text-width tokens: a connector, labelled projector with its block roles, not a vision tower.
        resamplers = {blk[0] for core in cores if (blk := structure.block_of(core.out, self.stack_prefix))
                      and list_kind.get(blk[0]) == structure.IMAGE and not deps[core.q] and structure.IMAGE in deps[core.k]}
        for name in resamplers:
            list_kind[name] = _RESAMPLER

        vision_block_matmuls = [m.node for m in matmuls
                                if blocks[m.node] and list_kind.get(blocks[m.node][0]) == structure.IMAGE]
        before_vision = structure.ancestors(vision_block_matmuls)

        output = graph.output_node()
        flat_outputs = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
        logits_idx = graph_meta(graph_module).logits_outputs or []
        if logits_idx:
            heads = structure.reachable_to([flat_outputs[i] for i in logits_idx
                                            if isinstance(flat_outputs[i], torch.fx.Node)], mm_nodes)
        else:
            # No output named ``logits`` (a tuple, a dict of other names, the loss alone): the head is a matmul
            # nearest to an output (through the loss, if that is all it returns) whose width is the vocabulary.
            vocab = structure.vocabulary_sizes(graph, user_inputs)
            heads = {n for n in structure.reachable_to([o for o in flat_outputs if isinstance(o, torch.fx.Node)], mm_nodes)
                     if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].shape[-1] in vocab}

        # Cross-attention: pixel-only projections inside language blocks mark their attention module.
        cross_modules = set()
        for m in matmuls:
            blk = blocks[m.node]
            d = deps[m.x]
            if blk and list_kind.get(blk[0]) == structure.TEXT and structure.IMAGE in d and structure.TEXT not in d:
                cross_modules.add(m.module.rsplit(".", 1)[0])

        meets_text = _reaches(graph, {n for n, d in deps.items() if structure.TEXT in d})
        components: dict[torch.fx.Node, Component] = {}
        for m in matmuls:
            blk = blocks[m.node]
            d = deps[m.x]
            kind = list_kind.get(blk[0]) if blk else None
            if blk and kind == structure.TEXT:
                comp = Component.LANGUAGE
                if any(m.module == c or m.module.startswith(c + ".") for c in cross_modules):
                    comp = Component.CROSS_ATTENTION
            elif blk and kind == structure.IMAGE:
                comp = Component.VISION
            elif blk and kind == _RESAMPLER:
                comp = Component.PROJECTOR
            elif m.node in heads and structure.TEXT in d:
                comp = Component.HEAD
            elif structure.TEXT in d:
                comp = Component.LANGUAGE
            elif structure.IMAGE in d:
                # Pixels to the text stream, not feeding a vision block: a projector (LLaVA with one CLIP layer reads
                # the patch embeddings, before any block). Feeding the blocks (a linear patch embedding), or never
                # meeting the text (a pooling head whose result is discarded): the vision model.
                projects = m.node in meets_text and m.node not in before_vision
                comp = Component.PROJECTOR if projects else Component.VISION
            elif m.node in before_vision:
                # Reads no modality but feeds the vision blocks: part of the vision model's input (Siglip2's
                # position table, resized to each image by a matmul with weights computed from the patch grid).
                comp = Component.VISION
            else:
                comp = Component.OTHER
            components[m.node] = comp

        roles = structure.attention_roles(cores, mm_nodes)
        by_block: dict[str, list[torch.fx.Node]] = defaultdict(list)
        for m in matmuls:
            if blocks[m.node]:
                by_block[blocks[m.node][1]].append(m.node)
        for members in by_block.values():
            roles.update(structure.mlp_roles(members, set(roles) & set(members), mm_nodes))
        # Vision / language matmuls outside the blocks (a pooling head's MLP): MLP wiring within their module.
        by_module: dict[str, list[torch.fx.Node]] = defaultdict(list)
        for m in matmuls:
            if not blocks[m.node] and components[m.node] in (Component.VISION, Component.LANGUAGE):
                by_module[m.module.rsplit(".", 1)[0]].append(m.node)
        # Attention outside the blocks (nn.MultiheadAttention in a pooling head): a core claims only the projections
        # inside the module that runs it, never a block's linears further upstream.
        module_of = {m.node: m.module for m in matmuls}
        loose = {n for members in by_module.values() for n in members}
        home_of = {core.out: (stack[-1].path if (stack := module_stack(core.out.meta, self.stack_prefix)) else "")
                   for core in cores}

        def inside(core, node) -> bool:
            home = home_of[core.out]
            return node in loose and (module_of[node] == home or module_of[node].startswith(home + "."))

        loose_roles: dict[torch.fx.Node, str] = structure.attention_roles(cores, mm_nodes, inside)
        for members in by_module.values():
            loose_roles.update(structure.mlp_roles(members, set(roles) | set(loose_roles), mm_nodes))

        all_roles = {**roles, **loose_roles}
        order: dict[str, dict[str, int]] = {"vision": {}, "language": {}}
        for m in matmuls:
            blk = blocks[m.node]
            tower = {structure.IMAGE: "vision", structure.TEXT: "language"}.get(list_kind.get(blk[0])) if blk else None
            if tower:
                order[tower].setdefault(blk[1], len(order[tower]))

        for m in matmuls:
            comp = components[m.node]
            blk = blocks[m.node]
            tower = {Component.VISION: "vision", Component.LANGUAGE: "language",
                     Component.CROSS_ATTENTION: "language"}.get(comp)
            layer = order[tower].get(blk[1]) if (tower and blk) else None
            in_block = blk is not None and comp in (Component.VISION, Component.LANGUAGE, Component.CROSS_ATTENTION,
                                                    Component.PROJECTOR)
            role = Role(roles[m.node]) if in_block and m.node in roles else Role(loose_roles.get(m.node, Role.OTHER))
            comp, role = _packed_labels(m, comp, role, matmuls, components, all_roles)
            set_labels(m.node, NodeLabels(comp, role, layer, m.site, m.kind, m.weight))
        graph_meta(graph_module).towers = {t: len(b) for t, b in order.items()}
        return PassResult(graph_module, bool(matmuls))


def _packed_labels(m: structure.Matmul, comp: Component, role: Role, matmuls: list[structure.Matmul],
                   components: dict[torch.fx.Node, Component], roles: dict[torch.fx.Node, str]) -> tuple[Component, Role]:
    """One component and role per packed parameter. Slices of one weight that feed q, k and v
    (nn.MultiheadAttention's ``in_proj_weight``) are together ``attn.qkv``, of the component of the slices that
    read a modality (the query of a pooling head is a parameter: it reads none)."""
    if m.kind != "param_slice":
        return comp, role
    group = [other.node for other in matmuls if other.weight == m.weight]
    slots = {roles.get(n) for n in group} - {None}
    if len(slots) > 1 and all(Role(r).is_attention and r != Role.ATTN_O for r in slots):
        role = Role.ATTN_QKV
    known = [components[n] for n in group if components[n] != Component.OTHER]
    return (known[0] if known else comp), role


def _reaches(graph: torch.fx.Graph, targets: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Nodes that are in ``targets`` or have a path to one of them."""
    found: set[torch.fx.Node] = set()
    for node in reversed(list(graph.nodes)):
        if node in targets or any(user in found for user in node.users):
            found.add(node)
    return found

