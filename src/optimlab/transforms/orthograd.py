r"""⊥Grad (OrthoGrad): the gradient component orthogonal to the weights, in front of any optimizer.

Paper: Prieto, Barsbey, Mediano, Birdal, "Grokking at the Edge of Numerical Stability", arXiv
`2501.04697 <https://arxiv.org/abs/2501.04697>`_ (ICLR 2025), §5.1 Definition 7. Official code:
https://github.com/LucasPrietoAl/grokking-at-the-edge-of-numerical-stability (``orthograd.py``).

Per parameter tensor :math:`w` (flattened) with gradient :math:`g`:

.. math::

    g_\perp = g - \frac{\langle w, g\rangle}{\langle w, w\rangle + 10^{-30}}\, w,
    \qquad
    g_\perp \leftarrow g_\perp\,\frac{\lVert g\rVert}{\lVert g_\perp\rVert + 10^{-30}}
    \quad\text{(only with ``rescale=True``)}

and the inner optimizer steps with :math:`g_\perp` in place of :math:`g`. ``rescale=True`` (default) is the
official code, which restores the gradient's norm; ``rescale=False`` is the paper's Definition 7 (projection
only). :math:`w = 0` leaves the gradient unchanged. Where :math:`g` is parallel to :math:`w` up to rounding
(:math:`\lVert g_\perp\rVert \le 4\epsilon_{mach}\sqrt{n}\,\lVert g\rVert`, always so for one-element tensors)
:math:`g_\perp = 0`: the official code would rescale the rounding noise to :math:`\lVert g\rVert`. The projection is computed in float32 for 16-bit
parameters. ``p.grad`` is restored after the step.

Hyperparameters (defaults): ``rescale`` True.

Coming from AdamW: wrap it, ``OrthoGrad(torch.optim.AdamW(...))``, with the inner optimizer's usual settings;
the paper uses it to grok without weight decay.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from optimlab._core.kernels import kernel
from optimlab._core.optimizer import state_dtype
from optimlab._core.validation import Flag
from optimlab._core.wrapper import OptimizerWrapper
from optimlab.registry import MethodInfo, register

__all__ = ["OrthoGrad", "orthogonal_part", "orthogonalize"]

_TINY = 1e-30


@kernel(read_only=("w", "g"))
def orthogonal_part(w: Tensor, g: Tensor, out: Tensor, scalars: Any, *, dtype: torch.dtype, rescale: bool) -> None:
    """Write into ``out`` ``g`` without its component along ``w``, rescaled to ``g``'s norm, computed in
    ``dtype``.

    ``scalars`` is ``(noise,)``: a remainder with norm at most ``noise`` times ``g``'s is rounding noise.
    """
    (noise,) = scalars
    w32, g32 = w.reshape(-1).to(dtype), g.reshape(-1).to(dtype)
    coef = torch.dot(w32, g32) / (torch.dot(w32, w32) + _TINY)
    g_perp = g32 - coef * w32
    g_norm, perp_norm = torch.linalg.vector_norm(g32), torch.linalg.vector_norm(g_perp)
    # g parallel to w up to rounding (always so for one-element tensors): what is left is noise, which
    # rescaling would blow up to the size of g in a random direction
    g_perp = torch.where(perp_norm <= noise * g_norm, 0.0, g_perp)
    if rescale:
        g_perp = g_perp * (g_norm / (perp_norm + _TINY))
    out.copy_(g_perp.view_as(out))


def orthogonalize(
    params: list[Tensor], grads: list[Tensor], *, rescale: bool = True, out: list[Tensor] | None = None
) -> list[Tensor]:
    """Gradients orthogonal to their parameters, written into ``out`` (new tensors by default); ``grads`` are
    not modified."""
    results = []
    for i, (w, g) in enumerate(zip(params, grads)):
        if g.is_sparse or g.is_complex():
            raise TypeError("OrthoGrad needs dense real gradients; sparse or complex gradients are not supported")
        dtype = state_dtype(w)
        noise = 4 * torch.finfo(dtype).eps * math.sqrt(max(g.numel(), 1))
        target = torch.empty_like(g) if out is None else out[i]
        orthogonal_part(w.detach(), g, target, scalars=(noise,), dtype=dtype, rescale=rescale)
        results.append(target)
    return results


class OrthoGrad(OptimizerWrapper):
    __doc__ = __doc__

    def __init__(self, optimizer: torch.optim.Optimizer, rescale: bool = True) -> None:
        super().__init__(optimizer, rescale=rescale)
        self._buffers = WeakTensorKeyDictionary()  # parameter -> the tensor its projected gradient is written into

    def _transform(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        return orthogonalize(params, grads, rescale=self.options["rescale"], out=list(map(self._buffer, params, grads)))

    def _buffer(self, p: Tensor, g: Tensor) -> Tensor:
        """A tensor like ``g`` to write ``p``'s projected gradient into, kept from step to step: a fresh one every
        step would be fresh memory every step, whose first touch costs as much as the projection itself. (Like
        the gradient buffers autograd accumulates into, it is overwritten by the next step.)"""
        buffer = self._buffers.get(p)
        if buffer is None or buffer.shape != g.shape or buffer.dtype != g.dtype or buffer.stride() != g.stride():
            buffer = self._buffers[p] = torch.empty_like(g)
        return buffer

    def __getstate__(self) -> dict[str, Any]:  # the buffers are scratch space: not pickled, made again on use
        return {k: v for k, v in super().__getstate__().items() if k != "_buffers"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._buffers = WeakTensorKeyDictionary()


register(
    MethodInfo(
        name="orthograd",
        cls=OrthoGrad,
        kind="wrapper",
        paper="Grokking at the Edge of Numerical Stability",
        arxiv="2501.04697",
        code_url="https://github.com/LucasPrietoAl/grokking-at-the-edge-of-numerical-stability",
        summary="projects each gradient orthogonal to its weights before any optimizer's step",
        hyperparameters={"rescale": Flag()},
        exemptions={
            "convergence": "⊥Grad moves orthogonally to the weights, so its fixed points are where the gradient is "
            "parallel to w, not the unconstrained minimiser (paper Prop. 2 only promises descent)"
        },
        advice="Keep the inner optimizer's AdamW settings; the paper pairs it with no weight decay.",
    )
)
