"""Helpers for tests (not code under test)."""

from __future__ import annotations

import itertools
import re

import torch


def expand(*patterns: str) -> list[str]:
    """Shell-style brace expansion: ``"a.{0,1}.{q,k}_proj"`` -> 4 names. Test-side only."""
    out = []
    for pattern in patterns:
        parts = re.split(r"(\{[^}]*\})", pattern)
        choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
        out.extend("".join(c) for c in itertools.product(*choices))
    return out


def set_random_lora(lora_model, seed: int = 1, std: float = 0.2) -> None:
    """Give every LoRA matrix random non-zero values (B is zero at initialisation)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def merged_copy(original: torch.nn.Module, lora_model) -> torch.nn.Module:
    """An eager deep copy of ``original`` whose adapted weights are W + s B A (test-side merge).

    ``nn.Linear`` weights are [out, in]; a raw ``x @ W`` parameter is [in, out] and gets the transpose.
    """
    import copy

    merged = copy.deepcopy(original)
    with torch.no_grad():
        for site in lora_model.sites:
            module = lora_model.get_submodule(site.module)
            delta = site.scale * (module.lora_B.weight.float() @ module.lora_A.weight.float())
            weight = merged.get_parameter(site.name + ".weight" if site.kind == "linear" else site.name)
            weight += (delta.T if site.weight_layout == "in_out" else delta).to(weight.dtype)
    return merged


def train_and_check_grads(lora_model, inputs, steps: int) -> list[float]:
    """AdamW steps on one batch; asserts after the first backward that every site's lora_B got a gradient.

    Returns the losses, one per step.
    """
    lora_model.train()
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        loss = lora_model(**inputs).loss
        loss.backward()
        if step == 0:
            for site in lora_model.sites:
                grad = lora_model.get_submodule(site.module).lora_B.weight.grad
                assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {site.name}.lora_B"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


class EagerLoraReference:
    """Module-level LoRA on the *original* model (graphlora leaves its modules alone), reading the rewritten
    model's LoRA parameters: the reference a rewritten model's outputs and LoRA gradients must equal.

    ``nn.Linear`` sites get a forward hook adding ``s * B(A(x))`` (PEFT's numerics: x in the LoRA dtype, sum
    cast back); a raw parameter matmul site has its parameter replaced by ``W + s (B A)`` (transposed for a
    ``[in, out]`` weight) for the call. Use as ``with EagerLoraReference(model, lora_model): model(**batch)``.
    """

    def __init__(self, original: torch.nn.Module, lora_model):
        self.original = original
        self.lora_model = lora_model
        self._handles = []
        self._swapped = []

    def __enter__(self):
        for site in self.lora_model.sites:
            lora = self.lora_model.get_submodule(site.module)
            a, b, scale = lora.lora_A.weight, lora.lora_B.weight, site.scale
            if site.kind == "linear":
                def hook(module, args, output, a=a, b=b, scale=scale):
                    x = args[0].to(a.dtype)
                    return (output + (x @ a.T @ b.T) * scale).to(output.dtype)
                self._handles.append(self.original.get_submodule(site.name).register_forward_hook(hook))
            else:
                owner_path, _, attr = site.name.rpartition(".")
                owner = self.original.get_submodule(owner_path)
                weight = owner._parameters.pop(attr)
                if site.weight_layout in ("experts", "experts_t"):
                    # PEFT's ParamWrapper: A [r E, in] expert-major rows, B [out, r E] expert-minor columns
                    e = weight.shape[0]
                    delta = scale * torch.einsum("ore,eri->eoi", b.reshape(b.shape[0], -1, e), a.reshape(e, -1, a.shape[-1]))
                    delta = delta.transpose(1, 2) if site.weight_layout == "experts_t" else delta
                else:
                    delta = scale * (b @ a)
                    delta = delta.T if site.weight_layout == "in_out" else delta
                owner.__dict__[attr] = weight + delta.to(weight.dtype)
                self._swapped.append((owner, attr, weight))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        for owner, attr, weight in reversed(self._swapped):
            owner.__dict__.pop(attr, None)
            owner._parameters[attr] = weight
        self._handles, self._swapped = [], []
        return False


def lora_grads(lora_model) -> dict[str, torch.Tensor | None]:
    """The current gradient of every LoRA parameter, by name (cloned)."""
    return {n: (p.grad.detach().clone() if p.grad is not None else None)
            for n, p in lora_model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
