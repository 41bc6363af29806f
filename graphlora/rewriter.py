"""``graphlora.rewrite(model, policy)``: the entry point."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from graphlora import families
from graphlora.adapters.peft_compat import matches_module_suffix
from graphlora.errors import PolicyError
from graphlora.mirror import mirror_module
from graphlora.model import GraphLoraModel
from graphlora.policy import Policy, as_policy, load_policy_source
from graphlora.progress import progress_stream, progress_to, rewrite_logger, step
from graphlora.quantized import install_quantized_forwards, quantized_layers


def _default_example_inputs(model: torch.nn.Module) -> dict[str, Any]:
    return families.synthesize_inputs(model)


def _apply_modules_to_save(mirror: torch.nn.Module, names: list[str]) -> list[str]:
    """Replace each matching module of the mirror with a trainable deep copy; return their paths."""
    paths = []
    for name in names:
        hits = [path for path, _ in mirror.named_modules() if path and matches_module_suffix(path, name)]
        if not hits:
            raise PolicyError(f"modules_to_save: {name!r} matches no module of the model", key_path="modules_to_save")
        paths.extend(hits)
    for path in sorted(set(paths)):
        parent_path, _, child = path.rpartition(".")
        parent = mirror.get_submodule(parent_path) if parent_path else mirror
        trainable = copy.deepcopy(parent._modules[child])
        for p in trainable.parameters():
            p.requires_grad_(True)
        parent._modules[child] = trainable
    return sorted(set(paths))


def rewrite(
    model: torch.nn.Module,
    policy: Policy | dict[str, Any] | str | Path | None = None,
    example_inputs: dict[str, Any] | None = None,
    *,
    cache_size: int = 8,
    fuse: bool | str = "auto",
    compile: bool | dict = False,
    verify: bool | str = True,
    trace_mode: str = "auto",
    observer: Callable[[str, torch.fx.GraphModule], None] | None = None,
    progress: bool | None | TextIO = None,
) -> GraphLoraModel:
    """Trace ``model``, label its linears, and insert LoRA where ``policy`` says.

    ``policy`` is a :class:`Policy`, a dict of its fields, or a path to a policy file (None: the
    defaults, i.e. Unsloth's). ``example_inputs`` are keyword arguments of one forward call (a training
    batch); when omitted they are synthesised from the model's config for known families.

    ``fuse`` replaces each LoRA branch by the fused ``graphlora::lora_linear`` op (Triton kernels on
    CUDA, a reference implementation elsewhere): ``True`` wherever the op accepts the inputs, ``False``
    nowhere, ``"auto"`` (the default) where it was measured to be faster, which is nowhere yet (on an
    H200 its host cost per call outweighed its GPU gain: graphlora/fusion_default.py, docs/benchmarks.md). ``lora_model.fusion_report()`` says per site whether it was fused and
    why not.

    ``compile=True`` (or a dict of ``torch.compile`` options) compiles every traced program with
    ``torch.compile`` (Inductor; the fused op stays one opaque node with its own backward). The first
    call of each program then pays the compile time.

    ``verify`` runs the traced program(s) and the eager model on the example inputs (eval mode, same
    seed, random LoRA matrices) and compares outputs and LoRA gradients; a traced part that differs
    is demoted (the whole model to regional tracing, a region to eager with module-level LoRA) and
    reported in ``lora_model.regions`` / ``lora_model.verification``; ``verify="strict"`` raises
    :class:`TraceMismatchError` instead; ``False`` skips it (it is also skipped on the meta device).

    ``progress``: one line per long step on stderr (``[graphlora] export LlamaDecoderLayer (40 blocks): 3.1 s``):
    ``None`` (the default) when stderr is a terminal (``GRAPHLORA_PROGRESS=1`` / ``0`` forces it on / off),
    ``True`` always, ``False`` never, or a stream to write them to (graphlora/progress.py).

    ``trace_mode`` (docs/tracing.md): ``"auto"`` (the default: ``"blocks"`` when the model has repeated
    blocks, else ``"whole_or_regional"``); ``"blocks"`` (one program per block class, dynamic in batch,
    text and image size; the glue runs eagerly with module-level LoRA); ``"whole"`` (one program for the
    whole forward, after the family's prologue; fail instead of falling back); ``"whole_or_regional"``
    (whole, falling back to regions when that fails or differs); ``"regional"``.

    ``observer(stage, graph_module)``, when given, is called at the first stage of every graph (``"record"``
    for the eager analysis recording, ``"export"`` for a trace) and after every pass, e.g. to dump the graph
    at each stage.

    The model's parameters are frozen and shared with the returned :class:`GraphLoraModel`, whose only
    trainable parameters are the LoRA matrices (and copies of ``policy.modules_to_save``).
    """
    source = None
    if isinstance(policy, (str, Path)):
        source = load_policy_source(policy)
        policy = source.policy
    policy = as_policy(policy)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"rewrite() takes an nn.Module, not {type(model).__name__}")
    quantized = quantized_layers(model)  # refuses unsupported quantization formats, naming the layer
    families.check_not_refused(model)
    if example_inputs is None:
        example_inputs = _default_example_inputs(model)
    if not isinstance(example_inputs, dict):
        raise TypeError("example_inputs must be a dict of keyword arguments of the model's forward")
    with progress_to(rewrite_logger, progress_stream(progress)):
        lora_model = None

        def summary() -> str:
            if lora_model is None:
                return ""
            return f"{len(lora_model.sites)} sites, trace mode {lora_model.trace_mode}"

        with step(rewrite_logger, f"rewrite {type(model).__name__}", summary):
            lora_model = _rewrite(model, policy, source, example_inputs, cache_size, fuse, compile, verify,
                                  trace_mode, observer, quantized)
    return lora_model


def _rewrite(model, policy, source, example_inputs, cache_size, fuse, compile, verify, trace_mode, observer,
             quantized):
    """The body of :func:`rewrite` after its arguments are checked."""
    for p in model.parameters():
        p.requires_grad_(False)
    mirror = mirror_module(model)
    install_quantized_forwards(mirror, quantized)
    if policy.modules_to_save:
        try:
            _apply_modules_to_save(mirror, policy.modules_to_save)
        except PolicyError as e:
            where = source.locate(e.key_path) if source is not None else None
            raise PolicyError(f"{where}: {e}" if where else str(e), key_path=e.key_path) from None
    lora_model = GraphLoraModel(model, mirror, policy, cache_size=cache_size, fuse=fuse, compile=compile)
    lora_model.observer = observer
    lora_model.quantized = quantized
    # The planner analyses the model, decides the sites, creates the LoRA parameters and traces.
    try:
        lora_model.planner.setup(example_inputs, verify=verify, trace_mode=trace_mode)
    except PolicyError as e:
        where = source.locate(e.key_path) if source is not None and e.key_path else None
        if where is None:
            raise
        raise PolicyError(f"{where}: {e}", key_path=e.key_path) from None
    return lora_model
