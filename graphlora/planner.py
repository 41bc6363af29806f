"""The planner, the entry point of set-up: what to trace, and the fall-back from one trace mode to the next.

Run once by :func:`graphlora.rewrite` (and again by ``trace_by_blocks()``). Per trace mode
(docs/tracing.md):

* ``blocks`` (the default): one eager **recording** of the whole model (graphlora/recorder.py) is the
  analysis graph: the analysis passes label it and decide the sites, whose LoRA matrices are then
  created. Blocks holding sites are grouped into block classes (graphlora/blocks.py); each class is
  exported once, from the first block's inputs, with every varying dimension dynamic. Every block is
  verified against eager through its class's program (one streaming eager run); blocks whose program
  does not export or differs run eagerly with module-level LoRA, as does the glue between blocks.
* ``whole``: the whole forward is one exported program (after the family's eager prologue); its graph
  is the analysis graph. When it does not export or differs from eager, ``auto`` falls back to
  regional tracing.
* ``regional``: labels from module names; the largest submodules that export and verify are programs.

The work is split by responsibility: graphlora/site_attacher.py creates the sites (LoRA matrices) from a
graph's plan; graphlora/block_planner.py plans, verifies and installs block programs;
graphlora/region_planner.py does the same for regions; this module chooses between them, traces the whole
model (``whole``) and verifies it, and switches a model to block programs later (``trace_by_blocks``).

Reads: the example call, ``verify`` and ``trace_mode``; the family's prologue (through the runtime).

Writes, on the model: ``sites``, ``skipped_sites``, ``site_table``, ``label_check``, ``regions``,
``verification``, ``trace_mode``; on the runtime: the block classes and the programs (each through the
module doing the work); here: the example call, kept for ``trace_by_blocks``.

Guarantees: an unknown ``trace_mode`` raises before anything changes; a mode that does not apply (no
repeated blocks under ``auto``, a whole forward that does not export or differs) leaves no site or program
behind before the next mode is planned; ``whole`` and ``regional`` never fall back, ``verify="strict"``
raises on a trace that differs from eager.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from graphlora.block_planner import BlockPlanner
from graphlora.errors import ExportFailedError, GraphLoraError, TraceMismatchError
from graphlora.lora import Site, eager_lora_hooks
from graphlora.progress import rewrite_logger, step
from graphlora.region_planner import RegionPlanner
from graphlora.runtime import eval_mode, forced_kwargs, is_deterministic
from graphlora.site_attacher import PlannerPart, SiteAttacher
from graphlora.trace import Program
from graphlora.trace_modes import AUTO, TRACE_MODE_CHOICES, RegionInfo, RegionMode, TraceMode
from graphlora.verify import Verification, compare


class Planner(PlannerPart):
    """Sets a rewritten model up (see the module docstring); ``owner`` is the GraphLoraModel."""

    def __init__(self, owner: torch.nn.Module):
        super().__init__(owner)
        self.example_call: dict[str, Any] | None = None
        self.attacher = SiteAttacher(owner)
        self.blocks = BlockPlanner(owner, self.attacher)
        self.regional = RegionPlanner(owner, self.attacher)
        self.glue_autocast = False  # whether autocast was on at the last call with glue parameter sites

    @property
    def glue_forwards(self) -> list[str]:
        """Linear sites running GlueLoraForward (blocks mode)."""
        return self.blocks.glue_forwards

    @property
    def glue_param_sites(self) -> list[Site]:
        """Raw parameter matmul sites in the eager glue (blocks mode), applied by the model's forward."""
        return self.blocks.glue_param_sites

    # ------------------------------------------------------------------ entry point
    def setup(self, call: dict[str, Any], verify: bool | str = True, trace_mode: str = "auto") -> None:
        """Trace, create the sites, verify against eager; fall back where needed."""
        if trace_mode not in TRACE_MODE_CHOICES:
            raise ValueError(f"trace_mode must be one of {', '.join(map(repr, TRACE_MODE_CHOICES))}, not {trace_mode!r}")
        self.example_call = dict(call)
        strict = verify == "strict"
        if trace_mode in (AUTO, TraceMode.BLOCKS):
            if self.blocks.plan(call, verify=bool(verify) and not self.owner.on_meta, strict=strict,
                                required=trace_mode == TraceMode.BLOCKS):
                return
            self.attacher.drop_sites()
        self.setup_whole_or_regional(call, verify, trace_mode)

    # ------------------------------------------------------------------ whole mode, falling back to regional
    def setup_whole_or_regional(self, call: dict[str, Any], verify: bool | str, trace_mode: str) -> None:
        """``whole`` (raise if it does not export or differs), ``regional``, or ``auto`` /
        ``whole_or_regional``: whole, falling back to regional tracing."""
        owner, runtime = self.owner, self.runtime
        on_meta = owner.on_meta
        reason = "trace_mode='regional'"
        if trace_mode != TraceMode.REGIONAL:
            runtime.on_analysed = self.attacher.adopt
            try:
                with torch.no_grad(), step(rewrite_logger, "export the whole model"):
                    program = runtime.whole_program_for(dict(call))
                runtime.on_analysed = None
                self.attacher.table_from_graph(program[0].graph_module)
                owner.trace_mode = TraceMode.WHOLE
                owner.regions = [RegionInfo("", RegionMode.GRAPH, "traced whole, after the family's eager prologue"
                                            if self._prologue_changes(call) else "traced whole")]
                if on_meta or not verify:
                    note = "on the meta device: no values to compare" if on_meta else "verify=False"
                    owner.verification = [Verification("", True, 0.0, 0.0, 0.0, note=f"verification skipped ({note})")]
                    return
                with step(rewrite_logger, "verify the whole model against eager"):
                    check = self._verify_whole(call, program[0])
                owner.verification = [check]
                owner.regions[0].verification = check
                if check.passed:
                    return
                reason = check.describe()
                if trace_mode == TraceMode.WHOLE:
                    raise TraceMismatchError(reason)
            except ExportFailedError as e:
                if trace_mode == TraceMode.WHOLE:
                    raise
                lines = str(e).splitlines()
                reason = "whole-model export failed: " + " ".join(line.strip() for line in lines[:3])
            finally:
                runtime.on_analysed = None
            self.attacher.drop_sites()
        with step(rewrite_logger, "regional tracing", lambda: f"{len(owner.regions)} regions"):
            self.regional.plan(call, verify=bool(verify) and not on_meta, strict=verify == "strict", reason=reason)

    def _prologue_changes(self, call: dict[str, Any]) -> bool:
        """Whether the family's prologue rewrites this call (some share a recipe and need none)."""
        prologue = self.runtime.prologue
        if prologue is None:
            return False
        out = prologue(self.mirror, dict(call))
        return set(out) != set(call) or any(out[k] is not call[k] for k in call)

    def _verify_whole(self, call: dict[str, Any], program: Program) -> Verification:
        owner = self.owner
        params = [p for n, p in owner.named_parameters() if ".lora_A." in n or ".lora_B." in n]
        context = contextlib.nullcontext() if (is_deterministic(program) or not owner.training) else eval_mode(owner)

        def traced():
            found, flat = self.runtime.whole_program_for(dict(call))
            return found(owner, flat)

        def eager():
            with eager_lora_hooks(owner, owner.sites):
                return self.mirror(**{**call, **forced_kwargs(self.mirror)})

        with context:
            return compare("", traced, eager, params)

    # ------------------------------------------------------------------ switching to blocks
    def trace_by_blocks(self, verify: bool | str = True) -> None:
        """Switch a whole-mode or regional model to block programs, keeping its sites and LoRA weights."""
        owner = self.owner
        if owner.trace_mode == TraceMode.BLOCKS:
            return
        call = self.example_call
        if call is None:
            raise GraphLoraError("this model keeps no example inputs to trace blocks with (rewrite it again)")
        if owner.trace_mode == TraceMode.REGIONAL:
            self.regional.unplan()
        self.runtime.clear()
        self.blocks.plan(call, verify=bool(verify) and not owner.on_meta, strict=verify == "strict", required=True,
                         keep_sites=True)


__all__ = ["Planner"]
