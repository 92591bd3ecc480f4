r"""The refined schedule: a learning-rate schedule computed from the gradient norms logged in a previous run.

Paper: Defazio, Cutkosky, Mehta, Mishchenko, "When, Why and How Much? Adaptive Learning Rate Scheduling by
Refinement" (later "Optimal Linear Decay Learning Rate Schedules and Further Refinements"), arXiv
`2310.07831 <https://arxiv.org/abs/2310.07831>`_. Official code:
https://github.com/facebookresearch/adaptive_scheduling (``find_schedule.py`` for the closed form,
``visual.py`` for the smoothing pipeline; read at commit 37a8a9b). optimlab follows that script step by step.

Given the gradient norms :math:`\hat G_1, \dots, \hat G_n` of a run (the raw, unclipped full-model gradient at
every step; the ℓ2 norm for SGD, the ℓ1 norm for Adam-type methods, as in the paper's runs):

1. **Clean**: drop non-finite values, then ``trim`` = 2 values at each end (the script's guard against
   broken first/last samples of its wandb exports).
2. **Resample** linearly to the fixed grid of ``grid`` = 10,000 points if the cleaned log is shorter; a longer
   log is filtered at its own length.
3. **Median-filter** with odd width :math:`w = 2\lfloor\lfloor\tau\cdot\mathrm{grid}\rfloor/2\rfloor + 1`
   (:math:`\tau = 0.1` gives :math:`w = 1001`): append :math:`2w` values to the end by reflection (about the
   last value, not repeating it), filter with the ``'nearest'`` boundary (the first value repeated on the
   left), and drop the appended part. The reflection keeps the end of the sequence from being dragged toward
   a constant.
4. **Resample** the smoothed norms linearly to the grid (10,000 points).
5. **Weights** :math:`w_t = \bar G_t^{-2}` for ℓ2 norms (``norm="l2"``, SGD) or :math:`w_t = \bar G_t^{-1}` for
   ℓ1 norms (``norm="l1"``, Adam-type), and the **closed form**

   .. math::

       \eta_t \propto w_t \sum_{p > t} w_p \qquad (\eta \text{ of the last grid point} = 0),

   **normalised** to a maximum of 1.
6. **Resample** to the ``steps`` of the run to schedule (default: the length of the log) and normalise again
   so the peak is exactly 1 (a peak between two sampled points would otherwise be cut a little).

Constant norms give exactly linear decay, :math:`\eta_t = (T-1-t)/(T-1)`
(:func:`optimlab.schedules.linear_decay`). Small norms early on give a warm-up by themselves; norms that rise
late give earlier annealing.

Where optimlab differs from the script, and why:

- the script drops only infinite values (``np.isinf``); NaNs would pass through its median filter into the
  schedule. optimlab drops every non-finite value;
- the script stops at its 10,000-point grid; optimlab resamples that to the requested number of steps (step 6)
  and renormalises the peak to 1;
- the closed form divides by the last weight before normalising; that is a constant and the normalisation
  removes it, so optimlab normalises directly.

The median filter's width is computed from the grid, not from the log's length, exactly as in the script: so
for logs longer than the grid it covers a fraction :math:`w/n < \tau` of the run.

Hyperparameters (defaults): ``norm`` (required: ``"l1"`` or ``"l2"``), ``steps`` (length of the log),
``tau`` 0.1 (in (0, 1]), ``grid`` 10,000, ``trim`` 2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from optimlab._core.validation import Choice, Interval
from optimlab.schedules.linear import _MultiplierLR

__all__ = [
    "GRID",
    "TRIM",
    "Refinement",
    "RefinedLR",
    "clean_norms",
    "closed_form_schedule",
    "load_schedule",
    "median_filter",
    "refine",
    "refine_details",
    "resample_linear",
    "save_schedule",
    "smooth_norms",
]

GRID = 10_000  # the official script's fixed number of points
TRIM = 2  # values the official script drops at each end of a log
_FORMAT = "optimlab.schedule"
_VERSION = 1
_MEDIAN_CHUNK = 1 << 22  # elements of the window matrix materialised at once by median_filter


def _as_1d_float64(values: Sequence[float] | Tensor, name: str) -> Tensor:
    try:
        tensor = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"Invalid {name}: expected a 1-D sequence of numbers ({err})") from None
    if tensor.dim() != 1:
        raise ValueError(f"Invalid {name}: expected a 1-D sequence of numbers, got shape {tuple(tensor.shape)}")
    return tensor.detach().cpu()


def resample_linear(values: Tensor, length: int) -> Tensor:
    """Linear interpolation of ``values`` (taken at equally spaced points of [0, 1]) at ``length`` equally spaced
    points of [0, 1], end points included: ``numpy.interp(linspace(0, 1, length), linspace(0, 1, n), values)``."""
    Interval(1, integer=True).check("length", length)
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"Invalid values: expected a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    n = values.numel()
    if n == length:
        return values.clone()
    if n == 1:
        return values.expand(length).clone()
    position = torch.linspace(0, n - 1, length, dtype=torch.float64, device=values.device)
    left = position.floor().long().clamp_(max=n - 2)
    fraction = (position - left).to(values.dtype)
    low, high = values[left], values[left + 1]
    out = low + (high - low) * fraction
    out[0] = values[0]  # the end points exactly, whatever the rounding of linspace
    if length > 1:
        out[-1] = values[-1]
    return out


def median_filter(values: Tensor, width: int) -> Tensor:
    """Running median of odd ``width`` over a 1-D tensor, with the ``'nearest'`` boundary (the end values
    repeated), like ``scipy.ndimage.median_filter(values, size=width, mode="nearest")``."""
    if not (isinstance(width, int) and not isinstance(width, bool) and width >= 1 and width % 2 == 1):
        raise ValueError(f"Invalid width: {width!r}; expected an odd integer >= 1")
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"Invalid values: expected a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    half = width // 2
    padded = torch.cat([values[:1].expand(half), values, values[-1:].expand(half)])
    windows = padded.unfold(0, width, 1)
    rows = max(1, _MEDIAN_CHUNK // width)  # bounds memory for long logs: one window matrix chunk at a time
    return torch.cat([chunk.median(dim=1).values for chunk in windows.split(rows)])


def _reflect_end(values: Tensor, count: int) -> Tensor:
    """``values`` followed by ``count`` values reflected about the last one (``numpy.pad(..., (0, count),
    mode="reflect")``; for ``count`` beyond the length the reflection repeats, period ``2 (n - 1)``)."""
    n = values.numel()
    if n == 1:
        return values.expand(n + count).clone()
    index = torch.arange(n + count, device=values.device) % (2 * (n - 1))
    index = torch.where(index >= n, 2 * (n - 1) - index, index)
    return values[index]


def clean_norms(norms: Sequence[float] | Tensor, *, trim: int = TRIM) -> Tensor:
    """The log without its non-finite values and without ``trim`` values at each end, as float64; raises
    ``ValueError`` when fewer than two values remain or one of them is not positive."""
    Interval(0, integer=True).check("trim", trim)
    raw = _as_1d_float64(norms, "norms")
    finite = raw[torch.isfinite(raw)]
    needed = 2 * trim + 2
    if finite.numel() < needed:
        raise ValueError(
            f"Invalid norms: refinement needs at least {needed} finite gradient norms ({trim} are dropped at "
            f"each end), got {finite.numel()} of {raw.numel()}"
        )
    kept = finite[trim : finite.numel() - trim]
    if bool((kept <= 0).any()):
        first = int(torch.nonzero(kept <= 0)[0, 0]) + trim
        raise ValueError(
            f"Invalid norms: gradient norms must be positive (their inverse powers are the weights); the finite "
            f"value {float(finite[first])!r} (number {first} after dropping non-finite values) is not"
        )
    return kept


def smooth_norms(norms: Sequence[float] | Tensor, *, tau: float = 0.1, grid: int = GRID, trim: int = TRIM) -> Tensor:
    """Steps 1-4 of the module docstring: the cleaned, median-filtered norms on the ``grid`` (float64)."""
    Interval(0.0, 1.0, low_closed=False).check("tau", tau)
    Interval(2, integer=True).check("grid", grid)
    cleaned = clean_norms(norms, trim=trim)
    if cleaned.numel() < grid:
        cleaned = resample_linear(cleaned, grid)
    width = 2 * (int(tau * grid) // 2) + 1
    filtered = median_filter(_reflect_end(cleaned, 2 * width), width)[: cleaned.numel()]
    return resample_linear(filtered, grid)


def closed_form_schedule(smoothed_norms: Tensor, *, norm: str) -> Tensor:
    r"""Step 5: weights :math:`\bar G^{-2}` (``"l2"``) or :math:`\bar G^{-1}` (``"l1"``), then
    :math:`\eta_t \propto w_t \sum_{p>t} w_p`, normalised to a maximum of 1 (the last value is 0)."""
    Choice(("l1", "l2")).check("norm", norm)
    if smoothed_norms.dim() != 1 or smoothed_norms.numel() < 2:
        raise ValueError("Invalid smoothed_norms: expected a 1-D tensor of at least 2 values")
    weights = smoothed_norms.to(torch.float64).pow(-2.0 if norm == "l2" else -1.0)
    if not torch.isfinite(weights).all():
        raise ValueError(
            "Invalid smoothed_norms: some are too small to weight in float64 (their inverse overflows); rescale "
            "the log (the schedule does not depend on the norms' unit)"
        )
    later = weights.flip(0).cumsum(0).flip(0)[1:]  # later[t] = sum of the weights after t
    schedule = torch.cat([weights[:-1] * later, weights.new_zeros(1)])
    return schedule / schedule.max()


class Refinement(NamedTuple):
    """What :func:`refine_details` computed: the cleaned log, its smoothed version on the grid, the schedule on
    the grid and the final multipliers (length ``steps``)."""

    norms: Tensor
    smoothed: Tensor
    grid_schedule: Tensor
    multipliers: Tensor


def refine_details(
    norms: Sequence[float] | Tensor,
    *,
    norm: str,
    steps: int | None = None,
    tau: float = 0.1,
    grid: int = GRID,
    trim: int = TRIM,
) -> Refinement:
    """:func:`refine` with its intermediate results, for plots and checks."""
    Choice(("l1", "l2")).check("norm", norm)
    raw = _as_1d_float64(norms, "norms")
    cleaned = clean_norms(raw, trim=trim)
    steps = raw.numel() if steps is None else steps
    Interval(2, integer=True).check("steps", steps)
    smoothed = smooth_norms(raw, tau=tau, grid=grid, trim=trim)
    on_grid = closed_form_schedule(smoothed, norm=norm)
    multipliers = resample_linear(on_grid, steps)
    multipliers = multipliers / multipliers.max()
    return Refinement(cleaned, smoothed, on_grid, multipliers)


def refine(
    norms: Sequence[float] | Tensor,
    *,
    norm: str,
    steps: int | None = None,
    tau: float = 0.1,
    grid: int = GRID,
    trim: int = TRIM,
) -> Tensor:
    """The refined schedule for a run of ``steps`` steps (default: ``len(norms)``) from the gradient norms of a
    previous run: float64 multipliers of the peak learning rate, all >= 0, maximum 1, last 0. ``norm`` says
    what the log holds: ``"l2"`` norms (SGD; weights Ĝ⁻²) or ``"l1"`` norms (Adam-type; weights Ĝ⁻¹). See the
    module docstring for the steps; ``grid`` and ``trim`` are the official script's constants."""
    return refine_details(norms, norm=norm, steps=steps, tau=tau, grid=grid, trim=trim).multipliers


def _check_multipliers(multipliers: Sequence[float] | Tensor) -> list[float]:
    values = _as_1d_float64(multipliers, "multipliers")
    if values.numel() == 0:
        raise ValueError("Invalid multipliers: expected at least one value")
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError("Invalid multipliers: expected finite values >= 0")
    return values.tolist()


class RefinedLR(_MultiplierLR):
    """An ``LRScheduler`` following given multipliers (e.g. from :func:`refine` or :func:`load_schedule`):
    after ``k`` calls of :meth:`step`, each param group's lr is its initial lr (the peak) times
    ``multipliers[k]``; past the end it stays at the last multiplier (0 for a refined schedule). Call
    :meth:`step` once per optimizer step, after it. The multipliers are part of ``state_dict()`` (a list of
    floats)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, multipliers: Sequence[float] | Tensor, last_epoch: int = -1
    ) -> None:
        self.multipliers = _check_multipliers(multipliers)
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        return self.multipliers[min(step, len(self.multipliers) - 1)]


def save_schedule(path: str | os.PathLike, multipliers: Sequence[float] | Tensor, **metadata: Any) -> Path:
    """Write ``multipliers`` and JSON-serialisable ``metadata`` to ``path`` as JSON, atomically (a reader sees
    the old file or the new one). Floats are written exactly (shortest round-trip repr)."""
    from optimlab.bench._files import write_atomic

    document = {
        "format": _FORMAT,
        "version": _VERSION,
        "metadata": metadata,
        "multipliers": _check_multipliers(multipliers),
    }
    text = json.dumps(document, allow_nan=False, indent=1)
    path = Path(path)
    write_atomic(path, lambda f: f.write(text + "\n"))
    return path


def load_schedule(path: str | os.PathLike) -> tuple[Tensor, dict[str, Any]]:
    """``(multipliers, metadata)`` of a file written by :func:`save_schedule`; multipliers as float64."""
    with open(path, encoding="utf-8") as f:
        try:
            document = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a schedule file: {err}") from None
    if not isinstance(document, dict) or document.get("format") != _FORMAT:
        raise ValueError(f'{path} is not an optimlab schedule file (no "format": {_FORMAT!r})')
    if document.get("version") != _VERSION:
        raise ValueError(f"{path}: unsupported schedule file version {document.get('version')!r}")
    multipliers = torch.tensor(_check_multipliers(document["multipliers"]), dtype=torch.float64)
    return multipliers, dict(document.get("metadata", {}))
