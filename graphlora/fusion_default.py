"""What ``fuse="auto"`` does, in one place: the traced programs (pipeline) and the module-level LoRA of
eager glue (lora.py) both ask :func:`fusion_skip_reason`.

``fuse="auto"`` (the default) leaves every LoRA branch unfused, on every device, because that is what
was measured to be faster:

* CPU: the fused op runs its reference implementation through a custom autograd function, which costs
  more than the plain branch (tools/bench_stream.py).
* CUDA (NVIDIA H200, torch 2.11, Triton 3.6; 2026-12-04; docs/benchmarks.md): the Triton kernels are
  correct and, on the GPU, faster than the unfused branch at large layers (16384 tokens through a
  4096 x 4096 linear: 2.7 ms against 3.3 ms per forward + backward), but each fused site costs about
  1.4 ms of host time per forward + backward (Python Triton launches and autograd), against about
  0.6 ms for the unfused branch. A training step of a 109M-parameter LLaVA (86 sites, 354 tokens) took
  0.128 s fused against 0.081 s unfused (PEFT: 0.066-0.077 s).
* meta: a meta model previews an accelerator run, so it does what CUDA does.

``fuse=True`` fuses wherever the op accepts the inputs; ``fuse=False`` never fuses.
"""

from __future__ import annotations

import functools

#: Why a LoRA branch over a quantized base layer (graphlora::linear_4bit / linear_8bit) is never fused.
QUANTIZED_BASE_REASON = ("quantized base layer: the fused op has no quantized-weight kernel, so the branch is "
                         "added to the bitsandbytes matmul's output unfused")

#: Devices whose Triton kernels exist but are not chosen by ``fuse="auto"`` (see the module docstring).
KERNEL_DEVICES = frozenset({"cuda", "meta"})


@functools.cache  # asked on every call of an eager glue linear
def fusion_skip_reason(fuse: bool | str, device_type: str) -> str | None:
    """Why LoRA branches on ``device_type`` are not fused under the ``fuse`` setting (None: they are)."""
    if fuse is False:
        return "fuse=False"
    if fuse != "auto":
        return None
    if device_type in KERNEL_DEVICES:
        return ("fuse='auto' leaves the branch unfused on CUDA: the fused op's host cost per call (Python "
                "Triton launches and autograd) outweighs its GPU gain at most sizes (measured on an H200, "
                "docs/benchmarks.md); fuse=True fuses")
    return (f"fuse='auto' on {device_type}: the fused op has no {device_type} kernels (its reference "
            "implementation costs more than the unfused branch); fuse=True fuses anyway")
