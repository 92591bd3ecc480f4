r"""The Flag aggregator: Byzantine-robust aggregation by the flag median of the workers' gradient directions.

Paper: Hamidreza Almasi, Harsh Mishra, Balajee Vamanan, Sathya N. Ravi, "Flag Aggregator: Scalable Distributed
Training under Failures and Augmented Losses using Convex Optimization", ICLR 2024, arXiv
`2302.05865 <https://arxiv.org/abs/2302.05865>`_. Official code: https://github.com/hamidralmasi/FlagAggregator
(``aggregators/flag.py``, ``aggregators/center_algorithms_torch.py``).

**The rule.** With the n workers' gradients :math:`g_i \in \mathbb R^d`, normalise
:math:`x_i = g_i / \lVert g_i\rVert` (a zero gradient stays zero) and find an r-dimensional subspace, a
:math:`d\times r` matrix :math:`Y` with orthonormal columns, that minimises the flag-median objective

.. math::

    E(Y) = \sum_i \sin\theta_i(Y) = \sum_i \sqrt{\max(0,\; 1 - \lVert Y^\top x_i\rVert^2)}

by iteratively reweighted least squares (IRLS) from a random start :math:`Y_0` (uniform on
:math:`[-\tfrac12, \tfrac12]^{d\times r}`, orthonormalised by QR). One IRLS step from :math:`Y` is

.. math::

    w_i = \bigl(\lvert 1 - \lVert Y^\top x_i\rVert^2\rvert + \varepsilon\bigr)^{-1/4}, \qquad
    Y^+ = \text{top-}r\text{ left singular vectors of } [\,w_1 x_1, \dots, w_n x_n\,]

(:math:`w_i^2 \approx 1/\sin\theta_i`, so the step minimises the majoriser
:math:`\sum_i w_i^2 \sin^2\theta_i(Y)` of :math:`E`, which makes :math:`E` non-increasing up to ε). With
λ > 0 the matrix also holds, for every ordered pair i ≠ j, the difference :math:`x_i - x_j` weighted by
:math:`\frac{\lambda}{n(n-1)} (\lvert 1 - \lVert Y^\top (x_i - x_j)\rVert^2\rvert + \varepsilon)^{-1/4}` (the
paper's augmentation by pairwise differences). The iteration stops after ``n_its`` steps, or as soon as
:math:`E` decreases by at most 1e-10 or falls to 1e-10; if the last step did not decrease :math:`E`, the previous
iterate is kept. The official aggregate is

.. math::

    \hat g_{\text{official}} = \frac1r \sum_i Y Y^\top x_i .

**Magnitude (a documented deviation by default).** :math:`\hat g_{\text{official}}` is a sum of projected *unit*
vectors: it forgets the gradients' magnitudes, and for n identical gradients g it is :math:`(n/r)\, g/\lVert
g\rVert`, so the step size depends on n, r and not at all on the gradient's size. The default
``scale="median"`` instead returns

.. math::

    \hat g = \operatorname{median}_i \lVert g_i\rVert \cdot \frac1n \sum_i Y Y^\top x_i
           = \operatorname{median}_i \lVert g_i\rVert \cdot \frac rn\, \hat g_{\text{official}},

which equals g for n identical gradients g (a drop-in replacement for the mean at the same learning rate). The
median (the mean of the two middle values for even n) of the norms is itself robust: with fewer than n/2
Byzantine rows it lies between the smallest and largest honest norm. ``scale="official"`` gives
:math:`\hat g_{\text{official}}` exactly, as the paper's experiments ran.

**Computation.** Everything the IRLS needs is in the span of the :math:`x_i`: with the Gram matrix
:math:`K = X X^\top` (X the n×d matrix of the :math:`x_i`) every step works on n×n (or, with λ > 0,
n×(n + n(n−1)/2)) matrices in float64: the weighted matrix is :math:`X^\top B` with a small coefficient matrix B,
its top-r left singular vectors are :math:`X^\top B V \Sigma^{-1}` with :math:`(V, \Sigma^2)` the top eigenpairs
of :math:`B^\top K B`, and the projections :math:`Y^\top x_i` are rows of :math:`K B V \Sigma^{-1}`. X itself is
never written: :math:`K = D^{-1} G G^\top D^{-1}` with G the gradients and D their norms, and products with X are
products with G after scaling the small factor. The pair (i, j) and (j, i) give the columns c and −c, which
contribute exactly what one column √2·c does, so each unordered pair appears once. Directions with a zero singular
value (r above the rank of the gradients) get a zero column instead of the arbitrary orthogonal vector an SVD would
return; they add nothing to :math:`Y Y^\top x_i` either way. The cost is one d·n² Gram product plus a few d·n
products, against the official code's normalised copy of the gradients and SVD of a d×n (or d×n²) matrix
(``benchmarks/aggregators.py``). A row whose norm overflows is a zero direction (as ``F.normalize`` makes it); a
row holding inf or NaN makes the result NaN, as in the official code. The stopping rules are applied with
``torch.where`` on device (no host synchronisation); the loop always runs ``n_its`` steps and freezes once
stopped.

**Randomness.** The official code re-seeds torch's global generator with 1 at every call, so every aggregation
starts from the same :math:`Y_0`. :class:`Flag` draws :math:`Y_0` from its own CPU ``torch.Generator`` (the
same numbers the official code's ``torch.manual_seed(seed); torch.rand(d, r)`` gives, on any device), re-seeded
at every call by default (``reseed=True``: stateless, as the official code); with ``reseed=False`` the generator
runs on and is the aggregator's state (:meth:`Flag.state_dict`). Either way every rank of a
:func:`~optimlab.distributed.aggregators.robust_hook` draws the same start.

**Dropped from the official code:** the CSV files written to a hard-coded path inside ``aggregate`` (logging of
per-worker projection ratios).

Hyperparameters (defaults), the official code's: ``r`` 1 (subspace dimension, 1 <= r <= min(n, d)), ``lam`` 0.0
(weight of the pairwise differences), ``n_its`` 1 (IRLS steps: one step from the random start), ``eps`` 1e-7,
``seed`` 1, ``reseed`` True, and this library's ``scale`` ``"median"`` (or ``"official"``).

Coming from the mean: with ``scale="median"`` the mean's learning rate; the aggregate is shorter than the honest
mean by about the honest fraction of the workers (the Byzantine rows' near-zero projections count in the sum).
With ``scale="official"`` the step no longer scales with the gradients: tune the learning rate afresh.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from optimlab._core.validation import NON_NEGATIVE, POSITIVE, Choice, Interval, check_hyperparameters
from optimlab._core.validation import Flag as BoolRule
from optimlab.distributed.aggregators import AGGREGATOR_LR_RANGE, Aggregator, _rows
from optimlab.registry import Capabilities, MethodInfo, register

__all__ = ["Flag", "flag_aggregate", "flag_median", "flag_init", "flag_objective", "SCALES"]

SCALES = ("median", "official")
_STOP = 1e-10  # the official code's tolerance on the objective and on its decrease


def flag_init(d: int, r: int, generator: torch.Generator, *, device: Any = None, dtype: Any = None) -> Tensor:
    """The random start: ``torch.rand(d, r) - 1/2`` from ``generator`` (on its device), orthonormalised by QR."""
    raw = torch.rand(d, r, generator=generator, device=generator.device, dtype=torch.float32) - 0.5
    return torch.linalg.qr(raw.to(device=device, dtype=dtype)).Q


def flag_objective(proj: Tensor) -> Tensor:
    """:math:`\\sum_i \\sqrt{\\max(0, 1 - \\lVert Y^\\top x_i\\rVert^2)}` from the ``(n, r)`` projections
    :math:`Y^\\top x_i` (rows)."""
    return (1 - proj.square().sum(1)).clamp_min(0).sqrt().sum()


def _weights(proj: Tensor, eps: float) -> Tensor:
    return ((1 - proj.square().sum(-1)).abs() + eps).pow(-0.25)


def _coefficients(proj: Tensor, lam: float, eps: float, pairs: tuple[Tensor, Tensor] | None) -> Tensor:
    """B with the weighted matrix = Xᵀ B: the weighted unit vectors, then (λ > 0) the weighted pair differences."""
    n = proj.shape[0]
    b = torch.diag(_weights(proj, eps))
    if pairs is None:
        return b
    i, j = pairs
    # √2: the ordered pairs (i, j) and (j, i) are the columns c and -c, which span and weigh like one √2·c
    w = _weights(proj[i] - proj[j], eps) * (math.sqrt(2) * lam / (n * (n - 1)))
    cols = torch.arange(i.numel(), device=proj.device)
    diff = proj.new_zeros(n, i.numel())
    diff[i, cols] = w
    diff[j, cols] = -w
    return torch.cat([b, diff], dim=1)


def _step(gram: Tensor, proj: Tensor, r: int, lam: float, eps: float, pairs, rounding: float) -> tuple[Tensor, Tensor]:
    """One IRLS step in coefficient space: (C with Y⁺ = Xᵀ C, the new projections K C)."""
    b = _coefficients(proj, lam, eps, pairs)
    evals, evecs = torch.linalg.eigh(b.T @ gram @ b)
    evals, evecs = evals[-r:].flip(0), evecs[:, -r:].flip(1)
    # eigenvalues at rounding level belong to directions outside the gradients' span: a zero column, not noise
    tol = evals[:1].clamp_min(0) * (b.shape[1] * rounding)
    inv = torch.where(evals > tol, evals.clamp_min(torch.finfo(evals.dtype).tiny).rsqrt(), 0)
    coef = (b @ evecs) * inv
    return coef, gram @ coef


def _inverse_norms(grads: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(norms, 1/norms with F.normalize's 1e-12 floor, finite-norm mask); a norm that overflows gives the factor 0,
    as ``x / inf = 0`` does in ``F.normalize``."""
    norms = torch.linalg.vector_norm(grads, dim=1)
    ok = norms.isfinite()
    return norms, torch.where(ok, norms.clamp_min(1e-12).reciprocal(), 0), ok


def flag_median(
    grads: Tensor, init: Tensor, *, lam: float = 0.0, n_its: int = 1, eps: float = 1e-7
) -> tuple[Tensor, Tensor]:
    """IRLS for the flag median of the directions of the rows of ``grads`` from the ``(d, r)`` start ``init``.

    The unit rows :math:`x_i` are never formed: their Gram matrix is the rows' Gram matrix scaled by the inverse
    norms (an n×n operation), and products with them are products with the rows and the scaled coefficients,
    which saves writing a second n×d matrix (as slow as the Gram product itself at d = 2^20). Returns
    ``(Y, objectives)``: the ``(d, r)`` basis (orthonormal columns, or zero columns for directions beyond the rows'
    rank) and the ``(n_its + 1,)`` float64 objective :math:`E` of the kept iterate after each step (the start
    first; constant once the official stopping rules fire).
    """
    n, r = grads.shape[0], init.shape[1]
    _, inv, ok = _inverse_norms(grads)
    inv64 = inv.double()
    both = ok[:, None] & ok[None, :]  # entries of an overflowing row are inf, and its direction is zero
    gram = torch.where(both, grads @ grads.T, 0).double() * (inv64[:, None] * inv64[None, :])
    proj = torch.where(ok[:, None], grads @ init, 0).double() * inv64[:, None]
    pairs = tuple(torch.triu_indices(n, n, 1, device=grads.device)) if lam > 0 and n > 1 else None
    rounding = torch.finfo(grads.dtype).eps
    coef = proj.new_zeros(n, r)
    at_init = torch.ones((), dtype=torch.bool, device=grads.device)
    err = flag_objective(proj)
    running = err > _STOP
    errs = [err]
    for _ in range(n_its):
        new_coef, new_proj = _step(gram, proj, r, lam, eps, pairs, rounding)
        new_err = flag_objective(new_proj)
        accept = running & (new_err < err)  # the official "better of the last two"
        coef = torch.where(accept, new_coef, coef)
        proj = torch.where(accept, new_proj, proj)
        at_init = at_init & ~accept
        running = running & (err - new_err > _STOP) & (new_err > _STOP)
        err = torch.where(accept, new_err, err)
        errs.append(err)
    basis = torch.where(at_init, init, grads.T @ (coef * inv64[:, None]).to(grads.dtype))
    return basis, torch.stack(errs)


def _median(x: Tensor) -> Tensor:
    n = x.numel()
    return x.sort().values[(n - 1) // 2 : n // 2 + 1].mean()


def flag_aggregate(
    grads: Tensor,
    *,
    r: int = 1,
    lam: float = 0.0,
    n_its: int = 1,
    eps: float = 1e-7,
    scale: str = "median",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The Flag aggregate of the rows of ``grads`` (see the module docstring); ``generator`` draws the start
    (default: a fresh CPU generator seeded 1, the official code's fixed start)."""
    n, d = _rows(grads).shape
    if not 1 <= r <= min(n, d):
        raise ValueError(f"Invalid r: {r}; expected 1 <= r <= min(n, d) = {min(n, d)} for {n} rows of size {d}")
    work = torch.promote_types(grads.dtype, torch.float32)  # half precision is too coarse for the Gram matrix
    g = grads.to(work)
    if generator is None:
        generator = torch.Generator().manual_seed(1)
    start = flag_init(d, r, generator, device=g.device, dtype=work)
    basis, _ = flag_median(g, start, lam=lam, n_its=n_its, eps=eps)
    norms, inv, _ = _inverse_norms(g)
    out = basis @ (basis.T @ (g.T @ inv))  # Σᵢ Y Yᵀ xᵢ, with Σᵢ xᵢ = Gᵀ (1/‖gᵢ‖)
    out = out / r if scale == "official" else out * (_median(norms) / n)
    return out.to(grads.dtype)


class Flag(Aggregator):
    __doc__ = __doc__

    def __init__(
        self,
        r: int = 1,
        lam: float = 0.0,
        n_its: int = 1,
        eps: float = 1e-7,
        scale: str = "median",
        seed: int = 1,
        reseed: bool = True,
    ) -> None:
        values = {"r": r, "lam": lam, "n_its": n_its, "eps": eps, "scale": scale, "seed": seed, "reseed": reseed}
        check_hyperparameters(type(self).info.hyperparameters, values)
        self.r, self.lam, self.n_its, self.eps, self.scale, self.seed, self.reseed = values.values()
        self.generator = torch.Generator().manual_seed(seed)

    def aggregate(self, grads: Tensor) -> Tensor:
        if self.reseed:
            self.generator.manual_seed(self.seed)
        return flag_aggregate(
            grads, r=self.r, lam=self.lam, n_its=self.n_its, eps=self.eps, scale=self.scale, generator=self.generator
        )

    def state_dict(self) -> dict[str, Any]:
        return {} if self.reseed else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.reseed:
            super().load_state_dict(state)
        else:
            self.generator.set_state(state["generator"])


register(
    MethodInfo(
        name="flag",
        cls=Flag,
        kind="aggregator",
        lr_range=AGGREGATOR_LR_RANGE,
        paper=(
            "Flag Aggregator: Scalable Distributed Training under Failures and Augmented Losses using Convex "
            "Optimization"
        ),
        arxiv="2302.05865",
        code_url="https://github.com/hamidralmasi/FlagAggregator",
        summary="The flag median (IRLS) of the workers' normalised gradients: a robust subspace, projected onto.",
        hyperparameters={
            "r": Interval(1.0, integer=True),
            "lam": NON_NEGATIVE,
            "n_its": Interval(1.0, integer=True),
            "eps": POSITIVE,
            "scale": Choice(SCALES),
            "seed": Interval(0.0, integer=True),
            "reseed": BoolRule(),
        },
        capabilities=Capabilities(stochastic=True),
    )
)
