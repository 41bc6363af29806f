"""Block classes: which modules are repeated blocks, and which blocks can share one traced program.

A VLM is a few repeated block classes (vision encoder layers, decoder layers, cross-attention decoder
layers, global vision layers, patch mergers ...) and glue. A **block** is an integer-indexed child
of a module container (``layers.3``, ``blocks.0``) that holds submodules; nested blocks belong to the
outermost one. Two blocks share a program when they are interchangeable for ``torch.export``: the
same module classes at the same relative paths, parameters and buffers of the same names, shapes,
dtypes and trainability, and the same plain (Python scalar) attributes, except the layer counter
(``layer_idx`` and friends, which only index a KV cache). The LoRA branch is part of the program, so
the key also holds each site's rank, scale, dropout and weight layout (:func:`lora_key`).

Sharing is then *checked*, not assumed: every block is verified against eager through the shared
program (graphlora/block_planner.py), and one that differs runs eagerly with module-level LoRA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch

from graphlora.lora import EXPERT_HOLDER

#: Attributes that number a layer (used to index a KV cache): not part of a block's key.
LAYER_COUNTER_ATTRIBUTES = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx"})
#: Names of the LoRA modules graphlora attaches to a site module (graphlora/lora.py).
LORA_MODULES = frozenset({"lora_A", "lora_B", EXPERT_HOLDER})


def block_candidates(root: torch.nn.Module) -> list[str]:
    """Paths of the outermost blocks of ``root``: integer-indexed children that hold submodules."""
    found: list[str] = []

    def visit(path: str, module: torch.nn.Module) -> None:
        for name, child in module._modules.items():
            if child is None:
                continue
            child_path = f"{path}.{name}" if path else name
            if name.isdigit() and next(iter(child.children()), None) is not None:
                found.append(child_path)
                continue
            visit(child_path, child)

    visit("", root)
    return found


def block_containing(path: str, blocks: Iterable[str]) -> str | None:
    """The block among ``blocks`` that ``path`` lies in (or is), else None."""
    for block in blocks:
        if path == block or path.startswith(block + "."):
            return block
    return None


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return False


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, (tuple, list)) else value


def shape_key(module: torch.nn.Module) -> tuple:
    """What must be equal for two blocks to share one exported program, LoRA aside (see the module
    docstring and :func:`lora_key`)."""
    entries = []
    for rel, sub in module.named_modules():
        if any(part in LORA_MODULES for part in rel.split(".")):
            continue  # the LoRA branch is keyed by lora_key
        attributes = tuple(sorted(
            (name, _frozen(value)) for name, value in vars(sub).items()
            if not name.startswith("_") and name != "training" and name not in LAYER_COUNTER_ATTRIBUTES
            and _plain(value)))
        params = tuple((name, tuple(p.shape), str(p.dtype), p.requires_grad)
                       for name, p in sub._parameters.items() if p is not None)
        buffers = tuple((name, tuple(b.shape), str(b.dtype)) for name, b in sub._buffers.items() if b is not None)
        entries.append((rel, type(sub), attributes, params, buffers))
    return tuple(entries)


def lora_key(block_path: str, sites: Iterable) -> tuple:
    """The LoRA branches of one block, relative to it: rank, scale, dropout and layout of each site."""
    prefix = block_path + "."
    return tuple(sorted((s.name[len(prefix):], s.r, float(s.scale), float(s.dropout), s.kind, s.weight_layout)
                        for s in sites))


@dataclasses.dataclass
class BlockClass:
    """Blocks that run one shared program: their key, their paths (in call order) and a display name."""

    key: tuple
    name: str  # e.g. "LlamaDecoderLayer", "MllamaVisionEncoderLayer (2)" when a class has several keys
    instances: list[str]

    @property
    def representative(self) -> str:
        """The block whose module is exported (the first one called)."""
        return self.instances[0]


def group_blocks(root: torch.nn.Module, blocks: list[str], sites_by_block: dict[str, list]) -> list[BlockClass]:
    """Group ``blocks`` (in call order) into classes that can share a program."""
    classes: dict[tuple, BlockClass] = {}
    per_type: dict[str, int] = {}
    for path in blocks:
        module = root.get_submodule(path)
        key = (shape_key(module), lora_key(path, sites_by_block.get(path, [])))
        group = classes.get(key)
        if group is None:
            base = type(module).__name__
            per_type[base] = per_type.get(base, 0) + 1
            name = base if per_type[base] == 1 else f"{base} ({per_type[base]})"
            group = classes[key] = BlockClass(key, name, [])
        group.instances.append(path)
    return list(classes.values())


__all__ = ["BlockClass", "LAYER_COUNTER_ATTRIBUTES", "block_candidates", "block_containing", "group_blocks",
           "lora_key", "shape_key"]
