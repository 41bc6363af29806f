"""GraphLoraModel: the rewritten model users train.

* The user's model is left as it is (its modules, hooks and ``state_dict`` keys); its parameters are
  frozen and *shared*, not copied.
* A *mirror* (graphlora/mirror.py) — new module objects of the same classes over the same parameters —
  carries the LoRA modules (``<site>.lora_A`` / ``<site>.lora_B``) and the trainable copies of
  ``modules_to_save``. GraphLoraModel registers the mirror's top-level children as its own, so its
  parameter names and ``state_dict`` keys are the original model's keys plus the LoRA keys, with no
  wrapper prefix, and decoder layers / vision blocks stay addressable submodules.
* What runs is decided by the :class:`~graphlora.planner.Planner` at rewrite time and served by the
  :class:`~graphlora.runtime.Runtime`: block programs (the default; glue eager with module-level
  LoRA), one whole-model program, or region programs. Programs read the live parameters by name.
* ``generate()`` and calls that ask for a KV cache run the mirror eagerly with the LoRA branch as
  forward hooks (module-level LoRA), which is the same computation.

This module is the ``nn.Module`` plumbing and the public API; docs/architecture.md has the picture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Iterator

import torch

from graphlora import families
from graphlora.errors import GraphLoraError
from graphlora.labels import Component, graph_meta
from graphlora.lora import AdapterSwitch, Site, SiteTable, SkippedSite, eager_lora_hooks
from graphlora.pipeline import Pipeline
from graphlora.planner import Planner
from graphlora.policy import Policy
from graphlora.grad_check import DeadSiteMonitor
from graphlora.runtime import Runtime, TraceRecord, forced_kwargs
from graphlora.trace import Program, ProgramVariant, text_length
from graphlora.trace_modes import RegionInfo, TraceMode
from graphlora.verify import Verification


class _ForwardWithSignature:
    """``forward`` whose ``inspect.signature`` is the wrapped model's (Trainer inspects it)."""

    def __get__(self, obj, objtype=None):
        if obj is None:
            return GraphLoraModel._forward
        return _BoundForward(obj)


class _BoundForward:
    __slots__ = ("_obj",)

    def __init__(self, obj: "GraphLoraModel"):
        self._obj = obj

    def __call__(self, *args, **kwargs):
        return GraphLoraModel._forward(self._obj, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self._obj._eager.forward)

    @property
    def __doc__(self):  # type: ignore[override]
        return GraphLoraModel._forward.__doc__



class GraphLoraModel(torch.nn.Module):
    """A model rewritten with LoRA; called, trained and evaluated like the original.

    Built by :func:`graphlora.rewrite`. Attributes: ``policy``, ``sites`` (adapted modules),
    ``skipped_sites`` (modules the policy chose that were not adapted, with reasons), ``trace_mode``,
    ``regions`` (what runs how), ``verification``, ``traces`` (every trace made, with the reason),
    ``num_traces``.
    """

    forward = _ForwardWithSignature()  # type: ignore[assignment]

    def __init__(self, original: torch.nn.Module, mirror: torch.nn.Module, policy: Policy, cache_size: int = 8,
                 fuse: bool | str = "auto", compile: bool | dict = False):
        super().__init__()
        # Register the mirror's top-level children/parameters/buffers under the same names: the
        # state_dict keys are the original's. The mirror root itself is held unregistered.
        for name, child in mirror._modules.items():
            self.add_module(name, child)
        for name, param in mirror._parameters.items():
            self.register_parameter(name, param)
        for name, buf in mirror._buffers.items():
            self.register_buffer(name, buf, persistent=name not in mirror._non_persistent_buffers_set)
        object.__setattr__(self, "_eager", mirror)
        object.__setattr__(self, "_original", original)
        # Families whose vision attention splits on data get an export-friendly, identical implementation.
        families.prepare_for_tracing(mirror)
        self.policy = policy
        self.sites: list[Site] = []
        self.skipped_sites: list[SkippedSite] = []
        #: Labels and decisions of every labelled matmul, and the LoRA branch of every site.
        self.site_table = SiteTable()
        #: On/off state of the adapters, shared by programs, glue forwards and hooks.
        self.switch = AdapterSwitch()
        #: "blocks", "whole" or "regional" (:class:`graphlora.trace_modes.TraceMode`).
        self.trace_mode = TraceMode.BLOCKS
        #: Which parts run as graphs and which eagerly (see :class:`RegionInfo`).
        self.regions: list[RegionInfo] = []
        #: How the traced program(s) compared with eager when the model was rewritten.
        self.verification: list[Verification] = []
        #: Structure vs module-name labels of the analysis graph: {"checked": n, "disagreements": [...]}.
        self.label_check: dict = {}
        #: The base model's bitsandbytes layers by module path (graphlora/quantized.py); empty for a float model.
        self.quantized: dict = {}
        #: Replace LoRA branches by the fused graphlora::lora_linear op (fuse_lora_linear pass): True, False, or
        #: "auto" (where measured faster; nowhere yet: graphlora/fusion_default.py).
        self.fuse = fuse
        #: torch.compile every program (True, or a dict of torch.compile keyword arguments).
        self.compile = compile
        self.pipeline = Pipeline(policy, fuse)
        self.runtime = Runtime(self, self.pipeline, cache_size)
        self.planner = Planner(self)
        #: The copies of the base weights :meth:`merge` took (``graphlora.adapters.MergeState``), or None.
        self.merge_state = None
        #: Watches the first training backward for sites that get no gradient (:attr:`dead_sites`).
        self.dead_site_monitor = DeadSiteMonitor(self)
        self.train(original.training)

    # ------------------------------------------------------------------ nn.Module plumbing
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            eager = self.__dict__.get("_eager")
            if eager is None or name.startswith("__"):
                raise
            # HF conveniences (config, generation_config, device, dtype, get_input_embeddings ...).
            return getattr(eager, name)

    @property
    def mirror(self) -> torch.nn.Module:
        """The module tree that runs: the user's classes over the shared parameters, with the LoRA modules."""
        return self._eager

    @property
    def observer(self):
        """``observer(stage, graph_module)``, called at each stage of each trace (graph dumps); not pickled."""
        return self.pipeline.observer

    @observer.setter
    def observer(self, value) -> None:
        self.pipeline.observer = value

    @property
    def traces(self) -> list[TraceRecord]:
        """Every trace made (and the eager analysis recording), each with the reason it was made."""
        return self.runtime.traces

    @property
    def num_traces(self) -> int:
        return self.runtime.num_traces

    def trace_log(self) -> str:
        """One line per trace made: what it serves and why it was made."""
        return "\n".join(t.describe() for t in self.traces if t.kind == "program")

    def train(self, mode: bool = True) -> "GraphLoraModel":
        super().train(mode)
        self._eager.training = mode
        return self

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        self.sync_mirror_root()
        self.runtime.clear()  # programs bake dtypes and devices: re-trace after .to()
        return result

    def sync_mirror_root(self) -> None:
        """Root-level parameters and buffers are registered on both this module and the mirror root: after
        something replaced them here (``.to()``, FSDP2's ``fully_shard``), the mirror root gets the new ones."""
        self._eager._parameters.update({k: v for k, v in self._parameters.items() if k in self._eager._parameters})
        self._eager._buffers.update({k: v for k, v in self._buffers.items() if k in self._eager._buffers})

    def __getstate__(self):
        _drop_transformers_capture_hooks(self._eager)
        _drop_transformers_capture_hooks(self._original)
        return super().__getstate__()

    @property
    def on_meta(self) -> bool:
        """Whether the parameters live on the meta device (a large config inspected without weights)."""
        first = next(self.parameters(), None)
        return first is not None and first.device.type == "meta"

    @property
    def adapters_enabled(self) -> bool:
        return self.switch.enabled

    @adapters_enabled.setter
    def adapters_enabled(self, value: bool) -> None:
        self.switch.enabled = value

    @property
    def base_model(self) -> torch.nn.Module:
        """The user's original model (its parameters are shared with this one)."""
        return self._original

    def get_base_model(self) -> torch.nn.Module:
        return self._original

    # ------------------------------------------------------------------ calling
    def _forward(self, *args, **kwargs):
        """Run the model (same arguments and output type as the original model's forward)."""
        call = self._bind_call(args, kwargs)
        out = self._run(call)
        if self.dead_site_monitor.active and self.training and torch.is_grad_enabled():
            self.dead_site_monitor.watch(call, out)  # the first training backward(s) only
        return out

    @property
    def dead_sites(self) -> list:
        """Sites whose first training backward gave their ``lora_B`` no gradient or an all-zero one
        (:class:`graphlora.grad_check.DeadSite`: name, component, fault, likely cause); reported once, as a warning."""
        return list(self.dead_site_monitor.dead)

    def _run(self, call: dict[str, Any]):
        wants_cache = call.get("use_cache") or call.get("past_key_values") is not None or call.get("cache") is not None
        items = call.get("num_items_in_batch")
        if isinstance(items, (int, float)) and not isinstance(items, bool):
            # Trainer's count of label tokens (the loss divides by it). transformers hands it on to every decoder
            # layer, so as a Python number it would be a constant of the programs (one new trace per value); as a
            # tensor it is a program input.
            call["num_items_in_batch"] = torch.tensor(items)
        if self.trace_mode in (TraceMode.REGIONAL, TraceMode.BLOCKS):
            if not wants_cache:
                call = {**call, **forced_kwargs(self._eager)}
            self.runtime.text_len = text_length(call)
            glue = self.planner.glue_param_sites if self.adapters_enabled else []
            if glue:
                self.planner.glue_autocast = any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
            with eager_lora_hooks(self, glue) if glue else contextlib.nullcontext():
                return self._eager(**call)  # blocks/regions run their programs, glue runs module-level LoRA
        if wants_cache:
            # Incremental decoding needs the KV cache object, which a traced program cannot return.
            return self._eager_call(call)
        try:
            program, flat = self.runtime.whole_program_for(call)
            return program(self, flat)
        except Exception as e:
            sharded = _fsdp_sharded_submodules(self)
            if not sharded:
                raise
            where = ", ".join(sharded[:3]) + (" ..." if len(sharded) > 3 else "")
            raise GraphLoraError(
                f"FSDP2 (fully_shard) on submodules ({where}) needs trace_mode='blocks': a whole-model program never "
                "calls those modules, so their all-gather hooks do not run and it would read sharded parameters. Call "
                "lora_model.trace_by_blocks() (or rewrite(..., trace_mode='blocks'); graphlora.integrations."
                "fully_shard_by_blocks does both) before fully_shard; fully_shard on the root alone works in whole "
                "mode") from e

    def _bind_call(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if not args:
            return dict(kwargs)
        sig = inspect.signature(self._eager.forward)
        bound = sig.bind_partial(*args, **kwargs)
        call: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = sig.parameters[name].kind
            if kind == inspect.Parameter.VAR_KEYWORD:
                call.update(value)
            elif kind == inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise GraphLoraError("graphlora cannot trace a forward that takes extra positional arguments")
            else:
                call[name] = value
        return call

    def _eager_call(self, call: dict[str, Any]):
        sites = self.sites if self.adapters_enabled else []
        with eager_lora_hooks(self, sites):
            return self._eager(**call)

    def generate(self, *args, **kwargs):
        """Hugging Face generation, run eagerly with the LoRA branches as forward hooks."""
        if self.trace_mode in (TraceMode.REGIONAL, TraceMode.BLOCKS):
            # Glue runs module-level LoRA; blocks and regions fall back to eager + hooks for KV-cache calls.
            glue = self.planner.glue_param_sites if self.adapters_enabled else []
            with eager_lora_hooks(self, glue) if glue else contextlib.nullcontext():
                return self._eager.generate(*args, **kwargs)
        sites = self.sites if self.adapters_enabled else []
        with eager_lora_hooks(self, sites):
            return self._eager.generate(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes the base model's outputs (e.g. DPO reference passes)."""
        if self.merged:  # the base weights hold the adapter: "disabled" would silently be the merged model
            raise GraphLoraError("disable_adapter() while the adapter is merged: call unmerge() first")
        previous = self.adapters_enabled
        self.adapters_enabled = False
        try:
            yield
        finally:
            self.adapters_enabled = previous

    # ------------------------------------------------------------------ adapters (graphlora/adapters/)
    def save_adapter(self, directory, overwrite: bool = False, *, for_serving: str | None = None, **kwargs):
        """Save the adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``) plus
        ``graphlora_policy.yaml``; ``PeftModel.from_pretrained`` and :func:`graphlora.load_adapter` read it.
        Existing adapter files are replaced only with ``overwrite=True``. See docs/adapters.md.

        ``for_serving="vllm"`` writes what vLLM serves instead (one global rank and alpha, per-site scales
        folded into B, exactly equal) and returns a :class:`graphlora.adapters.serving.ServingReport` naming
        the server flags it needs; what vLLM cannot serve is refused with the site and the reason."""
        if for_serving is not None:
            from graphlora.adapters.serving import save_for_serving

            if kwargs:
                raise TypeError(f"save_adapter(for_serving=...) takes no {', '.join(sorted(kwargs))}")
            return save_for_serving(self, directory, for_serving, overwrite=overwrite)
        from graphlora import adapters

        return adapters.save_adapter(self, directory, overwrite=overwrite, **kwargs)

    def load_adapter_weights(self, directory) -> None:
        """Copy the adapter tensors that :meth:`save_adapter` wrote in ``directory`` into this model, in place
        (resuming training). Keys, shapes and the numeric config fields must match this model's; see
        :func:`graphlora.adapters.load_adapter_weights`."""
        from graphlora import adapters

        adapters.load_adapter_weights(self, directory)

    def merge(self) -> None:
        """Fold ``s * B A`` into the adapted base weights, in place.

        WARNING: the base weights are SHARED with the original model you passed to ``rewrite()``: merging
        changes that model too (``lora_model.base_model``) until :meth:`unmerge`. A copy of every merged
        weight is kept so that ``unmerge()`` restores it bit-exactly. While merged, ``forward`` and
        ``generate`` run without the LoRA branch (no dropout, no gradient into LoRA) and
        ``disable_adapter()`` is refused. Weights tied to others are refused (use :meth:`save_merged`)."""
        from graphlora import adapters

        adapters.merge(self)

    def unmerge(self) -> None:
        """Restore the base weights saved by :meth:`merge`, bit-exactly, and re-enable the LoRA branch."""
        from graphlora import adapters

        adapters.unmerge(self)

    @property
    def merged(self) -> bool:
        """Whether :meth:`merge` folded the adapter into the base weights."""
        return self.merge_state is not None

    def save_merged(self, directory, overwrite: bool = False, **kwargs):
        """Write a plain transformers checkpoint (``config.json`` + safetensors) of the merged model, which
        ``from_pretrained`` loads into the original class; computed out of place, the live model (and the
        original model) are not changed. ``modules_to_save`` copies replace the originals."""
        from graphlora import adapters

        return adapters.save_merged(self, directory, overwrite=overwrite, **kwargs)

    # ------------------------------------------------------------------ tracing
    def trace_by_blocks(self, verify: bool | str = True) -> None:
        """Run every block holding a site through its block class's program (glue eager); the default mode.

        Needed for per-layer gradient checkpointing and FSDP2 sharding: both act on the layer modules'
        calls, which a whole-model program does not make. Sites and LoRA weights are kept.
        """
        self.planner.trace_by_blocks(verify)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Recompute each decoder layer / vision block in backward instead of storing its activations.

        Switches to :meth:`trace_by_blocks` (one program per layer) and turns on transformers' per-layer
        checkpointing flags (non-reentrant by default). transformers' layers checkpoint their class
        ``forward``, which a layer's program runner replaces, so the runner itself wraps each program
        call in the layer's checkpoint function (graphlora/runtime.py). Outputs and gradients are
        unchanged; activations inside each layer are recomputed in backward.
        """
        self.trace_by_blocks()
        options = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if hasattr(self._eager, "activation_checkpointing_enable"):  # transformers >= 5.2x
            self._eager.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)
        else:  # pragma: no cover - older transformers
            self._eager.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Alias of :meth:`activation_checkpointing_enable` (transformers' and PEFT's older name)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        for module in self._eager.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self._eager.modules())

    is_gradient_checkpointing = is_activation_checkpointing

    # ------------------------------------------------------------------ reporting
    @property
    def policy_digest(self) -> str:
        """sha256 of the canonical JSON of the policy this model was rewritten with."""
        return self.policy.digest()

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts (shared weights counted once)."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def param_groups(self, lr: float, *, weight_decay: float | None = None, **component_lrs: float | None) -> list[dict]:
        """Optimizer parameter groups with a learning rate per component, e.g.
        ``torch.optim.AdamW(lora_model.param_groups(lr=2e-4, vision_lr=2e-5, projector_lr=1e-4))``.

        One group per component with sites (``vision``, ``projector``, ``cross_attention``, ``language``,
        ``head``, ``other``; the rate ``<component>_lr``, else ``lr``) and one for the ``modules_to_save``
        copies (``modules_to_save_lr``); each group has a ``name``. Every trainable parameter is in exactly
        one group; a rate for a group with no parameters is an error. See graphlora/param_groups.py."""
        from graphlora.param_groups import param_groups, rates_from_kwargs

        return param_groups(self, lr, rates_from_kwargs(component_lrs), weight_decay)

    def lora_state_dict(self, peft_keys: bool = False) -> dict[str, torch.Tensor]:
        """The LoRA tensors; with ``peft_keys`` named as PEFT saves them (``base_model.model.<module>...``)."""
        out = {}
        for site in self.sites:
            module = self.get_submodule(site.module)
            for part in ("lora_A", "lora_B"):
                key = f"{site.module}.{part}.weight"
                out[f"base_model.model.{key}" if peft_keys else key] = getattr(module, part).weight
        return out

    def explain_rows(self) -> list:
        """One :class:`graphlora.report.ExplainRow` per labelled matmul: labels, decision and reason.

        Whole mode reads the first LoRA program's graph; blocks and regional mode the site table (from
        the eager analysis recording, resp. from names). Sites refused when their LoRA was created (expert matmuls ...) and sites that
        cannot reach the loss show as not adapted, with the reason.
        """
        from graphlora.report import ExplainRow, explain_program

        program = next((p for k, p in self.runtime.whole.programs() if k.variant == ProgramVariant.LORA), None)
        if self.trace_mode == TraceMode.WHOLE and program is not None:
            rows = explain_program(program)
        else:
            rows = []
            for name, labels in self.site_table.labels.items():
                d = self.site_table.decisions.get(name)
                targeted = bool(d and d.targeted)
                rows.append(ExplainRow(name, str(labels.component), str(labels.role), labels.layer, targeted,
                                       d.r if targeted else None, d.alpha if targeted else None,
                                       d.reason if d else "not decided", bool(d and d.skipped)))
            listed = {r.name for r in rows}
            rows += [ExplainRow(s.name, s.component, s.role, s.layer, True, s.r, s.alpha, s.reason)
                     for s in self.sites if s.name not in listed]
        refused = {s.name: s for s in self.skipped_sites}
        rows = [dataclasses.replace(r, targeted=False, r=None, alpha=None, skipped=True, reason=refused[r.name].reason)
                if r.name in refused else r for r in rows]
        names_say = {d["site"]: "/".join(d["names"]) for d in self.label_check.get("disagreements", [])}
        rows = [dataclasses.replace(r, names_say=names_say[r.name]) if r.name in names_say else r for r in rows]
        quantized = {path: layer.describe() for path, layer in self.quantized.items()}
        return [dataclasses.replace(r, quantization=quantized[r.name]) if r.name in quantized else r for r in rows]

    def fusion_report(self) -> dict[str, dict]:
        """Per site: ``{"fused": bool, "reason": str}``.

        Whole mode: the sites of the most recent LoRA program. Blocks mode: every site of every block,
        from its class's most recent LoRA program (a class program's report names the representative
        block's sites; each block gets the same entries under its own names), and each glue site, which
        runs the fused op as module-level LoRA. Regional mode: every LoRA region program.
        """
        return fusion_report(self)

    def block_programs(self) -> dict[str, Program]:
        """Block class name -> its most recent program with the adapters on (blocks mode)."""
        out = {}
        for block_class in self.block_classes():
            cache = self.runtime.block_caches.get(block_class.name)
            programs = [p for k, p in cache.programs() if k.variant == ProgramVariant.LORA] if cache is not None else []
            if programs:
                out[block_class.name] = programs[-1]
        return out

    def block_classes(self) -> list:
        """The block classes whose programs run the blocks (:class:`graphlora.blocks.BlockClass`), in call order."""
        return list({id(c): c for c in self.runtime.block_class_of.values()}.values())

    def cache_info(self) -> dict[str, int]:
        return {"programs": len(self.runtime.whole), "maxsize": self.runtime.whole.maxsize,
                "traces_made": self.num_traces}

    def programs(self) -> list[Program]:
        """Every cached program (whole-model, region and block-class programs)."""
        return self.runtime.programs()


def _fsdp_sharded_submodules(root: torch.nn.Module) -> list[str]:
    """Paths of the strict submodules that FSDP2's ``fully_shard`` was applied to."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch built without distributed
        return []
    return [name for name, m in root.named_modules() if name and isinstance(m, FSDPModule)]


def fusion_report(lora_model: "GraphLoraModel") -> dict[str, dict]:
    """See :meth:`GraphLoraModel.fusion_report`."""
    runtime = lora_model.runtime
    if lora_model.trace_mode == TraceMode.WHOLE:
        for key, program in reversed(runtime.whole.programs()):
            if key.variant == ProgramVariant.LORA:
                return dict(graph_meta(program.graph_module).fusion)
        return {}
    report: dict[str, dict] = {}
    for cache in runtime.region_caches.values():
        for key, program in cache.programs():
            if key.variant == ProgramVariant.LORA:
                report.update(graph_meta(program.graph_module).fusion)
    served: dict[str, dict] = {}
    for block_class in {id(c): c for c in runtime.block_class_of.values()}.values():
        cache = runtime.block_caches.get(block_class.name)
        programs = [p for k, p in cache.programs() if k.variant == ProgramVariant.LORA] if cache is not None else []
        if not programs:
            continue
        entries = graph_meta(programs[-1].graph_module).fusion
        rep = block_class.representative + "."
        for path in block_class.instances:
            for site, entry in entries.items():
                name = path + "." + site[len(rep):] if site.startswith(rep) else site
                served[name] = dict(entry)
    report.update(served)
    for path in lora_model.planner.glue_forwards:
        forward = lora_model.get_submodule(path).__dict__.get("forward")
        report.setdefault(path, dict(getattr(forward, "last", {"fused": False, "reason": "no glue forward"})))
    autocast = " (autocast is on)" if lora_model.planner.glue_autocast else ""
    for site in lora_model.planner.glue_param_sites:
        report.setdefault(site.name, {"fused": False, "reason": "glue raw parameter matmul: the weight is "
                                                                 f"replaced by W + s (B A)^T for each call{autocast}"})
    return report


def _drop_transformers_capture_hooks(root: torch.nn.Module) -> None:
    """Remove transformers' output-capturing hooks (local closures, unpicklable); they reinstall lazily."""
    for module in root.modules():
        for hook_id, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__module__", "") == "transformers.utils.output_capturing":
                del module._forward_hooks[hook_id]
        if module.__dict__.get("_output_capturing_hooks_installed"):
            module._output_capturing_hooks_installed = False


__all__ = ["GraphLoraModel", "RegionInfo", "Site", "SkippedSite", "Component", "TraceMode"]
