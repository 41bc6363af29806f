"""Optimizer parameter groups per component: a learning rate for the vision tower's LoRA, another for the projector's.

``lora_model.param_groups(lr=2e-4, vision_lr=2e-5, projector_lr=1e-4)`` returns the groups for
``torch.optim.AdamW(groups)`` (or graphlora's Trainer, ``component_learning_rates=``): one group per component
that has sites (its sites' ``lora_A`` / ``lora_B``, by the component graphlora labelled the site with), one for
the ``modules_to_save`` copies. A component without its own rate gets ``lr``. Every trainable parameter is in
exactly one group (checked); a rate for a component with no sites is an error naming the components that
have sites, so a typo or a strategy that froze the tower does not pass silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from graphlora.errors import GraphLoraError
from graphlora.labels import Component

if TYPE_CHECKING:  # pragma: no cover
    from graphlora.model import GraphLoraModel

#: The group of the ``modules_to_save`` copies (fully trained modules, not LoRA).
MODULES_TO_SAVE_GROUP = "modules_to_save"
#: Every group name a learning rate can be given for, in the order the groups are returned.
GROUP_NAMES: tuple[str, ...] = tuple(str(c) for c in Component) + (MODULES_TO_SAVE_GROUP,)


class ParamGroupError(GraphLoraError, ValueError):
    """Learning rates for groups that do not exist, or parameters that no group holds."""


def param_groups(lora_model: "GraphLoraModel", lr: float, rates: dict[str, float] | None = None,
                 weight_decay: float | None = None) -> list[dict[str, Any]]:
    """``[{"name": group, "params": [...], "lr": rate (, "weight_decay": wd)}]`` (see the module docstring).

    ``rates`` maps group names (:data:`GROUP_NAMES`) to learning rates."""
    rates = dict(rates or {})
    unknown = sorted(set(rates) - set(GROUP_NAMES))
    if unknown:
        raise ParamGroupError(f"learning rates for unknown groups {unknown}; the groups are {', '.join(GROUP_NAMES)}")
    members: dict[str, list[torch.nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    placed: set[int] = set()
    for site in lora_model.sites:
        module = lora_model.get_submodule(site.module)
        for part in ("lora_A", "lora_B"):
            p = getattr(module, part).weight
            if id(p) not in placed:
                placed.add(id(p))
                members[str(site.component)].append(p)
    for p in lora_model.parameters():
        if p.requires_grad and id(p) not in placed:
            placed.add(id(p))
            members[MODULES_TO_SAVE_GROUP].append(p)
    empty = sorted(name for name in rates if not members[name])
    if empty:
        present = [name for name in GROUP_NAMES if members[name]]
        raise ParamGroupError(f"learning rates for {', '.join(empty)}, which {'has' if len(empty) == 1 else 'have'} "
                              f"no trainable parameters in this model (groups with parameters: {', '.join(present)})")
    groups = []
    for name in GROUP_NAMES:
        if members[name]:
            group = {"name": name, "params": members[name], "lr": float(rates.get(name, lr))}
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
            groups.append(group)
    trainable = {id(p) for p in lora_model.parameters() if p.requires_grad}
    if trainable != placed:  # a LoRA matrix that was frozen, or a trainable tensor nothing accounts for
        raise ParamGroupError(f"{len(placed ^ trainable)} parameters are in the groups but not trainable, or the "
                              "other way round: freeze or unfreeze through the policy, not by hand")
    return groups


def rates_from_kwargs(kwargs: dict[str, Any]) -> dict[str, float]:
    """``{"vision_lr": 2e-5, ...}`` -> ``{"vision": 2e-5, ...}``; None values are left out."""
    rates = {}
    for key, value in kwargs.items():
        if not key.endswith("_lr"):
            raise TypeError(f"param_groups() got an unexpected keyword argument {key!r} (rates are <group>_lr: "
                            f"{', '.join(n + '_lr' for n in GROUP_NAMES)})")
        if value is not None:
            rates[key[:-3]] = value
    return rates
