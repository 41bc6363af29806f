"""The pass pipeline: every ordered list of passes graphlora runs, in one place.

Each trace goes through one labelling list and, when it carries LoRA, the transform list:

* **analysis** (the whole model's graph: the eager recording of the block-programs mode, or a whole
  export): strip export's dtype asserts, label by structure, cross-check names, select sites, mark
  sites that cannot reach the loss, plan the sites (shapes and owners of the LoRA matrices);
* **labelling** (a submodule's program: a block class or a region): strip asserts, copy labels from
  the whole-model site table, apply the decisions made once for the whole model, plan the sites (in
  regional mode a region's graph may show parameter matmuls that need sites);
* **transform**: insert the LoRA branches, fuse them into ``graphlora::lora_linear``;
* **lowering** (a program that runs eagerly, not compiled): ops that exist only so that export can trace
  (``graphlora::segment_attention``) become the eager code they stand for.

The observer (graph dumps) sees the graph at stage ``record`` (an eager recording) or ``export`` (a
trace) and after every pass; :data:`STAGES` lists the stage names in order.
"""

from __future__ import annotations

from typing import Callable

import torch

from graphlora.fusion_default import fusion_skip_reason
from graphlora.labels import NodeLabels, SiteDecision
from graphlora.pass_manager import PassManager, PassRecord
from graphlora.passes.apply_site_decisions_pass import ApplySiteDecisionsPass
from graphlora.passes.cross_check_labels_pass import CrossCheckLabelsPass
from graphlora.passes.fuse_lora_linear_pass import FuseLoraLinearPass
from graphlora.passes.insert_lora_branches_pass import BranchSpec, InsertLoraBranchesPass
from graphlora.passes.label_by_structure_pass import LabelByStructurePass
from graphlora.passes.label_from_site_table_pass import LabelFromSiteTablePass
from graphlora.passes.lower_segment_attention_pass import LowerSegmentAttentionPass
from graphlora.passes.mark_unreachable_sites_pass import MarkUnreachableSitesPass
from graphlora.passes.plan_lora_sites_pass import PlanLoraSitesPass
from graphlora.passes.select_lora_sites_pass import SelectLoraSitesPass
from graphlora.passes.settle_label_disagreements_pass import SettleLabelDisagreementsPass
from graphlora.passes.strip_tensor_metadata_asserts_pass import StripTensorMetadataAssertsPass
from graphlora.policy import Policy

Observer = Callable[[str, torch.fx.GraphModule], None]

#: The first stage of a recorded (eager) analysis graph, and of every exported program.
RECORD_STAGE = "record"
EXPORT_STAGE = "export"

ANALYSIS = (StripTensorMetadataAssertsPass, LabelByStructurePass, CrossCheckLabelsPass, SelectLoraSitesPass,
            SettleLabelDisagreementsPass, MarkUnreachableSitesPass, PlanLoraSitesPass)
LABELLING = (StripTensorMetadataAssertsPass, LabelFromSiteTablePass, ApplySiteDecisionsPass, PlanLoraSitesPass)
TRANSFORM = (InsertLoraBranchesPass, FuseLoraLinearPass)
LOWERING = (LowerSegmentAttentionPass,)
#: Every stage name a dump can show, in pipeline order.
STAGES: tuple[str, ...] = (RECORD_STAGE, EXPORT_STAGE) + tuple(
    dict.fromkeys(p.name for p in ANALYSIS + LABELLING + TRANSFORM + LOWERING))


def head_paths(model: torch.nn.Module) -> frozenset[str]:
    """Module paths of the model's output embedding (the head), tied copies included."""
    heads = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        for name, module in model.named_modules(remove_duplicate=False):
            if module is head:
                heads.add(name)
    return frozenset(heads)


class Pipeline:
    """The pass lists of one rewritten model (its policy, fusion setting and observer)."""

    def __init__(self, policy: Policy, fuse: bool | str = "auto", observer: Observer | None = None):
        self.policy = policy
        self.fuse = fuse
        #: Called as ``observer(stage, graph_module)`` at the first stage of each graph and after every pass.
        self.observer = observer

    def __getstate__(self):  # the observer (a dump's recorder ...) is not part of the model
        return {**self.__dict__, "observer": None}

    def observe(self, stage: str, gm: torch.fx.GraphModule) -> None:
        if self.observer is not None:
            self.observer(stage, gm)

    def run(self, passes: list, gm: torch.fx.GraphModule) -> list[PassRecord]:
        return PassManager(passes, after_each=self.observer)(gm)

    # -- the lists -----------------------------------------------------------------------------
    def analysis(self, root: torch.nn.Module, stack_prefix: str) -> list:
        """Labels, decisions and the site plan of a whole-model graph (``stack_prefix``: ``WRAPPER_PREFIX`` for an
        export through graphlora's wrapper, "" for an eager recording)."""
        classes = {path: type(m) for path, m in root.named_modules()}
        return [
            StripTensorMetadataAssertsPass(),
            LabelByStructurePass(module_classes=classes, stack_prefix=stack_prefix),
            CrossCheckLabelsPass(head_paths=head_paths(root), stack_prefix=stack_prefix),
            SelectLoraSitesPass(self.policy),
            SettleLabelDisagreementsPass(self.policy),
            MarkUnreachableSitesPass(),
            PlanLoraSitesPass(root),
        ]

    def labelling(self, root: torch.nn.Module, path: str, table: dict[str, NodeLabels],
                  decisions: dict[str, SiteDecision], towers: dict[str, int]) -> list:
        """Labels and decisions of a submodule's program, from the whole-model tables."""
        return [
            StripTensorMetadataAssertsPass(),
            LabelFromSiteTablePass(table, path, towers, root, head_paths(root)),
            ApplySiteDecisionsPass(decisions, self.policy),
            PlanLoraSitesPass(root),  # regional mode: parameter matmuls only a region's graph shows
        ]

    def transform(self, program, branches: dict[str, BranchSpec], live: torch.nn.Module, training: bool,
                  refused: frozenset[str], autocast: bool, device_type: str = "cpu") -> list:
        passes = [InsertLoraBranchesPass(program, branches, live, training, refused)]
        if self.fuse:
            passes.append(FuseLoraLinearPass(autocast=autocast, skip_reason=fusion_skip_reason(self.fuse, device_type)))
        return passes

    def lowering(self, gm: torch.fx.GraphModule, compiled: bool) -> list:
        """Passes for a program that runs eagerly (none for one that ``torch.compile`` compiles), those that
        apply to ``gm``."""
        if compiled:
            return []
        return [p() for p in LOWERING if p.applies_to(gm)]


__all__ = ["ANALYSIS", "EXPORT_STAGE", "LABELLING", "LOWERING", "Observer", "Pipeline", "RECORD_STAGE",
           "STAGES", "TRANSFORM", "fusion_skip_reason", "head_paths"]
