"""Regional planning: the largest submodules that export and verify become programs, the glue stays eager.

Used when the model is traced with ``trace_mode="regional"``, or when its whole forward does not export or
differs from eager. There is no whole-model graph: labels come from module names (graphlora/regions.py,
graphlora/name_rules.py) and the sites are decided on them by the policy.

Reads: one eager capture of every module's first call; the policy; the model's modules and parameters.

Writes: the sites (through :class:`~graphlora.site_attacher.SiteAttacher`) and the model's
``site_table``; on the model ``trace_mode``, ``regions`` and ``verification``; region programs in the
runtime's caches; on the mirror a :class:`~graphlora.runtime.RegionRunner` as the ``forward`` of each
region that verified, and an :class:`~graphlora.lora.EagerLoraHook` on every linear site outside them
(:attr:`RegionPlanner.glue_hooks`).

Guarantees: a module is tried as a region only if it holds a site and no inner module records outputs
through transformers' hooks; one that fails to export or differs from eager is split into its children;
a raw parameter the policy would adapt in the eager glue is reported as skipped, never dropped silently.
With ``verify="strict"`` the smallest differing regions raise. :meth:`RegionPlanner.unplan` removes the
runners and hooks and forgets the region programs.
"""

from __future__ import annotations

from typing import Any

import torch

from graphlora.errors import ExportFailedError, GraphLoraError, TraceMismatchError
from graphlora.labels import SiteDecision, SkipCause
from graphlora.lora import EagerLoraHook, eager_lora_hooks
from graphlora.passes.plan_lora_sites_pass import SitePlan
from graphlora.passes.select_lora_sites_pass import decide_site, decide_sites
from graphlora.pipeline import head_paths
from graphlora.regions import call_as_kwargs, capture_calls, name_label_for_param, name_labels, unreachable_modules
from graphlora.runtime import RegionRunner, eval_mode, forced_kwargs
from graphlora.site_attacher import PlannerPart, SiteAttacher, skipped_site
from graphlora.trace import text_length
from graphlora.trace_modes import RegionInfo, RegionMode, TraceMode, captures_below
from graphlora.verify import compare


class RegionPlanner(PlannerPart):
    """Plans and installs region programs (see the module docstring)."""

    def __init__(self, owner: torch.nn.Module, attacher: SiteAttacher):
        super().__init__(owner)
        self.attacher = attacher
        self.glue_hooks: list[tuple[str, int]] = []  # (module path, hook id) of the glue's LoRA hooks

    def plan(self, call: dict[str, Any], verify: bool, strict: bool, reason: str) -> None:
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
            self.attacher.attach(SitePlan(labels, decision, weight.shape[1], weight.shape[0], labels.module))
        self.runtime.on_analysed = self.attacher.adopt
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
        owner.regions, owner.verification = [RegionInfo("", RegionMode.EAGER, reason)], []
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
                    failed = RegionInfo(path, RegionMode.SPLIT, "inner modules carry output-capturing hooks")
                else:
                    info = self._try_region(path, captured[path], verify)
                    if info.mode == RegionMode.GRAPH:
                        owner.regions.append(info)
                        return
                    failed = info
            children = [f"{path}.{name}" for name, child in module._modules.items()
                        if child is not None and contains_site(f"{path}.{name}") and not isinstance(child, torch.nn.Linear)]
            if failed is not None:
                if children:
                    failed.mode = RegionMode.SPLIT  # its children are tried one by one
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
        graph_regions = [r.path for r in owner.regions if r.mode == RegionMode.GRAPH and r.path]
        self._report_glue_parameter_matmuls(graph_regions)
        for site in owner.sites:
            if site.kind == "linear" and not any(site.module.startswith(p + ".") for p in graph_regions):
                module = owner.get_submodule(site.module)
                handle = module.register_forward_hook(EagerLoraHook(site.scale, site.dropout, owner.switch))
                self.glue_hooks.append((site.module, handle.id))
        for path in graph_regions:
            self.mirror.get_submodule(path).forward = RegionRunner(self.runtime, path)

    def unplan(self) -> None:
        """Undo :meth:`plan_regions`: remove runners and glue hooks, forget region programs."""
        for region in self.owner.regions:
            if region.path and region.mode == RegionMode.GRAPH:
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
                    owner.skipped_sites.append(skipped_site(labels, (
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
            return RegionInfo(path, RegionMode.EAGER, f"export failed: {str(e).splitlines()[0]}")
        if not verify:
            return RegionInfo(path, RegionMode.GRAPH, "traced (verification skipped)")
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
            return RegionInfo(path, RegionMode.EAGER, "trace differs from eager", check)
        return RegionInfo(path, RegionMode.GRAPH, "traced", check)


__all__ = ["RegionPlanner"]
