"""Signs packed eight to a byte: the wire format of 1-bit compression.

A ``bool`` tensor costs a whole byte per element, so a 1-bit scheme that hands ``torch.distributed`` booleans
sends 8× what it claims. :func:`pack_signs` turns the last dimension of a tensor into bits, eight to a
``uint8`` (least significant bit first, the last byte padded with ``+1`` bits), and :func:`unpack_signs`
inverts it. A bit is 1 for a nonnegative entry, so ``sgn(0) = +1`` (DeepSpeed's convention: 1-bit compression
has no zero); a NaN packs as ``-1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_signs", "unpack_signs", "packed_size"]

# times eight little-endian 0/1 bytes read as one int64, this gathers byte k's bit into bit 56 + k (no two partial
# products meet there, so nothing carries into the top byte; overflow beyond bit 63 wraps and is discarded)
_GATHER = 0x0102040810204080


def packed_size(numel: int) -> int:
    """Bytes that ``numel`` packed signs take: ``ceil(numel / 8)``."""
    return -(-numel // 8)


def pack_signs(x: Tensor) -> Tensor:
    """The signs of ``x`` along its last dimension, eight to a ``uint8``: ``(..., d) -> (..., ceil(d/8))``.

    ``x`` is real (bit 1 where ``x >= 0``) or ``bool`` (bit 1 where True). Leading dimensions are kept.
    """
    bits = x if x.dtype == torch.bool else x >= 0
    d = bits.shape[-1]
    bytes_ = bits.view(torch.uint8)  # a bool is one byte, 0 or 1
    if d % 8:
        bytes_ = torch.nn.functional.pad(bytes_, (0, -d % 8), value=1)
    words = bytes_.contiguous().view(torch.int64)  # eight bits' bytes per word (little-endian)
    return words.mul(_GATHER).bitwise_right_shift_(56).to(torch.uint8)


def unpack_signs(packed: Tensor, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The inverse of :func:`pack_signs`: ``(..., ceil(numel/8)) -> (..., numel)`` signs ``±1`` in ``dtype``,
    or the bits themselves (True for ``+1``) for ``dtype=torch.bool``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed signs are uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_size(numel):
        raise ValueError(f"{numel} signs take {packed_size(numel)} bytes, got {packed.shape[-1]}")
    bytes_ = packed.new_empty((*packed.shape, 8))
    for k in range(8):
        torch.bitwise_and(packed.bitwise_right_shift(k), 1, out=bytes_[..., k])
    bits = bytes_.view(torch.bool).flatten(-2)[..., :numel]  # bytes of 0 or 1 are valid bools
    if dtype == torch.bool:
        return bits
    one = torch.ones((), dtype=dtype, device=packed.device)
    return torch.where(bits, one, -one)
