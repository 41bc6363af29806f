"""Record one eager model call as an analysis graph: the dataflow of the whole model, without export.

``record_call(model, call)`` runs the model once (no grad) under a ``TorchFunctionMode`` and writes
every torch function it calls into a ``torch.fx.Graph``: one node per call, its tensor arguments as
edges, ``meta["val"]`` a shape/dtype stand-in for its result (a meta tensor) and
``meta["nn_module_stack"]`` the modules it ran in (outermost first, as ``torch.export`` records it).
Parameters, buffers and the call's tensor inputs are placeholders, described in
``GraphMeta.placeholders`` exactly as for an exported program, so the structural
analysis passes (labels, selection, reachability) run on it unchanged.

This is the *analysis IR* of the block-programs trace mode: it costs one eager forward (milliseconds
on a tiny model; about a tenth of a ``torch.export`` of a published 11B config on the meta device)
and its cost does not depend on how the model would be traced. It is never executed. Ops are at the
granularity of torch functions, not aten ops: the few the analysis recognises (``linear``, matmuls,
attention, softmax, activations, products, splits, views and casts) get the aten op as their target,
every other op a named stand-in.

On the meta device there are no values to compute data-dependent metadata from, so the call runs
under a ``FakeTensorMode`` with a shape environment, with the compile flags transformers reads set (it
then takes its tracing-friendly paths, as under ``torch.export``); the family's eager prologue has
already turned image metadata into inputs.

Also recorded: the first call (arguments) of each module listed in ``capture`` (the block candidates
the programs are traced from) and the order in which modules are first called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import types
from typing import Any, Callable, Collection

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from graphlora.labels import PlaceholderKind, graph_meta
from graphlora.regions import CapturedCall
from graphlora.trace import record_loss_outputs

aten = torch.ops.aten

#: Torch function names -> the aten op the structural analysis (graphlora/structure.py) matches.
_ATEN_TARGETS: dict[str, Any] = {
    "linear": aten.linear.default,
    "matmul": aten.matmul.default, "__matmul__": aten.matmul.default, "mm": aten.mm.default,
    "bmm": aten.bmm.default, "baddbmm": aten.baddbmm.default, "embedding": aten.embedding.default,
    "_grouped_mm": aten._grouped_mm.default, "conv1d": aten.conv1d.default,
    "scaled_dot_product_attention": aten.scaled_dot_product_attention.default,
    "softmax": aten.softmax.int, "_softmax": aten.softmax.int,
    "silu": aten.silu.default, "gelu": aten.gelu.default, "relu": aten.relu.default,
    "sigmoid": aten.sigmoid.default, "tanh": aten.tanh.default, "hardswish": aten.hardswish.default,
    "mish": aten.mish.default, "elu": aten.elu.default, "leaky_relu": aten.leaky_relu.default,
    "silu_": aten.silu_.default, "relu_": aten.relu_.default,
    "mul": aten.mul.Tensor, "__mul__": aten.mul.Tensor, "__rmul__": aten.mul.Tensor, "multiply": aten.mul.Tensor,
    "split": aten.split.Tensor, "split_with_sizes": aten.split_with_sizes.default, "chunk": aten.chunk.default,
    "unbind": aten.unbind.int, "narrow": aten.narrow.default,
    "t": aten.t.default, "T": aten.t.default, "transpose": aten.transpose.int, "permute": aten.permute.default,
    "view": aten.view.default, "reshape": aten.reshape.default, "expand": aten.expand.default,
    "contiguous": aten.contiguous.default, "clone": aten.clone.default, "type_as": aten.type_as.default,
    "topk": aten.topk.default, "sort": aten.sort.default, "argmax": aten.argmax.default,
    "argsort": aten.argsort.default, "scatter": aten.scatter.src, "scatter_add": aten.scatter_add.default,
    "to": aten._to_copy.default, "float": aten._to_copy.default, "half": aten._to_copy.default,
    "bfloat16": aten._to_copy.default, "double": aten._to_copy.default, "type": aten._to_copy.default,
}

_STAND_INS: dict[str, Callable] = {}


def _opened(func: Callable) -> Callable:
    """``func`` (a Python torch function) with its top-level ``has_torch_function`` check turned off: called
    under the recorder, the torch functions of its body are recorded one by one instead of ``func`` as one
    opaque op."""
    namespace = dict(func.__globals__, has_torch_function=lambda *_: False)
    opened = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__)
    opened.__kwdefaults__ = func.__kwdefaults__
    return opened


#: Torch functions recorded from the inside: ``nn.MultiheadAttention`` (SigLIP and Phi-4 pooling heads) runs
#: its in-projections (slices of one packed weight), attention and out-projection inside this one function;
#: recorded as one op, its attention would be invisible and its projections unlabelled.
_OPENED: dict[Callable, Callable] = {torch.nn.functional.multi_head_attention_forward:
                                     _opened(torch.nn.functional.multi_head_attention_forward)}


def _stand_in(name: str) -> Callable:
    """A named, never-called function standing for a torch function the analysis does not match."""
    fn = _STAND_INS.get(name)
    if fn is None:
        safe = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "op"

        def fn(*args, **kwargs):  # noqa: ARG001
            raise RuntimeError("graphlora analysis graphs record dataflow; they are not executable")

        fn.__name__ = fn.__qualname__ = safe
        fn.__module__ = __name__
        _STAND_INS[name] = fn
    return fn


def _op_name(func: Any) -> str:
    self_obj = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") == "__get__" and self_obj is not None:  # a property such as Tensor.T
        return getattr(self_obj, "__name__", "getattr")
    return getattr(func, "__name__", None) or type(func).__name__


def _is_inplace(name: str) -> bool:
    return name in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__") or (
        name.endswith("_") and not name.endswith("__"))


@dataclasses.dataclass
class Recording:
    """What :func:`record_call` saw: the analysis graph, first calls of the captured modules, call order."""

    graph_module: torch.fx.GraphModule
    captured: dict[str, CapturedCall]
    call_order: list[str]  # module paths in the order of their first call
    seconds: float = 0.0


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: torch.fx.Graph, params: dict[int, tuple[str, str]], stack: list[tuple[str, type]],
                 modules: dict[str, torch.nn.Module]):
        super().__init__()
        self.modules = modules
        self.graph = graph
        self.params = params  # id(parameter or buffer) -> (kind, fqn)
        self.stack = stack
        self.nodes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.param_nodes: dict[str, torch.fx.Node] = {}
        self.placeholders: dict[str, tuple[str, str]] = {}
        self._insert_point = None  # placeholders go before every call_function node

    # -- nodes ---------------------------------------------------------------------------------
    def placeholder(self, name: str, kind: str, target: str, value: torch.Tensor) -> torch.fx.Node:
        if self._insert_point is not None:
            with self.graph.inserting_before(self._insert_point):
                node = self.graph.placeholder(name)
        else:
            node = self.graph.placeholder(name)
        node.target = node.name  # unique: FX uses the target as the argument name
        node.meta["val"] = _stand_in_value(value)
        self.placeholders[node.name] = (kind, target if kind != "user" else node.name)
        return node

    def node_of(self, t: torch.Tensor) -> torch.fx.Node:
        node = self.nodes.get(t)
        if node is not None:
            return node
        known = self.params.get(id(t))
        if known is not None:
            kind, fqn = known
            owned = self._owned_name(t)  # a tied weight is named after the module using it (lm_head.weight)
            fqn = owned or fqn
            node = self.param_nodes.get(fqn)
            if node is None:
                prefix = "p_" if kind == "param" else "b_"
                node = self.placeholder(prefix + fqn.replace(".", "_"), kind, fqn, t)
                self.param_nodes[fqn] = node
            return node
        node = self.placeholder("c_external", "constant", "<external>", t)  # made outside any recorded call
        self.nodes[t] = node
        return node

    def _owned_name(self, t: torch.Tensor) -> str | None:
        if not self.stack:
            return None
        path, _ = self.stack[-1]
        module = self.modules.get(path)
        if module is None:
            return None
        for attr, value in list(module._parameters.items()) + list(module._buffers.items()):
            if value is t:
                return f"{path}.{attr}"
        return None

    def _arg(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.node_of(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self._arg(v) for v in value) if not hasattr(value, "_fields") else tuple(
                self._arg(v) for v in value)
        if isinstance(value, dict):
            return {k: self._arg(v) for k, v in value.items() if isinstance(k, str)}
        return _constant(value)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opened = _OPENED.get(func)
        if opened is not None:
            with self:  # torch pops the mode while this method runs: push it again to record the body
                return opened(*args, **kwargs)
        out = func(*args, **kwargs)
        leaves = pytree.tree_leaves(out)
        name = _op_name(func)
        inplace = _is_inplace(name) and args and isinstance(args[0], torch.Tensor)
        if not inplace and not any(isinstance(x, torch.Tensor) for x in leaves):
            return out  # metadata (shape, dtype, item, tolist ...): no dataflow edge to record
        if isinstance(func, torch._ops.OpOverload):
            target = func  # an op (graphlora::segment_attention ...): the graph holds it as export would
        else:
            target = _ATEN_TARGETS.get(name) or _stand_in(name)
        if target is aten._to_copy.default and args and isinstance(args[0], torch.Tensor) and \
                isinstance(out, torch.Tensor) and out.dtype == args[0].dtype and out.device == args[0].device:
            target = aten.alias.default  # a no-op cast
        if name == "__getitem__" and not _slicing(args[1] if len(args) > 1 else None):
            target = _stand_in("index")
        node = self.graph.call_function(target, tuple(self._arg(a) for a in args),
                                        {k: self._arg(v) for k, v in kwargs.items()})
        self._insert_point = self._insert_point or node
        node.meta["nn_module_stack"] = {path: (path, cls) for path, cls in self.stack}
        if inplace and not isinstance(out, torch.Tensor):
            out = args[0]  # __setitem__ returns None; the mutated tensor is the result
        if isinstance(out, torch.Tensor):
            node.meta["val"] = _stand_in_value(out)
            self.nodes[out] = node
            if inplace and out is not args[0]:
                self.nodes[args[0]] = node
        else:
            node.meta["val"] = None
            for i, leaf in enumerate(leaves):
                if isinstance(leaf, torch.Tensor):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta["val"] = _stand_in_value(leaf)
                    item.meta["nn_module_stack"] = node.meta["nn_module_stack"]
                    self.nodes[leaf] = item
        return out


def _slicing(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, slice) for i in items) and not any(isinstance(i, torch.Tensor) for i in items)


def _stand_in_value(t: torch.Tensor) -> torch.Tensor | None:
    """A meta tensor with ``t``'s shape, strides and dtype (fake tensors are kept as they are)."""
    try:
        from torch._subclasses.fake_tensor import FakeTensor

        if isinstance(t, FakeTensor):
            return t
        return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")
    except Exception:  # noqa: BLE001 - sparse, nested or symbolic tensors: no stand-in
        return None


def _constant(value: Any) -> Any:
    """A value an FX graph can hold and print: primitives as they are, anything else by its type name."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format,
                                           torch.layout)) or value is Ellipsis:
        return value
    if isinstance(value, torch.SymInt):
        hint = value.node.hint if hasattr(value.node, "hint") else None
        return int(hint) if hint is not None else str(value)
    if isinstance(value, (torch.SymFloat, torch.SymBool)):
        return str(value)
    if isinstance(value, slice):
        return slice(_constant(value.start), _constant(value.stop), _constant(value.step))
    return f"<{type(value).__name__}>"


@contextlib.contextmanager
def _fake_execution():
    """Run on fake tensors (for a model on the meta device), with transformers' tracing paths on."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    flags = [f for f in ("_is_compiling_flag", "_is_exporting_flag") if hasattr(torch.compiler, f)]
    saved = [getattr(torch.compiler, f) for f in flags]
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    try:
        for f in flags:
            setattr(torch.compiler, f, True)
        with mode:
            yield
    finally:
        for f, value in zip(flags, saved):
            setattr(torch.compiler, f, value)


def _to_meta(value: Any) -> Any:
    """Captured fake tensors -> meta tensors of the same shape (None if a shape is data-dependent)."""
    def convert(t):
        if not isinstance(t, torch.Tensor):
            return t
        if any(not isinstance(s, int) for s in t.shape):
            raise _SymbolicShape
        return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")

    return pytree.tree_map(convert, value)


class _SymbolicShape(Exception):
    pass


def record_call(model: torch.nn.Module, call: dict[str, Any], capture: Collection[str] = (),
                fake: bool = False) -> Recording:
    """Run ``model(**call)`` once, without gradients, and record it (see the module docstring).

    ``fake``: run on fake tensors (the model is on the meta device). Raises whatever the model raises.
    """
    import time

    t0 = time.perf_counter()
    graph = torch.fx.Graph()
    params: dict[int, tuple[str, str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        params.setdefault(id(p), ("param", fqn))
    for fqn, b in model.named_buffers(remove_duplicate=False):
        params.setdefault(id(b), ("buffer", fqn))
    paths: dict[int, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if path:
            paths.setdefault(id(module), path)
    stack: list[tuple[str, type]] = []
    order: dict[str, int] = {}
    captured: dict[str, CapturedCall] = {}
    wanted = set(capture)

    def pre(module, args):
        path = paths.get(id(module))
        if path is not None:
            stack.append((path, type(module)))
            order.setdefault(path, len(order))

    def post(module, args, output):
        if paths.get(id(module)) is not None and stack and stack[-1][0] == paths[id(module)]:
            stack.pop()

    def capture_hook(path):
        def record(module, args, kwargs):
            if path not in captured:
                captured[path] = CapturedCall(args, dict(kwargs), len(captured))
        return record

    recorder = _Recorder(graph, params, stack, dict(model.named_modules()))
    flat, spec = pytree.tree_flatten_with_path(call)
    for key_path, leaf in flat:
        if isinstance(leaf, torch.Tensor):
            name = "".join(c if c.isalnum() else "_" for c in pytree.keystr(key_path)).strip("_")
            recorder.nodes[leaf] = recorder.placeholder(name, "user", name, leaf)
    handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
               torch.nn.modules.module.register_module_forward_hook(post, always_call=True)]
    for path in wanted:
        handles.append(model.get_submodule(path).register_forward_pre_hook(capture_hook(path), with_kwargs=True))
    try:
        with (_fake_execution() if fake else contextlib.nullcontext()), torch.no_grad(), recorder:
            output = model(**call)
    finally:
        for h in handles:
            h.remove()
    leaves, out_spec = pytree.tree_flatten(output)
    graph.output(tuple(recorder.nodes.get(x) if isinstance(x, torch.Tensor) else None for x in leaves))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph, class_name="AnalysisGraph")
    graph_meta(gm).placeholders = {name: (PlaceholderKind(kind), target)
                                   for name, (kind, target) in recorder.placeholders.items()}
    record_loss_outputs(gm, out_spec)
    if fake:
        converted = {}
        for path, c in captured.items():
            try:
                converted[path] = CapturedCall(_to_meta(c.args), _to_meta(c.kwargs), c.order)
            except _SymbolicShape:
                continue
        captured = converted
    return Recording(gm, captured, sorted(order, key=order.__getitem__), time.perf_counter() - t0)


__all__ = ["Recording", "record_call"]
