"""graphlora: compiler-style LoRA for vision-language models.

``graphlora.rewrite(model, policy)`` traces a transformers VLM with torch.export, labels every linear
by component (vision / projector / cross-attention / language / head), role and layer, and inserts
LoRA branches exactly where the policy says.
"""

from graphlora.errors import (
    ExportFailedError,
    GraphLoraError,
    NoSitesSelectedError,
    PassError,
    PolicyError,
    QuantizedBaseLayerError,
    UnsupportedModelError,
)
from graphlora.labels import Component, Role
from graphlora.lora import Site, SkippedSite
from graphlora.model import GraphLoraModel
from graphlora.policy import Policy, Rule, RuleMatch, load_policy
from graphlora.rewrite import rewrite
from graphlora.adapters import load_adapter
from graphlora.explain import explain

__version__ = "0.1.0"

__all__ = [
    "Component",
    "ExportFailedError",
    "GraphLoraError",
    "GraphLoraModel",
    "NoSitesSelectedError",
    "PassError",
    "Policy",
    "PolicyError",
    "QuantizedBaseLayerError",
    "Role",
    "Rule",
    "RuleMatch",
    "Site",
    "SkippedSite",
    "UnsupportedModelError",
    "explain",
    "load_adapter",
    "load_policy",
    "rewrite",
]
