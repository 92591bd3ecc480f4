r"""Gradient compressors on flat vectors, each with the wire format it actually sends.

A compressor :math:`\mathcal C` maps a vector :math:`x\in\mathbb R^d` to a cheaper message. It is *contractive*
with parameter :math:`\delta\in(0,1]` if :math:`\mathbb E\lVert\mathcal C(x)-x\rVert^2\le(1-\delta)\lVert x\rVert^2`
(the class error feedback needs), and *unbiased* with variance :math:`\omega` if :math:`\mathbb E\,\mathcal C(x)=x`
and :math:`\mathbb E\lVert\mathcal C(x)-x\rVert^2\le\omega\lVert x\rVert^2`.

- :class:`TopK` (``"topk"``): the :math:`k=\max(1,\operatorname{round}(r d))` entries of largest magnitude;
  contractive with :math:`\delta=k/d`. Wire: the ``k`` values and their ``int32`` indices.
- :class:`RandK` (``"randk"``): ``k`` coordinates drawn uniformly without replacement, scaled by :math:`d/k`
  (``scaled=True``, unbiased, :math:`\omega=d/k-1`) or not (``scaled=False``, contractive in expectation with
  :math:`\delta=k/d`). Every worker draws the *same* coordinates from a generator seeded alike (the shared-seed
  convention), so the wire is the ``k`` values only and the workers' messages add up by one all-reduce.
- :class:`ScaledSign` (``"sign"``): :math:`\tfrac{\lVert x\rVert_1}{d}\operatorname{sign}(x)` with
  :math:`\operatorname{sign}(0)=+1`; contractive with
  :math:`\delta(x)=\lVert x\rVert_1^2/(d\lVert x\rVert_2^2)\ge 1/d`. Wire: the signs bit-packed eight to a
  ``uint8`` (a ``bool`` is a whole byte; :mod:`optimlab.distributed.bitpack`, shared with 1-bit Adam) and the
  one scale.
- :class:`Identity` (``"identity"``): :math:`x` itself, :math:`\delta=1`; the uncompressed baseline and the
  uncompressed first round of EF21 and EControl.

The EControl paper's experiments compress with Top-K (so do the EF21 and EF14 experiments); rand-k and the scaled
sign are the other standard contractive/unbiased examples of that literature.

Every compressor works on the last dimension of a ``(..., d)`` tensor, so the simulator compresses all its
workers' rows in one call and a DDP hook compresses its one bucket with the same code. :meth:`Compressor.encode`
returns ``(wire, ctx)``: ``wire`` is the tuple of tensors handed to ``torch.distributed`` (its bytes are what
is counted), ``ctx`` what the receiver knows without being sent (rand-k's indices, regenerated from the shared
seed). Randomness comes only from the ``torch.Generator`` passed in, so a run resumes exactly from the
generator's saved state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optimlab._core.validation import Interval
from optimlab.distributed.bitpack import pack_signs, packed_size, unpack_signs

__all__ = ["Compressor", "TopK", "RandK", "ScaledSign", "Identity", "COMPRESSORS", "make_compressor", "RATIO"]

RATIO = Interval(0.0, 1.0, low_closed=False)  # the fraction of coordinates kept

Wire = tuple[Tensor, ...]


class Compressor:
    """Base class: a compressor of the last dimension, with an explicit wire format.

    Attributes:
        summable: the workers' wire tensors add up coordinate by coordinate (the same support on every
            worker), so the messages are summed by one all-reduce instead of being all-gathered.
        value_slots: positions in ``wire`` of the tensors that scale linearly with the message (divided by the
            world size before the sum, as DDP's averaging does).
        needs_generator: draws random numbers (from the generator passed to :meth:`encode`).
    """

    name = "compressor"
    summable = False
    value_slots: tuple[int, ...] = (0,)
    needs_generator = False

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Wire, Any]:
        """The wire tensors for each row of ``x`` (leading dimensions kept) and the receiver's context."""
        raise NotImplementedError

    def decode(self, wire: Wire, ctx: Any, d: int) -> Tensor:
        """The dense ``(..., d)`` message of ``wire`` (the inverse of the wire format)."""
        raise NotImplementedError

    def decode_sum(self, wire: Wire, ctx: Any, d: int) -> Tensor:
        """The sum over the leading (worker) dimension of the decoded messages ``wire`` (stacked, ``(n, ...)``),
        a ``d``-vector; for summable compressors the wire tensors are summed first."""
        if self.summable:
            return self.decode(tuple(t.sum(0) for t in wire), ctx, d)
        return self.decode(wire, ctx, d).sum(0)

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """:math:`\\mathcal C(x)`, dense (encode, then decode)."""
        wire, ctx = self.encode(x, generator)
        return self.decode(wire, ctx, x.shape[-1])

    def wire_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes one worker sends for a ``d``-vector of ``dtype`` (equal to the size of :meth:`encode`'s wire)."""
        raise NotImplementedError

    def delta(self, d: int) -> float | None:
        """The contraction parameter δ on ``d``-vectors (None where the compressor is not contractive)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _Sparsifier(Compressor):
    def __init__(self, ratio: float) -> None:
        RATIO.check("ratio", ratio)
        self.ratio = float(ratio)

    def k(self, d: int) -> int:
        """Coordinates kept of a ``d``-vector."""
        return min(d, max(1, round(self.ratio * d)))

    def delta(self, d: int) -> float | None:
        return self.k(d) / d

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio:g})"


class TopK(_Sparsifier):
    """The ``k = max(1, round(ratio·d))`` entries of largest magnitude; δ = k/d. Wire: values, ``int32`` indices."""

    name = "topk"

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Wire, Any]:
        idx = x.abs().topk(self.k(x.shape[-1]), dim=-1, sorted=False).indices
        return (x.gather(-1, idx), idx.to(torch.int32)), None

    def decode(self, wire: Wire, ctx: Any, d: int) -> Tensor:
        values, idx = wire
        return values.new_zeros((*values.shape[:-1], d)).scatter_(-1, idx.long(), values)

    def decode_sum(self, wire: Wire, ctx: Any, d: int) -> Tensor:
        # one scatter-add of every worker's pairs instead of n dense vectors
        values, idx = wire
        return values.new_zeros(d).index_add_(0, idx.reshape(-1).long(), values.reshape(-1))

    def wire_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        return self.k(d) * (torch.empty((), dtype=dtype).element_size() + 4)


class RandK(_Sparsifier):
    """``k`` uniformly drawn coordinates, the same on every worker (shared seed), scaled by d/k if ``scaled``.

    ``scaled=True`` (default): unbiased, ω = d/k − 1 (not contractive: :meth:`delta` is None).
    ``scaled=False``: contractive in expectation, δ = k/d. Wire: the ``k`` values (the indices are regenerated
    by every worker from the generator, which must be seeded alike on all workers).
    """

    name = "randk"
    summable = True
    needs_generator = True

    def __init__(self, ratio: float, scaled: bool = True) -> None:
        super().__init__(ratio)
        self.scaled = bool(scaled)

    def delta(self, d: int) -> float | None:
        return None if self.scaled and self.k(d) < d else self.k(d) / d

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Wire, Any]:
        d = x.shape[-1]
        k = self.k(d)
        idx = torch.randperm(d, generator=generator, device=x.device)[:k]
        values = x.index_select(-1, idx)
        if self.scaled:
            values = values * (d / k)
        return (values,), idx

    def decode(self, wire: Wire, ctx: Any, d: int) -> Tensor:
        (values,) = wire
        return values.new_zeros((*values.shape[:-1], d)).index_copy_(-1, ctx, values)

    def wire_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        return self.k(d) * torch.empty((), dtype=dtype).element_size()

    def __repr__(self) -> str:
        return f"RandK(ratio={self.ratio:g}, scaled={self.scaled})"


class ScaledSign(Compressor):
    """``‖x‖₁/d · sign(x)`` with sign(0) = +1; δ = 1/d (worst case). Wire: bit-packed signs and one scale."""

    name = "sign"
    value_slots = (1,)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Wire, Any]:
        scale = x.abs().mean(-1, keepdim=True)
        return (pack_signs(x), scale), None

    def decode(self, wire: Wire, ctx: Any, d: int) -> Tensor:
        packed, scale = wire
        return torch.where(unpack_signs(packed, d, torch.bool), scale, -scale)

    def wire_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        return packed_size(d) + torch.empty((), dtype=dtype).element_size()

    def delta(self, d: int) -> float | None:
        return 1.0 / d


class Identity(Compressor):
    """No compression: the vector itself (δ = 1)."""

    name = "identity"
    summable = True

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Wire, Any]:
        return (x,), None

    def decode(self, wire: Wire, ctx: Any, d: int) -> Tensor:
        return wire[0]

    def wire_bytes(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        return d * torch.empty((), dtype=dtype).element_size()

    def delta(self, d: int) -> float | None:
        return 1.0


COMPRESSORS: dict[str, type[Compressor]] = {"topk": TopK, "randk": RandK, "sign": ScaledSign, "identity": Identity}


def make_compressor(compressor: str | Compressor, ratio: float) -> Compressor:
    """A compressor by name (``ratio`` for the sparsifiers ``"topk"`` and ``"randk"``), or ``compressor`` itself."""
    if isinstance(compressor, Compressor):
        return compressor
    if compressor not in COMPRESSORS:
        raise ValueError(
            f"Invalid compressor: {compressor!r}; expected one of {', '.join(map(repr, COMPRESSORS))} "
            "or a Compressor instance"
        )
    cls = COMPRESSORS[compressor]
    return cls(ratio) if issubclass(cls, _Sparsifier) else cls()
