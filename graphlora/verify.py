"""Verification: a traced program must compute what the eager model computes.

Export can change numerics without an error (Phi-4's vision attention is causal in eager and
bidirectional once exported). So every rewrite runs each traced unit (the whole model, or a region)
and its eager twin on the same inputs, in eval mode with the same seed, with random non-zero LoRA
matrices so the inserted branches count, and compares the outputs and the gradients of a scalar loss
with respect to the LoRA parameters (:func:`compare`).

:func:`compare_outputs` is the same comparison for a program against a model without LoRA (the graph
dump's check when ``rewrite()`` recorded none): named outputs only, LoRA as it is, no gradients.
Both run each side with :func:`_run` (seeded, RNG state restored) and judge by :func:`relative_error`
against :func:`tolerance_for`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.utils._pytree as pytree


@dataclasses.dataclass
class Verification:
    """How a traced unit compared with eager on the example inputs."""

    unit: str  # "" for the whole model, else the region's module path
    passed: bool
    output_error: float  # max |traced - eager| / max |eager| over the floating outputs
    grad_error: float  # the same over the LoRA parameters' gradients
    tolerance: float
    note: str = ""  # set when the comparison was skipped (meta device, verify=False)
    gradients: bool = True  # False: outputs only (a block whose class's program was checked with gradients)

    def describe(self) -> str:
        where = self.unit or "the whole model"
        if self.note:
            return f"{where}: {self.note}"
        verdict = "matches" if self.passed else "DIFFERS from"
        grads = f"gradient error {self.grad_error:.2e}" if self.gradients else "outputs only"
        return (f"{where}: traced program {verdict} eager (output error {self.output_error:.2e}, "
                f"{grads}, tolerance {self.tolerance:.0e})")


def tolerance_for(outputs: Any) -> float:
    dtypes = {t.dtype for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return 1e-4 if dtypes <= {torch.float32, torch.float64} else 3e-2


def keyed_leaves(tree: Any) -> dict[str, Any]:
    """Leaves by key path: ModelOutputs flatten in field-assignment order, which can differ between
    an eager run and a traced one holding the same fields."""
    return {pytree.keystr(path): leaf for path, leaf in pytree.tree_flatten_with_path(tree)[0]}


def relative_error(got: Any, want: Any) -> float:
    worst = 0.0
    got_leaves, want_leaves = keyed_leaves(got), keyed_leaves(want)
    if {k for k, v in got_leaves.items() if isinstance(v, torch.Tensor)} != \
            {k for k, v in want_leaves.items() if isinstance(v, torch.Tensor)}:
        return float("inf")  # different outputs
    for key, b in want_leaves.items():
        a = got_leaves[key]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or not b.is_floating_point():
            continue
        if a.shape != b.shape:
            return float("inf")
        scale = b.detach().abs().max().float().item() if b.numel() else 0.0
        diff = (a.detach().float() - b.detach().float()).abs().max().item() if b.numel() else 0.0
        worst = max(worst, diff / max(scale, 1e-6))
    return worst


def scalar_loss(outputs: Any, generator_seed: int = 0) -> torch.Tensor:
    """A fixed random weighting of every floating output that requires grad (same for both runs:
    leaves are visited in key order, each drawing from a generator seeded by its key)."""
    total = None
    for key, leaf in sorted(keyed_leaves(outputs).items()):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.requires_grad:
            generator = torch.Generator().manual_seed(generator_seed + sum(map(ord, key)))
            weight = torch.randn(leaf.shape, generator=generator).to(leaf.device, leaf.dtype)
            term = (leaf * weight).sum().float()
            total = term if total is None else total + term
    return total


@contextlib.contextmanager
def random_lora(params: list[torch.nn.Parameter], seed: int = 0) -> Iterator[None]:
    """Give the LoRA matrices random values for the block (B is zero at initialisation), then restore."""
    saved = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for p in params:
                p.copy_((torch.randn(p.shape, generator=generator) * 0.1).to(p.device, p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
                p.grad = None


def _run(fn: Callable[[], Any], params: list[torch.nn.Parameter]) -> tuple[Any, list[torch.Tensor | None]]:
    for p in params:
        p.grad = None
    with torch.random.fork_rng(devices=[]), (torch.enable_grad() if params else torch.no_grad()):
        torch.manual_seed(0)
        outputs = fn()
    loss = scalar_loss(outputs)
    grads: list[torch.Tensor | None] = [None] * len(params)
    if loss is not None and params:
        got = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [g.detach().clone() if g is not None else None for g in got]
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, outputs), grads


def compare(unit: str, traced: Callable[[], Any], eager: Callable[[], Any], params: list[torch.nn.Parameter],
            gradients: bool = True) -> Verification:
    """Run both callables (same seed, random LoRA) and compare outputs and LoRA gradients.

    ``gradients=False`` compares outputs only (no backward): for a further block that runs a program
    already checked with gradients on another block of its class.
    """
    graded = params if gradients else []
    with random_lora(params):
        traced_out, traced_grads = _run(traced, graded)
        eager_out, eager_grads = _run(eager, graded)
    return _verdict(unit, traced_out, eager_out, traced_grads, eager_grads, gradients)


def _verdict(unit: str, traced_out: Any, eager_out: Any, traced_grads: list[torch.Tensor | None],
             eager_grads: list[torch.Tensor | None], gradients: bool) -> Verification:
    tol = tolerance_for(eager_out)
    out_err = relative_error(traced_out, eager_out)
    grad_err = 0.0
    for g_t, g_e in zip(traced_grads, eager_grads):
        if g_t is None and g_e is None:
            continue
        if g_t is None or g_e is None:
            grad_err = float("inf")
            break
        grad_err = max(grad_err, relative_error([g_t], [g_e]))
    return Verification(unit, out_err <= tol and grad_err <= tol, out_err, grad_err, tol, gradients=gradients)


#: The outputs :func:`compare_outputs` compares by default.
NAMED_OUTPUTS: tuple[str, ...] = ("loss", "logits")


@dataclasses.dataclass
class OutputVerification(Verification):
    """A comparison of named outputs (:func:`compare_outputs`): ``outputs`` maps each output both runs
    produced to its largest absolute difference, or to ``"shape (a) vs (b)"`` when the shapes differ."""

    outputs: dict[str, float | str] = dataclasses.field(default_factory=dict)


def named_outputs(outputs: Any, names: Sequence[str] = NAMED_OUTPUTS) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of a model's output (a mapping or a ModelOutput-like object); a bare tensor
    output is ``{"output": tensor}`` when none of the names is found."""
    found = {}
    for key in names:
        value = outputs.get(key) if isinstance(outputs, Mapping) else getattr(outputs, key, None)
        if isinstance(value, torch.Tensor):
            found[key] = value
    if not found and isinstance(outputs, torch.Tensor):
        found["output"] = outputs
    return found


def compare_outputs(unit: str, traced: Callable[[], Any], eager: Callable[[], Any],
                    names: Sequence[str] = NAMED_OUTPUTS) -> OutputVerification:
    """Run both callables once (same seed, no gradients, parameters as they are) and compare the
    outputs ``names`` that both produce, as :func:`compare` compares outputs.

    For a program checked against a model without LoRA: with LoRA B at zero both must agree.
    Exceptions of either run propagate.
    """
    traced_out, _ = _run(traced, [])
    eager_out, _ = _run(eager, [])
    got, want = named_outputs(traced_out, names), named_outputs(eager_out, names)
    common = [key for key in want if key in got]
    got, want = {k: got[k] for k in common}, {k: want[k] for k in common}
    differences: dict[str, float | str] = {}
    for key in common:
        a, b = got[key].float(), want[key].float()
        if a.shape != b.shape:
            differences[key] = f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        else:
            differences[key] = float((a - b).abs().max()) if a.numel() else 0.0
    check = _verdict(unit, got, want, [], [], gradients=False)
    return OutputVerification(**dataclasses.asdict(check), outputs=differences)
