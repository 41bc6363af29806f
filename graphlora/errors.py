"""Exceptions raised by graphlora.

Every error a user can provoke is a ``GraphLoraError`` subclass with a message that names *what* is
wrong and *where* (the policy key, the module path, the pass, the source line of the model).
"""

from __future__ import annotations


class GraphLoraError(Exception):
    """Base class of every error graphlora raises on purpose."""


class PolicyError(GraphLoraError, ValueError):
    """A policy is malformed, or selects nothing on the model it is applied to.

    ``key_path`` (e.g. ``"rules[2].match.layers"``) names the policy key at fault when there is one,
    so that a caller holding the policy file can point at its line.
    """

    def __init__(self, message: str, key_path: str | None = None):
        super().__init__(message)
        self.key_path = key_path


class NoSitesSelectedError(PolicyError):
    """The policy's flags excluded every candidate linear."""


class LabelDisagreementError(PolicyError):
    """The graph's structure and the module names label a linear differently, and it changes the selection."""


class LabelDisagreementWarning(UserWarning):
    """The graph's structure and the module names label some linears differently (the selection is the same)."""


class DeadLoraSitesWarning(UserWarning):
    """LoRA sites got no gradient (or exactly zero) in their first training backward: they train nothing."""


class PeftConversionWarning(UserWarning):
    """The installed PEFT rewrites a saved adapter's config before loading it (its MoE conversion): it would load
    the adapter wrongly."""


class UnsupportedModelError(GraphLoraError, TypeError):
    """The model (or one of its layers) cannot be rewritten, e.g. a base layer in an unsupported quantization."""


class QuantizedBaseLayerError(UnsupportedModelError):
    """A base layer is quantized in a format graphlora does not train over (GPTQ, AWQ, torchao, ...; bitsandbytes
    4/8-bit is supported), or its quantization state cannot be used (docs/quantization.md)."""


class ExportFailedError(GraphLoraError, RuntimeError):
    """torch.export could not trace the model; the message names the failing op and source line.

    ``partial_graph`` holds the graph torch had traced up to the failure (for debugging).
    """

    partial_graph: str | None = None


class PassError(GraphLoraError, RuntimeError):
    """A graph pass failed; the message names the pass and the passes that ran before it."""


class TraceMismatchError(GraphLoraError, RuntimeError):
    """The traced program disagrees with the eager model on the same inputs."""
