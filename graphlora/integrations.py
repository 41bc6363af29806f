"""Training integrations: ``transformers.Trainer`` and the trainers built on it (TRL's ``SFTTrainer`` ...).

A :class:`~graphlora.model.GraphLoraModel` already trains under a plain ``Trainer``: its ``forward`` reports
the original model's signature (so ``remove_unused_columns`` keeps the model's columns and Trainer passes
``num_items_in_batch``, which the program takes as a tensor input), and ``activation_checkpointing=True``
reaches :meth:`GraphLoraModel.activation_checkpointing_enable`. What a plain Trainer gets wrong:

* checkpoints: a model that is neither a ``PreTrainedModel`` nor a ``PeftModel`` is saved as its full
  ``state_dict()`` (every frozen base weight), and resuming cannot find an adapter to load;
* evaluation loss: Trainer finds the label columns from the *class* signature of ``forward``, which for a
  GraphLoraModel is generic, so ``eval_loss`` is not computed (unless ``label_names=["labels"]`` is set).

:class:`GraphLoraTrainerMixin` fixes both; use :class:`GraphLoraTrainer` in place of ``Trainer`` (the one
line), or mix it into another trainer class, first in the bases::

    from trl import SFTTrainer
    from graphlora.integrations import GraphLoraTrainerMixin

    class GraphLoraSFTTrainer(GraphLoraTrainerMixin, SFTTrainer):
        pass

Checkpoints then hold ``adapter_config.json``, ``adapter_model.safetensors`` and ``graphlora_policy.yaml``
(:meth:`GraphLoraModel.save_adapter`, PEFT's format) next to Trainer's own state (optimizer, scheduler, RNG,
``trainer_state.json``, ``training_args.bin``), and ``trainer.train(resume_from_checkpoint=...)`` /
``load_best_model_at_end`` copy the adapter back into the live model
(:meth:`GraphLoraModel.load_adapter_weights`, which checks keys, shapes and ranks/alphas).

Not covered: Trainer's own FSDP / DeepSpeed integrations (their state-dict paths bypass ``_save``); for
sharded training use a torchrun loop with FSDP2 in blocks mode, :func:`fully_shard_by_blocks`
(docs/training.md).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from graphlora.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

try:  # transformers is a dependency; the guard keeps `import graphlora.integrations` cheap to diagnose
    from transformers import Trainer
except ImportError:  # pragma: no cover
    Trainer = None  # type: ignore[assignment,misc]

TRAINING_ARGS_NAME = "training_args.bin"


def unwrap_graphlora(model: Any):
    """The :class:`GraphLoraModel` inside ``model`` (DDP's ``.module``, ``torch.compile``'s ``_orig_mod``), or None."""
    from graphlora.model import GraphLoraModel

    seen = set()
    while model is not None and id(model) not in seen:
        if isinstance(model, GraphLoraModel):
            return model
        seen.add(id(model))
        inner = model.__dict__.get("_orig_mod")
        if inner is None:
            inner = getattr(model, "module", None) if isinstance(model, torch.nn.Module) else None
        model = inner
    return None


class GraphLoraTrainerMixin:
    """Makes a ``transformers.Trainer`` (sub)class save and resume a GraphLoraModel as an adapter.

    * ``_save`` writes the adapter (:meth:`GraphLoraModel.save_adapter`) instead of the full state dict, plus
      the processing class and ``training_args.bin`` as Trainer does;
    * ``_load_from_checkpoint`` / ``_load_best_model`` load the adapter tensors into the live model;
    * the label columns (``label_names``) are read from the original model's forward, so evaluation computes
      ``eval_loss``;
    * ``component_learning_rates={"vision": 2e-5, "projector": 1e-4}`` gives the optimizer a group per
      component (:meth:`GraphLoraModel.param_groups`).

    Models that are not GraphLoraModels are handled by the trainer's own methods.
    """

    def __init__(self, *args, component_learning_rates: dict[str, float] | None = None, **kwargs):
        #: ``{"vision": 2e-5, "projector": 1e-4}``: learning rates per component group (GraphLoraModel.param_groups);
        #: the others get ``args.learning_rate``.
        self.component_learning_rates = dict(component_learning_rates or {})
        super().__init__(*args, **kwargs)
        lora_model = unwrap_graphlora(getattr(self, "model", None))
        if lora_model is not None:
            from transformers.utils.generic import can_return_loss, find_labels

            original_class = type(lora_model.mirror)
            if self.args.label_names is None:
                self.label_names = find_labels(original_class)
            self.can_return_loss = can_return_loss(original_class)

    # -- optimizer -------------------------------------------------------------------------------
    def create_optimizer(self, *args, **kwargs):
        """Trainer's optimizer over :meth:`GraphLoraModel.param_groups` when ``component_learning_rates`` is given:
        one group per component (split, as Trainer does, into parameters with and without weight decay)."""
        lora_model = unwrap_graphlora(self.model)
        if lora_model is None or not self.component_learning_rates or self.optimizer is not None:
            return super().create_optimizer(*args, **kwargs)
        groups = lora_model.param_groups(self.args.learning_rate,
                                         **{f"{k}_lr": v for k, v in self.component_learning_rates.items()})
        decay = set(self.get_decay_parameter_names(self.model))
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        split = []
        for group in groups:
            for suffix, wd, keep in (("", self.args.weight_decay, True), ("/no_decay", 0.0, False)):
                params = [p for p in group["params"] if (name_of.get(id(p)) in decay) == keep]
                if params:
                    split.append({**group, "name": group["name"] + suffix, "params": params, "weight_decay": wd})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        self.optimizer = optimizer_cls(split, **optimizer_kwargs)
        return self.optimizer

    # -- saving ----------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        lora_model = unwrap_graphlora(self.model)
        if lora_model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        lora_model.save_adapter(output_dir, overwrite=True)
        if getattr(self, "processing_class", None) is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    # -- loading ---------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        lora_model = unwrap_graphlora(model if model is not None else self.model)
        if lora_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _require_adapter(resume_from_checkpoint)
        lora_model.load_adapter_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        lora_model = unwrap_graphlora(self.model)
        if lora_model is None:
            return super()._load_best_model()
        best = self.state.best_model_checkpoint
        _require_adapter(best)
        lora_model.load_adapter_weights(best)


def fully_shard_by_blocks(model: torch.nn.Module, **fully_shard_kwargs: Any) -> list[torch.nn.Module]:
    """FSDP2 for a GraphLoraModel: ``fully_shard`` on every decoder layer and vision block, then on the root.

    * Switches to blocks mode first (:meth:`GraphLoraModel.trace_by_blocks`): each layer then runs its own
      program through the layer module, so FSDP2's unshard/reshard hooks run around it. A whole-model program
      never calls the layer modules (graphlora refuses that combination with an error naming this fix).
    * The layers are transformers' ``GradientCheckpointingLayer`` modules (decoder layers, vision blocks).
    * The user's original model object shares graphlora's parameters; ``fully_shard`` replaces them on
      graphlora's modules only, so the original model would keep every full weight alive. Its parameters are
      re-pointed to the sharded ones, which frees the full weights: afterwards use the GraphLoraModel (the original
      model object holds sharded parameters and cannot run on its own).

    ``fully_shard_kwargs`` (``mesh``, ``mp_policy``, ``reshard_after_forward`` ...) go to every ``fully_shard``
    call. Returns the sharded layer modules. Call it on every rank, before creating the optimizer.
    """
    from torch.distributed.fsdp import fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    lora_model = unwrap_graphlora(model)
    if lora_model is None:
        raise TypeError(f"fully_shard_by_blocks() takes a GraphLoraModel, not {type(model).__name__}")
    lora_model.trace_by_blocks()
    holders: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in lora_model.base_model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module, name))
    before = dict(lora_model.named_parameters(remove_duplicate=False))
    layers = [m for m in lora_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        fully_shard(layer, **fully_shard_kwargs)
    fully_shard(lora_model, **fully_shard_kwargs)
    after = dict(lora_model.named_parameters(remove_duplicate=False))
    for fqn, old in before.items():
        new = after.get(fqn)
        if new is not None and new is not old:
            for module, name in holders.get(id(old), ()):
                module._parameters[name] = new
    lora_model.sync_mirror_root()
    return layers


def _require_adapter(directory: str) -> None:
    if not os.path.isfile(os.path.join(directory, ADAPTER_WEIGHTS_NAME)) or \
            not os.path.isfile(os.path.join(directory, ADAPTER_CONFIG_NAME)):
        raise ValueError(f"Can't find a graphlora adapter checkpoint at {directory} (expected {ADAPTER_CONFIG_NAME} "
                         f"and {ADAPTER_WEIGHTS_NAME}, written by GraphLoraTrainerMixin._save)")


if Trainer is not None:

    class GraphLoraTrainer(GraphLoraTrainerMixin, Trainer):
        """``transformers.Trainer`` for GraphLoraModels: checkpoints hold the adapter, not the base weights."""

else:  # pragma: no cover
    GraphLoraTrainer = None  # type: ignore[assignment,misc]


__all__ = ["GraphLoraTrainer", "GraphLoraTrainerMixin", "fully_shard_by_blocks", "unwrap_graphlora"]
