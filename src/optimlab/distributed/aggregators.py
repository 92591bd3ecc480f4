r"""Robust aggregation: rules that turn the workers' gradients into one direction, and the DDP hook that runs them.

An *aggregator* maps the ``(n, d)`` matrix of the n workers' gradients (one per row) to one ``d``-vector, the
direction every replica applies. The same object serves the single-process simulator (call it on the matrix from
:func:`optimlab.distributed.simulator.worker_gradients`) and real ``torch.distributed`` training (register
:func:`robust_hook` on a DDP model). This module holds the interface and the baselines; the Flag aggregator is in
:mod:`optimlab.distributed.flag`.

Baselines, with :math:`g_1, \dots, g_n` the rows and f the number of Byzantine workers tolerated:

- ``mean`` (:class:`Mean`): :math:`\frac1n \sum_i g_i`, DDP's default; one bad row moves it arbitrarily far.
- ``coordinate_median`` (:class:`CoordinateMedian`): per coordinate, the median of the n values (the mean of the
  two middle values for even n). Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates", ICML 2018, arXiv `1803.01498 <https://arxiv.org/abs/1803.01498>`_.
- ``trimmed_mean`` (:class:`TrimmedMean`): per coordinate, drop the f largest and the f smallest values and
  average the other n − 2f (Yin et al., the β-trimmed mean with f = ⌊βn⌋, scipy's ``trim_mean`` convention).
  Needs f < n/2.
- ``krum`` (:class:`Krum`): score each row by the sum of its squared distances to its n − f − 2 nearest other
  rows and return the row with the lowest score; multi-Krum (m > 1) returns the mean of the m best-scored rows.
  Needs n > 2f + 2. Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent", NeurIPS 2017, arXiv `1703.02757 <https://arxiv.org/abs/1703.02757>`_.

**Real distributed training.** :func:`robust_hook` is a DDP communication hook: each rank all-gathers every rank's
bucket through a :class:`~optimlab.distributed.comm.Communicator` (the bytes counted there: numel × element size
per rank, the same as DDP's all-reduce) and applies the aggregator to the gathered ``(world_size, numel)``
matrix, so every rank computes the same direction from the same rows. Chosen ranks can be made Byzantine
(:class:`RobustHookState`'s ``byzantine`` and ``attack``): those ranks send the attack's rows instead of their
gradients. Attacks such as "a little is enough" need the honest gradients of all workers (the omniscient
adversary of the robust-aggregation literature), so with an attack the hook first all-gathers the honest buckets,
the Byzantine ranks compute their rows from them, and a second all-gather carries what every rank really sends;
the aggregate is computed only from the second, and only the second counts in ``bytes_sent`` (the first simulates
the adversary, it is not the method's traffic). Without an attack there is one all-gather.

DDP aggregates *per bucket*: for coordinate-wise rules (mean, median, trimmed mean) that equals aggregating the
whole gradient, but for rules that look at whole rows (Krum's distances, Flag's subspace and its norm scale) each
bucket is a separate problem, so the result differs from aggregating the whole flattened gradient (Krum may pick
different workers for different buckets). For whole-vector semantics, construct DDP with a ``bucket_cap_mb``
larger than the model (one bucket; DDP also caps its *first* bucket at ``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``,
1 MiB, so beyond that the gradient is split anyway).
"""

# no "from __future__ import annotations": DDP.register_comm_hook checks robust_hook's annotations as objects

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from optimlab._core.validation import Constraint, Interval, check_hyperparameters
from optimlab.distributed.comm import Communicator
from optimlab.registry import MethodInfo, register

__all__ = [
    "Aggregator",
    "Mean",
    "CoordinateMedian",
    "TrimmedMean",
    "Krum",
    "mean",
    "coordinate_median",
    "trimmed_mean",
    "krum",
    "krum_scores",
    "sort_rows",
    "RobustHookState",
    "robust_hook",
]

_COUNT = Interval(0.0, integer=True)
_POSITIVE_COUNT = Interval(1.0, integer=True)


class _OrNone(Constraint):
    """``None`` or a value satisfying ``rule`` (an optional hyperparameter)."""

    def __init__(self, rule: Constraint) -> None:
        self.rule = rule

    def check(self, name: str, value: Any) -> None:
        if value is not None:
            self.rule.check(name, value)

    def describe(self, name: str) -> str:
        return f"None or {self.rule.describe(name)}"


def _rows(grads: Tensor) -> Tensor:
    """``grads`` checked to be an ``(n, d)`` floating-point matrix with n >= 1."""
    if not isinstance(grads, Tensor) or not grads.is_floating_point():
        raise TypeError(f"an aggregator takes a floating-point tensor of gradients, got {type(grads).__name__}")
    if grads.dim() != 2 or grads.shape[0] < 1:
        raise ValueError(
            f"an aggregator takes an (n, d) matrix with one worker's gradient per row (n >= 1), got shape "
            f"{tuple(grads.shape)}; flatten each worker's gradient first (simulator.worker_gradients does)"
        )
    return grads


class Aggregator:
    """The interface: ``aggregator(grads)`` maps the ``(n, d)`` matrix of workers' gradients to a ``d``-vector.

    Subclasses implement :meth:`aggregate` (called with the checked matrix). Stateless rules keep the default
    (empty) :meth:`state_dict`; a rule with state (Flag's generator, when it is not re-seeded) overrides both.
    """

    info: ClassVar[MethodInfo]

    def __call__(self, grads: Tensor) -> Tensor:
        return self.aggregate(_rows(grads))

    def aggregate(self, grads: Tensor) -> Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.info.defaults) if hasattr(self, "info") else ""
        return f"{type(self).__name__}({args})"


# -- functional cores ---------------------------------------------------------------------------------------------
def mean(grads: Tensor) -> Tensor:
    """The plain average of the rows."""
    return _rows(grads).mean(0)


_NETWORK_MAX_ROWS = 64  # above this, torch.sort's n log n beats the network's n^2 / 2 compare-exchanges


def sort_rows(grads: Tensor) -> Tensor:
    """Every column of ``grads`` sorted ascending (a new matrix), NaN sorted as +inf.

    For n <= 64 rows this is an odd-even transposition network: n rounds of elementwise min/max between
    neighbouring rows, each over all columns at once, about 5x faster than ``torch.sort`` along a short first
    dimension (n = 15, d = 2^20: 0.2 s against 1.0 s on one core). NaN becomes +inf first, because min/max would
    spread a NaN through the network (a Byzantine row of NaNs would turn every median into NaN).
    """
    out = grads.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)
    n = out.shape[0]
    if n > _NETWORK_MAX_ROWS:
        return out.sort(0).values
    for r in range(n):
        low, high = out[r % 2 : n - 1 : 2], out[r % 2 + 1 : n : 2]
        smaller = torch.minimum(low, high)
        high.copy_(torch.maximum(low, high))
        low.copy_(smaller)
    return out


def coordinate_median(grads: Tensor) -> Tensor:
    """The coordinate-wise median of the rows (for even n, the mean of the two middle values)."""
    n = _rows(grads).shape[0]
    # torch.median would return the lower middle value for even n
    return sort_rows(grads)[(n - 1) // 2 : n // 2 + 1].mean(0)


def _check_trim(f: int, n: int) -> None:
    if not 2 * f < n:
        raise ValueError(f"Invalid f: {f}; the trimmed mean of n={n} rows needs 0 <= f < n/2 (n - 2f rows left)")


def trimmed_mean(grads: Tensor, f: int) -> Tensor:
    """The coordinate-wise mean after dropping the ``f`` largest and ``f`` smallest values of each coordinate."""
    _COUNT.check("f", f)
    n = _rows(grads).shape[0]
    _check_trim(f, n)
    return grads.mean(0) if f == 0 else sort_rows(grads)[f : n - f].mean(0)


def _check_krum(f: int, m: int, n: int) -> None:
    if not 2 * f + 2 < n:
        raise ValueError(f"Invalid f: {f}; Krum on n={n} rows needs n > 2f + 2 (f < {(n - 2) / 2:g})")
    if not 1 <= m <= n:
        raise ValueError(f"Invalid m: {m}; multi-Krum on n={n} rows needs 1 <= m <= n")


def krum_scores(grads: Tensor, f: int) -> Tensor:
    """Krum's score of each row: the sum of its squared distances to its n − f − 2 nearest other rows."""
    _COUNT.check("f", f)
    n = _rows(grads).shape[0]
    _check_krum(f, 1, n)
    # squared distances from the differences (pdist: each pair once, faster than a Gram matrix on CPU); the Gram
    # form |a|^2 + |b|^2 - 2 a.b cancels to rounding noise when the rows agree closely relative to their norm
    work = grads.to(torch.promote_types(grads.dtype, torch.float32))  # pdist has no half precision
    i, j = torch.triu_indices(n, n, 1, device=grads.device)
    pairs = torch.pdist(work).square()  # in the order of triu_indices
    dist2 = work.new_full((n, n), math.inf)  # a row is not its own neighbour
    dist2[i, j] = pairs
    dist2[j, i] = pairs
    return dist2.topk(n - f - 2, dim=1, largest=False).values.sum(1)


def krum(grads: Tensor, f: int, m: int = 1) -> Tensor:
    """Krum (``m = 1``: the best-scored row) or multi-Krum (the mean of the ``m`` best-scored rows)."""
    _POSITIVE_COUNT.check("m", m)
    scores = krum_scores(grads, f)
    _check_krum(f, m, grads.shape[0])
    # a stable sort: ties go to the lower worker index, the same on every rank
    best = scores.argsort(stable=True)[:m]
    return grads.index_select(0, best).mean(0)


# -- classes ------------------------------------------------------------------------------------------------------
class Mean(Aggregator):
    r"""The plain average of the workers' gradients (DDP's default): the non-robust baseline.

    Paper (as the baseline of robust aggregation): Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates", arXiv `1803.01498 <https://arxiv.org/abs/1803.01498>`_.

    .. math::

        \hat g = \frac1n \sum_{i=1}^n g_i

    One Byzantine row moves it arbitrarily far.

    Hyperparameters (defaults): none.
    Coming from DDP: the same average, so the same learning rate.
    """

    def aggregate(self, grads: Tensor) -> Tensor:
        return grads.mean(0)


class CoordinateMedian(Aggregator):
    r"""The coordinate-wise median of the workers' gradients.

    Paper: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates", arXiv `1803.01498 <https://arxiv.org/abs/1803.01498>`_ (no official code).

    .. math::

        \hat g_k = \operatorname{median}\{g_{1,k}, \dots, g_{n,k}\}\quad\text{for every coordinate } k

    (the mean of the two middle values for even n). NaN is ordered as +inf, so a NaN row cannot poison it.

    Hyperparameters (defaults): none.
    Coming from the mean: the same learning rate; the median of noisy small-batch gradients is shorter than
    their mean when their distribution is skewed.
    """

    def aggregate(self, grads: Tensor) -> Tensor:
        return coordinate_median(grads)


class TrimmedMean(Aggregator):
    r"""The coordinate-wise trimmed mean: drop the f largest and f smallest values of each coordinate, average the rest.

    Paper: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates", arXiv `1803.01498 <https://arxiv.org/abs/1803.01498>`_ (no official code).

    .. math::

        \hat g_k = \frac{1}{n - 2f} \sum_{j = f+1}^{n-f} g_{(j),k}

    with :math:`g_{(1),k} \le \dots \le g_{(n),k}` the sorted values of coordinate k.

    Hyperparameters (defaults): ``beta`` 0.1, the fraction trimmed from each end, in [0, 1/2): f = ⌊β n⌋ values
    per side; ``f`` None, the number trimmed from each end, used instead of ``beta`` when given (it must be
    < n/2 for the n rows aggregated).
    Coming from the mean: the same learning rate; set f to the number of Byzantine workers expected.
    """

    def __init__(self, beta: float = 0.1, f: int | None = None) -> None:
        check_hyperparameters(type(self).info.hyperparameters, {"beta": beta, "f": f})
        self.beta, self.f = beta, f

    def trimmed(self, n: int) -> int:
        """The number of values trimmed from each end for ``n`` rows."""
        return self.f if self.f is not None else math.floor(self.beta * n)

    def aggregate(self, grads: Tensor) -> Tensor:
        return trimmed_mean(grads, self.trimmed(grads.shape[0]))


class Krum(Aggregator):
    r"""Krum and multi-Krum: the gradient closest to its neighbours (or the mean of the m best).

    Paper: Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent", NeurIPS 2017, arXiv `1703.02757 <https://arxiv.org/abs/1703.02757>`_ (no official code).

    .. math::

        s(i) = \sum_{j \in N_i} \lVert g_i - g_j\rVert^2, \qquad \hat g = g_{\arg\min_i s(i)}

    with :math:`N_i` the :math:`n - f - 2` rows nearest to :math:`g_i`; multi-Krum averages the m rows of lowest
    score (ties broken by the lower index).

    Hyperparameters (defaults): ``f`` 1, the number of Byzantine workers tolerated (needs n > 2f + 2 for the n
    rows aggregated); ``m`` 1, how many best-scored rows are averaged, 1 <= m <= n (1: Krum itself).
    Coming from the mean: Krum returns one worker's gradient, so its noise is that of one worker's batch: a
    smaller learning rate than the mean's, or multi-Krum with m near n - f.
    """

    def __init__(self, f: int = 1, m: int = 1) -> None:
        check_hyperparameters(type(self).info.hyperparameters, {"f": f, "m": m})
        self.f, self.m = f, m

    def aggregate(self, grads: Tensor) -> Tensor:
        return krum(grads, self.f, self.m)


# -- the DDP hook ----------------------------------------------------------------------------------------------------
AttackFn = Callable[..., Tensor]


@dataclass
class RobustHookState:
    """The state of :func:`robust_hook`.

    Attributes:
        comm: the :class:`~optimlab.distributed.comm.Communicator` the buckets travel through (bytes counted).
        aggregator: any callable from an ``(n, d)`` matrix to a ``d``-vector (an :class:`Aggregator`).
        byzantine: the ranks that send the attack's rows instead of their gradients (default none).
        attack: ``attack(honest, byzantine, generator=...)`` returning the matrix with the Byzantine rows
            replaced (the functions of :mod:`optimlab.distributed.attacks`; bind their options with
            ``functools.partial``). Required when ``byzantine`` is not empty.
        generator: the attack's random numbers (seed it alike on every rank so that all Byzantine ranks draw
            one consistent matrix).
    """

    comm: Communicator
    aggregator: Callable[[Tensor], Tensor]
    byzantine: Sequence[int] = ()
    attack: AttackFn | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.byzantine = tuple(self.byzantine)
        bad = [r for r in self.byzantine if not (isinstance(r, int) and 0 <= r < self.comm.world_size)]
        if bad or len(set(self.byzantine)) != len(self.byzantine):
            raise ValueError(
                f"Invalid byzantine: {self.byzantine}; expected distinct ranks in [0, {self.comm.world_size})"
            )
        if self.byzantine and self.attack is None:
            raise ValueError("byzantine ranks need an attack (e.g. optimlab.distributed.attacks.sign_flip)")


def robust_hook(state: RobustHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """A DDP communication hook that replaces the bucket's average by ``state.aggregator`` of every rank's bucket.

    Register with ``ddp_model.register_comm_hook(RobustHookState(Communicator(), Flag()), robust_hook)``. Each rank
    all-gathers the buckets into a ``(world_size, numel)`` matrix and aggregates it; deterministic aggregators
    therefore keep the replicas identical. See the module docstring for Byzantine ranks and per-bucket semantics.
    """
    comm, row = state.comm, bucket.buffer()
    if state.byzantine:
        # the omniscient adversary's view: part of simulating the attack, not the method's traffic (not counted)
        honest = comm.all_gather(row, counted=False)
        if comm.rank in state.byzantine:
            row = state.attack(honest, state.byzantine, generator=state.generator)[comm.rank].to(row.dtype)
    result = state.aggregator(comm.all_gather(row)).to(row.dtype)
    fut: torch.futures.Future[Tensor] = torch.futures.Future()
    fut.set_result(result)
    return fut


# the range of the SGD step an aggregate drives (what the bench tunes), the same for every aggregator
AGGREGATOR_LR_RANGE = (3e-3, 3.0)
_YIN = "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"
register(
    MethodInfo(
        name="mean",
        cls=Mean,
        kind="aggregator",
        lr_range=AGGREGATOR_LR_RANGE,
        paper=_YIN,
        arxiv="1803.01498",
        summary="The plain average of the workers' gradients (DDP's default): the non-robust baseline of Yin et al.",
    )
)
register(
    MethodInfo(
        name="coordinate_median",
        cls=CoordinateMedian,
        kind="aggregator",
        lr_range=AGGREGATOR_LR_RANGE,
        paper=_YIN,
        arxiv="1803.01498",
        summary="Coordinate-wise median of the workers' gradients.",
    )
)
register(
    MethodInfo(
        name="trimmed_mean",
        cls=TrimmedMean,
        kind="aggregator",
        lr_range=AGGREGATOR_LR_RANGE,
        paper=_YIN,
        arxiv="1803.01498",
        summary="Coordinate-wise mean after dropping the f largest and f smallest values (f = floor(beta n) or given).",
        hyperparameters={"beta": Interval(0.0, 0.5, high_closed=False), "f": _OrNone(_COUNT)},
    )
)
register(
    MethodInfo(
        name="krum",
        cls=Krum,
        kind="aggregator",
        lr_range=AGGREGATOR_LR_RANGE,
        paper="Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
        arxiv="1703.02757",
        summary="The gradient closest to its n - f - 2 nearest neighbours (multi-Krum: mean of the m best).",
        hyperparameters={"f": _COUNT, "m": _POSITIVE_COUNT},
    )
)
