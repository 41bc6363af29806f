"""graphlora custom ops.

Importing this package registers ``torch.ops.graphlora.lora_linear`` and
``torch.ops.graphlora.lora_linear_group`` (and their backward ops), and
``torch.ops.graphlora.segment_attention`` (attention within the segments of a packed sequence), and
``torch.ops.graphlora.linear_4bit`` / ``linear_8bit`` (bitsandbytes base layers as opaque nodes; they import
bitsandbytes only when they run). Call them through
``torch.ops.graphlora.*`` or ``graphlora.ops.lora_linear.lora_linear`` (the submodule
``graphlora.ops.lora_linear`` keeps its module name; the function is not re-exported here so the
two do not shadow each other). The Triton kernels in ``graphlora.ops.triton_kernels`` are imported
lazily, on the first CUDA call (or when a test asks for them), so ``TRITON_INTERPRET`` can be set
before they are defined.
"""

from . import dropout_rng, lora_linear, quantized_linear, segment_attention
from .lora_linear import (
    lora_linear_group,
    main_gemm_backend,
    reference_lora_linear,
    reference_lora_linear_backward,
    reference_lora_linear_group,
    reference_lora_linear_group_backward,
    triton_on_cpu,
    triton_path_reason,
)

__all__ = [
    "dropout_rng",
    "lora_linear",
    "lora_linear_group",
    "main_gemm_backend",
    "quantized_linear",
    "reference_lora_linear",
    "reference_lora_linear_backward",
    "reference_lora_linear_group",
    "reference_lora_linear_group_backward",
    "segment_attention",
    "triton_on_cpu",
    "triton_path_reason",
]
