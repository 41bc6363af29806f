"""Counter-based dropout generator shared by the reference op and the Triton kernels.

The keep-mask of ``graphlora::lora_linear`` is a pure function of ``(seed, stream, index)``:

* ``seed``   -- a 64-bit integer (the op's 0-dim int64 ``seed`` tensor),
* ``stream`` -- a small non-negative integer; the single op uses stream 0, member ``m`` of
  ``graphlora::lora_linear_group`` uses stream ``m`` (so a one-member group draws the same mask as
  the single op),
* ``index``  -- the element's position in the flattened ``[N, in_features]`` view of ``x``
  (``row * in_features + col``, a 64-bit integer).

Nothing is stored: forward and backward regenerate the mask from the seed. This module is the
specification (pure torch integer ops, any device, no host synchronisation: the seed is never read
with ``.item()``). ``graphlora/ops/triton_kernels.py`` implements the same arithmetic with
``uint32`` Triton tensors (``_mix32``, ``_stream_keys``, ``_keep_mask``) and its tests check that
both agree bit for bit.

Algorithm (all arithmetic modulo 2**32 on unsigned 32-bit words)::

    mix32(h):  h ^= h >> 16; h *= 0x7FEB352D; h ^= h >> 15; h *= 0x846CA68B; h ^= h >> 16
               (C. Wellons' "lowbias32" integer hash: a bijection with strong avalanche)

    per (seed, stream):
        s_lo, s_hi = low and high 32-bit words of the seed (two's complement)
        k  = mix32(s_lo ^ 0x9E3779B9)
        k  = mix32(k ^ s_hi)
        k0 = mix32(k ^ mix32(stream ^ 0x632BE5AB))
        k1 = mix32(k0 ^ 0x5851F42D) | 1            # odd, so multiplying by it is a bijection

    per element index i:
        i_lo, i_hi = low and high 32-bit words of i
        base = k0 ^ mix32(i_hi ^ k1)                 # constant while i < 2**32
        bits = mix32((i_lo ^ base) * k1)             # uniform 32-bit word

    keep(i) = (bits >> 1) >= threshold(p),   threshold(p) = round(p * 2**31)

so an element is kept with probability ``1 - threshold(p) / 2**31`` (``p`` quantised to 2**-31) and
kept elements are scaled by ``1 / (1 - p)`` like ``torch.nn.functional.dropout``. Within one
``(seed, stream)`` the map ``i_lo -> bits`` is a bijection, so no two elements of a 2**32-element
block share a random word. The per-element cost is one multiply-xor plus one ``mix32`` (about a
dozen integer instructions), which matters because the kernels regenerate the mask three times
per training step.

Torch has no unsigned 32-bit arithmetic on all devices, so words are held in int64 tensors with
values in ``[0, 2**32)``; products are split into 16-bit halves so that nothing overflows int64.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x846CA68B
SEED_SALT = 0x9E3779B9
STREAM_SALT = 0x632BE5AB
KEY_SALT = 0x5851F42D
THRESHOLD_BITS = 31

__all__ = [
    "MASK32",
    "MIX_MUL1",
    "MIX_MUL2",
    "SEED_SALT",
    "STREAM_SALT",
    "KEY_SALT",
    "THRESHOLD_BITS",
    "threshold",
    "mix32",
    "mix32_int",
    "stream_keys",
    "random_bits",
    "keep_mask",
    "dropout_mask",
]


def threshold(p: float) -> int:
    """Integer threshold: an element is kept iff ``(bits >> 1) >= threshold(p)``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(int(round(p * (1 << THRESHOLD_BITS))), (1 << THRESHOLD_BITS) - 1)


def mix32_int(h: int) -> int:
    """``mix32`` on a Python int (used for compile-time constants and tests)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * MIX_MUL1) & MASK32
    h ^= h >> 15
    h = (h * MIX_MUL2) & MASK32
    h ^= h >> 16
    return h


def _mul32(h: torch.Tensor, c: int | torch.Tensor) -> torch.Tensor:
    """``(h * c) mod 2**32`` for int64 tensors holding 32-bit words, without int64 overflow."""
    c_lo = c & 0xFFFF
    c_hi = c >> 16
    return (h * c_lo + (((h * c_hi) & 0xFFFF) << 16)) & MASK32


def mix32(h: torch.Tensor) -> torch.Tensor:
    """``mix32`` on an int64 tensor of 32-bit words (values in ``[0, 2**32)``)."""
    h = h ^ (h >> 16)
    h = _mul32(h, MIX_MUL1)
    h = h ^ (h >> 15)
    h = _mul32(h, MIX_MUL2)
    return h ^ (h >> 16)


def stream_keys(seed: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 32-bit keys ``(k0, k1)`` of ``(seed, stream)`` as 0-dim int64 tensors on seed's device."""
    if stream < 0:
        raise ValueError(f"stream must be non-negative, got {stream}")
    s = seed.reshape(()).to(torch.int64)
    s_lo = s & MASK32
    s_hi = (s >> 32) & MASK32
    k = mix32(s_lo ^ SEED_SALT)
    k = mix32(k ^ s_hi)
    k0 = mix32(k ^ mix32_int(stream ^ STREAM_SALT))
    k1 = mix32(k0 ^ KEY_SALT) | 1
    return k0, k1


def random_bits(seed: torch.Tensor, stream: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform 32-bit words (int64 tensor, values in ``[0, 2**32)``) for int64 element indices."""
    k0, k1 = stream_keys(seed, stream)
    k0 = k0.to(index.device)
    k1 = k1.to(index.device)
    i_lo = index & MASK32
    i_hi = index >> 32
    base = k0 ^ mix32(i_hi ^ k1)
    return mix32(_mul32(i_lo ^ base, k1))


def keep_mask(
    seed: torch.Tensor, stream: int, rows: int, cols: int, p: float, device: torch.device | str
) -> torch.Tensor:
    """Boolean keep-mask of shape ``[rows, cols]`` (the flattened ``[N, in]`` view of ``x``)."""
    index = torch.arange(rows * cols, device=device, dtype=torch.int64).view(rows, cols)
    bits = random_bits(seed, stream, index)
    return (bits >> 1) >= threshold(p)


def dropout_mask(x: torch.Tensor, seed: torch.Tensor, p: float, stream: int = 0) -> torch.Tensor:
    """Keep-mask for ``x`` of shape ``[..., in]``, shaped like ``x`` (bool)."""
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    return keep_mask(seed, stream, rows, cols, p, x.device).view(x.shape)
