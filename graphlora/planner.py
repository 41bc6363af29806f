"""The planner: what to trace, the labels and sites, verification against eager, and fall-back.

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

State it writes on the model: ``sites``, ``skipped_sites``, ``site_table``, ``label_check``,
``regions``, ``verification``, ``trace_mode``; on the runtime: the block classes and the programs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree

from graphlora.blocks import BlockClass, block_candidates, block_containing, group_blocks, shape_key
from graphlora.errors import ExportFailedError, GraphLoraError, LabelDisagreementWarning, TraceMismatchError
from graphlora.labels import SiteDecision, SkipCause, get_decision, graph_meta, labelled_nodes
from graphlora.lora import EXPERT_LAYOUTS, LORA_DTYPES, EagerLoraHook, GlueLoraForward, Site, SkippedSite, attach_lora, eager_lora_hooks
from graphlora.passes.insert_lora_branches_pass import BranchSpec
from graphlora.passes.plan_lora_sites_pass import SitePlan
from graphlora.passes.select_lora_sites_pass import decide_site, decide_sites
from graphlora.pipeline import RECORD_STAGE, head_paths
from graphlora.recorder import record_call
from graphlora.regions import (
    call_as_kwargs,
    capture_calls,
    name_label_for_param,
    name_labels,
    unreachable_modules,
)
from graphlora.runtime import (
    BlockRunner,
    RegionRunner,
    TraceCache,
    TraceRecord,
    bind_call,
    eval_mode,
    forced_kwargs,
    is_deterministic,
)
from graphlora.trace import Program, text_length
from graphlora.verify import Verification, compare


class TraceMode(str, enum.Enum):
    """How a rewritten model runs (``lora_model.trace_mode``)."""

    BLOCKS = "blocks"
    WHOLE = "whole"
    REGIONAL = "regional"

    def __str__(self) -> str:
        return self.value


#: ``rewrite(trace_mode=...)`` values: a mode; "auto" (block programs when the model has repeated blocks, else
#: "whole_or_regional"); "whole_or_regional" (one whole-model program, regional tracing when it does not export
#: or differs from eager). "whole" and "regional" never fall back.
TRACE_MODE_CHOICES = ("auto",) + tuple(m.value for m in TraceMode) + ("whole_or_regional",)


@dataclasses.dataclass
class RegionInfo:
    """How one part of the model runs: a traced ``graph`` or ``eager`` (with module-level LoRA).

    ``path`` is ``""`` for the whole model (whole-model tracing; in blocks and regional mode the glue),
    else a submodule's path (a block or a region). ``reason`` says why a part is eager or which block
    class program runs it; ``verification`` how its trace compared with eager.
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


def captures_below(module: torch.nn.Module) -> bool:
    """Whether a strict descendant records outputs through transformers' capturing hooks.

    Attention maps (only recorded for ``output_attentions=True``) do not count: they are not
    returned for modules inside traced programs (docs/tracing.md).
    """
    for name, sub in module.named_modules():
        if name and any(_captured_key(h) not in (None, "attentions") for h in sub._forward_hooks.values()):
            return True
    return False


def _skipped(labels, reason: str, cause: SkipCause) -> SkippedSite:
    return SkippedSite(labels.module, str(labels.component), str(labels.role), labels.layer, reason, cause)


def _warn_disagreements(label_check: dict) -> None:
    """One warning naming the linears on which structure and names disagree (the settle pass raised for those
    whose disagreement would change the selection, unless the policy says which labels to trust)."""
    found = label_check.get("disagreements") or []
    if not found:
        return
    trust = label_check.get("trust_labels")
    shown = "; ".join(f"{d['site']}: structure {'/'.join(d['structure'])}, names {'/'.join(d['names'])}"
                      for d in found[:5]) + (f"; ... and {len(found) - 5} more" if len(found) > 5 else "")
    settled = {"names": "trust_labels=names: the names decided",
               "structure": "trust_labels=structure: the structure decided"}.get(
        trust, "the structure decided; the policy selects the same either way")
    warnings.warn(f"graph structure and module names label {len(found)} linear(s) differently ({settled}): {shown}. "
                  "See `graphlora explain` (column 'names say') or lora_model.label_check.", LabelDisagreementWarning,
                  stacklevel=4)


def _to_meta(call: dict[str, Any]) -> dict[str, Any]:
    return pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, call)


class Planner:
    """Sets a rewritten model up (see the module docstring); ``owner`` is the GraphLoraModel."""

    def __init__(self, owner: torch.nn.Module):
        self.owner = owner
        self.example_call: dict[str, Any] | None = None
        self.glue_hooks: list[tuple[str, int]] = []  # (module path, hook id) of regional glue LoRA hooks
        self.glue_forwards: list[str] = []  # Linear sites running GlueLoraForward (blocks mode)
        self.glue_param_sites: list[Site] = []  # raw parameter matmul sites in the eager glue (blocks mode)
        self.glue_autocast = False  # whether autocast was on at the last call with glue parameter sites
        self._generator: torch.Generator | None = None

    @property
    def runtime(self):
        return self.owner.runtime

    @property
    def mirror(self) -> torch.nn.Module:
        return self.owner.mirror

    # ------------------------------------------------------------------ sites
    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.owner.policy.random_state)
        return self._generator

    def attach(self, entry: SitePlan) -> None:
        """Create the LoRA matrices of one planned site (or record why it is refused)."""
        owner, labels, decision = self.owner, entry.labels, entry.decision
        if not decision.targeted:
            if decision.skipped:
                owner.skipped_sites.append(_skipped(labels, decision.reason, decision.cause or SkipCause.REFUSED))
            return
        if entry.refusal is not None:
            owner.skipped_sites.append(_skipped(labels, entry.refusal, SkipCause.UNSUPPORTED_LAYOUT))
            return
        try:
            weight = owner.get_parameter(labels.weight)
            in_features, out_features, rank = entry.in_features, entry.out_features, decision.r
            if entry.layout in EXPERT_LAYOUTS:
                if decision.dropout:
                    owner.skipped_sites.append(_skipped(labels, (
                        f"LoRA dropout ({decision.dropout}) cannot apply to an expert parameter's LoRA (it is added to "
                        "the weight, not to an activation; PEFT refuses it too): set dropout: 0 for it (a rule with "
                        "role mlp.gate_up / mlp.down and dropout: 0) or lora_dropout: 0"), SkipCause.EXPERT_DROPOUT))
                    return
                experts, d1, d2 = weight.shape
                out_features, in_features = (d1, d2) if entry.layout == "experts" else (d2, d1)
                rank = decision.r * experts  # PEFT's ParamWrapper: r rows of A (columns of B) per expert
                holder_path, _, attr = entry.owner.rpartition(".")
                parent_path, _, holder_name = holder_path.rpartition(".")
                parent = owner.get_submodule(parent_path) if parent_path else owner
                if holder_name not in parent._modules:
                    parent.add_module(holder_name, torch.nn.ModuleDict())
                parent._modules[holder_name][attr] = torch.nn.Module()
            attach_lora(owner.get_submodule(entry.owner), in_features, out_features, rank,
                        LORA_DTYPES[owner.policy.lora_dtype], self.generator, weight.device)
        except ValueError as e:
            owner.skipped_sites.append(_skipped(labels, str(e), SkipCause.REFUSED))
            return
        scale = owner.policy.scale(decision.r, decision.alpha)
        site = Site(labels.module, str(labels.component), str(labels.role), labels.layer, decision.r, decision.alpha,
                    decision.dropout, scale, decision.reason, module=entry.owner, kind=labels.kind,
                    weight_layout=entry.layout)
        owner.sites.append(site)
        owner.site_table.branches[labels.module] = BranchSpec(scale, site.dropout, f"{entry.owner}.lora_A.weight",
                                                              f"{entry.owner}.lora_B.weight", entry.layout)

    def adopt(self, program_or_gm, base: str = "") -> None:
        """Create sites for the planned sites of a graph that have none yet (while rewriting only)."""
        gm = program_or_gm.graph_module if isinstance(program_or_gm, Program) else program_or_gm
        if not base:
            self.owner.label_check = dict(graph_meta(gm).label_check)
            _warn_disagreements(self.owner.label_check)
        known = {s.name for s in self.owner.sites} | {s.name for s in self.owner.skipped_sites}
        for entry in graph_meta(gm).site_plan:
            if entry.labels.module not in known:
                self.attach(entry)
        if not base and not self.owner.sites:
            reasons = "; ".join(f"{s.name}: {s.reason}" for s in self.owner.skipped_sites[:5])
            raise GraphLoraError(f"no selected site can be adapted: {reasons}")

    def drop_sites(self) -> None:
        """Forget every site and LoRA parameter (before re-planning)."""
        owner = self.owner
        for site in owner.sites:
            module = owner.get_submodule(site.module)
            for part in ("lora_A", "lora_B"):
                if part in module._modules:
                    del module._modules[part]
        owner.sites.clear()
        owner.skipped_sites.clear()
        owner.dead_site_monitor.reset()
        owner.site_table.branches.clear()
        self._generator = None
        self.runtime.clear()
        self.runtime.block_sites.clear()

    def _table_from_graph(self, gm: torch.fx.GraphModule) -> None:
        table = self.owner.site_table
        table.labels, table.decisions = {}, {}
        for node, labels in labelled_nodes(gm.graph):
            table.labels.setdefault(labels.module, labels)
            decision = get_decision(node)
            if decision is not None and (decision.targeted or labels.module not in table.decisions):
                table.decisions[labels.module] = decision
        table.towers = dict(graph_meta(gm).towers)

    # ------------------------------------------------------------------ entry point
    def setup(self, call: dict[str, Any], verify: bool | str = True, trace_mode: str = "auto") -> None:
        """Trace, create the sites, verify against eager; fall back where needed."""
        if trace_mode not in TRACE_MODE_CHOICES:
            raise ValueError(f"trace_mode must be one of {', '.join(map(repr, TRACE_MODE_CHOICES))}, not {trace_mode!r}")
        self.example_call = dict(call)
        strict = verify == "strict"
        if trace_mode in ("auto", "blocks"):
            if self.setup_blocks(call, verify=bool(verify) and not self.owner.on_meta, strict=strict,
                                 required=trace_mode == "blocks"):
                return
            self.drop_sites()
        self.setup_whole_or_regional(call, verify, trace_mode)

    # ------------------------------------------------------------------ blocks mode
    def setup_blocks(self, call: dict[str, Any], verify: bool, strict: bool, required: bool,
                     keep_sites: bool = False) -> bool:
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
                recording = record_call(mirror, analysis_call, capture=first_of_shape.values(), fake=owner.on_meta)
            except Exception as e:  # noqa: BLE001 - the model's own failure, reported by the next mode
                if required:
                    raise GraphLoraError(f"the eager analysis run of the model failed: {type(e).__name__}: "
                                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
                return False
            gm = recording.graph_module
            self.owner.pipeline.observe(RECORD_STAGE, gm)
            records = self.owner.pipeline.run(self.owner.pipeline.analysis(mirror, ""), gm)
            runtime.traces.append(TraceRecord(None, records, recording.seconds, 0.0, "", "",
                                              "eager analysis recording of the whole model", kind="analysis"))
            runtime.analysis_graph = gm
            self._table_from_graph(gm)
            self.adopt(gm)
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
        owner.regions = [RegionInfo("", "eager", f"glue between blocks, eagerly with module-level LoRA ({glue} sites); "
                                                 f"{len(blocks)} blocks in {len(classes)} block programs")]
        owner.verification = []
        accepted: list[BlockClass] = []
        for block_class in classes:
            if self._trace_block_class(block_class, captured.get(first_of_shape[shape_key(
                    mirror.get_submodule(block_class.representative))])):
                accepted.append(block_class)
        graph_blocks = [p for c in accepted for p in c.instances]
        if verify and graph_blocks:
            checks = self._verify_blocks(call, graph_blocks)
            owner.verification.extend(checks.values())
            failed = [p for p, c in checks.items() if not c.passed]
            if strict and failed:
                raise TraceMismatchError("the traced program differs from eager in: " + "; ".join(
                    checks[p].describe() for p in failed))
            for path in failed:
                block_class = runtime.block_class_of.pop(path)
                block_class.instances.remove(path)
                owner.regions.append(RegionInfo(path, "eager", "its block program differs from eager", checks[path]))
            graph_blocks = [p for p in graph_blocks if p not in failed]
        else:
            checks = {}
        for block_class in accepted:
            for path in block_class.instances:
                note = "verification skipped" if not verify else ""
                owner.regions.append(RegionInfo(path, "graph", f"block program {block_class.name} "
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
            owner.regions.append(RegionInfo(path, "eager", reason))
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
                module.forward = GlueLoraForward(module, site.scale, site.dropout, owner.switch, owner.fuse)
                self.glue_forwards.append(site.module)
            else:
                self.glue_param_sites.append(site)

    def uninstall_blocks(self) -> None:
        """Undo :meth:`_install_blocks` and forget the block classes."""
        runtime = self.runtime
        for path in list(runtime.block_class_of):
            self.mirror.get_submodule(path).__dict__.pop("forward", None)
        for path in self.glue_forwards:
            self.owner.get_submodule(path).__dict__.pop("forward", None)
        self.glue_forwards, self.glue_param_sites = [], []
        runtime.block_class_of.clear()
        runtime.block_caches.clear()

    # ------------------------------------------------------------------ whole and regional modes
    def setup_whole_or_regional(self, call: dict[str, Any], verify: bool | str, trace_mode: str) -> None:
        """``whole`` (raise if it does not export or differs), ``regional``, or ``auto`` /
        ``whole_or_regional``: whole, falling back to regional tracing."""
        owner, runtime = self.owner, self.runtime
        on_meta = owner.on_meta
        reason = "trace_mode='regional'"
        if trace_mode != "regional":
            runtime.on_analysed = self.adopt
            try:
                with torch.no_grad():
                    program = runtime.whole_program_for(dict(call))
                runtime.on_analysed = None
                self._table_from_graph(program[0].graph_module)
                owner.trace_mode = TraceMode.WHOLE
                owner.regions = [RegionInfo("", "graph", "traced whole, after the family's eager prologue"
                                            if self._prologue_changes(call) else "traced whole")]
                if on_meta or not verify:
                    note = "on the meta device: no values to compare" if on_meta else "verify=False"
                    owner.verification = [Verification("", True, 0.0, 0.0, 0.0, note=f"verification skipped ({note})")]
                    return
                check = self._verify_whole(call, program[0])
                owner.verification = [check]
                owner.regions[0].verification = check
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
            finally:
                runtime.on_analysed = None
            self.drop_sites()
        self.setup_regional(call, verify=bool(verify) and not on_meta, strict=verify == "strict", reason=reason)

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

    def setup_regional(self, call: dict[str, Any], verify: bool, strict: bool, reason: str) -> None:
        """Plan regional tracing: label by names, decide sites, trace and verify the largest regions."""
        owner, mirror = self.owner, self.mirror
        call = {**call, **forced_kwargs(mirror)}
        self.runtime.text_len = text_length(call)
        captured = capture_calls(mirror, call)
        table = owner.site_table
        table.labels, table.towers = name_labels(mirror, captured, head_paths(mirror))
        items = list(table.labels.values())
        decisions = decide_sites(owner.policy, items, table.towers)
        targeted_paths = [labels.module for labels, d in zip(items, decisions) if d.targeted]
        dead = unreachable_modules(mirror, call, targeted_paths) if not owner.on_meta else set()
        names = "`loss`" if "labels" in call else "`logits`"
        decisions = [SiteDecision(False, f"its output never reaches {names}, so it can receive no gradient "
                                         f"(chosen by: {d.reason})", d.r, d.alpha, d.dropout, skipped=True,
                                     cause=SkipCause.UNREACHABLE)
                     if labels.module in dead else d for labels, d in zip(items, decisions)]
        table.decisions = {labels.module: d for labels, d in zip(items, decisions)}
        for labels, decision in zip(items, decisions):
            weight = owner.get_parameter(labels.weight)
            self.attach(SitePlan(labels, decision, weight.shape[1], weight.shape[0], labels.module))
        self.runtime.on_analysed = self.adopt
        try:
            self.plan_regions(call, list(mirror._modules), captured, verify, strict, reason, TraceMode.REGIONAL)
        finally:
            self.runtime.on_analysed = None

    def plan_regions(self, call: dict[str, Any], roots: list[str], captured, verify: bool, strict: bool,
                     reason: str, mode: TraceMode) -> None:
        """Trace and verify regions, starting at ``roots`` and splitting what fails; install runners and
        glue hooks."""
        owner = self.owner
        owner.trace_mode = mode
        owner.regions, owner.verification = [RegionInfo("", "eager", reason)], []
        targeted = {s.module for s in owner.sites}

        def contains_site(path: str) -> bool:
            return any(m == path or m.startswith(path + ".") for m in targeted)

        def visit(path: str) -> None:
            module = self.mirror.get_submodule(path)
            if not contains_site(path) or isinstance(module, torch.nn.Linear):
                return
            failed = None
            if path in captured:
                if captures_below(module):
                    # transformers records hidden states with hooks on inner modules; inside a traced
                    # region they would not fire, so only the modules carrying them can be regions.
                    failed = RegionInfo(path, "split", "inner modules carry output-capturing hooks")
                else:
                    info = self._try_region(path, captured[path], verify)
                    if info.mode == "graph":
                        owner.regions.append(info)
                        return
                    failed = info
            children = [f"{path}.{name}" for name, child in module._modules.items()
                        if child is not None and contains_site(f"{path}.{name}") and not isinstance(child, torch.nn.Linear)]
            if failed is not None:
                if children:
                    failed.mode = "split"  # its children are tried one by one
                owner.regions.append(failed)
            for child in children:
                visit(child)

        for root in roots:
            visit(root)
        if strict:
            # Localised: the smallest parts whose trace differs from eager (none of their parts does).
            failed = [r for r in owner.regions if r.path and r.verification is not None and not r.verification.passed]
            bad = [r for r in failed if not any(o.path.startswith(r.path + ".") for o in failed)]
            if bad:
                raise TraceMismatchError("the traced program differs from eager in: " + "; ".join(
                    r.verification.describe() for r in bad))
            if reason.startswith("the whole model"):  # it differed, and no adapted part explains why
                raise TraceMismatchError(reason)
        # Sites outside graph regions run as module-level LoRA (forward hooks) on the eager glue.
        graph_regions = [r.path for r in owner.regions if r.mode == "graph" and r.path]
        self._report_glue_parameter_matmuls(graph_regions)
        for site in owner.sites:
            if site.kind == "linear" and not any(site.module.startswith(p + ".") for p in graph_regions):
                module = owner.get_submodule(site.module)
                handle = module.register_forward_hook(EagerLoraHook(site.scale, site.dropout, owner.switch))
                self.glue_hooks.append((site.module, handle.id))
        for path in graph_regions:
            self.mirror.get_submodule(path).forward = RegionRunner(self.runtime, path)

    def unplan_regions(self) -> None:
        """Undo :meth:`plan_regions`: remove runners and glue hooks, forget region programs."""
        for region in self.owner.regions:
            if region.path and region.mode == "graph":
                self.mirror.get_submodule(region.path).__dict__.pop("forward", None)
        for path, hook_id in self.glue_hooks:
            self.owner.get_submodule(path)._forward_hooks.pop(hook_id, None)
        self.glue_hooks = []
        self.runtime.region_caches.clear()

    def _report_glue_parameter_matmuls(self, graph_regions: list[str]) -> None:
        """Raw parameter matmuls are visible only in graphs: one the policy would adapt in the eager glue
        cannot be, and is reported (never silently dropped)."""
        owner = self.owner
        known = {s.name for s in owner.sites} | {s.name for s in owner.skipped_sites}
        heads = head_paths(self.mirror)
        for owner_path, module in self.mirror.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or any(
                    owner_path == p or owner_path.startswith(p + ".") for p in graph_regions):
                continue
            for name, param in module.named_parameters(recurse=False):
                fqn = f"{owner_path}.{name}" if owner_path else name
                if param.ndim not in (2, 3) or not param.is_floating_point() or fqn in known:
                    continue
                kind = "param_matmul" if param.ndim == 2 else "expert_matmul"
                labels = name_label_for_param(self.mirror, fqn, kind, heads)
                if decide_site(owner.policy, labels, owner.site_table.towers)[0].targeted:
                    what = "a raw parameter (used by a matmul?)" if param.ndim == 2 else "a 3-D (expert?) parameter"
                    owner.skipped_sites.append(_skipped(labels, (
                        f"{what} in the eager glue of regional tracing: without a graph graphlora cannot see how it is "
                        "used, so it is not adapted (trace_mode='blocks' or 'whole' adapts expert parameters)"),
                        SkipCause.EAGER_GLUE))

    def _try_region(self, path: str, captured, verify: bool) -> RegionInfo:
        owner, runtime = self.owner, self.runtime
        module = self.mirror.get_submodule(path)
        try:
            call = call_as_kwargs(module, captured.args, captured.kwargs)
            with torch.no_grad():
                runtime.region_program(path, module, call)
        except (ExportFailedError, GraphLoraError, TypeError) as e:
            return RegionInfo(path, "eager", f"export failed: {str(e).splitlines()[0]}")
        if not verify:
            return RegionInfo(path, "graph", "traced (verification skipped)")
        region_sites = [s for s in owner.sites if s.module.startswith(path + ".")]
        params = [p for s in region_sites for p in (owner.get_parameter(f"{s.module}.lora_A.weight"),
                                                    owner.get_parameter(f"{s.module}.lora_B.weight"))]

        def traced():
            program, flat = runtime.region_program(path, module, call)
            return program(module, flat)

        def eager():
            with eager_lora_hooks(owner, region_sites):
                return type(module).forward(module, **call)

        with eval_mode(module):
            check = compare(path, traced, eager, params)
        owner.verification.append(check)
        if not check.passed:
            runtime.region_caches.pop(path, None)
            return RegionInfo(path, "eager", "trace differs from eager", check)
        return RegionInfo(path, "graph", "traced", check)

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
            self.unplan_regions()
        self.runtime.clear()
        self.setup_blocks(call, verify=bool(verify) and not owner.on_meta, strict=verify == "strict", required=True,
                          keep_sites=True)


__all__ = ["Planner", "RegionInfo", "TRACE_MODE_CHOICES", "TraceMode", "captures_below"]
