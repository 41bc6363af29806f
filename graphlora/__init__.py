"""graphlora: compiler-style LoRA for vision-language models.

``graphlora.rewrite(model, policy)`` traces a transformers VLM with torch.export, labels every linear
by component (vision / projector / cross-attention / language / head), role and layer, and inserts
LoRA branches exactly where the policy says.

The heavy entry points (``rewrite``, ``GraphLoraModel``, ``load_adapter``, ``explain``) import
transformers on first use, so ``import graphlora`` stays quick.
"""

from graphlora.errors import (
    ExportFailedError,
    GraphLoraError,
    NoSitesSelectedError,
    PassError,
    PolicyError,
    QuantizedBaseLayerError,
    TraceMismatchError,
    UnsupportedModelError,
)
from graphlora.labels import Component, Role
from graphlora.lora import Site, SkippedSite
from graphlora.policy import Policy, Rule, RuleMatch, load_policy

__version__ = "0.1.0"

_LAZY = {
    "rewrite": "graphlora.rewriter",
    "GraphLoraModel": "graphlora.model",
    "load_adapter": "graphlora.adapters.load",
    "explain": "graphlora.explainer",
    "quantization_config": "graphlora.component_quantization",
    "quantization_plan": "graphlora.component_quantization",
    "QuantizationPlan": "graphlora.component_quantization",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'graphlora' has no attribute {name!r}")


__all__ = [
    "Component",
    "ExportFailedError",
    "GraphLoraError",
    "GraphLoraModel",
    "NoSitesSelectedError",
    "PassError",
    "Policy",
    "PolicyError",
    "QuantizationPlan",
    "QuantizedBaseLayerError",
    "Role",
    "Rule",
    "RuleMatch",
    "Site",
    "SkippedSite",
    "TraceMismatchError",
    "UnsupportedModelError",
    "explain",
    "load_adapter",
    "load_policy",
    "quantization_config",
    "quantization_plan",
    "rewrite",
]
