r"""Byzantine attacks for testing robust aggregation: functions of the honest gradient matrix.

Every attack takes the ``(n, d)`` matrix of the n workers' *honest* gradients (row i: what worker i computed on
its data), the Byzantine workers (``byzantine``: an int f for the last f rows, or a sequence of row indices) and
a ``generator`` for its random numbers, and returns a new matrix in which the Byzantine rows are replaced by what
those workers send; the honest rows are copied unchanged. The adversary is omniscient (it sees every honest
gradient), the standard threat model of the robust-aggregation literature. The same functions corrupt the rows
in the simulator and, through :class:`~optimlab.distributed.aggregators.RobustHookState`, what Byzantine ranks
send in real DDP training.

- :func:`sign_flip`: a Byzantine worker sends :math:`-s\, g_i`, its own gradient reversed and scaled by ``scale``
  (s = 1: plain sign flipping; s > n/f − 1 turns the mean into an ascent direction).
- :func:`large_noise`: a Byzantine worker sends :math:`\mathcal N(0, \sigma^2 I)` noise, ``std`` σ (default 100):
  the "random" failures of the Flag paper's experiments and the Gaussian attack of the Byzantine literature.
- :func:`little_is_enough`: Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For
  Distributed Learning", NeurIPS 2019, arXiv `1902.06156 <https://arxiv.org/abs/1902.06156>`_. Every Byzantine
  worker sends :math:`\mu - z\,\sigma` with :math:`\mu, \sigma` the coordinate-wise mean and standard deviation
  (n − 1 in the denominator) of all n honest gradients and, by default, the paper's
  :math:`z_{\max} = \Phi^{-1}\bigl((n - s)/n\bigr)` with :math:`s = \lfloor n/2 + 1\rfloor - f` (the number of
  honest workers the attackers must win over for a majority; Φ the standard normal CDF): small enough per
  coordinate to pass median- and distance-based filters, consistent enough across steps to stall training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from optimlab._core.validation import NON_NEGATIVE, Interval

__all__ = ["byzantine_rows", "sign_flip", "large_noise", "little_is_enough", "alie_z", "ATTACKS"]


def byzantine_rows(n: int, byzantine: int | Sequence[int]) -> list[int]:
    """The Byzantine row indices: ``range(n - f, n)`` for an int ``f``, else the given distinct indices."""
    if isinstance(byzantine, int) and not isinstance(byzantine, bool):
        Interval(0.0, n, integer=True).check("f", byzantine)
        return list(range(n - byzantine, n))
    rows = list(byzantine)
    if len(set(rows)) != len(rows) or not all(isinstance(i, int) and 0 <= i < n for i in rows):
        raise ValueError(f"Invalid byzantine: {byzantine!r}; expected an int f or distinct row indices in [0, {n})")
    return rows


def _replace(grads: Tensor, rows: list[int], values: Tensor) -> Tensor:
    out = grads.clone()
    if rows:
        out[torch.tensor(rows, device=grads.device)] = values.to(grads.dtype)
    return out


def sign_flip(grads: Tensor, byzantine: int | Sequence[int], *, scale: float = 1.0, generator=None) -> Tensor:
    """Byzantine rows send ``-scale`` times their own honest gradient."""
    NON_NEGATIVE.check("scale", scale)
    rows = byzantine_rows(grads.shape[0], byzantine)
    return _replace(grads, rows, grads[rows] * -scale)


def large_noise(
    grads: Tensor, byzantine: int | Sequence[int], *, std: float = 100.0, generator: torch.Generator | None = None
) -> Tensor:
    """Byzantine rows send Gaussian noise of standard deviation ``std`` (drawn from ``generator``, on its device,
    then moved to the gradients' device: the same numbers on every device)."""
    NON_NEGATIVE.check("std", std)
    rows = byzantine_rows(grads.shape[0], byzantine)
    device = generator.device if generator is not None else grads.device
    noise = torch.randn(len(rows), grads.shape[1], generator=generator, device=device, dtype=grads.dtype)
    return _replace(grads, rows, noise.to(grads.device) * std)


def alie_z(n: int, f: int) -> float:
    """The paper's :math:`z_{\\max} = \\Phi^{-1}((n - s)/n)` with :math:`s = \\lfloor n/2 + 1\\rfloor - f`."""
    s = math.floor(n / 2 + 1) - f
    if not 1 <= s <= n - 1:
        raise ValueError(f"Invalid f: {f}; 'a little is enough' needs 1 <= floor(n/2 + 1) - f <= n - 1 (n={n})")
    return float(torch.special.ndtri(torch.tensor((n - s) / n, dtype=torch.float64)))


def little_is_enough(
    grads: Tensor, byzantine: int | Sequence[int], *, z: float | None = None, generator=None
) -> Tensor:
    """Byzantine rows all send ``mean - z * std`` of the honest rows (coordinate-wise); ``z`` defaults to
    :func:`alie_z` of n and the number of Byzantine rows."""
    n = grads.shape[0]
    rows = byzantine_rows(n, byzantine)
    if not rows:
        return grads.clone()
    if n < 2:
        raise ValueError("'a little is enough' needs n >= 2 rows to estimate a standard deviation")
    z = alie_z(n, len(rows)) if z is None else z
    std, mu = torch.std_mean(grads, dim=0)
    return _replace(grads, rows, (mu - z * std).expand(len(rows), -1))


#: The attacks by name (for the bench and the command line).
ATTACKS = {"sign_flip": sign_flip, "large_noise": large_noise, "little_is_enough": little_is_enough}
