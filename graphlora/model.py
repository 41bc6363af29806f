"""GraphLoraModel: the rewritten model users train.

Structure (docs/architecture.md):

* The user's model is left as it is (its modules, hooks and ``state_dict`` keys); its parameters are
  frozen and *shared*, not copied.
* A *mirror* (graphlora/mirror.py) — new module objects of the same classes over the same parameters —
  carries the LoRA modules (``<site>.lora_A`` / ``<site>.lora_B``) and the trainable copies of
  ``modules_to_save``. GraphLoraModel registers the mirror's top-level children as its own, so its
  parameter names and ``state_dict`` keys are the original model's keys plus the LoRA keys, with no
  wrapper prefix, and decoder layers / vision blocks stay addressable submodules.
* ``forward`` runs a traced program (graphlora/trace.py) chosen from a cache keyed by what the trace
  specialised on; programs read the live parameters by name at every call.
* ``generate()`` and calls that ask for a KV cache run the mirror eagerly with the LoRA branch as
  forward hooks (module-level LoRA), which is the same computation.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import time
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree

from graphlora import families
from graphlora.errors import GraphLoraError
from graphlora.labels import Component, get_decision, labelled_nodes
from graphlora.lora import LORA_DTYPES, Site, SkippedSite, attach_lora, eager_lora_hooks
from graphlora.pass_manager import PassManager, PassRecord
from graphlora.passes.insert_lora_branches_pass import BranchSpec, InsertLoraBranchesPass
from graphlora.passes.cross_check_labels_pass import CrossCheckLabelsPass
from graphlora.passes.fuse_lora_linear_pass import FuseLoraLinearPass
from graphlora.passes.label_by_structure_pass import LabelByStructurePass
from graphlora.passes.mark_unreachable_sites_pass import MarkUnreachableSitesPass
from graphlora.passes.select_lora_sites_pass import SelectLoraSitesPass
from graphlora.passes.strip_tensor_metadata_asserts_pass import StripTensorMetadataAssertsPass
from graphlora.policy import Policy
from graphlora.trace import (
    FORCED_KWARGS,
    CallKey,
    Program,
    export_call,
    make_call_key,
    split_call,
)


class TraceCache:
    """Bounded LRU of programs. Programs are derived state: copies and pickles start empty."""

    def __init__(self, maxsize: int = 8):
        if maxsize < 1:
            raise ValueError("the trace cache needs room for at least one program")
        self.maxsize = maxsize
        self._entries: "collections.OrderedDict[int, tuple[CallKey, Program]]" = collections.OrderedDict()
        self._next = 0

    def find(self, key: CallKey, flat_inputs_of) -> tuple[Program, list[Any]] | None:
        for ident, (k, program) in self._entries.items():
            if k != key:
                continue
            flat = flat_inputs_of(program)
            if program.guard.accepts([x for x in flat if isinstance(x, torch.Tensor)]):
                self._entries.move_to_end(ident)
                return program, flat
        return None

    def put(self, key: CallKey, program: Program) -> None:
        self._entries[self._next] = (key, program)
        self._next += 1
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def programs(self) -> list[tuple[CallKey, Program]]:
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo) -> "TraceCache":
        return TraceCache(self.maxsize)

    def __reduce__(self):
        return (TraceCache, (self.maxsize,))


@dataclasses.dataclass
class TraceRecord:
    """What one trace did: its key, the passes that ran, and how long export and passes took."""

    key: CallKey
    passes: list[PassRecord]
    export_seconds: float
    passes_seconds: float


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
    ``skipped_sites`` (modules the policy chose that were not adapted, with reasons), ``num_traces``.
    """

    forward = _ForwardWithSignature()  # type: ignore[assignment]

    def __init__(self, original: torch.nn.Module, mirror: torch.nn.Module, policy: Policy, cache_size: int = 8,
                 fuse: bool = True, compile: bool | dict = False):
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
        # Families whose forward does not export whole get an eager prologue (data-dependent image
        # metadata computed eagerly and passed in) and may need their mirror prepared for tracing.
        self._prologue = families.get_prologue(mirror)
        families.prepare_for_tracing(mirror)
        self.policy = policy
        self.sites: list[Site] = []
        self.skipped_sites: list[SkippedSite] = []
        self.traces: list[TraceRecord] = []
        self.num_traces = 0
        self._cache = TraceCache(cache_size)
        self._adapters_enabled = True
        self._branches: dict = {}
        #: Replace LoRA branches by the fused graphlora::lora_linear op (fuse_lora_linear pass).
        self.fuse = fuse
        #: torch.compile every program (True, or a dict of torch.compile keyword arguments).
        self.compile = compile
        #: Called as ``observer(stage, graph_module)`` after export and after every pass of every trace
        #: (graph dumps use it). Not copied or pickled.
        self._observer = None
        #: Structure vs module-name labels of the first trace: {"checked": n, "disagreements": [...]}.
        self.label_check: dict = {}
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

    def train(self, mode: bool = True) -> "GraphLoraModel":
        super().train(mode)
        self._eager.training = mode
        return self

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        # Root-level parameters are registered on both this module and the mirror root.
        self._eager._parameters.update({k: v for k, v in self._parameters.items() if k in self._eager._parameters})
        self._eager._buffers.update({k: v for k, v in self._buffers.items() if k in self._eager._buffers})
        self._cache.clear()  # programs bake dtypes and devices: re-trace after .to()
        return result

    def __getstate__(self):
        _drop_transformers_capture_hooks(self._eager)
        _drop_transformers_capture_hooks(self._original)
        state = super().__getstate__()
        return {**state, "_observer": None}

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
        if call.get("use_cache") or call.get("past_key_values") is not None or call.get("cache") is not None:
            # Incremental decoding needs the KV cache object, which a traced program cannot return.
            return self._eager_call(call)
        program, flat = self._program_for(call)
        return program(self, flat)

    def _program_for(self, call: dict[str, Any]) -> tuple[Program, list[Any]]:
        """The cached program for this call (tracing one if none accepts it) and its flat inputs."""
        if self._prologue is not None:
            call = self._prologue(self._eager, call)
        tensors, constants = split_call(call)
        constants.pop("use_cache", None)
        variant = "lora" if self._adapters_enabled else "base"
        key = make_call_key(tensors, constants, self.training, variant)
        found = self._cache.find(key, lambda program: program.flatten_inputs(tensors))
        if found is not None:
            return found
        program = self._build_program(tensors, constants, key)
        self._cache.put(key, program)
        return program, program.flatten_inputs(tensors)

    def _trace_only(self, call: dict[str, Any]) -> Program:
        return self._program_for(dict(call))[0]

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
        sites = self.sites if self._adapters_enabled else []
        with eager_lora_hooks(self, sites):
            return self._eager(**call)

    def generate(self, *args, **kwargs):
        """Hugging Face generation, run eagerly with the LoRA branches as forward hooks."""
        sites = self.sites if self._adapters_enabled else []
        with eager_lora_hooks(self, sites):
            return self._eager.generate(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes the base model's outputs (e.g. DPO reference passes)."""
        previous = self._adapters_enabled
        self._adapters_enabled = False
        try:
            yield
        finally:
            self._adapters_enabled = previous

    # ------------------------------------------------------------------ tracing
    def _analysis_passes(self) -> list:
        return [
            StripTensorMetadataAssertsPass(),
            LabelByStructurePass(module_classes={path: type(m) for path, m in self._eager.named_modules()}),
            CrossCheckLabelsPass(head_paths=_head_paths(self._eager)),
            SelectLoraSitesPass(self.policy),
            MarkUnreachableSitesPass(),
        ]

    def _transform_passes(self, program: Program, key: CallKey) -> list:
        refused = frozenset(s.name for s in self.skipped_sites)
        passes = [InsertLoraBranchesPass(program, self._branches, self, key.training, refused)]
        if self.fuse:
            autocast_on = any(enabled for _, enabled, _ in key.autocast)
            passes.append(FuseLoraLinearPass(autocast=autocast_on))
        return passes

    def _forced_kwargs(self) -> dict[str, Any]:
        """FORCED_KWARGS that this model's forward accepts."""
        params = inspect.signature(self._eager.forward).parameters
        takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
        return {k: v for k, v in FORCED_KWARGS.items() if takes_any or k in params}

    def _build_program(self, tensors: dict[str, Any], constants: dict[str, Any], key: CallKey) -> Program:
        t0 = time.perf_counter()
        ep = export_call(self._eager, tensors, {**constants, **self._forced_kwargs()})
        program = Program.from_exported(ep, tuple(sorted(tensors)))
        t1 = time.perf_counter()
        gm = program.graph_module
        _record_loss_outputs(gm, program.out_spec)
        observe = self._observer
        if observe is not None:
            observe("export", gm)
        records = PassManager(self._analysis_passes(), after_each=observe)(gm)
        if not self.sites and not self.skipped_sites:
            self._create_sites(program)
        if key.variant == "lora":
            records += PassManager(self._transform_passes(program, key), after_each=observe)(gm)
        if self.compile:
            options = self.compile if isinstance(self.compile, dict) else {}
            program.runner = torch.compile(gm, **options)
        self.traces.append(TraceRecord(key, records, t1 - t0, time.perf_counter() - t1))
        self.num_traces += 1
        return program

    def _create_sites(self, program: Program) -> None:
        """Turn the first trace's decisions into sites and LoRA parameters (once per model)."""
        by_site: dict[str, list] = {}
        for node, labels in labelled_nodes(program.graph_module.graph):
            by_site.setdefault(labels.module, []).append((node, labels, get_decision(node)))
        generator = torch.Generator().manual_seed(self.policy.random_state)
        lora_dtype = LORA_DTYPES[self.policy.lora_dtype]
        self.label_check = dict(program.graph_module.meta.get("graphlora.label_check", {}))
        for site_name, entries in by_site.items():
            node, labels, decision = next(((n, lab, d) for n, lab, d in entries if d.targeted), entries[0])
            if not decision.targeted:
                if decision.skipped:
                    self.skipped_sites.append(_skipped(labels, decision.reason))
                continue
            owner, layout, refusal = _lora_owner(self, node, labels)
            if refusal is not None:
                self.skipped_sites.append(_skipped(labels, refusal))
                continue
            in_features = int(node.args[0].meta["val"].shape[-1])
            out_features = int(node.meta["val"].shape[-1])
            module = self.get_submodule(owner)
            weight = self.get_parameter(labels.weight)
            try:
                attach_lora(module, in_features, out_features, decision.r, lora_dtype, generator, weight.device)
            except ValueError as e:
                self.skipped_sites.append(_skipped(labels, str(e)))
                continue
            scale = self.policy.scale(decision.r, decision.alpha)
            site = Site(site_name, str(labels.component), str(labels.role), labels.layer, decision.r, decision.alpha,
                        decision.dropout, scale, decision.reason, module=owner, kind=labels.kind, weight_layout=layout)
            self.sites.append(site)
            self._branches[site_name] = BranchSpec(
                scale, site.dropout, f"{owner}.lora_A.weight", f"{owner}.lora_B.weight"
            )
        if not self.sites:
            reasons = "; ".join(f"{s.name}: {s.reason}" for s in self.skipped_sites[:5])
            raise GraphLoraError(f"no selected site can be adapted: {reasons}")

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

    def lora_state_dict(self, peft_keys: bool = False) -> dict[str, torch.Tensor]:
        """The LoRA tensors; with ``peft_keys`` named as PEFT saves them (``base_model.model.<module>...``)."""
        out = {}
        for site in self.sites:
            module = self.get_submodule(site.module)
            for part in ("lora_A", "lora_B"):
                key = f"{site.module}.{part}.weight"
                out[f"base_model.model.{key}" if peft_keys else key] = getattr(module, part).weight
        return out

    def fusion_report(self) -> dict[str, dict]:
        """Per site of the most recent LoRA program: ``{"fused": bool, "reason": str}``."""
        for key, program in reversed(self._cache.programs()):
            if key.variant == "lora":
                return dict(program.graph_module.meta.get("graphlora.fusion", {}))
        return {}

    def cache_info(self) -> dict[str, int]:
        return {"programs": len(self._cache), "maxsize": self._cache.maxsize, "traces_made": self.num_traces}

    def programs(self) -> list[Program]:
        return [p for _, p in self._cache.programs()]


def _skipped(labels, reason: str) -> SkippedSite:
    return SkippedSite(labels.module, str(labels.component), str(labels.role), labels.layer, reason)


def _lora_owner(model: torch.nn.Module, node, labels) -> tuple[str, str, str | None]:
    """(module that holds the LoRA parameters, weight layout, refusal reason or None) for a site."""
    if labels.kind == "linear":
        return labels.module, "out_in", None
    if labels.kind == "expert_matmul":
        return "", "", "a matmul on a 3-D (expert) parameter: LoRA for expert weights is not supported yet"
    if labels.kind == "param_linear":
        return "", "", (f"F.linear on parameter {labels.weight} inside a {_class_of(model, labels.weight)} "
                        "(e.g. nn.MultiheadAttention's packed in-projection): not supported yet")
    # A raw parameter matmul: y = x @ W (W [in, out]) or x @ W^T.
    weight_arg = node.args[1]
    if weight_arg.op == "placeholder":
        layout = "in_out"
    elif weight_arg.op == "call_function" and weight_arg.target in (torch.ops.aten.t.default, torch.ops.aten.transpose.int) \
            and weight_arg.args[0].op == "placeholder":
        layout = "out_in"
    else:
        return "", "", f"a matmul whose weight {labels.weight} is not the right-hand operand (x @ W): not supported yet"
    return labels.weight.rpartition(".")[0], layout, None


def _class_of(model: torch.nn.Module, param_fqn: str) -> str:
    owner = param_fqn.rpartition(".")[0]
    try:
        return type(model.get_submodule(owner)).__name__ if owner else type(model).__name__
    except AttributeError:
        return "module"


def _head_paths(model: torch.nn.Module) -> frozenset[str]:
    heads = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        for name, module in model.named_modules(remove_duplicate=False):
            if module is head:
                heads.add(name)
    return frozenset(heads)


def _record_loss_outputs(gm: torch.fx.GraphModule, out_spec: pytree.TreeSpec) -> None:
    """Which flat outputs carry the training signal: ``loss`` if present, else ``logits``."""
    context = out_spec.context
    if isinstance(context, (list, tuple)) and all(isinstance(k, str) for k in context):
        offset = 0
        ranges = {}
        children = out_spec.children() if hasattr(out_spec, "children") else out_spec.children_specs
        for name, child in zip(context, children):
            ranges[name] = range(offset, offset + child.num_leaves)
            offset += child.num_leaves
        if "logits" in ranges:
            gm.meta["graphlora.logits_outputs"] = list(ranges["logits"])
        for name in ("loss", "logits"):
            if name in ranges:
                gm.meta["graphlora.loss_outputs"] = list(ranges[name])
                gm.meta["graphlora.loss_output_names"] = f"`{name}`"
                return
    gm.meta["graphlora.loss_outputs"] = None


def _drop_transformers_capture_hooks(root: torch.nn.Module) -> None:
    """Remove transformers' output-capturing hooks (local closures, unpicklable); they reinstall lazily."""
    for module in root.modules():
        for hook_id, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__module__", "") == "transformers.utils.output_capturing":
                del module._forward_hooks[hook_id]
        if module.__dict__.get("_output_capturing_hooks_installed"):
            module._output_capturing_hooks_installed = False


__all__ = ["GraphLoraModel", "Site", "SkippedSite", "Component"]
