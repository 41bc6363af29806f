"""The runtime of a rewritten model: program caches, which program serves a call, the trace log.

Three kinds of program serve calls (docs/architecture.md):

* the **whole-model** program (``trace_mode="whole"``): one per :class:`~graphlora.trace.CallKey` and
  accepted shapes, in :attr:`Runtime.whole`;
* **block programs** (``trace_mode="blocks"``): one per block class (graphlora/blocks.py), with every
  varying dimension dynamic; a :class:`BlockRunner` installed as ``forward`` on each block of the mirror
  serves that block's calls through its class's program, with the block's own parameters;
* **region programs** (``trace_mode="regional"``): one per region module, served by a
  :class:`RegionRunner`.

A new trace is made only when no cached program accepts a call: another keyword set or non-tensor
argument, train/eval mode, dtype, device, autocast state, adapters on/off, or (whole and regional
programs) shapes the program was not traced for. Every trace is logged in :attr:`Runtime.traces` with
the reason (what was new).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import time
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from graphlora import families
from graphlora.errors import GraphLoraError
from graphlora.lora import eager_lora_hooks
from graphlora.pass_manager import PassRecord
from graphlora.name_rules import WRAPPER_PREFIX
from graphlora.pipeline import EXPORT_STAGE, Pipeline
from graphlora.regions import call_as_kwargs, forward_signature
from graphlora.trace import (
    FORCED_KWARGS,
    CallKey,
    Program,
    ProgramVariant,
    autocast_state,
    export_call,
    make_call_key,
    record_loss_outputs,
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
        #: Keys of the programs the last :meth:`clear` dropped (trace reasons compare with them).
        self.retired: list[CallKey] = []
        #: :func:`call_signature` -> entry id of the program that last served a call with that signature.
        self._served: dict[tuple, int] = {}

    def find(self, key: CallKey, flat_inputs_of, signature: tuple | None = None) -> tuple[Program, list[Any]] | None:
        for ident, (k, program) in self._entries.items():
            if k != key:
                continue
            flat = flat_inputs_of(program)
            if program.guard.accepts([x for x in flat if isinstance(x, torch.Tensor)]):
                self._entries.move_to_end(ident)
                self._remember(signature, ident)
                return program, flat
        return None

    def served(self, signature: tuple) -> Program | None:
        """The program that last served a call with this :func:`call_signature` (if still cached)."""
        ident = self._served.get(signature)
        entry = self._entries.get(ident) if ident is not None else None
        return entry[1] if entry is not None else None

    def _remember(self, signature: tuple | None, ident: int) -> None:
        if signature is None:
            return
        if len(self._served) >= 256:  # constants that change at every call (each one is a new trace anyway)
            self._served.clear()
        self._served[signature] = ident

    def put(self, key: CallKey, program: Program, signature: tuple | None = None) -> None:
        self._entries[self._next] = (key, program)
        self._remember(signature, self._next)
        self._next += 1
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        if self._entries:
            self.retired = [k for k, _ in self._entries.values()]
        self._entries.clear()
        self._served.clear()

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
    """One trace: its key, the passes that ran, how long export and passes took, and why it was made.

    ``path``: ``""`` for the whole model (or the eager analysis recording), else the module exported
    (a region, or the representative block of a block class); ``unit``: the block class served
    (block programs); ``reason``: what was new (``"first call"``, ``"eval mode"``, ...).
    """

    key: CallKey | None
    passes: list[PassRecord]
    export_seconds: float
    passes_seconds: float
    path: str = ""
    unit: str = ""
    reason: str = ""
    kind: str = "program"  # "program", or "analysis" for the eager recording of the whole model

    def describe(self) -> str:
        what = self.unit or self.path or "<whole model>"
        return f"{what}: {self.reason or 'traced'} ({self.export_seconds + self.passes_seconds:.2f} s)"


def why_new_trace(cache: TraceCache, key: CallKey) -> str:
    """What a new trace has that no cached program of ``cache`` had."""
    keys = [k for k, _ in cache.programs()]
    if not keys and cache.retired:
        if key in cache.retired:
            return "the programs were dropped by .to() (programs bake dtypes and devices)"
        keys = cache.retired
    if not keys:
        return "first call"
    if key in keys:
        return "input shapes outside the ranges of every cached program"
    best: list[str] | None = None
    for other in reversed(keys):  # the closest cached key: the fewest differences
        changes = _key_changes(key, other)
        if best is None or len(changes) < len(best):
            best = changes
    return "; ".join(best or []) or "a key no cached program has"


def _key_changes(key: CallKey, other: CallKey) -> list[str]:
    changes = []
    if key.training != other.training:
        changes.append("train mode" if key.training else "eval mode")
    if key.variant != other.variant:
        changes.append("adapters disabled" if key.variant == ProgramVariant.BASE else "adapters enabled")
    added, removed = set(key.tensor_names) - set(other.tensor_names), set(other.tensor_names) - set(key.tensor_names)
    if added:
        changes.append("new tensor inputs " + ", ".join(sorted(added)))
    if removed:
        changes.append("tensor inputs left out: " + ", ".join(sorted(removed)))
    moved = added | removed  # an argument that is None in one call and a tensor in the other
    if not added and not removed and key.tensor_meta != other.tensor_meta:
        changes.append("input dtypes or devices " + ", ".join(sorted({m for ms in key.tensor_meta for m in ms})))
    if key.constants != other.constants:
        mine, theirs = dict(key.constants), dict(other.constants)
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k, ...) != theirs.get(k, ...) and k not in moved)
        if changed:
            changes.append("other non-tensor arguments: " + ", ".join(f"{k}={mine.get(k, '<absent>')!r}" for k in changed))
    if key.autocast != other.autocast:
        changes.append("autocast " + ", ".join(f"{d}:{dt}" for d, on, dt in key.autocast if on) if any(
            on for _, on, _ in key.autocast) else "autocast off")
    return changes



def call_signature(call: dict[str, Any], training: bool, variant: ProgramVariant) -> tuple | None:
    """A cheap exact fingerprint of a block call's structure (not its sizes), or None when it has values other
    than tensors, non-empty tuples of tensors, None and plain scalars.

    Two calls with one signature have the same :class:`~graphlora.trace.CallKey` and flatten alike (each
    tensor, then each tuple's tensors, in the program's input order), so the program that served one serves the
    other if its shape guard accepts the sizes: the per-call dispatch then skips splitting, keying and pytree
    flattening (:meth:`Runtime.block_program`)."""
    parts: list[tuple] = []
    for name, value in call.items():
        if isinstance(value, torch.Tensor):
            parts.append((name, value.dtype, value.device, value.ndim))
        elif type(value) is tuple and value and all(isinstance(v, torch.Tensor) for v in value):
            parts.append((name, tuple((v.dtype, v.device, v.ndim) for v in value)))
        elif value is None or type(value) in (bool, int, float, str):
            parts.append((name, type(value), value))
        else:
            return None
    return tuple(parts), training, variant, autocast_state()


def _signature_leaves(program: Program, call: dict[str, Any]) -> list[torch.Tensor]:
    """``program``'s flat inputs from a call that has a :func:`call_signature` (no pytree walk)."""
    flat: list[torch.Tensor] = []
    for name in program.tensor_names:
        value = call[name]
        if isinstance(value, torch.Tensor):
            flat.append(value)
        else:
            flat.extend(value)
    return flat


@dataclasses.dataclass(frozen=True)
class MaskRule:
    """What ``attention_mask=None`` means to a block, so that a call without a mask can be given the
    equivalent mask and run the same program as calls with one.

    transformers passes ``None`` instead of a mask when the mask would change nothing (no padding; a
    sliding window longer than the text): sdpa then runs with ``is_causal`` set from the attention
    module's ``is_causal``, eager attention with no mask. A batch of one sample, or of equal lengths,
    thus calls the decoder layers with ``None`` and a padded batch with a tensor.

    Recurrent and convolution layers (LFM2's short convolution, Mamba-style mixers) take the 2-D padding mask
    instead (``create_recurrent_attention_mask``: ``None`` when nothing is padded): ``padding`` gives them
    all ones ``[batch, length]``, int64 as tokenizers return it.
    """

    causal: bool
    additive: bool  # eager attention adds a float mask; sdpa takes a boolean one
    padding: bool = False

    def mask_for(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length = hidden.shape[0], hidden.shape[1]
        if self.padding:
            return torch.ones(batch, length, dtype=torch.long, device=hidden.device)
        if self.additive:
            mask = torch.zeros(length, length, dtype=hidden.dtype, device=hidden.device)
            if self.causal:
                mask = mask.masked_fill(torch.ones(length, length, dtype=torch.bool, device=hidden.device).triu(1),
                                        torch.finfo(hidden.dtype).min)
        else:
            mask = torch.ones(length, length, dtype=torch.bool, device=hidden.device)
            if self.causal:
                mask = mask.tril()
        return mask.expand(batch, 1, length, length)


def mask_rule(block: torch.nn.Module) -> MaskRule | None:
    """The block's :class:`MaskRule`, or None when it cannot be told (no attention module that says
    ``is_causal``, modules that disagree, an attention implementation other than sdpa or eager)."""
    found = set()
    for module in block.modules():
        causal = module.__dict__.get("is_causal", getattr(type(module), "is_causal", None)) \
            if "Attention" in type(module).__name__ else None
        if isinstance(causal, bool):
            implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
            found.add((causal, implementation))
    if len(found) != 1:
        return None
    ((causal, implementation),) = found
    if implementation not in ("sdpa", "eager"):
        return None
    return MaskRule(causal, implementation == "eager")


#: A call's arguments by the names of the module's (class) ``forward`` parameters.
bind_call = call_as_kwargs


def forced_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """:data:`FORCED_KWARGS` that ``model``'s forward accepts."""
    forward = model.forward
    if inspect.ismethod(forward) and forward.__func__ is type(model).forward:
        sig = forward_signature(type(model))
        params = dict(list(sig.parameters.items())[1:])  # drop self
    else:
        params = inspect.signature(forward).parameters
    takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in FORCED_KWARGS.items() if takes_any or k in params}


def is_deterministic(program: Program) -> bool:
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
def eval_mode(module: torch.nn.Module):
    """Every module of ``module`` in eval mode for the block (a GraphLoraModel's mirror too)."""
    modes = {m: m.training for m in module.modules()}
    mirror = getattr(module, "mirror", None)
    module.eval()
    if isinstance(mirror, torch.nn.Module):
        mirror.training = False
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        if isinstance(mirror, torch.nn.Module):
            mirror.training = modes[module]


class Runtime:
    """Program caches and dispatch for one rewritten model (``owner``, a GraphLoraModel).

    Reads from the owner: ``mirror`` (the module tree programs are traced from), ``sites``,
    ``skipped_sites``, ``site_table``, ``adapters_enabled``, ``compile``. ``on_analysed(program, path)``
    is set while the model is being rewritten: it creates the sites a new analysis found.
    """

    def __init__(self, owner: torch.nn.Module, pipeline: Pipeline, cache_size: int = 8):
        self.owner = owner
        self.pipeline = pipeline
        self.cache_size = cache_size
        self.whole = TraceCache(cache_size)
        self.region_caches: dict[str, TraceCache] = {}
        self.block_caches: dict[str, TraceCache] = {}
        self.block_class_of: dict[str, Any] = {}  # block path -> its graphlora.blocks.BlockClass
        self.block_sites: dict[str, list] = {}  # block path -> the sites inside it
        self.traces: list[TraceRecord] = []
        self.text_len: int | None = None
        self.on_analysed: Callable[[Program, str], None] | None = None
        self.prologue = families.get_prologue(owner.mirror)
        #: block class name -> the MaskRule its calls without a mask get (None: they keep None).
        self.mask_rules: dict[str, MaskRule | None] = {}
        #: The eager analysis recording of the whole model (blocks mode), after the analysis passes.
        self.analysis_graph: torch.fx.GraphModule | None = None

    def __getstate__(self):
        # Derived state: programs (TraceCache pickles empty) and the analysis graph (not picklable: it
        # records torch functions) are rebuilt, not saved.
        return {**self.__dict__, "analysis_graph": None, "on_analysed": None}

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def num_traces(self) -> int:
        """Programs traced so far (the eager analysis recording is not a trace)."""
        return sum(1 for t in self.traces if t.kind == "program")

    def clear(self) -> None:
        """Forget every program (dtypes and devices are baked into them: after ``.to()``)."""
        self.whole.clear()
        for cache in list(self.region_caches.values()) + list(self.block_caches.values()):
            cache.clear()

    def programs(self) -> list[Program]:
        """Every cached program: whole-model, then region, then block-class programs."""
        out = [p for _, p in self.whole.programs()]
        for cache in list(self.region_caches.values()) + list(self.block_caches.values()):
            out += [p for _, p in cache.programs()]
        return out

    def keyed_programs(self) -> list[tuple[CallKey, Program]]:
        out = self.whole.programs()
        for cache in list(self.region_caches.values()) + list(self.block_caches.values()):
            out += cache.programs()
        return out

    def branches_under(self, path: str) -> dict:
        """Branch specs of the sites inside ``path``, with parameter names relative to it."""
        branches = self.owner.site_table.branches
        if not path:
            return branches
        prefix = path + "."
        return {name: dataclasses.replace(spec, a_fqn=spec.a_fqn[len(prefix):], b_fqn=spec.b_fqn[len(prefix):])
                for name, spec in branches.items() if spec.a_fqn.startswith(prefix)}

    @property
    def variant(self) -> ProgramVariant:
        return ProgramVariant.LORA if self.owner.adapters_enabled else ProgramVariant.BASE

    # -- building ------------------------------------------------------------------------------
    def build(self, tensors: dict[str, Any], constants: dict[str, Any], key: CallKey, path: str = "",
              every_dimension: bool = False, unit: str = "", reason: str = "") -> Program:
        """Export the whole mirror (``path == ""``) or one of its modules, run the passes, maybe compile."""
        t0 = time.perf_counter()
        mirror = self.owner.mirror
        if path:
            module = mirror.get_submodule(path)
            # Trace the module's plain forward: with checkpointing on, its class forward would trace through
            # torch.utils.checkpoint (the runner checkpoints the program instead, see run_region).
            checkpointing = module.__dict__.get("gradient_checkpointing")
            if checkpointing is True:
                module.gradient_checkpointing = False
            try:
                ep = export_call(module, tensors, constants, text_len=self.text_len, class_forward=True,
                                 every_dimension=every_dimension)
            finally:
                if checkpointing is True:
                    module.gradient_checkpointing = True
        else:
            ep = export_call(mirror, tensors, {**constants, **forced_kwargs(mirror)})
        program = Program.from_exported(ep, tuple(sorted(tensors)))
        t1 = time.perf_counter()
        gm = program.graph_module
        record_loss_outputs(gm, program.out_spec)
        self.pipeline.observe(EXPORT_STAGE, gm)
        table = self.owner.site_table
        passes = (self.pipeline.labelling(mirror, path, table.labels, table.decisions, table.towers) if path
                  else self.pipeline.analysis(mirror, WRAPPER_PREFIX))
        records = self.pipeline.run(passes, gm)
        if self.on_analysed is not None:
            self.on_analysed(program, path)
        if key.variant == ProgramVariant.LORA:
            refused = frozenset(s.name for s in self.owner.skipped_sites)
            live = self.owner if not path else self.owner.get_submodule(path)
            autocast_on = any(enabled for _, enabled, _ in key.autocast)
            device = "cuda" if any("@cuda" in m for metas in key.tensor_meta for m in metas) else \
                next((p.device.type for p in live.parameters()), "cpu")
            records += self.pipeline.run(self.pipeline.transform(
                program, self.branches_under(path), live, key.training, refused, autocast_on, device), gm)
        options = self.owner.compile
        records += self.pipeline.run(self.pipeline.lowering(gm, compiled=bool(options)), gm)
        if options:
            options = dict(options) if isinstance(options, dict) else {}
            if every_dimension:  # a block program serves every shape: compile it shape-generic once
                options.setdefault("dynamic", True)
            program.runner = torch.compile(gm, **options)
        self.traces.append(TraceRecord(key, records, t1 - t0, time.perf_counter() - t1, path, unit, reason))
        return program

    # -- the whole model -----------------------------------------------------------------------
    def whole_program_for(self, call: dict[str, Any]) -> tuple[Program, list[Any]]:
        """The cached whole-model program for this call (tracing one if none accepts it) and its flat inputs."""
        if self.prologue is not None:
            call = self.prologue(self.owner.mirror, call)
        if self.owner.on_meta:
            # A meta model (a large config inspected without weights) takes CPU inputs, whose values
            # the prologue may need (image grids); the trace itself runs on meta tensors.
            call = pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, call)
        tensors, constants = split_call(call)
        constants.pop("use_cache", None)
        key = make_call_key(tensors, constants, self.owner.training, self.variant)
        found = self.whole.find(key, lambda program: program.flatten_inputs(tensors))
        if found is not None:
            return found
        program = self.build(tensors, constants, key, reason=why_new_trace(self.whole, key))
        self.whole.put(key, program)
        return program, program.flatten_inputs(tensors)

    # -- regions -------------------------------------------------------------------------------
    def region_program(self, path: str, module: torch.nn.Module, call: dict[str, Any]) -> tuple[Program, list[Any]]:
        tensors, constants = split_call(call, keep_none=True)
        key = make_call_key(tensors, constants, module.training, self.variant)
        cache = self.region_caches.setdefault(path, TraceCache(self.cache_size))
        found = cache.find(key, lambda program: program.flatten_inputs(tensors))
        if found is not None:
            return found
        program = self.build(tensors, constants, key, path, reason=why_new_trace(cache, key))
        cache.put(key, program)
        return program, program.flatten_inputs(tensors)

    def sites_in(self, path: str) -> list:
        sites = self.block_sites.get(path)
        if sites is None:
            sites = [s for s in self.owner.sites if s.module.startswith(path + ".")]
            self.block_sites[path] = sites
        return sites

    def _eager_with_lora(self, path: str, module: torch.nn.Module, args: tuple, kwargs: dict):
        sites = self.sites_in(path) if self.owner.adapters_enabled else []
        with eager_lora_hooks(self.owner, sites):
            return type(module).forward(module, *args, **kwargs)

    @staticmethod
    def _call_program(module: torch.nn.Module, program: Program, flat: list[Any]):
        checkpoint = getattr(module, "_gradient_checkpointing_func", None)
        if checkpoint is not None and getattr(module, "gradient_checkpointing", False) is True and module.training \
                and torch.is_grad_enabled():
            # transformers' GradientCheckpointingLayer checkpoints its *class* forward, which this runner replaces:
            # checkpoint the program call instead (traced outside the checkpoint; inputs passed positionally so
            # that reentrant checkpointing also propagates their gradients).
            return checkpoint(lambda *inputs: program(module, list(inputs)), *flat)
        return program(module, flat)

    def run_region(self, path: str, args: tuple, kwargs: dict):
        """A call of a traced region (installed as its ``forward`` by :class:`RegionRunner`)."""
        return self._run_unit(path, args, kwargs, self.region_program)

    def _run_unit(self, path: str, args: tuple, kwargs: dict, program_for):
        """Serve a call of a region or block with the program ``program_for(path, module, call)`` gives."""
        module = self.owner.mirror.get_submodule(path)
        try:
            call = bind_call(module, args, kwargs)
            program, flat = program_for(path, module, call)
        except GraphLoraError:
            # Untraceable arguments (a KV-cache object during generation ...): run this call eagerly.
            return self._eager_with_lora(path, module, args, kwargs)
        return self._call_program(module, program, flat)

    # -- block classes -------------------------------------------------------------------------
    def _with_mask(self, block_class, module: torch.nn.Module, call: dict[str, Any]) -> dict[str, Any]:
        """``call`` with ``attention_mask=None`` replaced by the equivalent mask (see :class:`MaskRule`).

        Causal blocks (decoder layers: ``None`` means an unpadded batch) always get the mask; bidirectional
        ones only when their class already has a program that takes a mask. The first time per class, the
        block's eager output with the mask is checked against its output with ``None``; if they differ, the
        class keeps ``None`` (and gets a second program)."""
        hidden = call.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
            return call
        name = block_class.name
        if name not in self.mask_rules:
            rule = mask_rule(module)
            if hidden.device.type != "meta":
                # A block whose attention does not say (Mllama's cross-attention layers take the causal mask and
                # never read it; a convolution layer takes the 2-D padding mask): a causal mask, else a padding
                # mask, is used if it demonstrably computes the same.
                candidates = [rule] if rule is not None else [MaskRule(True, False), MaskRule(True, True),
                                                             MaskRule(True, False, padding=True)]
                rule = next((c for c in candidates if self._mask_is_equivalent(c, module, call, hidden)), None)
            self.mask_rules[name] = rule
        rule = self.mask_rules[name]
        if rule is None:
            return call
        if not rule.causal and not any("attention_mask" in k.tensor_names for k, _ in self.block_caches[name].programs()):
            # A bidirectional block (a vision encoder layer) is usually called without a mask, which lets sdpa
            # pick its fastest kernel: give it one only once a program with a mask exists.
            return call
        return {**call, "attention_mask": rule.mask_for(hidden)}

    @staticmethod
    def _mask_is_equivalent(rule: MaskRule, module: torch.nn.Module, call: dict[str, Any], hidden) -> bool:
        """Whether the block's eager output with ``rule``'s mask equals its output with ``None``."""
        from graphlora.verify import relative_error, tolerance_for

        try:
            with torch.no_grad(), eval_mode(module):
                plain = type(module).forward(module, **call)
                with_mask = type(module).forward(module, **{**call, "attention_mask": rule.mask_for(hidden)})
        except Exception:  # noqa: BLE001 - a mask this block cannot take
            return False
        return relative_error(with_mask, plain) <= tolerance_for(plain)

    def block_program(self, path: str, module: torch.nn.Module, call: dict[str, Any]) -> tuple[Program, list[Any]]:
        """The program of ``path``'s block class for this call (traced when none accepts it)."""
        block_class = self.block_class_of[path]
        if "attention_mask" in call and call["attention_mask"] is None:
            call = self._with_mask(block_class, module, call)
        cache = self.block_caches[block_class.name]
        signature = call_signature(call, module.training, self.variant)
        # Fast path: every block of a class is called alike within a forward, and batch after batch.
        served = cache.served(signature) if signature is not None else None
        if served is not None:
            flat = _signature_leaves(served, call)
            if served.guard.accepts(flat):
                return served, flat
        tensors, constants = split_call(call, keep_none=True)
        key = make_call_key(tensors, constants, module.training, self.variant)
        found = cache.find(key, lambda program: program.flatten_inputs(tensors), signature)
        if found is not None:
            return found
        program = self.build(tensors, constants, key, block_class.representative, every_dimension=True,
                             unit=block_class.name, reason=why_new_trace(cache, key))
        cache.put(key, program, signature)
        return program, program.flatten_inputs(tensors)

    def run_block(self, path: str, args: tuple, kwargs: dict):
        """A call of a block (installed as its ``forward`` by :class:`BlockRunner`)."""
        return self._run_unit(path, args, kwargs, self.block_program)


class RegionRunner:
    """Installed as ``forward`` of a region module of the mirror; serves calls with traced programs."""

    def __init__(self, runtime: Runtime, path: str):
        self.runtime = runtime
        self.path = path

    def __call__(self, *args, **kwargs):
        return self.runtime.run_region(self.path, args, kwargs)


class BlockRunner:
    """Installed as ``forward`` of a block of the mirror; serves its calls with its block class's program."""

    def __init__(self, runtime: Runtime, path: str):
        self.runtime = runtime
        self.path = path

    def __call__(self, *args, **kwargs):
        return self.runtime.run_block(self.path, args, kwargs)


__all__ = ["BlockRunner", "RegionRunner", "Runtime", "TraceCache", "TraceRecord", "bind_call", "eval_mode",
           "forced_kwargs", "is_deterministic", "why_new_trace"]
