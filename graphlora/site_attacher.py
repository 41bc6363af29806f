"""Site attachment: the LoRA matrices of planned sites, created on the mirror, and the records of them.

Reads: the site plan a graph carries (``graph_meta(gm).site_plan``, written by the plan_lora_sites pass:
shape, owner and layout of each site's matrices, or why it is refused), the node labels and decisions
(through graphlora/labels.py) and the policy (rank, alpha, dropout, LoRA dtype, random state).

Writes, on the GraphLoraModel: ``sites`` and ``skipped_sites`` (each planned site is one or the other,
with its reason and :class:`~graphlora.labels.SkipCause`), ``site_table`` (labels, decisions, towers,
and the LoRA branch of every site), ``label_check``; ``<site>.lora_A`` / ``<site>.lora_B`` on the
mirror's site modules (a ``ModuleDict`` holder for expert parameters).

Guarantees: a site is created once, whichever graph (the analysis recording, the whole program, a
region program) plans it first; LoRA matrices are drawn from one generator seeded with the policy's
``random_state``, in plan order, so the same model and policy give the same initial adapters;
:meth:`SiteAttacher.drop_sites` undoes every site and clears the programs built on them. Adopting a
whole-model graph warns once about the linears whose structure and name labels disagree, and raises when
its plan adapts no site, naming why the first ones were refused.
"""

from __future__ import annotations

import warnings

import torch

from graphlora.errors import GraphLoraError, LabelDisagreementWarning
from graphlora.labels import SkipCause, get_decision, graph_meta, labelled_nodes
from graphlora.lora import EXPERT_LAYOUTS, LORA_DTYPES, Site, SkippedSite, attach_lora
from graphlora.passes.insert_lora_branches_pass import BranchSpec
from graphlora.passes.plan_lora_sites_pass import SitePlan
from graphlora.trace import Program


def skipped_site(labels, reason: str, cause: SkipCause) -> SkippedSite:
    """The record of a linear (or parameter) the policy selected that gets no LoRA, and why."""
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


class PlannerPart:
    """Base of the planner and its parts: the GraphLoraModel they set up (``owner``), its runtime and mirror."""

    def __init__(self, owner: torch.nn.Module):
        self.owner = owner

    @property
    def runtime(self):
        return self.owner.runtime

    @property
    def mirror(self) -> torch.nn.Module:
        return self.owner.mirror


class SiteAttacher(PlannerPart):
    """Creates and forgets the sites of a rewritten model (see the module docstring)."""

    def __init__(self, owner: torch.nn.Module):
        super().__init__(owner)
        self._generator: torch.Generator | None = None

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
                owner.skipped_sites.append(skipped_site(labels, decision.reason, decision.cause or SkipCause.REFUSED))
            return
        if entry.refusal is not None:
            owner.skipped_sites.append(skipped_site(labels, entry.refusal, SkipCause.UNSUPPORTED_LAYOUT))
            return
        try:
            weight = owner.get_parameter(labels.weight)
            in_features, out_features, rank = entry.in_features, entry.out_features, decision.r
            if entry.layout in EXPERT_LAYOUTS:
                if decision.dropout:
                    owner.skipped_sites.append(skipped_site(labels, (
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
            owner.skipped_sites.append(skipped_site(labels, str(e), SkipCause.REFUSED))
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

    def table_from_graph(self, gm: torch.fx.GraphModule) -> None:
        """The model's site table (labels, decisions, towers) from a labelled graph."""
        table = self.owner.site_table
        table.labels, table.decisions = {}, {}
        for node, labels in labelled_nodes(gm.graph):
            table.labels.setdefault(labels.module, labels)
            decision = get_decision(node)
            if decision is not None and (decision.targeted or labels.module not in table.decisions):
                table.decisions[labels.module] = decision
        table.towers = dict(graph_meta(gm).towers)


__all__ = ["PlannerPart", "SiteAttacher", "skipped_site"]
