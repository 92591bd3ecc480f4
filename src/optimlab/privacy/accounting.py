r"""Privacy accounting: a thin layer over Opacus's RDP accountant (no hand-written RDP here).

DP-SGD with Poisson sampling at rate :math:`q` and noise multiplier :math:`\sigma` is the sampled Gaussian
mechanism iterated once per step. Opacus's ``RDPAccountant`` (opacus 1.6.0, ``opacus/accountants/rdp.py`` and
``analysis/rdp.py``) computes its Rényi-DP at the orders :math:`\alpha \in \{1.1, 1.2, \dots, 10.9\} \cup
\{12, \dots, 63\}`, adds it over the steps, and converts to :math:`(\varepsilon, \delta)`-DP by Balle et al.'s
Theorem 21 (arXiv 1905.09982):

.. math::

    \varepsilon = \min_\alpha\; \mathrm{RDP}(\alpha) - \frac{\log\delta + \log\alpha}{\alpha - 1}
                  + \log\frac{\alpha - 1}{\alpha}.

For full-batch steps (:math:`q = 1`) the mechanism is the Gaussian mechanism and
:math:`\mathrm{RDP}(\alpha) = T\alpha/(2\sigma^2)` after :math:`T` steps, the closed form the tests check against.
The inverse, the noise multiplier that reaches a target :math:`(\varepsilon, \delta)`, is Opacus's
``get_noise_multiplier`` (a bisection to within ``epsilon_tolerance``, 0.01 by default, from above: the
returned :math:`\sigma` spends at most the target).

The guarantee assumes Poisson sampling (:class:`~optimlab.privacy.sampling.PoissonBatchSampler`), not shuffling,
and the add/remove-one-record neighbouring relation. :math:`\delta` is always explicit; the library default is
:math:`\delta = 1/N` (:func:`default_delta`), as the spec asks; DiceSGD's official CIFAR runs passed no
:math:`\delta` and so got fastDP's default, which is :math:`1/(2N)` in the fastDP versions that define it that way.

**DiceSGD (official practice, not a proved bound).** The official code (github.com/564612540/DiceSGD,
``optimizers_utils.py``) takes the DP-SGD noise multiplier :math:`\sigma` for the target :math:`(\varepsilon,
\delta)` and multiplies the noise standard deviation by :math:`\sqrt{1 + 2C_2/C_1}`
(:func:`dicesgd_noise_inflation`); its README still lists "update the calculation of DP noise multipliers for
DiceSGD" as a to-do, and the paper's RDP theorem states the noise as a standard deviation depending on
:math:`C_1`, :math:`C_2` and a gradient bound. An :math:`\varepsilon` reported for DiceSGD here is DP-SGD's
:math:`\varepsilon` at the uninflated :math:`\sigma`: it follows that practice, it is not a bound proved for
DiceSGD.

Opacus is imported when an accountant is first used; without it these functions raise an ``ImportError`` saying
``pip install optimlab[privacy]``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from optimlab._core.validation import NON_NEGATIVE, POSITIVE, Interval

__all__ = [
    "PrivacyAccountant",
    "check_delta",
    "default_delta",
    "dicesgd_noise_inflation",
    "epsilon",
    "noise_multiplier_for",
]

_DELTA = Interval(0.0, 1.0, low_closed=False, high_closed=False)
_SAMPLE_RATE = Interval(0.0, 1.0, low_closed=False)
_SIGMA = Interval(0.0, math.inf, high_closed=False)
_STEPS = Interval(0, integer=True)


def _opacus() -> Any:
    """Opacus's accountant module, imported on first use (an optional dependency)."""
    try:
        import opacus.accountants as accountants
        import opacus.accountants.utils  # noqa: F401  (get_noise_multiplier)
    except ImportError as err:
        raise ImportError(
            "privacy accounting uses Opacus's RDP accountant, which is not installed; install it with "
            "`pip install optimlab[privacy]` (opacus==1.6.0)"
        ) from err
    return accountants


def check_delta(delta: float) -> float:
    """``delta`` as a float, or a ``ValueError`` unless 0 < δ < 1."""
    _DELTA.check("delta", delta)
    return float(delta)


def default_delta(num_samples: int) -> float:
    """The library's default δ = 1/N for a data set of N records (N ≥ 2, so that δ < 1)."""
    Interval(2, integer=True).check("num_samples", num_samples)
    return 1.0 / num_samples


def dicesgd_noise_inflation(error_clip_ratio: float) -> float:
    r""":math:`\sqrt{1 + 2 C_2/C_1}`: the factor by which DiceSGD's official code multiplies the DP-SGD noise
    standard deviation (official practice for the hidden error state, not a proved bound; see the module
    docstring). ``error_clip_ratio`` is :math:`C_2/C_1 \ge 0`."""
    NON_NEGATIVE.check("error_clip_ratio", error_clip_ratio)
    return math.sqrt(1.0 + 2.0 * float(error_clip_ratio))


def _rdp_accountant(history: list[tuple[float, float, int]]) -> Any:
    accountant = _opacus().RDPAccountant()
    # Opacus's own get_noise_multiplier sets the history this way: (noise multiplier, sample rate, steps)
    accountant.history = [tuple(h) for h in history]
    return accountant


def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε spent after ``steps`` steps of the subsampled Gaussian mechanism (Opacus's RDP accountant); 0 for no
    steps, ``inf`` for ``noise_multiplier`` 0."""
    _SIGMA.check("noise_multiplier", noise_multiplier)
    _SAMPLE_RATE.check("sample_rate", sample_rate)
    _STEPS.check("steps", steps)
    delta = check_delta(delta)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    return float(_rdp_accountant([(float(noise_multiplier), float(sample_rate), steps)]).get_epsilon(delta=delta))


def noise_multiplier_for(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, epsilon_tolerance: float = 0.01
) -> float:
    """The noise multiplier σ for which ``steps`` steps at ``sample_rate`` spend at most ``target_epsilon``
    (Opacus's ``get_noise_multiplier`` with the RDP accountant; ε(σ) is within ``epsilon_tolerance`` below the
    target). For DiceSGD pass this σ as its ``noise_multiplier``: it inflates the noise itself (official practice)."""
    POSITIVE.check("target_epsilon", target_epsilon)
    _SAMPLE_RATE.check("sample_rate", sample_rate)
    Interval(1, integer=True).check("steps", steps)
    POSITIVE.check("epsilon_tolerance", epsilon_tolerance)
    delta = check_delta(delta)
    accountants = _opacus()
    with warnings.catch_warnings():
        # the bisection's probes at far-off sigmas hit the edge of the orders; only the answer's epsilon matters
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        sigma = accountants.utils.get_noise_multiplier(
            target_epsilon=float(target_epsilon),
            target_delta=delta,
            sample_rate=float(sample_rate),
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=float(epsilon_tolerance),
        )
    return float(sigma)


class PrivacyAccountant:
    """The privacy spent by a training run, step by step: ``step(noise_multiplier=σ, sample_rate=q)`` after each
    optimizer step, ``epsilon()`` at any time (Opacus's RDP accountant over the recorded history).

    ``delta`` is the δ of the reported (ε, δ) (0 < δ < 1; :func:`default_delta` gives the library's 1/N). The
    history, a list of ``[σ, q, steps]`` runs, round-trips through ``state_dict`` (plain numbers: loads with
    ``torch.load(weights_only=True)``).
    """

    def __init__(self, delta: float) -> None:
        self.delta = check_delta(delta)
        self.history: list[tuple[float, float, int]] = []

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        _SIGMA.check("noise_multiplier", noise_multiplier)
        _SAMPLE_RATE.check("sample_rate", sample_rate)
        _STEPS.check("steps", steps)
        if steps == 0:
            return
        sigma, q = float(noise_multiplier), float(sample_rate)
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + steps)
        else:
            self.history.append((sigma, q, steps))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the accountant's δ); ``inf`` if any step had no noise."""
        delta = self.delta if delta is None else check_delta(delta)
        if not self.history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in self.history):
            return math.inf
        return float(_rdp_accountant(self.history).get_epsilon(delta=delta))

    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta = check_delta(state["delta"])
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
