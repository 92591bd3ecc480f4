r"""Coordinate-wise clipping: clip the few largest coordinates of the gradient, over the whole model, to the
magnitude of the top-fraction coordinate; in front of any optimizer.

Paper: Pan & Li, "Toward Understanding Why Adam Converges Faster Than SGD for Transformers", arXiv
`2306.00204 <https://arxiv.org/abs/2306.00204>`_ (OPT 2022 workshop). Official code:
https://github.com/panyan7/adam-vs-sgd (``landscape_utils.py``: ``clip_top_coordinates``).

The paper traces SGD's slow progress on transformers to a few coordinates with large gradients, which make the
*directional sharpness* :math:`v^\top \nabla^2 f\, v` of the update direction high; clipping just those
coordinates lets a larger step make more progress. With all :math:`d` entries :math:`x_1, \dots, x_d` of all
the given tensors, a fraction :math:`c \in [0, 1]` and a scale :math:`s > 0`:

.. math::

    \tau &= \text{the } (\lfloor c\,d \rfloor + 1)\text{-th largest of } \lvert x_1\rvert, \dots, \lvert x_d\rvert
    \qquad (\tau = 0 \text{ when } \lfloor c\,d \rfloor \ge d,\ \text{e.g. } c = 1) \\
    x'_k &= \operatorname{clamp}(x_k, -s\tau, s\tau) =
    \begin{cases} x_k & \lvert x_k\rvert < s\tau \\ \operatorname{sign}(x_k)\, s\tau & \lvert x_k\rvert \ge s\tau \end{cases}

So with :math:`s = 1` at most :math:`\lfloor c\,d\rfloor` entries exceed the threshold and are clipped to it
(plus the entries at exactly :math:`\tau`, which are unchanged by the clip). Properties, for every input:
entries below :math:`s\tau` are untouched, all others equal :math:`\pm s\tau` with their own sign,
:math:`\max_k \lvert x'_k\rvert = \min(s\tau, \max_k \lvert x_k\rvert)`, :math:`\lVert x'\rVert \le \lVert x\rVert`,
and :math:`\#\{k : \lvert x_k\rvert \ge \tau\} \ge \lfloor c\,d\rfloor + 1`.

Details, as in the official code unless said otherwise:

* **Global.** :math:`\tau` is one number over *every* given tensor (the official code takes all parameters of
  the model); :class:`CoordClip` takes every param group of the wrapped optimizer.
* :math:`\lfloor c\,d\rfloor` is ``int(c * d)`` in double precision, the official index into the descending
  sort. :math:`\tau` is found with ``torch.kthvalue`` (a selection, not a full sort), and stays a tensor: no
  host synchronisation.
* **c = 0 is the identity**, whatever :math:`s` (the official code returns the input before scaling); the
  inputs themselves are returned. **c = 1** gives :math:`\tau = 0`, all zeros.
* **Ties.** The result depends on the value :math:`\tau` only, never on which entries are "the top
  :math:`\lfloor c d\rfloor`": every entry with :math:`\lvert x_k\rvert \ge s\tau` becomes
  :math:`\pm s\tau`, so equal magnitudes are always treated alike (many entries tied at the threshold are all
  :math:`\pm s\tau`, i.e. unchanged for :math:`s \le 1`). No tie-breaking by position happens anywhere.
* **Non-finite values.** A NaN entry stays NaN (``clamp`` propagates it; the official masked product does
  too). NaN sorts above every number, so a NaN among the top :math:`\lfloor c\,d\rfloor + 1` magnitudes makes
  :math:`\tau` NaN and every output NaN: a non-finite gradient reaches every parameter, as with a global norm
  clip. Use :class:`torch.amp.GradScaler` to skip such steps.
* The threshold is computed in the tensors' (promoted) dtype on the first tensor's device; it costs one scratch
  copy of the :math:`d` magnitudes, like the official sort.

Hyperparameters (defaults) of :class:`CoordClip`: ``fraction`` :math:`c` = 0.1, ``threshold_scale`` :math:`s`
= 1.0.

The fractions of the paper's experiments (``algorithm_list.py``) are :math:`c = 0.1` in front of SGD (and
normalized SGD; the default) and :math:`c = 0.5` in front of Adam and Adafactor, always with :math:`s = 1`;
:math:`c = 0` (the official optimizers' ``coordinate_clip`` default) turns the clip off. A global clip couples
all parameters: the update of one param group depends on the others' gradients.

Coming from AdamW: the paper's Adam variant clips only the first moment's input (its second moment sees the
raw gradient), which :class:`~optimlab.optim.coord_clipped.CoordClippedAdam` implements; wrapping AdamW in
:class:`CoordClip` clips the gradient both moments see. In front of SGD, use ``fraction=0.1`` and a learning
rate ~5x larger than without the clip (the paper's machine-translation runs: 1e-3 vs 5e-3).

Example::

    opt = optimlab.CoordClip(torch.optim.SGD(model.parameters(), lr=5e-3, momentum=0.9), fraction=0.1)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from optimlab._core.validation import POSITIVE, Constraint, Interval, check_hyperparameters
from optimlab._core.wrapper import Batch, OptimizerWrapper
from optimlab.registry import Capabilities, MethodInfo, register

__all__ = [
    "CoordClip",
    "FRACTION",
    "THRESHOLD_SCALE",
    "clip_top_coordinates",
    "clip_top_coordinates_grouped",
    "top_coordinates_threshold",
]

FRACTION = Interval(0.0, 1.0)  # the c of the operator
THRESHOLD_SCALE = POSITIVE  # the s of the operator


def _check_dense_real(tensors: Sequence[Tensor]) -> None:
    for t in tensors:
        if t.is_sparse:
            raise TypeError(
                "coordinate-wise clipping needs dense gradients, got a sparse one; use dense gradients "
                "(e.g. nn.Embedding(sparse=False))"
            )
        if t.is_complex():
            raise TypeError(
                "coordinate-wise clipping does not support complex tensors; optimize torch.view_as_real(p) "
                "as a real parameter instead"
            )


def top_coordinates_threshold(tensors: Sequence[Tensor], fraction: float) -> Tensor:
    """τ: the ``(int(fraction * d) + 1)``-th largest magnitude over all ``d`` entries of ``tensors``, a 0-dim
    tensor on the first tensor's device (0 when ``int(fraction * d) >= d``). ``tensors`` must hold an entry."""
    check_hyperparameters({"fraction": FRACTION}, {"fraction": fraction})
    device = tensors[0].device
    magnitudes = torch.cat([t.detach().reshape(-1).to(device) for t in tensors]).abs_()  # one scratch copy
    d = magnitudes.numel()
    rank = int(fraction * d)  # index into the descending order, as the official code
    if rank >= d:
        return magnitudes.new_zeros(())
    if magnitudes.dtype in (torch.float16, torch.bfloat16):
        magnitudes = magnitudes.float()  # exact: every 16-bit value is a float32 value
    if magnitudes.dtype == torch.float32:
        return _kth_largest_float32(magnitudes, rank).to(tensors[0].dtype)
    return torch.kthvalue(magnitudes, d - rank).values  # (rank+1)-th largest = (d-rank)-th smallest


def _kth_largest_float32(magnitudes: Tensor, rank: int) -> Tensor:
    """The ``(rank+1)``-th largest of non-negative float32 ``magnitudes``, exactly, as a 0-dim tensor.

    For non-negative floats the order of the bit patterns, read as integers, is the numeric order; so a radix
    select finds the value: count the entries per high 16 bits (one ``bincount``), locate the bucket that holds
    the target, then count that bucket's entries per low 16 bits. Two counting passes instead of a selection
    over all d values: ``torch.kthvalue`` over 42M entries took 4.5x as long on this project's CPU. Every step
    is a tensor operation, so there is no host sync.
    """
    bits = magnitudes.view(torch.int32)
    high = bits >> 16  # 0 .. 2^15 - 1: the sign bit is 0
    counts = torch.bincount(high, minlength=1 << 15)
    at_or_above = counts.flip(0).cumsum(0).flip(0)  # at_or_above[i] = #{entries whose high bits are >= i}
    bucket = (at_or_above > rank).sum() - 1  # the last bucket with more than `rank` entries at or above it
    above = at_or_above[bucket] - counts[bucket]  # entries in higher buckets
    low = torch.where(high == bucket, (bits & 0xFFFF) + 1, 0)  # 1 .. 2^16 inside the bucket, 0 outside
    low_counts = torch.bincount(low, minlength=(1 << 16) + 1)[1:]
    low_at_or_above = low_counts.flip(0).cumsum(0).flip(0) + above
    position = (low_at_or_above > rank).sum() - 1
    return ((bucket << 16) | position).to(torch.int32).view(torch.float32)


def clip_top_coordinates(tensors: Sequence[Tensor], fraction: float, threshold_scale: float = 1.0) -> list[Tensor]:
    """Every entry of ``tensors`` clamped to ``±threshold_scale·τ``, τ from :func:`top_coordinates_threshold`
    over all of them (see the module docstring). New tensors; for ``fraction == 0`` the inputs themselves."""
    check_hyperparameters(
        {"fraction": FRACTION, "threshold_scale": THRESHOLD_SCALE},
        {"fraction": fraction, "threshold_scale": threshold_scale},
    )
    _check_dense_real(tensors)
    if fraction == 0 or sum(t.numel() for t in tensors) == 0:
        return list(tensors)
    bound = top_coordinates_threshold(tensors, fraction) * threshold_scale
    clipped = []
    for t in tensors:
        b = bound.to(device=t.device, dtype=t.dtype)
        clipped.append(torch.clamp(t, -b, b))
    return clipped


def clip_top_coordinates_grouped(
    groups: Sequence[Sequence[Tensor]], fraction: float, threshold_scale: float = 1.0
) -> list[list[Tensor]]:
    """:func:`clip_top_coordinates` with one threshold over all tensors of all ``groups``, returned in the same
    nesting (a list per group)."""
    clipped = iter(clip_top_coordinates([t for group in groups for t in group], fraction, threshold_scale))
    return [[next(clipped) for _ in group] for group in groups]


class CoordClip(OptimizerWrapper):
    __doc__ = __doc__

    def __init__(self, optimizer: torch.optim.Optimizer, fraction: float = 0.1, threshold_scale: float = 1.0) -> None:
        super().__init__(optimizer, fraction=fraction, threshold_scale=threshold_scale)

    def _transform_all(self, batches: list[Batch]) -> list[list[Tensor]]:
        # one threshold over the gradients of every param group
        grads = [group_grads for _, _, group_grads in batches]
        return clip_top_coordinates_grouped(grads, self.options["fraction"], self.options["threshold_scale"])


PAPER = "Toward Understanding Why Adam Converges Faster Than SGD for Transformers"
CODE_URL = "https://github.com/panyan7/adam-vs-sgd"
GLOBAL_CLIP: dict[str, Constraint] = {"fraction": FRACTION, "threshold_scale": THRESHOLD_SCALE}
# what one threshold over all parameters means for the conformance battery's premises
GLOBAL_CLIP_EXEMPTIONS = {
    "param_groups": "one clip threshold over all param groups: grouped parameters are not separate optimizers",
    "missing_gradients": "the threshold is taken over the gradients present at each step, so a parameter that "
    "joins late changes the others' clipping",
    "convergence": "on a noiseless objective the threshold (a top-fraction magnitude) falls towards 0 once most "
    "coordinates have converged, and the rest crawl (tests/transforms and tests/optim check convergence on a noisy "
    "quadratic instead)",
}

register(
    MethodInfo(
        name="coordclip",
        cls=CoordClip,
        kind="wrapper",
        paper=PAPER,
        arxiv="2306.00204",
        code_url=CODE_URL,
        summary="clips the gradient's largest coordinates, over all param groups, to the top-fraction magnitude",
        hyperparameters=GLOBAL_CLIP,
        capabilities=Capabilities(global_state=True),
        exemptions=GLOBAL_CLIP_EXEMPTIONS,
        advice="The default fraction 0.1 is the paper's in front of SGD (with a ~5x larger lr); for Adam use "
        "CoordClippedAdam (fraction 0.5), which clips only the first moment's input.",
    )
)
