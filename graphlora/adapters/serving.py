"""Serving-ready adapters: ``save_adapter(directory, for_serving="vllm")``.

vLLM reads PEFT's files with fewer features than PEFT (``vllm/lora/peft_helper.py``, ``lora_model.py``): one
global ``r`` and ``lora_alpha`` (no ``rank_pattern`` / ``alpha_pattern``), ``modules_to_save`` None, no DoRA,
tensors ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` whose module name ends in one of the
model's LoRA-capable module names (else "expected target modules in ... but received ..."). LoRA on the
vision tower and the projector is served only with ``--enable-tower-connector-lora``.

What this writes, exactly equal to the adapter it comes from:

* ``r`` = the largest site rank and ``lora_alpha`` = ``r`` (scale 1, no rsLoRA);
* per site ``A' = [A; 0]`` (``[r, in]``) and ``B' = [s B, 0]`` (``[out, r]``), with ``s`` the site's own scale:
  ``1 * B' A' = s B A``, so mixed ranks, alphas and rsLoRA fold in without changing the output;
* ``target_modules``: the sites' exact module paths.

Refused, with the site and the reason: ``modules_to_save`` copies (vLLM loads none), and sites that are not
``nn.Linear`` modules (raw parameter and expert matmuls: PEFT's ``target_parameters``, which vLLM does not
read). :class:`ServingReport` says which sites need ``--enable-tower-connector-lora``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from graphlora.adapters.atomic_io import commit, write_safetensors_temp, write_text_temp
from graphlora.adapters.format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, AdapterError, AdapterExistsError
from graphlora.adapters.peft_compat import modules_to_save_paths
from graphlora.labels import Component

if TYPE_CHECKING:  # pragma: no cover
    from graphlora.model import GraphLoraModel

#: The report written beside the adapter (not read by vLLM).
REPORT_NAME = "graphlora_serving.json"
#: Components vLLM serves LoRA on only with ``--enable-tower-connector-lora``.
TOWER_CONNECTOR = frozenset({str(Component.VISION), str(Component.PROJECTOR)})


class ServingTarget(enum.StrEnum):
    """Servers :func:`save_for_serving` writes adapters for."""

    VLLM = "vllm"


class ServingAdapterError(AdapterError):
    """The adapter cannot be served as it is; the message names the sites and why."""


@dataclasses.dataclass(frozen=True)
class ServingReport:
    """What :func:`save_for_serving` wrote and what the server needs to serve it."""

    directory: Path
    target: ServingTarget
    r: int
    lora_alpha: int
    sites: tuple[str, ...]
    #: Sites on the vision tower or the projector: vLLM serves them only with ``--enable-tower-connector-lora``.
    tower_connector_sites: tuple[str, ...]
    #: Sites whose rank was padded to ``r`` (their extra rows and columns are zero).
    padded_sites: tuple[str, ...]

    @property
    def server_flags(self) -> list[str]:
        """The vLLM flags this adapter needs beyond ``--enable-lora``."""
        flags = [f"--max-lora-rank {self.r}"]
        if self.tower_connector_sites:
            flags.append("--enable-tower-connector-lora")
        return flags

    def describe(self) -> str:
        lines = [f"{len(self.sites)} sites, r = lora_alpha = {self.r}; serve with --enable-lora "
                 + " ".join(self.server_flags)]
        if self.tower_connector_sites:
            lines.append(f"{len(self.tower_connector_sites)} sites on the vision tower or projector need "
                         f"--enable-tower-connector-lora (e.g. {self.tower_connector_sites[0]})")
        if self.padded_sites:
            lines.append(f"{len(self.padded_sites)} sites padded with zeros to rank {self.r}")
        return "\n".join(lines)


def _refusals(lora_model: "GraphLoraModel") -> list[str]:
    problems = []
    for path in modules_to_save_paths(lora_model.base_model, lora_model.policy.modules_to_save):
        problems.append(f"{path}: a modules_to_save copy (vLLM loads adapters with modules_to_save None); "
                        "merge it into the base model or drop it from modules_to_save")
    for site in lora_model.sites:
        if site.kind != "linear":
            problems.append(f"{site.name}: a LoRA on a raw parameter ({site.kind}; PEFT's target_parameters), "
                            "which vLLM's adapter loader does not read")
    return problems


def serving_tensors(lora_model: "GraphLoraModel", r: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``{base_model.model.<site>.lora_A.weight: A', ...lora_B.weight: B'}`` at global rank ``r`` and scale 1
    (module docstring), and the sites that were padded."""
    tensors, padded = {}, []
    with torch.no_grad():
        for site in lora_model.sites:
            module = lora_model.get_submodule(site.module)
            a, b = module.lora_A.weight.detach(), module.lora_B.weight.detach()
            rank = a.shape[0]
            a_out = a.new_zeros((r, a.shape[1]))
            a_out[:rank] = a
            b_out = b.new_zeros((b.shape[0], r))
            b_out[:, :rank] = (b.float() * site.scale).to(b.dtype)
            if rank != r:
                padded.append(site.name)
            key = f"base_model.model.{site.name}"
            tensors[f"{key}.lora_A.weight"] = a_out.contiguous().cpu()
            tensors[f"{key}.lora_B.weight"] = b_out.contiguous().cpu()
    return tensors, padded


def save_for_serving(lora_model: "GraphLoraModel", directory: str | os.PathLike, target: str = "vllm",
                     overwrite: bool = False) -> ServingReport:
    """Write an adapter ``target`` serves, equal to this one (module docstring); return the report."""
    try:
        target = ServingTarget(target)
    except ValueError:
        raise ValueError(f"for_serving={target!r}: graphlora writes serving adapters for "
                         f"{', '.join(t.value for t in ServingTarget)}") from None
    problems = _refusals(lora_model)
    if problems:
        raise ServingAdapterError(f"{target.value} cannot serve this adapter as it is:\n  " + "\n  ".join(problems))
    if not lora_model.sites:
        raise ServingAdapterError("the model has no LoRA sites to serve")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = [n for n in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, REPORT_NAME) if (directory / n).exists()]
    if existing and not overwrite:
        raise AdapterExistsError(f"{directory} already holds {', '.join(existing)}; pass overwrite=True to replace it")
    r = max(int(s.r) for s in lora_model.sites)
    tensors, padded = serving_tensors(lora_model, r)
    sites = tuple(sorted(s.name for s in lora_model.sites))
    original = lora_model.base_model
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(getattr(original, "config", None), "_name_or_path", None) or None,
        "r": r, "lora_alpha": r, "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(sites), "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    }
    report = ServingReport(directory, target, r, r, sites,
                           tuple(sorted(s.name for s in lora_model.sites if str(s.component) in TOWER_CONNECTOR)),
                           tuple(sorted(padded)))
    report_json = {"target": target.value, "r": r, "lora_alpha": r, "server_flags": report.server_flags,
                   "tower_connector_sites": list(report.tower_connector_sites), "padded_sites": list(report.padded_sites)}
    staged: dict[str, Path] = {}
    try:
        staged[ADAPTER_WEIGHTS_NAME] = write_safetensors_temp(directory, ADAPTER_WEIGHTS_NAME, tensors, {"format": "pt"})
        staged[REPORT_NAME] = write_text_temp(directory, REPORT_NAME, json.dumps(report_json, indent=2) + "\n")
        staged[ADAPTER_CONFIG_NAME] = write_text_temp(directory, ADAPTER_CONFIG_NAME,
                                                      json.dumps(config, indent=2, sort_keys=True) + "\n")
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    commit(directory, staged)
    return report
