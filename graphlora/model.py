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

from graphlora import families, structure
from graphlora.errors import ExportFailedError, GraphLoraError, TraceMismatchError
from graphlora.labels import Component, SiteDecision, get_decision, labelled_nodes
from graphlora.lora import LORA_DTYPES, AdapterSwitch, EagerLoraHook, Site, SkippedSite, attach_lora, eager_lora_hooks
from graphlora.pass_manager import PassManager, PassRecord
from graphlora.passes.apply_site_decisions_pass import ApplySiteDecisionsPass
from graphlora.passes.insert_lora_branches_pass import BranchSpec, InsertLoraBranchesPass
from graphlora.passes.cross_check_labels_pass import CrossCheckLabelsPass
from graphlora.passes.label_from_site_table_pass import LabelFromSiteTablePass
from graphlora.passes.fuse_lora_linear_pass import FuseLoraLinearPass
from graphlora.passes.label_by_structure_pass import LabelByStructurePass
from graphlora.passes.mark_unreachable_sites_pass import MarkUnreachableSitesPass
from graphlora.passes.select_lora_sites_pass import SelectLoraSitesPass, decide_site, decide_sites
from graphlora.passes.strip_tensor_metadata_asserts_pass import StripTensorMetadataAssertsPass
from graphlora.policy import Policy
from graphlora.name_rules import block_path
from graphlora.regions import (
    RegionRunner,
    module_stack_of,
    call_as_kwargs,
    capture_calls,
    name_label_for_param,
    name_labels,
    unreachable_modules,
)
from graphlora.trace import (
    FORCED_KWARGS,
    CallKey,
    Program,
    export_call,
    make_call_key,
    split_call,
    text_length,
)
from graphlora.verify import Verification, compare


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
    path: str = ""  # "" for the whole model, else the region's module path


@dataclasses.dataclass
class RegionInfo:
    """How one part of the model runs: a traced ``graph`` or ``eager`` (with module-level LoRA).

    ``path`` is ``""`` for the whole model (whole-model tracing), else a submodule's path (regional
    tracing). ``reason`` says why a part is eager; ``verification`` how its trace compared with eager.
    """

    path: str
    mode: str  # "graph" | "eager" | "split" (not traced itself; its children were tried)
    reason: str = ""
    verification: Verification | None = None

    def describe(self) -> str:
        where = self.path or "<whole model>"
        text = f"{where}: {self.mode}"
        if self.reason:
            text += f" ({self.reason})"
        return text


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
        self._switch = AdapterSwitch()
        self._branches: dict = {}
        #: "whole" (the forward is one traced program, after the family's prologue if any) or
        #: "regional" (the largest submodules that trace and verify are programs; glue is eager).
        self.trace_mode = "whole"
        #: Which parts run as graphs and which eagerly (see :class:`RegionInfo`).
        self.regions: list[RegionInfo] = []
        #: How the traced program(s) compared with eager when the model was rewritten.
        self.verification: list[Verification] = []
        self._region_caches: dict[str, TraceCache] = {}
        self._cache_size = cache_size
        self._site_labels: dict = {}  # regional: site -> NodeLabels from names
        self._site_decisions: dict = {}  # regional: site -> SiteDecision
        self._towers: dict[str, int] = {}
        self._adopting = True  # new sites may be created (during rewrite only)
        self._glue_hooks: list[tuple[str, int]] = []  # (module path, hook id) of glue LoRA hooks
        self._text_len: int | None = None
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
        for cache in self._region_caches.values():
            cache.clear()
        return result

    def __getstate__(self):
        _drop_transformers_capture_hooks(self._eager)
        _drop_transformers_capture_hooks(self._original)
        state = super().__getstate__()
        return {**state, "_observer": None}

    @property
    def _on_meta(self) -> bool:
        first = next(self.parameters(), None)
        return first is not None and first.device.type == "meta"

    @property
    def _adapters_enabled(self) -> bool:
        return self._switch.enabled

    @_adapters_enabled.setter
    def _adapters_enabled(self, value: bool) -> None:
        self._switch.enabled = value

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
        wants_cache = call.get("use_cache") or call.get("past_key_values") is not None or call.get("cache") is not None
        if self.trace_mode in ("regional", "blocks"):
            if not wants_cache:
                call = {**call, **self._forced_kwargs()}
            self._text_len = text_length(call)
            return self._eager(**call)  # regions run their programs, glue runs with LoRA hooks
        if wants_cache:
            # Incremental decoding needs the KV cache object, which a traced program cannot return.
            return self._eager_call(call)
        items = call.get("num_items_in_batch")
        if isinstance(items, (int, float)) and not isinstance(items, bool):
            # Trainer's count of label tokens (the loss divides by it). A Python number would be a constant of
            # the trace (one new trace per value); as a tensor it is a program input.
            call["num_items_in_batch"] = torch.tensor(items)
        try:
            program, flat = self._program_for(call)
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

    def _program_for(self, call: dict[str, Any]) -> tuple[Program, list[Any]]:
        """The cached program for this call (tracing one if none accepts it) and its flat inputs."""
        if self._prologue is not None:
            call = self._prologue(self._eager, call)
        if self._on_meta:
            # A meta model (a large config inspected without weights) takes CPU inputs, whose values
            # the prologue may need (image grids); the trace itself runs on meta tensors.
            call = pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, call)
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
        if self.trace_mode in ("regional", "blocks"):  # glue hooks are installed; regions fall back to eager + hooks
            return self._eager.generate(*args, **kwargs)
        sites = self.sites if self._adapters_enabled else []
        with eager_lora_hooks(self, sites):
            return self._eager.generate(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes the base model's outputs (e.g. DPO reference passes)."""
        if self.merged:  # the base weights hold the adapter: "disabled" would silently be the merged model
            raise GraphLoraError("disable_adapter() while the adapter is merged: call unmerge() first")
        previous = self._adapters_enabled
        self._adapters_enabled = False
        try:
            yield
        finally:
            self._adapters_enabled = previous

    # ------------------------------------------------------------------ adapters (graphlora/adapters.py)
    def save_adapter(self, directory, overwrite: bool = False, **kwargs):
        """Save the adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``) plus
        ``graphlora_policy.yaml``; ``PeftModel.from_pretrained`` and :func:`graphlora.load_adapter` read it.
        Existing adapter files are replaced only with ``overwrite=True``. See docs/adapters.md."""
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
        return self.__dict__.get("_merge_state") is not None

    def save_merged(self, directory, overwrite: bool = False, **kwargs):
        """Write a plain transformers checkpoint (``config.json`` + safetensors) of the merged model, which
        ``from_pretrained`` loads into the original class; computed out of place, the live model (and the
        original model) are not changed. ``modules_to_save`` copies replace the originals."""
        from graphlora import adapters

        return adapters.save_merged(self, directory, overwrite=overwrite, **kwargs)

    # ------------------------------------------------------------------ tracing
    def _whole_analysis_passes(self) -> list:
        return [
            StripTensorMetadataAssertsPass(),
            LabelByStructurePass(module_classes={path: type(m) for path, m in self._eager.named_modules()}),
            CrossCheckLabelsPass(head_paths=_head_paths(self._eager)),
            SelectLoraSitesPass(self.policy),
            MarkUnreachableSitesPass(),
        ]

    def _region_analysis_passes(self, path: str) -> list:
        return [
            StripTensorMetadataAssertsPass(),
            LabelFromSiteTablePass(self._site_labels, path, self._towers, self._eager, _head_paths(self._eager)),
            ApplySiteDecisionsPass(self._site_decisions, self.policy),
        ]

    def _transform_passes(self, program: Program, key: CallKey, path: str = "") -> list:
        refused = frozenset(s.name for s in self.skipped_sites)
        live = self if not path else self.get_submodule(path)
        passes = [InsertLoraBranchesPass(program, self._branches_under(path), live, key.training, refused)]
        if self.fuse:
            autocast_on = any(enabled for _, enabled, _ in key.autocast)
            passes.append(FuseLoraLinearPass(autocast=autocast_on))
        return passes

    def _branches_under(self, path: str) -> dict[str, BranchSpec]:
        """Branch specs of the sites inside ``path``, with parameter names relative to it."""
        if not path:
            return self._branches
        prefix = path + "."
        return {name: dataclasses.replace(spec, a_fqn=spec.a_fqn[len(prefix):], b_fqn=spec.b_fqn[len(prefix):])
                for name, spec in self._branches.items() if spec.a_fqn.startswith(prefix)}

    def _forced_kwargs(self) -> dict[str, Any]:
        """FORCED_KWARGS that this model's forward accepts."""
        params = inspect.signature(self._eager.forward).parameters
        takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
        return {k: v for k, v in FORCED_KWARGS.items() if takes_any or k in params}

    def _build_program(self, tensors: dict[str, Any], constants: dict[str, Any], key: CallKey, path: str = "") -> Program:
        """Export the whole model (``path == ""``) or a region, run the passes, maybe compile."""
        t0 = time.perf_counter()
        if path:
            module = self._eager.get_submodule(path)
            # Trace the layer's plain forward: with checkpointing on, its class forward would trace through
            # torch.utils.checkpoint (the runner checkpoints the program instead, see _run_region).
            checkpointing = module.__dict__.get("gradient_checkpointing")
            if checkpointing is True:
                module.gradient_checkpointing = False
            try:
                ep = export_call(module, tensors, constants, text_len=self._text_len, class_forward=True)
            finally:
                if checkpointing is True:
                    module.gradient_checkpointing = True
        else:
            ep = export_call(self._eager, tensors, {**constants, **self._forced_kwargs()})
        program = Program.from_exported(ep, tuple(sorted(tensors)))
        t1 = time.perf_counter()
        gm = program.graph_module
        _record_loss_outputs(gm, program.out_spec)
        observe = self._observer
        if observe is not None:
            observe("export", gm)
        analysis = self._region_analysis_passes(path) if path else self._whole_analysis_passes()
        records = PassManager(analysis, after_each=observe)(gm)
        if self._adopting:
            self._adopt_sites(program, base=path)
        if key.variant == "lora":
            records += PassManager(self._transform_passes(program, key, path), after_each=observe)(gm)
        if self.compile:
            options = self.compile if isinstance(self.compile, dict) else {}
            program.runner = torch.compile(gm, **options)
        self.traces.append(TraceRecord(key, records, t1 - t0, time.perf_counter() - t1, path))
        self.num_traces += 1
        return program

    def _adopt_sites(self, program: Program, base: str = "") -> None:
        """Create sites and LoRA parameters for the program's targeted matmuls that have none yet.

        Runs while the model is being rewritten (the whole model's first trace, or each region's);
        afterwards the set of sites is fixed and a trace selecting a new one is an error.
        """
        by_site: dict[str, list] = {}
        for node, labels in labelled_nodes(program.graph_module.graph):
            by_site.setdefault(labels.module, []).append((node, labels, get_decision(node)))
        if not base:
            self.label_check = dict(program.graph_module.meta.get("graphlora.label_check", {}))
        known = {s.name for s in self.sites} | {s.name for s in self.skipped_sites}
        for site_name, entries in by_site.items():
            if site_name in known:
                continue
            node, labels, decision = next(((n, lab, d) for n, lab, d in entries if d.targeted), entries[0])
            if not decision.targeted:
                if decision.skipped:
                    self.skipped_sites.append(_skipped(labels, decision.reason))
                continue
            in_features = int(node.args[0].meta["val"].shape[-1])
            out_features = int(node.meta["val"].shape[-1])
            self._add_site(labels, decision, node, in_features, out_features)
        if not base and not self.sites:
            reasons = "; ".join(f"{s.name}: {s.reason}" for s in self.skipped_sites[:5])
            raise GraphLoraError(f"no selected site can be adapted: {reasons}")

    def _add_site(self, labels, decision, node, in_features: int, out_features: int) -> None:
        """Attach LoRA for one targeted site (``node``: its matmul, needed for parameter matmuls only)."""
        owner, layout, refusal = _lora_owner(self, node, labels)
        if refusal is not None:
            self.skipped_sites.append(_skipped(labels, refusal))
            return
        try:
            weight = self.get_parameter(labels.weight)
            attach_lora(self.get_submodule(owner), in_features, out_features, decision.r,
                        LORA_DTYPES[self.policy.lora_dtype], self._generator, weight.device)
        except ValueError as e:
            self.skipped_sites.append(_skipped(labels, str(e)))
            return
        scale = self.policy.scale(decision.r, decision.alpha)
        site = Site(labels.module, str(labels.component), str(labels.role), labels.layer, decision.r, decision.alpha,
                    decision.dropout, scale, decision.reason, module=owner, kind=labels.kind, weight_layout=layout)
        self.sites.append(site)
        self._branches[labels.module] = BranchSpec(scale, site.dropout, f"{owner}.lora_A.weight", f"{owner}.lora_B.weight")

    @property
    def _generator(self) -> torch.Generator:
        generator = self.__dict__.get("_lora_generator")
        if generator is None:
            generator = torch.Generator().manual_seed(self.policy.random_state)
            self.__dict__["_lora_generator"] = generator
        return generator

    def _drop_sites(self) -> None:
        """Forget every site and LoRA parameter (before re-planning in regional mode)."""
        for site in self.sites:
            module = self.get_submodule(site.module)
            for part in ("lora_A", "lora_B"):
                if part in module._modules:
                    del module._modules[part]
        self.sites, self.skipped_sites, self._branches = [], [], {}
        self.__dict__.pop("_lora_generator", None)
        self._cache.clear()

    # ------------------------------------------------------------------ rewrite-time setup
    def _setup(self, call: dict[str, Any], verify: bool | str = True, trace_mode: str = "auto") -> None:
        """Trace, create the sites, verify against eager; fall back to regions when needed."""
        on_meta = _on_meta(self)
        if trace_mode not in ("auto", "whole", "regional", "blocks"):
            raise ValueError(f"trace_mode must be 'auto', 'whole', 'regional' or 'blocks', not {trace_mode!r}")
        self._example_call = dict(call)
        if trace_mode == "blocks":
            self._setup(call, verify, "auto")
            self.trace_by_blocks(verify)
            return
        reason = "trace_mode='regional'"
        if trace_mode != "regional":
            try:
                with torch.no_grad():
                    program = self._trace_only(call)
                self.trace_mode = "whole"
                self.regions = [RegionInfo("", "graph", "traced whole, after the family's eager prologue"
                                           if self._prologue_changes(call) else "traced whole")]
                if on_meta or not verify:
                    note = "on the meta device: no values to compare" if on_meta else "verify=False"
                    self.verification = [Verification("", True, 0.0, 0.0, 0.0, note=f"verification skipped ({note})")]
                    return
                check = self._verify_whole(call, program)
                self.verification = [check]
                self.regions[0].verification = check
                if check.passed:
                    return
                reason = check.describe()
                if trace_mode == "whole":
                    raise TraceMismatchError(reason)
            except ExportFailedError as e:
                if trace_mode == "whole":
                    raise
                lines = str(e).splitlines()
                reason = "whole-model export failed: " + " ".join(line.strip() for line in lines[:3])
            self._drop_sites()
        self._setup_regional(call, verify=verify and not on_meta, strict=verify == "strict", reason=reason)

    def _prologue_changes(self, call: dict[str, Any]) -> bool:
        """Whether the family's prologue rewrites this call (some share a recipe and need none)."""
        if self._prologue is None:
            return False
        out = self._prologue(self._eager, dict(call))
        return set(out) != set(call) or any(out[k] is not call[k] for k in call)

    def _verify_whole(self, call: dict[str, Any], program: Program) -> Verification:
        params = [p for n, p in self.named_parameters() if ".lora_A." in n or ".lora_B." in n]
        deterministic = _is_deterministic(program)
        context = contextlib.nullcontext() if (deterministic or not self.training) else _eval_mode(self)

        def traced():
            found, flat = self._program_for(dict(call))
            return found(self, flat)

        def eager():
            with eager_lora_hooks(self, self.sites):
                return self._eager(**{**call, **self._forced_kwargs()})

        with context:
            return compare("", traced, eager, params)

    def _setup_regional(self, call: dict[str, Any], verify: bool, strict: bool, reason: str) -> None:
        """Plan regional tracing: label by names, decide sites, trace and verify the largest regions."""
        call = {**call, **self._forced_kwargs()}
        self._text_len = text_length(call)
        captured = capture_calls(self._eager, call)
        self._site_labels, self._towers = name_labels(self._eager, captured, _head_paths(self._eager))
        items = list(self._site_labels.values())
        decisions = decide_sites(self.policy, items, self._towers)
        targeted_paths = [labels.module for labels, d in zip(items, decisions) if d.targeted]
        dead = unreachable_modules(self._eager, call, targeted_paths) if not _on_meta(self) else set()
        names = "`loss`" if "labels" in call else "`logits`"
        decisions = [SiteDecision(False, f"its output never reaches {names}, so it can receive no gradient "
                                         f"(chosen by: {d.reason})", d.r, d.alpha, d.dropout, skipped=True)
                     if labels.module in dead else d for labels, d in zip(items, decisions)]
        self._site_decisions = {labels.module: d for labels, d in zip(items, decisions)}
        for labels, decision in zip(items, decisions):
            if decision.skipped:
                self.skipped_sites.append(_skipped(labels, decision.reason))
            if decision.targeted:
                weight = self.get_parameter(labels.weight)
                self._add_site(labels, decision, None, weight.shape[1], weight.shape[0])
        self._plan_regions(call, list(self._eager._modules), captured, verify, strict, reason, "regional")

    def _plan_regions(self, call: dict[str, Any], roots: list[str], captured, verify: bool, strict: bool,
                      reason: str, mode: str) -> None:
        """Trace and verify regions, starting at ``roots`` and splitting what fails; install runners and
        glue hooks. ``mode``: "regional" (roots are the model's children) or "blocks" (roots are the
        towers' blocks: one program per decoder layer / vision block)."""
        self.trace_mode = mode
        self.regions, self.verification = [RegionInfo("", "eager", reason)], []
        targeted = {s.module for s in self.sites}

        def contains_site(path: str) -> bool:
            return any(m == path or m.startswith(path + ".") for m in targeted)

        def visit(path: str) -> None:
            module = self._eager.get_submodule(path)
            if not contains_site(path) or isinstance(module, torch.nn.Linear):
                return
            failed = None
            if path in captured:
                if _captures_below(module):
                    # transformers records hidden states with hooks on inner modules; inside a traced
                    # region they would not fire, so only the modules carrying them can be regions.
                    failed = RegionInfo(path, "split", "inner modules carry output-capturing hooks")
                else:
                    info = self._try_region(path, captured[path], verify, strict)
                    if info.mode == "graph":
                        self.regions.append(info)
                        return
                    failed = info
            children = [f"{path}.{name}" for name, child in module._modules.items()
                        if child is not None and contains_site(f"{path}.{name}") and not isinstance(child, torch.nn.Linear)]
            if failed is not None:
                if children:
                    failed.mode = "split"  # its children are tried one by one
                self.regions.append(failed)
            for child in children:
                visit(child)

        for root in roots:
            visit(root)
        if strict:
            # Localised: the smallest parts whose trace differs from eager (none of their parts does).
            failed = [r for r in self.regions if r.path and r.verification is not None and not r.verification.passed]
            bad = [r for r in failed if not any(o.path.startswith(r.path + ".") for o in failed)]
            if bad:
                raise TraceMismatchError("the traced program differs from eager in: " + "; ".join(
                    r.verification.describe() for r in bad))
            if reason.startswith("the whole model"):  # it differed, and no adapted part explains why
                raise TraceMismatchError(reason)
        # Sites outside graph regions run as module-level LoRA (forward hooks) on the eager glue.
        graph_regions = [r.path for r in self.regions if r.mode == "graph" and r.path]
        self._report_glue_parameter_matmuls(graph_regions)
        for site in self.sites:
            if site.kind == "linear" and not any(site.module.startswith(p + ".") for p in graph_regions):
                module = self.get_submodule(site.module)
                handle = module.register_forward_hook(EagerLoraHook(site.scale, site.dropout, self._switch))
                self._glue_hooks.append((site.module, handle.id))
        for path in graph_regions:
            self._eager.get_submodule(path).forward = RegionRunner(self, path)

    def _unplan_regions(self) -> None:
        """Undo :meth:`_plan_regions`: remove runners and glue hooks, forget region programs."""
        for region in self.regions:
            if region.path and region.mode == "graph":
                self._eager.get_submodule(region.path).__dict__.pop("forward", None)
        for path, hook_id in self._glue_hooks:
            self.get_submodule(path)._forward_hooks.pop(hook_id, None)
        self._glue_hooks = []
        self._region_caches.clear()

    def trace_by_blocks(self, verify: bool | str = True) -> None:
        """Run every decoder layer and vision block holding a site as its own traced program (glue eager).

        Needed for per-layer gradient checkpointing and FSDP2 sharding: both act on the layer modules'
        calls, which a whole-model program does not make. Sites and LoRA weights are kept.
        """
        if self.trace_mode == "blocks":
            return
        call = getattr(self, "_example_call", None)
        if call is None:
            raise GraphLoraError("this model keeps no example inputs to trace blocks with (rewrite it again)")
        call = {**call, **self._forced_kwargs()}
        if self.trace_mode == "whole":
            program = next((p for k, p in self._cache.programs() if k.variant == "lora"), None)
            if program is None:
                with torch.no_grad():
                    program = self._trace_only(call)
            gm = program.graph_module
            self._site_labels, self._site_decisions = {}, {}
            blocks = []
            for node, labels in labelled_nodes(gm.graph):
                self._site_labels.setdefault(labels.module, labels)
                decision = get_decision(node)
                if decision is not None and (decision.targeted or labels.module not in self._site_decisions):
                    self._site_decisions[labels.module] = decision
                blk = structure.block_of(node, "m.")
                if blk is not None and labels.layer is not None and blk[1] not in blocks:
                    blocks.append(blk[1])
            self._towers = dict(gm.meta.get("graphlora.towers", {}))
        else:
            self._unplan_regions()
            blocks = []
            for labels in self._site_labels.values():
                stack = module_stack_of(self._eager, labels.module)
                blk = block_path(stack)
                if blk is not None and labels.layer is not None and blk not in blocks:
                    blocks.append(blk)
        self._text_len = text_length(call)
        captured = capture_calls(self._eager, call)
        self._cache.clear()
        self._plan_regions(call, blocks, captured, bool(verify), verify == "strict",
                           "traced by blocks (per-layer programs for gradient checkpointing and FSDP2)", "blocks")

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Recompute each decoder layer / vision block in backward instead of storing its activations.

        Switches to :meth:`trace_by_blocks` (one program per layer) and turns on transformers' per-layer
        checkpointing flags (non-reentrant by default). transformers' layers checkpoint their class
        ``forward``, which a layer's program runner replaces, so the runner itself wraps each program
        call in the layer's checkpoint function (see ``_run_region``). Outputs and gradients are
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

    def _report_glue_parameter_matmuls(self, graph_regions: list[str]) -> None:
        """Raw parameter matmuls are visible only in graphs: one the policy would adapt in the eager glue
        cannot be, and is reported (never silently dropped)."""
        known = {s.name for s in self.sites} | {s.name for s in self.skipped_sites}
        heads = _head_paths(self._eager)
        for owner_path, owner in self._eager.named_modules():
            if isinstance(owner, (torch.nn.Linear, torch.nn.Embedding)) or any(
                    owner_path == p or owner_path.startswith(p + ".") for p in graph_regions):
                continue
            for name, param in owner.named_parameters(recurse=False):
                fqn = f"{owner_path}.{name}" if owner_path else name
                if param.ndim != 2 or not param.is_floating_point() or fqn in known:
                    continue
                labels = name_label_for_param(self._eager, fqn, "param_matmul", heads)
                if decide_site(self.policy, labels, self._towers)[0].targeted:
                    self.skipped_sites.append(_skipped(labels, (
                        "a raw parameter (used by a matmul?) in the eager glue of regional tracing: without a graph "
                        "graphlora cannot see how it is used, so it is not adapted")))

    def _try_region(self, path: str, captured, verify: bool, strict: bool) -> RegionInfo:
        module = self._eager.get_submodule(path)
        try:
            call = call_as_kwargs(module, captured.args, captured.kwargs)
            with torch.no_grad():
                self._region_program(path, module, call)
        except (ExportFailedError, GraphLoraError, TypeError) as e:
            return RegionInfo(path, "eager", f"export failed: {str(e).splitlines()[0]}")
        if not verify:
            return RegionInfo(path, "graph", "traced (verification skipped)")
        region_sites = [s for s in self.sites if s.module.startswith(path + ".")]
        params = [p for s in region_sites for p in (self.get_parameter(f"{s.module}.lora_A.weight"),
                                                    self.get_parameter(f"{s.module}.lora_B.weight"))]

        def traced():
            program, flat = self._region_program(path, module, call)
            return program(module, flat)

        def eager():
            with eager_lora_hooks(self, region_sites):
                return type(module).forward(module, **call)

        with _eval_mode(module):
            check = compare(path, traced, eager, params)
        self.verification.append(check)
        if not check.passed:
            self._region_caches.pop(path, None)
            return RegionInfo(path, "eager", "trace differs from eager", check)
        return RegionInfo(path, "graph", "traced", check)

    def _region_program(self, path: str, module: torch.nn.Module, call: dict[str, Any]) -> tuple[Program, list[Any]]:
        tensors, constants = split_call(call, keep_none=True)
        variant = "lora" if self._adapters_enabled else "base"
        key = make_call_key(tensors, constants, module.training, variant)
        cache = self._region_caches.setdefault(path, TraceCache(self._cache_size))
        found = cache.find(key, lambda program: program.flatten_inputs(tensors))
        if found is not None:
            return found
        program = self._build_program(tensors, constants, key, path)
        cache.put(key, program)
        return program, program.flatten_inputs(tensors)

    def _run_region(self, path: str, args: tuple, kwargs: dict):
        """A call of a traced region (installed as its ``forward`` by :class:`RegionRunner`)."""
        module = self._eager.get_submodule(path)
        try:
            call = call_as_kwargs(module, args, kwargs)
            program, flat = self._region_program(path, module, call)
        except GraphLoraError:
            # Untraceable arguments (a KV-cache object during generation ...): run this call eagerly.
            sites = [s for s in self.sites if s.module.startswith(path + ".")] if self._adapters_enabled else []
            with eager_lora_hooks(self, sites):
                return type(module).forward(module, *args, **kwargs)
        checkpoint = getattr(module, "_gradient_checkpointing_func", None)
        if checkpoint is not None and getattr(module, "gradient_checkpointing", False) is True and module.training \
                and torch.is_grad_enabled():
            # transformers' GradientCheckpointingLayer checkpoints its *class* forward, which this runner replaces:
            # checkpoint the program call instead (traced above, outside the checkpoint; inputs passed positionally so
            # that reentrant checkpointing also propagates their gradients).
            return checkpoint(lambda *inputs: program(module, list(inputs)), *flat)
        return program(module, flat)

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

    def explain_rows(self) -> list:
        """One :class:`graphlora.report.ExplainRow` per labelled matmul: labels, decision and reason.

        Whole mode reads the first LoRA program's graph; regional modes read the site table planned
        from names. Sites refused when their LoRA was created (expert matmuls ...) and sites that
        cannot reach the loss show as not adapted, with the reason.
        """
        from graphlora.report import ExplainRow, explain_program

        program = next((p for k, p in self._cache.programs() if k.variant == "lora"), None)
        if self.trace_mode == "whole" and program is not None:
            rows = explain_program(program)
        else:
            rows = []
            for name, labels in self._site_labels.items():
                d = self._site_decisions.get(name)
                targeted = bool(d and d.targeted)
                rows.append(ExplainRow(name, str(labels.component), str(labels.role), labels.layer, targeted,
                                       d.r if targeted else None, d.alpha if targeted else None,
                                       d.reason if d else "not decided", bool(d and d.skipped)))
            listed = {r.name for r in rows}
            rows += [ExplainRow(s.name, s.component, s.role, s.layer, True, s.r, s.alpha, s.reason)
                     for s in self.sites if s.name not in listed]
        refused = {s.name: s for s in self.skipped_sites}
        return [dataclasses.replace(r, targeted=False, r=None, alpha=None, skipped=True, reason=refused[r.name].reason)
                if r.name in refused else r for r in rows]

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


def _fsdp_sharded_submodules(root: torch.nn.Module) -> list[str]:
    """Paths of the strict submodules that FSDP2's ``fully_shard`` was applied to."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch built without distributed
        return []
    return [name for name, m in root.named_modules() if name and isinstance(m, FSDPModule)]


def _on_meta(module: torch.nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters())


def _captured_key(hook) -> str | None:
    """The output key a transformers output-capturing hook records ("hidden_states" ...), else None."""
    if getattr(hook, "__module__", "") != "transformers.utils.output_capturing":
        return None
    code, cells = getattr(hook, "__code__", None), getattr(hook, "__closure__", None) or ()
    names = code.co_freevars if code is not None else ()
    for name, cell in zip(names, cells):
        if name == "key":
            return cell.cell_contents
    return "unknown"


def _captures_below(module: torch.nn.Module) -> bool:
    """Whether a strict descendant records outputs through transformers' capturing hooks.

    Attention maps (only recorded for ``output_attentions=True``) do not count: in regional mode
    they are not returned for modules inside traced regions (docs/tracing.md).
    """
    for name, sub in module.named_modules():
        if name and any(_captured_key(h) not in (None, "attentions") for h in sub._forward_hooks.values()):
            return True
    return False


def _is_deterministic(program: Program) -> bool:
    """No active dropout and no random op in the program (so two runs agree)."""
    for node in program.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == torch.ops.aten.dropout.default and node.args[1] > 0 and node.args[2]:
            return False
        if node.target in (torch.ops.aten.randint.low, torch.ops.aten.bernoulli.p, torch.ops.aten.rand.default):
            return False
    return True


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    modes = {m: m.training for m in module.modules()}
    root_mode = getattr(module, "_eager", None)
    module.eval()
    if root_mode is not None:
        root_mode.training = False
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        if root_mode is not None:
            root_mode.training = modes[module]


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
