"""The mirror: a second module tree over the user's model that shares its parameters.

``mirror_module(model)`` returns a tree of *new* module objects of the *same classes*, holding the *same*
``Parameter`` and buffer objects. The mirror is a working eager model (same forward code), so it can be
traced, run eagerly (generation) and extended (LoRA modules attached to its site modules, copies for
``modules_to_save``) without touching the user's module objects: the user's model keeps its
``state_dict`` keys and forward behaviour, while weights are shared, not copied.
"""

from __future__ import annotations

import copy

import torch


def mirror_module(module: torch.nn.Module, _memo: dict[int, torch.nn.Module] | None = None) -> torch.nn.Module:
    """A shallow structural copy of ``module``: new module objects, shared parameters and buffers.

    Module objects used at several places (tied submodules) stay shared in the mirror.
    """
    memo = {} if _memo is None else _memo
    if id(module) in memo:
        return memo[id(module)]
    twin = copy.copy(module)  # same class, __dict__ copied one level (config, hooks dicts shared below)
    memo[id(module)] = twin
    twin._parameters = dict(module._parameters)
    twin._buffers = dict(module._buffers)
    twin._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    # Hooks are carried over (transformers installs output-capturing hooks once per model and marks
    # the model as hooked), in dicts of the mirror's own so hooks graphlora adds stay on the mirror.
    for hook_dict in (
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_backward_hooks",
        "_backward_pre_hooks",
    ):
        if hasattr(module, hook_dict):
            setattr(twin, hook_dict, copy.copy(getattr(module, hook_dict)))
    twin._modules = {name: (mirror_module(child, memo) if child is not None else None)
                     for name, child in module._modules.items()}
    return twin
