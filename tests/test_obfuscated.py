"""Labels come from graph structure, not names.

A small self-contained VLM (a ViT with attention + MLP blocks, a 2-layer projector, a Llama-style
decoder, a causal-LM head) is built twice with the same weights: once with the usual transformers
names (``vision_tower``, ``multi_modal_projector``, ``language_model.layers.N.self_attn.q_proj``...)
and once with meaningless attribute names. Both get the same components, roles and layers; the
obfuscated one reports that the module-name rules disagree (structure decided), and LoRA lands on
the right linears and trains.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

import graphlora
from graphlora.explainer import explain
from helpers import expand, train_and_check_grads

D, HEADS, VOCAB, IMAGE_TOKEN = 32, 4, 64, 63
PATCH, IMAGE = 4, 16
N_PATCHES = (IMAGE // PATCH) ** 2

# attribute names: key -> name. Class names are neutral in both variants (name rules read classes too).
NAMED = dict(
    vision="vision_tower", patch="patch_embed", vblocks="layers", projector="multi_modal_projector",
    proj1="linear_1", proj2="linear_2", language="language_model", embed="embed_tokens", lblocks="layers",
    final_norm="norm", head="lm_head", attn="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj",
    mlp="mlp", fc1="fc1", fc2="fc2", gate="gate_proj", up="up_proj", down="down_proj",
    norm1="input_layernorm", norm2="post_attention_layernorm",
)
OBFUSCATED = dict(
    vision="zq1", patch="pz", vblocks="blk", projector="p0", proj1="l0", proj2="l1", language="tk", embed="em",
    lblocks="st", final_norm="nf", head="hd", attn="mx", q="a0", k="a1", v="a2", o="a3", mlp="fz", fc1="f0",
    fc2="f1", gate="g0", up="g1", down="g2", norm1="n0", norm2="n1",
)


class Named(nn.Module):
    """A module whose children are registered under names looked up in a table."""

    def __init__(self, names: dict[str, str]):
        super().__init__()
        self.names = names

    def put(self, key: str, module: nn.Module) -> None:
        setattr(self, self.names[key], module)

    def get(self, key: str) -> nn.Module:
        return getattr(self, self.names[key])


class Norm(nn.Module):
    """RMSNorm."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Mix(Named):
    """Multi-head attention: q, k, v projections, SDPA, output projection."""

    def __init__(self, names, causal: bool):
        super().__init__(names)
        self.causal = causal
        for key in "qkvo":
            self.put(key, nn.Linear(D, D, bias=not causal))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (self.get(key)(x).view(b, n, HEADS, D // HEADS).transpose(1, 2) for key in "qkv")
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.get("o")(out.transpose(1, 2).reshape(b, n, D))


class Chan(Named):
    """The vision MLP fc2(gelu(fc1(x))), or the decoder's down(silu(gate(x)) * up(x))."""

    def __init__(self, names, gated: bool):
        super().__init__(names)
        self.gated = gated
        if gated:
            self.put("gate", nn.Linear(D, 2 * D, bias=False))
            self.put("up", nn.Linear(D, 2 * D, bias=False))
            self.put("down", nn.Linear(2 * D, D, bias=False))
        else:
            self.put("fc1", nn.Linear(D, 2 * D))
            self.put("fc2", nn.Linear(2 * D, D))

    def forward(self, x):
        if self.gated:
            return self.get("down")(F.silu(self.get("gate")(x)) * self.get("up")(x))
        return self.get("fc2")(F.gelu(self.get("fc1")(x)))


class Block(Named):
    def __init__(self, names, text: bool):
        super().__init__(names)
        self.put("norm1", Norm() if text else nn.LayerNorm(D))
        self.put("attn", Mix(names, causal=text))
        self.put("norm2", Norm() if text else nn.LayerNorm(D))
        self.put("mlp", Chan(names, gated=text))

    def forward(self, x):
        x = x + self.get("attn")(self.get("norm1")(x))
        return x + self.get("mlp")(self.get("norm2")(x))


class Tower(Named):
    """Patch embedding (a Linear on flattened 4x4 patches) and two encoder blocks."""

    def __init__(self, names):
        super().__init__(names)
        self.put("patch", nn.Linear(3 * PATCH * PATCH, D))
        self.put("vblocks", nn.ModuleList(Block(names, text=False) for _ in range(2)))

    def forward(self, pixel_values):
        b = pixel_values.shape[0]
        g = IMAGE // PATCH
        patches = pixel_values.reshape(b, 3, g, PATCH, g, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
        x = self.get("patch")(patches)
        for block in self.get("vblocks"):
            x = block(x)
        return x


class Bridge(Named):
    def __init__(self, names):
        super().__init__(names)
        self.put("proj1", nn.Linear(D, D))
        self.put("proj2", nn.Linear(D, D))

    def forward(self, x):
        return self.get("proj2")(F.gelu(self.get("proj1")(x)))


class Stack(Named):
    """Token embedding and two decoder layers."""

    def __init__(self, names):
        super().__init__(names)
        self.put("embed", nn.Embedding(VOCAB, D))
        self.put("lblocks", nn.ModuleList(Block(names, text=True) for _ in range(2)))
        self.put("final_norm", Norm())


class TinyVLM(Named):
    """input_ids (16 image tokens then text) + pixel_values [B, 3, 16, 16] (+ labels) -> loss, logits."""

    def __init__(self, names):
        super().__init__(names)
        self.put("vision", Tower(names))
        self.put("projector", Bridge(names))
        self.put("language", Stack(names))
        self.put("head", nn.Linear(D, VOCAB, bias=False))

    def get_output_embeddings(self):
        return self.get("head")

    def forward(self, input_ids, pixel_values, labels=None):
        image = self.get("projector")(self.get("vision")(pixel_values))
        lm = self.get("language")
        x = lm.get("embed")(input_ids)
        mask = (input_ids == IMAGE_TOKEN).unsqueeze(-1).expand_as(x)
        x = x.masked_scatter(mask, image.to(x.dtype))
        for block in lm.get("lblocks"):
            x = block(x)
        logits = self.get("head")(lm.get("final_norm")(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def build(names: dict[str, str]) -> TinyVLM:
    torch.manual_seed(0)
    return TinyVLM(names).eval()


def twin_models() -> tuple[TinyVLM, TinyVLM, dict[str, str]]:
    """The named model, the obfuscated one with the same weights, and named path -> obfuscated path."""
    named, obfuscated = build(NAMED), build(OBFUSCATED)
    path_map = {a: b for (a, _), (b, _) in zip(named.named_modules(), obfuscated.named_modules())}
    state = named.state_dict()
    obfuscated.load_state_dict({f"{path_map[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v for k, v in state.items()})
    return named, obfuscated, path_map


def example_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, IMAGE_TOKEN, (2, 8), generator=g)
    input_ids = torch.cat([torch.full((2, N_PATCHES), IMAGE_TOKEN), text], dim=1)
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN, -100)
    return dict(input_ids=input_ids, pixel_values=torch.randn(2, 3, IMAGE, IMAGE, generator=g), labels=labels)


FULL_VLM = dict(finetune_vision_layers=True, finetune_language_layers=True, finetune_projector=True)

# What each linear of the named model is (component, role, layer): the test's own reading of the code above.
_VISION_BLOCK = {**dict(zip(expand("self_attn.{q,k,v,o}_proj"), expand("attn.{q,k,v,o}"))),
                 "mlp.fc1": "mlp.up", "mlp.fc2": "mlp.down"}
_TEXT_BLOCK = {**dict(zip(expand("self_attn.{q,k,v,o}_proj"), expand("attn.{q,k,v,o}"))),
               **dict(zip(expand("mlp.{gate,up,down}_proj"), expand("mlp.{gate,up,down}")))}
EXPECTED = {
    "vision_tower.patch_embed": ("vision", "other", None),
    **{f"vision_tower.layers.{i}.{name}": ("vision", role, i) for i in range(2) for name, role in _VISION_BLOCK.items()},
    "multi_modal_projector.linear_1": ("projector", "other", None),
    "multi_modal_projector.linear_2": ("projector", "other", None),
    **{f"language_model.layers.{i}.{name}": ("language", role, i) for i in range(2) for name, role in _TEXT_BLOCK.items()},
    "lm_head": ("head", "other", None),
}


def _labels(rows) -> dict[str, tuple]:
    return {r.name: (r.component, r.role, r.layer) for r in rows}


def test_twins_compute_the_same_function():
    named, obfuscated, path_map = twin_models()
    assert "zq1.blk.1.mx.a0" in dict(obfuscated.named_modules())
    inputs = example_inputs()
    with torch.no_grad():
        a, b = named(**inputs), obfuscated(**inputs)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


def test_structure_labels_without_names():
    named, obfuscated, path_map = twin_models()
    inputs = example_inputs()
    named_labels = _labels(explain(named, FULL_VLM, inputs))
    obfuscated_labels = _labels(explain(obfuscated, FULL_VLM, inputs))
    assert named_labels == EXPECTED
    # Site by site (mapped by position in the module tree): the same component, role and layer.
    assert obfuscated_labels == {path_map[name]: labels for name, labels in EXPECTED.items()}


@pytest.mark.parametrize("trace_mode", ["whole", "blocks"])
def test_obfuscated_model_is_rewritten_and_trains(trace_mode):
    named, obfuscated, path_map = twin_models()
    inputs = example_inputs()
    named_lora = graphlora.rewrite(named, FULL_VLM, inputs, trace_mode=trace_mode)
    obfuscated_lora = graphlora.rewrite(obfuscated, FULL_VLM, inputs, trace_mode=trace_mode)
    # Traced whole or by block programs (labels from the eager recording's graph): labels come from a graph
    # (regional tracing would label by names).
    assert named_lora.trace_mode == obfuscated_lora.trace_mode == trace_mode

    # LoRA lands on the same linears, with the same labels (every linear but the head).
    expected_sites = sorted(name for name, (component, _, _) in EXPECTED.items() if component != "head"
                            and name != "vision_tower.patch_embed")
    assert sorted(s.name for s in named_lora.sites) == expected_sites
    assert sorted(s.name for s in obfuscated_lora.sites) == sorted(path_map[n] for n in expected_sites)
    by_name = {s.name: s for s in obfuscated_lora.sites}
    for site in named_lora.sites:
        twin = by_name[path_map[site.name]]
        assert (twin.component, twin.role, twin.layer) == (site.component, site.role, site.layer)

    # The names agree with the structure on the named model; on the obfuscated one they fail and
    # structure decides (the disagreements are reported, the labels above are structural).
    assert named_lora.label_check["disagreements"] == []
    assert named_lora.label_check["checked"] == len(EXPECTED)
    disagreements = {d["site"]: d for d in obfuscated_lora.label_check["disagreements"]}
    assert disagreements, "the obfuscated model's names should not explain its labels"
    assert obfuscated_lora.label_check["checked"] == len(EXPECTED)
    assert sorted(disagreements) == sorted(path_map[n] for n in EXPECTED if n != "lm_head")  # all but the head
    # ``changes_selection``: by its name labels the policy would choose the linear differently (neutral names
    # say nothing, so the structure decides: a warning, not an error; tests/test_label_disagreements.py).
    assert disagreements["zq1.blk.0.mx.a0"] == {  # a vision q projection inside a numbered block
        "site": "zq1.blk.0.mx.a0", "structure": ["vision", "attn.q"], "names": ["language", "other"],
        "changes_selection": True}
    assert disagreements["p0.l0"] == {"site": "p0.l0", "structure": ["projector", "other"], "names": ["other", "other"],
                                      "changes_selection": True}
    assert disagreements["tk.st.1.fz.g2"] == {
        "site": "tk.st.1.fz.g2", "structure": ["language", "mlp.down"], "names": ["language", "other"],
        "changes_selection": True}
    assert disagreements["zq1.pz"]["structure"] == ["vision", "other"]
    assert "hd" not in disagreements  # the head is found by get_output_embeddings(), not by its name

    # Identical at initialisation, and both train.
    with torch.no_grad():
        torch.testing.assert_close(named_lora(**inputs).logits, obfuscated_lora(**inputs).logits, rtol=0, atol=0)
    for lora_model in (named_lora, obfuscated_lora):
        assert not any(p.requires_grad for n, p in lora_model.named_parameters() if ".lora_" not in n)
        losses = train_and_check_grads(lora_model, inputs, steps=6)
        assert losses[-1] < losses[0], losses


class UnnamedOutputVLM(TinyVLM):
    """The obfuscated VLM returning its logits under no known name, and not saying which module is the head."""

    get_output_embeddings = None

    def __init__(self, names, form: str):
        super().__init__(names)
        self.form = form

    def forward(self, input_ids, pixel_values, labels=None):
        out = super().forward(input_ids, pixel_values, labels)
        if self.form == "tuple":
            return (out.loss, out.logits) if labels is not None else (out.logits,)
        return {"objective": out.loss, "scores": out.logits}


@pytest.mark.parametrize("form", ["tuple", "dict"])
@pytest.mark.parametrize("trace_mode", ["whole", "blocks"])
def test_the_output_linear_is_the_head_whatever_its_name_and_output_key(form, trace_mode):
    torch.manual_seed(0)
    model = UnnamedOutputVLM(OBFUSCATED, form).eval()
    lora_model = graphlora.rewrite(model, FULL_VLM, example_inputs(), trace_mode=trace_mode, verify=False)
    rows = {r.name: r for r in lora_model.explain_rows()}
    assert (str(rows["hd"].component), str(rows["hd"].role)) == ("head", "other")
    # Only the vocabulary-wide output matmul: the projector's and the blocks' outputs are not the head.
    assert [name for name, r in rows.items() if str(r.component) == "head"] == ["hd"]
    assert "hd" not in {s.name for s in lora_model.sites}
