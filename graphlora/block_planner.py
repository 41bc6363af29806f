"""Block planning: one program per block class, every block verified through it, the glue eager.

Reads: the model's repeated blocks (graphlora/blocks.py), one eager recording of the whole model
(graphlora/recorder.py), labelled by the analysis passes (the pipeline), and the first call of one block
of each shape; the example call.

Writes: the sites (through :class:`~graphlora.site_attacher.SiteAttacher`, unless they are kept from
another mode); on the runtime the analysis graph, the block classes (``block_class_of``), their program
caches and the trace log; on the model ``trace_mode``, ``regions`` (the glue, then one entry per block)
and ``verification``; on the mirror a :class:`~graphlora.runtime.BlockRunner` as the ``forward`` of
each block whose program verified, and a :class:`~graphlora.lora.GlueLoraForward` on every other
linear site (:attr:`BlockPlanner.glue_forwards`); the raw-parameter sites left in the eager glue
(:attr:`BlockPlanner.glue_param_sites`, applied by the model's forward).

Guarantees: a block class is exported once, from the first call of its representative, with every
dimension that can vary dynamic (a one-sample example is replaced, for the captures only, by a
synthesised batch of two); every block is compared with its eager forward on its own inputs (the first
of each class with LoRA gradients too), and a block whose program does not export or differs runs
eagerly with module-level LoRA, with the reason in ``regions``; ``verify="strict"`` raises instead.
When the model has no repeated block (or its eager recording fails) and blocks were not required,
nothing changes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.utils._pytree as pytree

from graphlora.blocks import BlockClass, block_candidates, block_containing, group_blocks, shape_key
from graphlora.errors import ExportFailedError, GraphLoraError, TraceMismatchError
from graphlora.lora import GlueLoraForward, Site, eager_lora_hooks
from graphlora.pipeline import RECORD_STAGE
from graphlora.progress import rewrite_logger, step
from graphlora.quantized import is_quantized_forward
from graphlora.recorder import record_call
from graphlora.regions import capture_calls
from graphlora.runtime import BlockRunner, TraceCache, TraceRecord, bind_call, eval_mode, forced_kwargs, is_deterministic
from graphlora.site_attacher import PlannerPart, SiteAttacher
from graphlora.trace_modes import RegionInfo, RegionMode, TraceMode, captures_below
from graphlora.verify import Verification, compare


def _to_meta(call: dict[str, Any]) -> dict[str, Any]:
    return pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, call)


class BlockPlanner(PlannerPart):
    """Plans and installs block programs (see the module docstring)."""

    def __init__(self, owner: torch.nn.Module, attacher: SiteAttacher):
        super().__init__(owner)
        self.attacher = attacher
        self.glue_forwards: list[str] = []  # Linear sites running GlueLoraForward
        self.glue_param_sites: list[Site] = []  # raw parameter matmul sites in the eager glue

    def plan(self, call: dict[str, Any], verify: bool, strict: bool, required: bool, keep_sites: bool = False) -> bool:
        """Plan block programs (see the module docstring). Returns False, with nothing changed, when the
        model has no repeated block (or its eager analysis run fails) and blocks were not ``required``
        (``auto`` then traces the whole model)."""
        owner, mirror, runtime = self.owner, self.mirror, self.runtime
        call = {**call, **forced_kwargs(mirror)}
        candidates = block_candidates(mirror)
        if not candidates and not required:
            return False  # no repeated blocks (a small custom model): one whole-model program is the natural unit
        first_of_shape: dict[tuple, str] = {}
        for path in candidates:
            first_of_shape.setdefault(shape_key(mirror.get_submodule(path)), path)
        recording = None
        if not keep_sites:
            analysis_call = call
            if owner.on_meta:
                if runtime.prologue is not None:  # metadata from CPU values, then fake tensors on meta
                    analysis_call = runtime.prologue(mirror, analysis_call)
                analysis_call = _to_meta(analysis_call)
            try:
                with step(rewrite_logger, "record one eager forward" + (" on meta" if owner.on_meta else ""),
                          lambda: f"{len(recording.graph_module.graph.nodes)} ops"):
                    recording = record_call(mirror, analysis_call, capture=first_of_shape.values(),
                                            fake=owner.on_meta)
            except Exception as e:  # noqa: BLE001 - the model's own failure, reported by the next mode
                if required:
                    raise GraphLoraError(f"the eager analysis run of the model failed: {type(e).__name__}: "
                                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
                return False
            gm = recording.graph_module
            self.owner.pipeline.observe(RECORD_STAGE, gm)
            with step(rewrite_logger, "label and select", lambda: f"{len(owner.sites)} sites"):
                records = self.owner.pipeline.run(self.owner.pipeline.analysis(mirror, ""), gm)
                runtime.traces.append(TraceRecord(None, records, recording.seconds, 0.0, "", "",
                                                  "eager analysis recording of the whole model", kind="analysis"))
                runtime.analysis_graph = gm
                self.attacher.table_from_graph(gm)
                self.attacher.adopt(gm)
        sites_by_block: dict[str, list[Site]] = {}
        for site in owner.sites:
            block = block_containing(site.module, candidates)
            if block is not None:
                sites_by_block.setdefault(block, []).append(site)
        order = {p: i for i, p in enumerate(recording.call_order)} if recording is not None else {}
        captured = dict(recording.captured) if recording is not None else {}
        blocks = sorted(sites_by_block, key=lambda p: order.get(p, len(order) + candidates.index(p)))
        missing = [first_of_shape[shape_key(mirror.get_submodule(p))] for p in blocks]
        missing = [p for p in dict.fromkeys(missing) if p not in captured]
        wider = self._batch_of_two(call)
        if wider is not None:
            # A batch of one sample: export would make every size-1 batch dimension static. Trace from a synthesised
            # batch of two instead (the example's own inputs still verify the programs).
            missing = list(dict.fromkeys(first_of_shape[shape_key(mirror.get_submodule(p))] for p in blocks))
            captured, call_for_capture = {}, wider
        else:
            call_for_capture = call
        if missing:  # keep_sites (switching from another mode), or a meta capture with data-dependent shapes
            capture_call = _to_meta(runtime.prologue(mirror, call_for_capture) if runtime.prologue
                                    else call_for_capture) if owner.on_meta else call_for_capture
            captured.update(capture_calls(mirror, capture_call, only=missing))
        owner.trace_mode = TraceMode.BLOCKS
        classes = group_blocks(mirror, blocks, sites_by_block)
        glue = sum(1 for s in owner.sites if block_containing(s.module, blocks) is None)
        owner.regions = [RegionInfo("", RegionMode.EAGER, f"glue between blocks, eagerly with module-level LoRA ({glue} sites); "
                                                 f"{len(blocks)} blocks in {len(classes)} block programs")]
        owner.verification = []
        accepted: list[BlockClass] = []
        for block_class in classes:
            count = len(block_class.instances)
            with step(rewrite_logger, f"export {block_class.name} ({count} block{'s' if count != 1 else ''})"):
                if self._trace_block_class(block_class, captured.get(first_of_shape[shape_key(
                        mirror.get_submodule(block_class.representative))])):
                    accepted.append(block_class)
        graph_blocks = [p for c in accepted for p in c.instances]
        if verify and graph_blocks:
            with step(rewrite_logger, f"verify {len(graph_blocks)} blocks against eager"):
                checks = self._verify_blocks(call, graph_blocks)
            owner.verification.extend(checks.values())
            failed = [p for p, c in checks.items() if not c.passed]
            if strict and failed:
                raise TraceMismatchError("the traced program differs from eager in: " + "; ".join(
                    checks[p].describe() for p in failed))
            for path in failed:
                block_class = runtime.block_class_of.pop(path)
                block_class.instances.remove(path)
                owner.regions.append(RegionInfo(path, RegionMode.EAGER, "its block program differs from eager", checks[path]))
            graph_blocks = [p for p in graph_blocks if p not in failed]
        else:
            checks = {}
        for block_class in accepted:
            for path in block_class.instances:
                note = "verification skipped" if not verify else ""
                owner.regions.append(RegionInfo(path, RegionMode.GRAPH, f"block program {block_class.name} "
                                                               f"({len(block_class.instances)} blocks){' ' + note if note else ''}",
                                                checks.get(path)))
        if not verify:
            why = "on the meta device: no values to compare" if owner.on_meta else "verify=False"
            owner.verification = [Verification("", True, 0.0, 0.0, 0.0, note=f"verification skipped ({why})")]
        self._install_blocks(graph_blocks)
        return True

    def _batch_of_two(self, call: dict[str, Any]) -> dict[str, Any] | None:
        """For a call with one sample: a synthesised batch of two of the family (None if the call has more
        samples, or the family has no recipe to synthesise one)."""
        ids = call.get("input_ids", call.get("inputs_embeds"))
        if not isinstance(ids, torch.Tensor) or ids.ndim < 2 or ids.shape[0] != 1:
            return None
        try:
            from graphlora.families import synthesize_inputs

            wider = synthesize_inputs(self.mirror, batch_size=2, text_len=max(8, int(ids.shape[1]) // 2),
                                      with_labels="labels" in call)
        except Exception:  # noqa: BLE001 - no recipe (UnsupportedFamilyError) or a config it cannot read
            return None
        return {**wider, **forced_kwargs(self.mirror)}

    def _trace_block_class(self, block_class: BlockClass, captured) -> bool:
        """Register the class and trace its program from ``captured`` (the first call of a block of its
        shape); a class whose program does not export runs eagerly (reported in ``regions``)."""
        owner, runtime = self.owner, self.runtime
        runtime.block_caches[block_class.name] = TraceCache(max(runtime.cache_size, 16))
        for path in block_class.instances:
            runtime.block_class_of[path] = block_class
        reason = None
        module = self.mirror.get_submodule(block_class.representative)
        if captured is None:
            reason = "the block was never called by the example inputs"
        elif captures_below(module):
            reason = "inner modules record outputs through transformers' hooks, which a program would not call"
        else:
            try:
                call = bind_call(module, captured.args, captured.kwargs)
                with torch.no_grad():
                    runtime.block_program(block_class.representative, module, call)
            except (ExportFailedError, GraphLoraError, TypeError) as e:
                reason = f"export failed: {str(e).splitlines()[0]}"
        if reason is None:
            return True
        for path in block_class.instances:
            runtime.block_class_of.pop(path, None)
            owner.regions.append(RegionInfo(path, RegionMode.EAGER, reason))
        runtime.block_caches.pop(block_class.name, None)
        return False

    def _verify_blocks(self, call: dict[str, Any], paths: list[str]) -> dict[str, Verification]:
        """Compare every block's program with its eager forward on the block's own inputs (one eager run of
        the model; each block is checked when it is first called, so only one block's inputs are held). The
        first block of each class is checked with LoRA gradients, the others on outputs."""
        owner, runtime = self.owner, self.runtime
        results: dict[str, Verification] = {}
        graded: set[str] = set()  # block classes whose program was checked with gradients

        def check(path):
            def pre_hook(module, args, kwargs):
                if path in results:
                    return
                sites = runtime.sites_in(path)
                params = [p for s in sites for p in (owner.get_parameter(f"{s.module}.lora_A.weight"),
                                                     owner.get_parameter(f"{s.module}.lora_B.weight"))]
                bound = bind_call(module, args, kwargs)
                with torch.enable_grad():
                    program, _ = runtime.block_program(path, module, bound)
                    context = (contextlib.nullcontext() if is_deterministic(program) or not module.training
                               else eval_mode(module))

                    def traced():
                        found, flat = runtime.block_program(path, module, bound)
                        return found(module, flat)

                    def eager():
                        with eager_lora_hooks(owner, sites):
                            return type(module).forward(module, *args, **kwargs)

                    # The first block of a class checks outputs and LoRA gradients; the others run the same graph
                    # on their own weights and inputs, so outputs decide (no backward: half the cost).
                    name = runtime.block_class_of[path].name
                    with context:
                        results[path] = compare(path, traced, eager, params, gradients=name not in graded)
                    graded.add(name)
            return pre_hook

        handles = [self.mirror.get_submodule(p).register_forward_pre_hook(check(p), with_kwargs=True) for p in paths]
        try:
            with torch.no_grad():
                self.mirror(**call)
        finally:
            for h in handles:
                h.remove()
        return results

    def _install_blocks(self, graph_blocks: list[str]) -> None:
        """Runners on program blocks; module-level LoRA on every other site (the glue)."""
        owner, runtime = self.owner, self.runtime
        for path in graph_blocks:
            self.mirror.get_submodule(path).forward = BlockRunner(runtime, path)
        self.glue_param_sites = []
        for site in owner.sites:
            if block_containing(site.module, graph_blocks) is not None:
                continue
            if site.kind == "linear":
                module = owner.get_submodule(site.module)
                base = module.__dict__.get("forward")  # a quantized layer's forward (graphlora/quantized.py)
                module.forward = GlueLoraForward(module, site.scale, site.dropout, owner.switch, owner.fuse,
                                                 base=base if is_quantized_forward(base) else None)
                self.glue_forwards.append(site.module)
            else:
                self.glue_param_sites.append(site)

    def uninstall(self) -> None:
        """Undo :meth:`_install_blocks` and forget the block classes."""
        runtime = self.runtime
        for path in list(runtime.block_class_of):
            self.mirror.get_submodule(path).__dict__.pop("forward", None)
        for path in self.glue_forwards:
            module = self.owner.get_submodule(path)
            glue = module.__dict__.pop("forward", None)
            if getattr(glue, "base", None) is not None:
                module.forward = glue.base
        self.glue_forwards, self.glue_param_sites = [], []
        runtime.block_class_of.clear()
        runtime.block_caches.clear()


__all__ = ["BlockPlanner"]
