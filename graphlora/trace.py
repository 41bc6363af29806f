"""Tracing: turn a model call into an executable FX program with torch.export.

A :class:`Program` is a lifted, functional ``torch.fx.GraphModule`` (parameters, buffers and constants
are placeholders) plus the plan that feeds it: which live module attribute goes into which placeholder.
Parameters are looked up by fully qualified name on the *live* module at every call, so one program
serves every copy of the weights (``.to()``, ``load_state_dict``, FSDP re-assignments), and several
programs (one per specialisation) share the same parameters.

What specialises a program (the :class:`CallKey`): the keyword set, the values of non-tensor
arguments, train/eval mode, input dtypes and the autocast state; within a key, the shapes export
fixed (:class:`ShapeGuard`; e.g. LLaVA's batch size) while the others (text length) stay dynamic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import itertools
import linecache
import logging
import os
import sys
import traceback
import weakref
from typing import Any

import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from graphlora.errors import ExportFailedError, GraphLoraError
from graphlora.labels import PlaceholderKind, graph_meta
from graphlora.name_rules import WRAPPER_ATTR

#: Attribute under which the export wrapper holds the model; stripped from parameter names.
_WRAPPED = WRAPPER_ATTR

#: Keyword arguments the traced forward always receives (a cache in the output cannot be exported).
FORCED_KWARGS: dict[str, Any] = {"use_cache": False}


# ---------------------------------------------------------------------------------------------
# The call key: what a trace specialises on apart from shapes
# ---------------------------------------------------------------------------------------------
def _freeze(value: Any) -> Any:
    """A hashable stand-in for a non-tensor argument value (for the cache key)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str, slice)) or isinstance(value, enum.Enum):
        return value
    # Objects (a KV cache, a config ...) would be baked into the trace by identity: not traceable.
    raise GraphLoraError(f"cannot trace a call with a non-tensor argument of type {type(value).__name__}")


def _is_tensor_tree(value: Any) -> bool:
    leaves = pytree.tree_leaves(value)
    return bool(leaves) and all(isinstance(x, torch.Tensor) for x in leaves)


def autocast_state() -> tuple:
    """The autocast settings in force, as a hashable tuple (part of the cache key)."""
    state = []
    for device_type in ("cpu", "cuda"):
        try:
            enabled = torch.is_autocast_enabled(device_type)
            dtype = torch.get_autocast_dtype(device_type) if enabled else None
        except (RuntimeError, TypeError):  # pragma: no cover - device type unknown to this build
            enabled, dtype = False, None
        state.append((device_type, enabled, str(dtype)))
    return tuple(state)


class ProgramVariant(enum.StrEnum):
    """Which program a call runs: with the LoRA branches, or the base model (adapters disabled)."""

    LORA = "lora"
    BASE = "base"


@dataclasses.dataclass(frozen=True)
class CallKey:
    """Everything a trace specialises on except tensor shapes."""

    tensor_names: tuple[str, ...]
    tensor_meta: tuple[tuple[str, ...], ...]  # per tensor input: dtypes (and device types) of its leaves
    constants: tuple[tuple[str, Any], ...]
    training: bool
    autocast: tuple
    variant: ProgramVariant = ProgramVariant.LORA


def split_call(kwargs: dict[str, Any], keep_none: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split call keyword arguments into tensor inputs and non-tensor constants.

    ``None`` values are dropped (HF forwards default every argument to None) unless ``keep_none``
    (a submodule's forward may take a required argument that is None in this call).
    """
    tensors: dict[str, Any] = {}
    constants: dict[str, Any] = {}
    for name, value in kwargs.items():
        if value is None:
            if keep_none:
                constants[name] = None
            continue
        if _is_tensor_tree(value):
            tensors[name] = value
        else:
            constants[name] = value
    return tensors, constants


def make_call_key(tensors: dict[str, Any], constants: dict[str, Any], training: bool, variant: str) -> CallKey:
    names = tuple(sorted(tensors))
    meta = tuple(
        tuple(f"{t.dtype}@{t.device.type}" for t in pytree.tree_leaves(tensors[n])) for n in names
    )
    return CallKey(
        tensor_names=names,
        tensor_meta=meta,
        constants=tuple(sorted((k, _freeze(v)) for k, v in constants.items())),
        training=training,
        autocast=autocast_state(),
        variant=variant,
    )


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def _make_export_wrapper(model: torch.nn.Module, tensor_names: tuple[str, ...], constants: dict[str, Any],
                         class_forward: bool = False):
    """A module whose forward has one named parameter per tensor input.

    torch.export refuses ``dynamic_shapes`` for inputs that land in a ``**kwargs`` parameter, and
    most VLM forwards take their image arguments that way; this wrapper gives each input a name.
    With ``class_forward`` the model's class ``forward`` is called directly: no hooks of the model
    module itself, and not an instance-level ``forward`` override (a region runner).
    """
    for name in tensor_names:
        if not name.isidentifier():
            raise GraphLoraError(f"cannot trace an input named {name!r}: not a Python identifier")
    params = ", ".join(tensor_names)
    call = ", ".join(f"{n}={n}" for n in tensor_names)
    target = f"type(self.{_WRAPPED}).forward(self.{_WRAPPED}, " if class_forward else f"self.{_WRAPPED}("
    src = f"def forward(self, {params}):\n    return {target}{call}, **self._graphlora_constants)\n"
    namespace: dict[str, Any] = {}
    exec(compile(src, "<graphlora export wrapper>", "exec"), namespace)  # noqa: S102 - generated from identifiers
    cls = type("GraphLoraExportWrapper", (torch.nn.Module,), {"forward": namespace["forward"]})
    wrapper = cls()
    setattr(wrapper, _WRAPPED, model)
    wrapper._graphlora_constants = dict(constants)
    return wrapper


def text_length(tensors: dict[str, Any]) -> int | None:
    """The text length of a call: ``input_ids.shape[-1]`` (or ``inputs_embeds.shape[1]``)."""
    ids = tensors.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.ndim >= 1:
        return int(ids.shape[-1])
    embeds = tensors.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.ndim >= 2:
        return int(embeds.shape[1])
    return None


def default_dynamic_shapes(tensors: dict[str, Any], length: int | None = None) -> dict[str, Any]:
    """Dynamic-shape spec: the text length is dynamic, everything else static.

    Every dimension of an integer/bool input (token ids, masks, labels, position ids) whose size is
    the text length gets ``Dim.AUTO`` (export keeps it dynamic, or specialises it when the model
    needs a constant), as does ``inputs_embeds``' sequence dimension. Marking every dimension AUTO
    costs up to three times the export time for nothing: VLMs fix batch and image sizes anyway, and
    a new batch size is a new trace (cached).

    A region (a submodule traced alone) sees hidden states, not token ids: pass the model call's
    text ``length`` and every dimension of that size, floating inputs included, is marked.
    """
    floats_too = length is not None
    length = length if length is not None else text_length(tensors)

    def spec(name: str, t: torch.Tensor):
        if length is None or length < 2:
            return None
        if name == "inputs_embeds":
            return {1: Dim.AUTO}
        if (t.dtype.is_floating_point or t.is_complex()) and not floats_too:
            return None
        dims = {i: Dim.AUTO for i, size in enumerate(t.shape) if size == length}
        return dims or None

    return {name: pytree.tree_map(lambda t, n=name: spec(n, t), value) for name, value in tensors.items()}


def every_dimension_dynamic(tensors: dict[str, Any]) -> dict[str, Any]:
    """Dynamic-shape spec of a block program: ``Dim.AUTO`` on every dimension whose example size is >= 2.

    A block (decoder layer, vision block) sees batch, sequence and patch dimensions that all vary
    with the data. A dimension of size 1 in the example stays static: in an example whose batch size is
    at least 2 it is a broadcast dimension (a mask's head dimension, positions shared by the batch),
    which must stay 1 for the broadcasts in the graph to mean what they meant in eager.
    """
    def spec(t: torch.Tensor):
        dims = {i: Dim.AUTO for i, size in enumerate(t.shape) if size >= 2}
        return dims or None

    return {name: pytree.tree_map(spec, value) for name, value in tensors.items()}


@contextlib.contextmanager
def _size_oblivious(enabled: bool):
    """Trace dynamic dimensions size-obliviously: export assumes a symbolic size is not 1 when it decides a
    broadcast (as it does anyway) but does not specialise the program to sizes >= 2, so a batch of one
    sample (or one image) runs through the same program."""
    if not enabled:
        yield
        return
    try:
        import torch.fx.experimental._config as fx_config
    except ImportError:  # pragma: no cover - a torch without the option: size-1 batches retrace
        yield
        return
    if not hasattr(fx_config, "backed_size_oblivious"):  # pragma: no cover
        yield
        return
    with fx_config.patch(backed_size_oblivious=True):
        yield


def _user_frame(tb) -> traceback.FrameSummary | None:
    """The innermost traceback frame outside torch and graphlora: the model's failing line."""
    torch_dir = os.path.dirname(torch.__file__)
    own_dir = os.path.dirname(__file__)
    best = None
    for frame in traceback.extract_tb(tb):
        fname = os.path.abspath(frame.filename)
        if fname.startswith(torch_dir) or fname.startswith(own_dir) or frame.filename.startswith("<"):
            continue
        best = frame
    return best


def describe_export_failure(model: torch.nn.Module, exc: BaseException) -> str:
    """One paragraph naming the failing operation and the model's source line."""
    frame = _user_frame(exc.__traceback__)
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    headline = lines[0] if lines else ""
    for line in lines:  # torch's data-dependent errors put the op in a "Could not guard" / "Caused by" line
        if "Could not" in line or "data-dependent" in line:
            headline = line.strip()
            break
    where = "an unknown location"
    code = ""
    if frame is not None:
        where = f"{frame.filename}:{frame.lineno} in {frame.name}"
        code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
    msg = (
        f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: {headline}\n"
        f"  failing line: {where}"
    )
    if code:
        msg += f"\n      {code}"
    msg += (
        "\n  This usually means the model computes a shape from tensor data (image metadata);"
        " see docs/tracing.md for the families graphlora knows how to trace."
    )
    return msg


@contextlib.contextmanager
def _quiet_export_logs():
    """Quiet torch's export-time logging: a warning per specialised dimension (expected here), and on a
    failing export the whole partial graph; graphlora reports failures itself, naming op and line."""
    names = ("torch._export.non_strict_utils", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes",
             "torch._subclasses.fake_tensor")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _keep_output_capture_marks(model: torch.nn.Module):
    """Keep transformers' "hooks installed" marks that a trace sets.

    transformers installs its output-capturing hooks lazily, on a model's first forward, and marks the
    model as hooked. If that first forward is a torch.export trace, the hooks stay but the mark is
    rolled back with the traced module state, so the next eager call would install them a second time
    and record every hidden state twice. After the trace, a model whose subtree gained capturing hooks
    is marked again (hooks in a nested model's subtree mark that model, not its parents).
    """
    before = {id(m): set(m._forward_hooks) for m in model.modules()}
    try:
        yield
    finally:
        try:
            from transformers.modeling_utils import PreTrainedModel
        except ImportError:  # pragma: no cover
            PreTrainedModel = ()  # noqa: N806
        def own_subtree(root):  # root and its modules that belong to no nested PreTrainedModel
            stack = [root]
            while stack:
                module = stack.pop()
                yield module
                stack.extend(c for c in module.children() if not isinstance(c, PreTrainedModel))

        for module in model.modules():
            if not isinstance(module, PreTrainedModel) or getattr(module, "_output_capturing_hooks_installed", False):
                continue
            gained = any(hook_id not in before.get(id(sub), ()) and
                         getattr(hook, "__module__", "") == "transformers.utils.output_capturing"
                         for sub in own_subtree(module) for hook_id, hook in sub._forward_hooks.items())
            if gained:
                module._output_capturing_hooks_installed = True


@contextlib.contextmanager
def _no_output_collector():
    """Hide transformers' active output collector while tracing.

    A region traced during a forward would otherwise append its fake intermediate values to the
    hidden states the enclosing model is collecting through hooks.
    """
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older transformers
        yield
        return
    saved = _active_collector.get()
    token = _active_collector.set(None)
    try:
        yield
    finally:
        _active_collector.reset(token) if token is not None else _active_collector.set(saved)


def export_call(
    model: torch.nn.Module,
    tensors: dict[str, Any],
    constants: dict[str, Any],
    dynamic: bool = True,
    text_len: int | None = None,
    class_forward: bool = False,
    every_dimension: bool = False,
) -> ExportedProgram:
    """torch.export (non-strict, training IR) of ``model(**tensors, **constants)``.

    ``text_len``: for a region (a submodule traced alone), the text length of the model call (see
    :func:`default_dynamic_shapes`). ``class_forward``: call the class ``forward`` (regions: their
    instance ``forward`` is a runner, and their own hooks run around the runner, not in the trace).
    ``every_dimension``: block programs: every dimension that can vary is dynamic
    (:func:`every_dimension_dynamic`), traced size-obliviously so that a later size of 1 is accepted.
    """
    names = tuple(sorted(tensors))
    wrapper = _make_export_wrapper(model, names, constants, class_forward=class_forward)
    kwargs = {n: tensors[n] for n in names}
    if every_dimension:
        dynamic_shapes = every_dimension_dynamic(kwargs)
    else:
        dynamic_shapes = default_dynamic_shapes(kwargs, text_len) if dynamic else None
    stderr = io.StringIO()  # torch prints the partial graph of a failed export to stderr
    try:
        with _quiet_export_logs(), _no_output_collector(), _keep_output_capture_marks(model), \
                _size_oblivious(every_dimension), contextlib.redirect_stderr(stderr):
            ep = torch.export.export(wrapper, (), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except GraphLoraError:
        raise
    except Exception as e:  # noqa: BLE001 - every export failure is translated
        error = ExportFailedError(describe_export_failure(model, e))
        error.partial_graph = getattr(e, "partial_fx_graph", None) or stderr.getvalue()
        raise error from e
    sys.stderr.write(stderr.getvalue())
    return ep


def record_loss_outputs(gm: torch.fx.GraphModule, out_spec: pytree.TreeSpec) -> None:
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
            graph_meta(gm).logits_outputs = list(ranges["logits"])
        for name in ("loss", "logits"):
            if name in ranges:
                graph_meta(gm).loss_outputs = list(ranges[name])
                graph_meta(gm).loss_output_names = f"`{name}`"
                return
    graph_meta(gm).loss_outputs = None


# ---------------------------------------------------------------------------------------------
# Shape guard
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ShapeGuard:
    """Which input shapes a program accepts: static dims must match, symbolic dims must fit their range.

    Symbols are unified across inputs (two inputs sharing a symbol must agree), and compound
    expressions (``2*s0``) are checked after unification.
    """

    shapes: list[tuple[Any, ...]]  # per flat user input: ints and sympy expressions
    ranges: dict[sympy.Symbol, tuple[int, float]]

    @classmethod
    def from_placeholders(cls, placeholders: list[torch.fx.Node], range_constraints: dict) -> "ShapeGuard":
        shapes = []
        for node in placeholders:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                shapes.append(())
                continue
            dims = []
            for d in val.shape:
                if isinstance(d, torch.SymInt):
                    expr = d.node.expr
                    dims.append(int(expr) if expr.is_number else expr)
                else:
                    dims.append(int(d))
            shapes.append(tuple(dims))
        ranges = {}
        for sym, vr in range_constraints.items():
            ranges[sym] = (_bound(vr.lower, 0), _bound(vr.upper, float("inf")))
        return cls(shapes=shapes, ranges=ranges)

    def accepts(self, flat_inputs: list[torch.Tensor]) -> bool:
        if len(flat_inputs) != len(self.shapes):
            return False
        binding: dict[sympy.Symbol, int] = {}
        compound: list[tuple[Any, int]] = []
        for shape, t in zip(self.shapes, flat_inputs):
            if t.ndim != len(shape):
                return False
            for want, got in zip(shape, t.shape):
                if isinstance(want, int):
                    if want != got:
                        return False
                elif isinstance(want, sympy.Symbol):
                    if binding.setdefault(want, got) != got:
                        return False
                    lo, hi = self.ranges.get(want, (0, float("inf")))
                    if not lo <= got <= hi:
                        return False
                else:
                    compound.append((want, got))
        for expr, got in compound:
            try:
                value = expr.subs(binding)
            except Exception:  # noqa: BLE001
                return False
            if not value.is_number or int(value) != got:
                return False
        return True


def _bound(value: Any, infinite: float) -> float:
    """A range bound as a number (torch's integer infinity does not convert with int())."""
    try:
        return int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return infinite


# ---------------------------------------------------------------------------------------------
# Program: the executable form
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class InputSlot:
    """Where one placeholder's value comes from at call time."""

    kind: str  # "param" | "buffer" | "constant" | "user"
    target: str  # FQN on the live module ("param"/"buffer"/"constant"), or the user input's path
    value: Any = None  # for constants that do not live on the module


@dataclasses.dataclass
class Program:
    """A lifted FX graph and the recipe to call it with live parameters and user inputs."""

    graph_module: torch.fx.GraphModule
    slots: list[InputSlot]
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    output_kinds: list[tuple[str, str | None]]  # per graph output: ("user"|"buffer"|"input", target)
    guard: ShapeGuard
    tensor_names: tuple[str, ...]
    #: What runs the graph: the GraphModule itself, or a torch.compile'd version of it.
    runner: Any = None
    #: Per live module: where each placeholder's value is read from (built on the first call with it).
    _feeds: Any = dataclasses.field(default_factory=weakref.WeakKeyDictionary, repr=False, compare=False)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_exported(cls, ep: ExportedProgram, tensor_names: tuple[str, ...]) -> "Program":
        gm = ep.graph_module
        sig = ep.graph_signature
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        slots: list[InputSlot] = []
        user_placeholders = []
        user_index = 0
        prefix = _WRAPPED + "."
        for spec, node in zip(sig.input_specs, placeholders):
            if spec.kind == InputKind.USER_INPUT:
                slots.append(InputSlot("user", str(user_index)))
                user_placeholders.append(node)
                user_index += 1
            elif spec.kind == InputKind.PARAMETER:
                slots.append(InputSlot("param", spec.target.removeprefix(prefix)))
            elif spec.kind == InputKind.BUFFER:
                slots.append(InputSlot("buffer", spec.target.removeprefix(prefix)))
            elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
                slots.append(InputSlot("constant", spec.target.removeprefix(prefix), ep.constants[spec.target]))
            else:
                raise GraphLoraError(f"unsupported exported input kind {spec.kind} for {node.name}")
        output_kinds = []
        for spec in sig.output_specs:
            if spec.kind == OutputKind.USER_OUTPUT:
                output_kinds.append(("user", None))
            elif spec.kind == OutputKind.BUFFER_MUTATION:
                output_kinds.append(("buffer", spec.target.removeprefix(prefix)))
            elif spec.kind == OutputKind.USER_INPUT_MUTATION:
                output_kinds.append(("input", spec.target))
            else:
                raise GraphLoraError(f"unsupported exported output kind {spec.kind}")
        # Inputs keep their user-facing names: makes dumps readable and placeholders stable.
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                node.target = node.name
        gm.recompile()
        guard = ShapeGuard.from_placeholders(user_placeholders, ep.range_constraints)
        program = cls(gm, slots, ep.call_spec.in_spec, ep.call_spec.out_spec, output_kinds, guard, tensor_names)
        program._record_placeholders()
        return program

    def _record_placeholders(self) -> None:
        """``GraphMeta.placeholders``: placeholder name -> (kind, target), for passes."""
        placeholders = [n for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        graph_meta(self.graph_module).placeholders = {
            node.name: (PlaceholderKind(slot.kind), slot.target if slot.kind != "user" else node.name)
            for slot, node in zip(self.slots, placeholders)
        }

    # -- parameters ---------------------------------------------------------------------------
    def param_placeholder(self, fqn: str) -> torch.fx.Node | None:
        """The placeholder fed with parameter ``fqn``, if any."""
        for name, (kind, target) in graph_meta(self.graph_module).placeholders.items():
            if kind == PlaceholderKind.PARAM and target == fqn:
                return self._placeholder_named(name)
        return None

    def _placeholder_named(self, name: str) -> torch.fx.Node | None:
        for node in self.graph_module.graph.nodes:
            if node.op != "placeholder":
                break
            if node.name == name:
                return node
        return None

    def add_param_placeholder(self, fqn: str, example: torch.Tensor, fake_mode=None) -> torch.fx.Node:
        """Add a placeholder fed with live parameter ``fqn`` (before the first user input).

        Pass the graph's ``fake_mode`` when adding many (finding it scans every placeholder).
        """
        graph = self.graph_module.graph
        placeholders = list(itertools.takewhile(lambda n: n.op == "placeholder", graph.nodes))
        index = next((i for i, s in enumerate(self.slots) if s.kind == "user"), len(self.slots))
        anchor = placeholders[index] if index < len(placeholders) else None
        fake_mode = fake_mode or fake_mode_of(graph)
        name = "p_" + fqn.replace(".", "_")
        ctx = graph.inserting_before(anchor) if anchor is not None else graph.inserting_after(placeholders[-1])
        with ctx:
            node = graph.placeholder(name)
        node.target = node.name  # FX may rename the node; keep target in sync (trap: renamed placeholders)
        if fake_mode is not None:
            with fake_mode:
                node.meta["val"] = torch.empty_strided(
                    example.shape, example.stride(), dtype=example.dtype, device=example.device
                )
        else:
            node.meta["val"] = example.detach()
        self.slots.insert(index, InputSlot("param", fqn))
        graph_meta(self.graph_module).placeholders[node.name] = (PlaceholderKind.PARAM, fqn)
        return node

    def user_placeholders(self) -> list[torch.fx.Node]:
        placeholders = [n for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        return [n for s, n in zip(self.slots, placeholders) if s.kind == "user"]

    # -- calling ------------------------------------------------------------------------------
    def flatten_inputs(self, tensors: dict[str, Any]) -> list[Any]:
        flat, spec = pytree.tree_flatten(((), {n: tensors[n] for n in self.tensor_names}))
        if spec != self.in_spec:
            raise GraphLoraError(f"call structure {spec} does not match the traced structure {self.in_spec}")
        return flat

    def _feed_plan(self, live: torch.nn.Module) -> list[tuple]:
        """Per slot: ("user", index) or (kind, owner module, attribute name, constant value)."""
        plan = self._feeds.get(live)
        if plan is None or len(plan) != len(self.slots):
            plan = []
            for slot in self.slots:
                if slot.kind == "user":
                    plan.append(("user", int(slot.target)))
                    continue
                owner_path, _, attr = slot.target.rpartition(".")
                owner = _get_attr(live, owner_path, default=None) if owner_path else live
                if not isinstance(owner, torch.nn.Module):
                    owner = None  # resolved by name at each call (and reported there if missing)
                plan.append((slot.kind, owner, attr, slot))
            self._feeds[live] = plan
        return plan

    def __call__(self, live: torch.nn.Module, flat_inputs: list[Any]) -> Any:
        args = []
        for entry in self._feed_plan(live):
            kind = entry[0]
            if kind == "user":
                args.append(flat_inputs[entry[1]])
                continue
            _, owner, attr, slot = entry
            if owner is None:
                value = _get_attr(live, slot.target, default=None if kind == "constant" else ...)
            else:
                # The module's dicts are read at every call: .to(), load_state_dict and FSDP2 swap tensors in.
                store = owner._parameters if kind == "param" else owner._buffers if kind == "buffer" else None
                value = store.get(attr) if store is not None else None
                if value is None:
                    value = getattr(owner, attr, None)
                    if value is None and kind != "constant":
                        value = _get_attr(live, slot.target)  # raises, naming the attribute
            if kind == "constant" and not isinstance(value, torch.Tensor):
                value = slot.value  # a constant that does not live on the module
            args.append(value)
        outputs = (self.graph_module if self.runner is None else self.runner)(*args)
        if not isinstance(outputs, (tuple, list)):
            outputs = (outputs,)
        user_outputs = []
        for (kind, target), value in zip(self.output_kinds, outputs):
            if kind == "user":
                user_outputs.append(value)
            elif kind == "buffer":
                with torch.no_grad():
                    _get_attr(live, target).copy_(value)
            else:
                raise GraphLoraError(f"a traced program mutates its input {target}; not supported")
        return pytree.tree_unflatten(user_outputs, self.out_spec)


def _get_attr(root: torch.nn.Module, fqn: str, default: Any = ...) -> Any:
    obj: Any = root
    for part in fqn.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            if default is not ...:
                return default
            raise GraphLoraError(f"the model has no attribute {fqn!r} (needed by a traced program)") from None
    return obj


def fake_mode_of(graph: torch.fx.Graph):
    """The FakeTensorMode the graph's ``meta['val']`` tensors were made in (trap: never make a new one)."""
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
