"""Labels from structure for two shapes the transformer-only rules missed (found with LFM2-VL):

* a gated short-convolution token mixer (LFM2's ShortConv: ``out_proj(C * conv(B * x))``, ``B, C, x`` chunks
  of one ``in_proj``) is linear attention with a fixed local kernel: ``in_proj`` is ``attn.qkv`` and
  ``out_proj`` is ``attn.o``, and the block's feed-forward keeps its MLP roles;
* a matmul that reads no modality but feeds the vision blocks (Siglip2's position table, resized to each
  image by weights computed from the integer patch grid) belongs to the vision model, not to ``other``.

The toy model's attribute names are meaningless, so the labels can only come from the graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from graphlora.explainer import explain

D, VOCAB, GRID, PATCH = 16, 32, 2, 4


class Mixer(nn.Module):
    """Gated short convolution: ``p2(C * conv(B * x))`` with ``B, C, x = p1(x)``."""

    def __init__(self):
        super().__init__()
        self.p1 = nn.Linear(D, 3 * D, bias=False)
        self.c0 = nn.Conv1d(D, D, 3, groups=D, padding=2, bias=False)
        self.p2 = nn.Linear(D, D, bias=False)

    def forward(self, x):
        b, c, h = self.p1(x).transpose(-1, -2).chunk(3, dim=-2)
        y = F.conv1d(b * h, self.c0.weight, padding=2, groups=D)[..., : x.shape[1]]
        return self.p2((c * y).transpose(-1, -2))


class Attn(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal
        self.a0, self.a1, self.a2, self.a3 = (nn.Linear(D, D, bias=False) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, 2, D // 2).transpose(1, 2) for f in (self.a0, self.a1, self.a2))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.a3(out.transpose(1, 2).reshape(b, n, D))


class Ffn(nn.Module):
    def __init__(self):
        super().__init__()
        self.f0, self.f1 = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.f2 = nn.Linear(2 * D, D, bias=False)

    def forward(self, x):
        return self.f2(F.silu(self.f0(x)) * self.f1(x))


class Layer(nn.Module):
    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mx, self.ff = mixer, Ffn()

    def forward(self, x):
        x = x + self.mx(x)
        return x + self.ff(x)


class Toy(nn.Module):
    """Patch linear + position table resized by the grid -> 1 attention block -> linear -> [conv, attn] -> head."""

    def __init__(self):
        super().__init__()
        self.pe = nn.Linear(3 * PATCH * PATCH, D)
        self.tab = nn.Parameter(torch.randn(GRID * GRID, D))
        self.vb = nn.ModuleList([Layer(Attn(causal=False))])
        self.pj = nn.Linear(D, D)
        self.em = nn.Embedding(VOCAB, D)
        self.lb = nn.ModuleList([Layer(Mixer()), Layer(Attn(causal=True))])
        self.hd = nn.Linear(D, VOCAB, bias=False)

    def forward(self, input_ids, pixel_values, grid):
        n = pixel_values.shape[1]
        # interpolation weights of each patch over the table: computed from the integer grid only
        cells = torch.arange(n)[:, None] * grid.prod(-1).float()[:, None, None] / n
        weights = torch.softmax(-(cells - torch.arange(GRID * GRID)).abs(), dim=-1)
        x = self.pe(pixel_values) + weights @ self.tab
        for layer in self.vb:
            x = layer(x)
        h = torch.cat([self.pj(x), self.em(input_ids)], dim=1)
        for layer in self.lb:
            h = layer(h)
        return CausalLMOutputWithPast(logits=self.hd(h))


@pytest.fixture(scope="module")
def rows():
    torch.manual_seed(0)
    inputs = dict(input_ids=torch.randint(VOCAB, (2, 5)), pixel_values=torch.randn(2, 4, 3 * PATCH * PATCH),
                  grid=torch.tensor([[2, 2], [2, 2]]))
    policy = dict(finetune_vision_layers=True, finetune_language_layers=True, finetune_projector=True)
    return {r.name: (r.component, r.role, r.layer) for r in explain(Toy().eval(), policy, inputs)}


def test_gated_short_convolution_is_the_token_mixer(rows):
    assert rows["lb.0.mx.p1"] == ("language", "attn.qkv", 0)
    assert rows["lb.0.mx.p2"] == ("language", "attn.o", 0)
    assert [rows[f"lb.0.ff.f{i}"][1] for i in range(3)] == ["mlp.gate", "mlp.up", "mlp.down"]
    assert rows["lb.1.mx.a3"] == ("language", "attn.o", 1)


def test_position_table_resized_by_the_grid_is_vision(rows):
    assert rows["tab"][:2] == ("vision", "other")
    assert rows["pe"][:2] == ("vision", "other")
    assert rows["pj"][:2] == ("projector", "other")
