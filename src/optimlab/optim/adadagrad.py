r"""AdAdaGrad and AdAdaGrad-Norm: batch sizes that grow by a statistical test, with AdaGrad step sizes.

Paper: Lau, Liu, Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods", arXiv
`2402.11215 <https://arxiv.org/abs/2402.11215>`_. Official code: https://github.com/timlautk/AdAdaGrad
(``tests.py``: the tests; ``main.py``: the batch-size rule).

**The tests.** At step :math:`k` let :math:`g_i` be the per-sample gradients (over all parameters, flattened) of
the :math:`b` examples of the test sample (:mod:`optimlab.per_sample`), :math:`\bar g` their mean and
:math:`\operatorname{Var}_i` the unbiased sample variance over :math:`i` (dividing by :math:`b-1`, so
:math:`b \ge 2`). Each test accepts the batch when a variance is small next to :math:`\lVert\bar g\rVert`, and
otherwise proposes the batch size :math:`\hat b` at which it would be accepted:

.. math::

    \text{norm test (Byrd et al., 2012):}\quad
        \hat b &= \frac{\sum_{j=1}^d \operatorname{Var}_i(g_{i,j})}{\eta^2\,\lVert\bar g\rVert^2} \\
    \text{inner-product test (Bollapragada et al., 2018):}\quad
        \hat b &= \frac{\operatorname{Var}_i\langle g_i, \bar g\rangle}{\theta^2\,\lVert\bar g\rVert^4} \\
    \text{orthogonality test:}\quad
        \hat b &= \frac{\sum_{j=1}^d \operatorname{Var}_i\big(g_i - \tfrac{\langle g_i,\bar g\rangle}
        {\lVert\bar g\rVert^2}\bar g\big)_j}{\nu^2\,\lVert\bar g\rVert^2} \\
    \text{augmented inner-product test:}\quad
        \hat b &= \max\big(\hat b_{\text{inner product}},\, \hat b_{\text{orthogonality}}\big)

The variances are summed over coordinates (a trace, the ℓ1 norm of the coordinate-wise variance, as in the official
code), not a norm of a vector of variances. The test passes when :math:`\hat b \le b`. A zero mean gradient with
a nonzero variance gives :math:`\hat b = \infty`; a zero variance gives :math:`\hat b = 0`.

**The batch-size rule**, applied every ``test_interval`` steps while :math:`b_k < B_{max}`:

.. math::

    b_{k+1} = \min\big(B_{max},\ \max(b_k,\ \lceil\hat b\rceil)\big)

so batch sizes never decrease and never exceed :math:`B_{max}`. :math:`b_k` is the current batch size, as in the
paper; the official code compares with the size of the test sample, which is the same unless the test runs on a
sub-sample (``test_sample_size``), where the code's rule could shrink the batch and the paper's cannot.

**Step sizes.** *AdAdaGrad* is this rule driving :class:`torch.optim.Adagrad`, which is the paper's coordinate-wise
AdaGrad: :math:`v \leftarrow v + g^2`, :math:`\theta \leftarrow \theta - \alpha\, g/(\sqrt v + \epsilon)` with
:math:`v_0` = ``initial_accumulator_value`` (use ``lr_decay=0``, its default; ``eps`` sits outside the square
root). *AdAdaGrad-Norm* drives :class:`AdaGradNorm`, the scalar AdaGrad-Norm of the paper
(Ward, Wu, Bottou, arXiv 1806.01811), one accumulator for the whole model:

.. math::

    g &\leftarrow g + \lambda\theta \qquad\text{(L2 decay, as torch.optim.Adagrad)} \\
    \beta^2 &\leftarrow \beta^2 + \lVert g\rVert^2 \qquad\text{(the norm over all parameters of all groups)} \\
    \theta &\leftarrow \theta - \alpha\, \frac{g}{\sqrt{\beta^2} + \epsilon}

with :math:`\beta_0^2` = ``initial_accumulator_value``. The official ``adagradnorm.py`` differs: it keeps one
accumulator per output row of each weight matrix (per output channel of a convolution), the variant of the
AdaGrad-stepsizes code, and its ``weight_decay`` subtracts ``lr·λ·g``. optimlab implements the paper's scalar
algorithm, the one its convergence theorem is about, and torch's L2 decay. The accumulator is kept as one
:math:`\sum_t\lVert g_{p,t}\rVert^2` per parameter tensor and :math:`\beta^2` is their sum, so a parameter without
a gradient counts as a zero gradient, exactly as in the scalar algorithm: one joining late shares the running
accumulator rather than starting its own. Groups may set ``lr`` and ``weight_decay``; ``eps`` and
``initial_accumulator_value`` belong to the shared accumulator and are set in the constructor only.

**Usage.** The :class:`AdaptiveBatchSampler` feeds a ``DataLoader``; the :class:`BatchSizeController` tests each
batch (at the parameters its gradient is taken at) and grows the sampler's batch size::

    sampler = AdaptiveBatchSampler(dataset, batch_size=64, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler)
    controller = BatchSizeController(model, F.cross_entropy, sampler, test="norm", eta=0.1, max_batch_size=50_000)
    opt = AdaGradNorm(model.parameters(), lr=1.0)           # or torch.optim.Adagrad(...) for AdAdaGrad
    for epoch in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            controller.step(x, y)                           # before opt.step(): the same parameters
            opt.step()

The paper keeps the learning rate fixed as the batch grows. With ``num_workers > 0`` a ``DataLoader`` draws index
lists ahead (``prefetch_factor × num_workers`` batches), and those keep the size they were drawn with: a new size
shows from the next batch drawn.

Hyperparameters (defaults): test ``eta`` :math:`\eta` 0.1, ``theta`` :math:`\theta` 0.1, ``nu`` :math:`\nu` 0.1
(official code; its README also uses :math:`\eta = 0.5` and :math:`\theta = 0.5, \nu = 1`), ``test`` ``"norm"``,
``test_interval`` 1, ``max_batch_size`` 50000, initial batch size 64 (official command line). AdaGradNorm: ``lr``
1.0, ``initial_accumulator_value`` 0.01, ``eps`` 1e-10 (official ``adagradnorm.py``), ``weight_decay`` 0.0.

Coming from AdamW: AdaGradNorm's ``lr`` is a length: the first step moves the parameters by about ``lr`` in norm
(:math:`\beta_1 \approx \lVert g_1\rVert`), and later steps shrink as :math:`\beta` accumulates. Start near 1 and
tune on a log grid; no schedule is needed for convergence. The batch size test is independent of the optimizer:
``BatchSizeController`` also drives SGD or AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Sampler

from optimlab._core.optimizer import LOW_PRECISION, OptimlabOptimizer, as_float, state_dtype
from optimlab._core.validation import NON_NEGATIVE, POSITIVE, Choice, Flag, Interval
from optimlab.per_sample import per_sample_grads
from optimlab.registry import Capabilities, MethodInfo, register

__all__ = [
    "TESTS",
    "AdaGradNorm",
    "AdaptiveBatchSampler",
    "BatchSizeController",
    "TestResult",
    "adagrad_norm_",
    "augmented_inner_product_test",
    "inner_product_test",
    "next_batch_size",
    "norm_test",
    "orthogonality_test",
]

PerSampleGrads = Mapping[str, Tensor] | Sequence[Tensor] | Tensor


# -- the tests -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TestResult:
    """The outcome of one test on one sample of per-sample gradients.

    ``estimate`` is :math:`\\hat b` (``inf`` for a zero mean gradient with nonzero variance); ``variance`` the
    numerator of the test (for the augmented test, the inner-product one, with ``orthogonal_variance`` the other);
    ``grad_norm_sq`` is :math:`\\lVert\\bar g\\rVert^2`; ``sample_size`` is :math:`b`.
    """

    __test__ = False  # not a pytest test class

    test: str
    estimate: float
    sample_size: int
    grad_norm_sq: float
    variance: float
    orthogonal_variance: float | None = None

    @property
    def passed(self) -> bool:
        """Whether the sample was large enough, :math:`\\hat b \\le b`."""
        return self.estimate <= self.sample_size


def _blocks(per_sample_grads: PerSampleGrads) -> tuple[list[Tensor], int]:
    """The per-sample gradients as ``(b, d_l)`` matrices, one per parameter tensor, and ``b``."""
    if isinstance(per_sample_grads, Tensor):
        raw = [per_sample_grads]
    elif isinstance(per_sample_grads, Mapping):
        raw = list(per_sample_grads.values())
    else:
        raw = list(per_sample_grads)
    if not raw or not all(isinstance(g, Tensor) and g.dim() >= 1 for g in raw):
        raise TypeError("per-sample gradients must be (b, ...) tensors: a dict as per_sample_grads returns, or a list")
    sizes = {g.shape[0] for g in raw}
    if len(sizes) != 1:
        raise ValueError(f"per-sample gradients disagree on the number of samples: {sorted(sizes)}")
    b = sizes.pop()
    if b < 2:
        raise ValueError(
            f"the batch-size tests need at least 2 per-sample gradients (the unbiased variance divides by b - 1); "
            f"got {b}: test on batches of 2 or more examples"
        )
    return [g.detach().reshape(b, -1) for g in raw], b


def _accumulation_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64  # MPS has no float64


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return 0.0 if numerator == 0 else math.inf  # no noise at all / noise around a zero gradient


def _moments(blocks: list[Tensor]) -> tuple[list[Tensor], Tensor, torch.dtype]:
    """Mean gradient of each block and :math:`\\lVert\\bar g\\rVert^2` over all blocks."""
    dtype = _accumulation_dtype(blocks[0])
    means = [g.mean(dim=0) for g in blocks]
    norm_sq = sum(m.square().sum(dtype=dtype).to(blocks[0].device) for m in means)
    return means, norm_sq, dtype


def _inner_products(blocks: list[Tensor], means: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """:math:`\\langle g_i^l, \\bar g^l\\rangle` per block ``l``: one ``(b,)`` vector each."""
    return [(g @ m).to(dtype) for g, m in zip(blocks, means)]


def _orthogonal_variance(blocks: list[Tensor], means: list[Tensor], coefficients: list[Tensor], dtype) -> Tensor:
    """:math:`\\sum_j \\operatorname{Var}_i (g_i - c_i \\bar g)_j` with ``coefficients[l]`` the :math:`c_i` of block l."""
    total = 0
    for g, m, c in zip(blocks, means, coefficients):
        residual = g.to(dtype) - c.to(dtype)[:, None] * m.to(dtype)[None, :]
        total = total + torch.var(residual, dim=0, correction=1).sum().to(blocks[0].device)
    return total


def norm_test(per_sample_grads: PerSampleGrads, eta: float = 0.1) -> TestResult:
    """The norm test on per-sample gradients (a dict as :func:`~optimlab.per_sample.per_sample_grads` returns, a
    list of ``(b, ...)`` tensors or one ``(b, d)`` matrix); see the module docstring."""
    _check_positive("eta", eta)
    blocks, b = _blocks(per_sample_grads)
    means, norm_sq, dtype = _moments(blocks)
    # in the accumulation dtype: 16-bit per-sample gradients would overflow their squared deviations
    variance = sum(torch.var(g.to(dtype), dim=0, correction=1).sum().to(norm_sq.device) for g in blocks)
    variance, norm_sq = torch.stack([variance, norm_sq]).tolist()
    return TestResult("norm", _ratio(variance, eta**2 * norm_sq), b, norm_sq, variance)


def _inner_product_parts(
    blocks: list[Tensor], means: list[Tensor], norm_sq: Tensor, dtype: torch.dtype, blockwise: bool
) -> tuple[Tensor, list[Tensor]]:
    """The variance of the inner products and the projection coefficients :math:`c_i` of the orthogonality test."""
    inner = _inner_products(blocks, means, dtype)
    device = norm_sq.device
    if blockwise:  # the official code: each parameter tensor on its own
        variance = sum(torch.var(p, correction=1).to(device) for p in inner)
        block_norms = [m.square().sum(dtype=dtype) for m in means]
        coefficients = [torch.where(n > 0, p / n, 0.0) for p, n in zip(inner, block_norms)]
    else:
        total = sum(p.to(device) for p in inner)
        variance = torch.var(total, correction=1)
        c = torch.where(norm_sq > 0, total / norm_sq, 0.0)
        coefficients = [c.to(g.device) for g in blocks]
    return variance, coefficients


def inner_product_test(per_sample_grads: PerSampleGrads, theta: float = 0.1, *, blockwise: bool = False) -> TestResult:
    """The inner-product test. ``blockwise=True`` is the official code's form: the variance of
    :math:`\\langle g_i^l, \\bar g^l\\rangle` for each parameter tensor :math:`l`, summed over tensors (it leaves out
    the covariances between tensors); the default is the test as defined, over the whole gradient."""
    _check_positive("theta", theta)
    blocks, b = _blocks(per_sample_grads)
    means, norm_sq, dtype = _moments(blocks)
    variance, _ = _inner_product_parts(blocks, means, norm_sq, dtype, blockwise)
    variance, norm_sq = torch.stack([variance, norm_sq]).tolist()
    return TestResult("inner_product", _ratio(variance, theta**2 * norm_sq**2), b, norm_sq, variance)


def orthogonality_test(per_sample_grads: PerSampleGrads, nu: float = 0.1, *, blockwise: bool = False) -> TestResult:
    """The orthogonality test; ``blockwise=True`` projects each parameter tensor's gradients on that tensor's mean
    gradient (the official code), the default projects whole gradients."""
    _check_positive("nu", nu)
    blocks, b = _blocks(per_sample_grads)
    means, norm_sq, dtype = _moments(blocks)
    _, coefficients = _inner_product_parts(blocks, means, norm_sq, dtype, blockwise)
    variance = _orthogonal_variance(blocks, means, coefficients, dtype)
    variance, norm_sq = torch.stack([variance, norm_sq]).tolist()
    return TestResult("orthogonality", _ratio(variance, nu**2 * norm_sq), b, norm_sq, variance)


def augmented_inner_product_test(
    per_sample_grads: PerSampleGrads, theta: float = 0.1, nu: float = 0.1, *, blockwise: bool = False
) -> TestResult:
    """The augmented inner-product test: the larger of the inner-product and orthogonality estimates (official
    ``ip+orth``)."""
    _check_positive("theta", theta)
    _check_positive("nu", nu)
    blocks, b = _blocks(per_sample_grads)
    means, norm_sq, dtype = _moments(blocks)
    inner_variance, coefficients = _inner_product_parts(blocks, means, norm_sq, dtype, blockwise)
    orthogonal = _orthogonal_variance(blocks, means, coefficients, dtype)
    inner_variance, orthogonal, norm_sq = torch.stack([inner_variance, orthogonal, norm_sq]).tolist()
    estimate = max(_ratio(inner_variance, theta**2 * norm_sq**2), _ratio(orthogonal, nu**2 * norm_sq))
    return TestResult("augmented_inner_product", estimate, b, norm_sq, inner_variance, orthogonal)


TESTS = {
    "norm": norm_test,
    "inner_product": inner_product_test,
    "orthogonality": orthogonality_test,
    "augmented_inner_product": augmented_inner_product_test,
}


def _check_positive(name: str, value: Any) -> None:
    POSITIVE.check(name, value)


def next_batch_size(current: int, estimate: float, max_batch_size: int) -> int:
    """The paper's rule :math:`\\min(B_{max}, \\max(b_k, \\lceil\\hat b\\rceil))`."""
    if math.isnan(estimate):
        raise ValueError("the test's batch-size estimate is NaN: the per-sample gradients hold a NaN or inf")
    if estimate >= max_batch_size:
        return max_batch_size
    return min(max_batch_size, max(current, math.ceil(estimate)))


# -- the sampler -----------------------------------------------------------------------------------------------------
_POSITIVE_INT = Interval(1, integer=True)


class AdaptiveBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices whose length is the current :attr:`batch_size`, which may change between
    batches; use it as ``DataLoader(dataset, batch_sampler=sampler)``.

    Each epoch visits every index once, in a random order drawn from ``seed + epoch`` (``shuffle=True``) or in
    order. The last batch of an epoch holds what is left (dropped with ``drop_last=True``). Iterating resumes where
    the previous iteration stopped: an epoch interrupted by a ``break`` continues on the next ``iter()``, and a
    finished epoch starts the next one; :meth:`state_dict` saves the epoch and the position in it.
    """

    def __init__(
        self, data_source: Sized | int, batch_size: int, *, shuffle: bool = True, drop_last: bool = False, seed: int = 0
    ) -> None:
        num_samples = data_source if isinstance(data_source, int) else len(data_source)
        _POSITIVE_INT.check("num_samples", num_samples)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.epoch, self.position = 0, 0

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        _POSITIVE_INT.check("batch_size", value)
        self._batch_size = int(value)

    def _order(self) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        while self.position < self.num_samples:
            end = self.position + self._batch_size
            if end > self.num_samples and self.drop_last:
                break
            batch = order[self.position : end].tolist()
            self.position = min(end, self.num_samples)
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        """Batches in one epoch at the current batch size."""
        full, rest = divmod(self.num_samples, self._batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def state_dict(self) -> dict[str, int]:
        return {"batch_size": self._batch_size, "epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.batch_size = state["batch_size"]
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


# -- the controller --------------------------------------------------------------------------------------------------
class BatchSizeController:
    """Runs a batch-size test on the current batch every ``test_interval`` steps and grows ``sampler.batch_size`` by
    :func:`next_batch_size` (see the module docstring).

    ``sampler`` is anything with a settable integer ``batch_size`` (an :class:`AdaptiveBatchSampler`).
    ``test`` is one of :data:`TESTS`; ``eta``, ``theta``, ``nu`` are its tolerances; ``blockwise`` selects the
    official code's per-tensor inner-product and orthogonality tests. ``test_sample_size`` caps the examples the
    test uses (the first ones of the batch; the official ``max_test_micro_batch_size``), to bound the memory of
    per-sample gradients; ``chunk_size`` and ``randomness`` go to :func:`~optimlab.per_sample.per_sample_grads`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        sampler: Any,
        *,
        test: str = "norm",
        eta: float = 0.1,
        theta: float = 0.1,
        nu: float = 0.1,
        max_batch_size: int = 50_000,
        test_interval: int = 1,
        test_sample_size: int | None = None,
        blockwise: bool = False,
        chunk_size: int | None = None,
        randomness: str = "different",
    ) -> None:
        Choice(tuple(TESTS)).check("test", test)
        Flag().check("blockwise", blockwise)
        for name, value in (("eta", eta), ("theta", theta), ("nu", nu)):
            _check_positive(name, value)
        _POSITIVE_INT.check("test_interval", test_interval)
        Interval(2, integer=True).check("max_batch_size", max_batch_size)
        if test_sample_size is not None:
            Interval(2, integer=True).check("test_sample_size", test_sample_size)
        if not isinstance(getattr(sampler, "batch_size", None), int):
            raise TypeError(
                f"the sampler must have an integer batch_size the controller can set, such as AdaptiveBatchSampler; "
                f"got {type(sampler).__name__}"
            )
        if not 2 <= sampler.batch_size <= max_batch_size:
            raise ValueError(
                f"Invalid batch_size: {sampler.batch_size!r} (the sampler's); expected an integer with "
                f"2 <= batch_size <= max_batch_size = {max_batch_size} (the test's variance needs 2 examples)"
            )
        self.model, self.loss_fn, self.sampler = model, loss_fn, sampler
        self.test, self.max_batch_size, self.test_interval = test, max_batch_size, test_interval
        self.test_sample_size, self.blockwise = test_sample_size, blockwise
        self.chunk_size, self.randomness = chunk_size, randomness
        self._tolerances = {"norm": {"eta": eta}, "inner_product": {"theta": theta}, "orthogonality": {"nu": nu}}
        self._tolerances["augmented_inner_product"] = {"theta": theta, "nu": nu}
        self.num_steps = 0
        self.last_result: TestResult | None = None

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def run_test(self, inputs: Any, targets: Tensor | None = None) -> TestResult:
        """The configured test on this batch (its first ``test_sample_size`` examples), without changing anything."""
        if self.test_sample_size is not None:
            cut = slice(0, self.test_sample_size)
            inputs = tuple(x[cut] for x in inputs) if isinstance(inputs, tuple | list) else inputs[cut]
            targets = None if targets is None else targets[cut]
        grads = per_sample_grads(
            self.model, self.loss_fn, inputs, targets, chunk_size=self.chunk_size, randomness=self.randomness
        )
        options = dict(self._tolerances[self.test])
        if self.test != "norm":
            options["blockwise"] = self.blockwise
        return TESTS[self.test](grads, **options)

    def step(self, inputs: Any, targets: Tensor | None = None) -> TestResult | None:
        """Account for one training step on the batch ``(inputs, targets)``: on test steps (the first, then every
        ``test_interval``-th, while the batch size is below ``max_batch_size``) test the batch and set the
        sampler's batch size for the batches to come. Returns the test's result, or ``None`` when no test ran
        (also for a batch of a single example, the tail of an epoch, which carries no variance).

        Call it before ``optimizer.step()``, so that the test sees the parameters the step's gradient was taken at.
        """
        due = self.num_steps % self.test_interval == 0
        self.num_steps += 1
        first = inputs[0] if isinstance(inputs, tuple | list) else inputs
        if not due or self.sampler.batch_size >= self.max_batch_size or first.shape[0] < 2:
            return None
        result = self.run_test(inputs, targets)
        self.sampler.batch_size = next_batch_size(self.sampler.batch_size, result.estimate, self.max_batch_size)
        self.last_result = result
        return result

    def state_dict(self) -> dict[str, int]:
        """The step count (the sampler saves the batch size with its own ``state_dict``)."""
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.num_steps = int(state["num_steps"])


# -- AdaGrad-Norm ----------------------------------------------------------------------------------------------------
def adagrad_norm_(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float | Sequence[float],
    eps: float,
    weight_decay: float | Sequence[float] = 0.0,
    initial_accumulator_value: float = 0.0,
    idle_states: Iterable[dict[str, Any]] = (),
) -> None:
    """Functional AdaGrad-Norm: one step on ``params`` with one scalar accumulator, in place (``grads`` are only
    read).

    Each state holds ``sum_sq``, a 0-dim tensor: :math:`\\sum_t \\lVert g_{p,t}\\rVert^2` of its parameter. The
    accumulator :math:`\\beta^2` is ``initial_accumulator_value`` plus the ``sum_sq`` of ``states`` and of
    ``idle_states`` (parameters without a gradient this step, whose past gradients still count). ``lr`` and
    ``weight_decay`` are numbers, or one number per parameter.
    """
    if not params:
        return
    lrs = [lr] * len(params) if isinstance(lr, int | float) else list(lr)
    decays = [weight_decay] * len(params) if isinstance(weight_decay, int | float) else list(weight_decay)
    grads = [g if wd == 0 else g.add(p, alpha=wd) for p, g, wd in zip(params, grads, decays)]
    for g, state in zip(grads, states):
        norm = torch.linalg.vector_norm(g, dtype=state["sum_sq"].dtype)
        state["sum_sq"].add_(norm.square())
    sums = [s["sum_sq"] for s in (*states, *idle_states)]
    device = params[0].device
    dtype = sums[0].dtype
    for s in sums[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    accumulator = torch.stack([s.to(device, dtype) for s in sums]).sum() + initial_accumulator_value
    denominator = accumulator.sqrt_().add_(eps)
    for p, g, step_size in zip(params, grads, lrs):
        p.addcdiv_(g, denominator.to(p.device, p.dtype), value=-step_size)


class AdaGradNorm(OptimlabOptimizer):
    __doc__ = __doc__
    functional = staticmethod(adagrad_norm_)
    shared_hyperparameters = ("eps", "initial_accumulator_value")  # of the one accumulator, not of a group

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1.0,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.01,
    ) -> None:
        super().__init__(params, self._defaults_from_arguments(locals()))

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return {"sum_sq": torch.zeros((), dtype=state_dtype(p), device=p.device)}

    def _apply(self, batches: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[dict]]]) -> None:
        # one step over every group at once: the accumulator couples them
        params, work, grads, states, lrs, decays = [], [], [], [], [], []
        for group, group_params, group_grads, group_states in batches:
            for p, g, state in zip(group_params, group_grads, group_states):
                w = p.float() if p.dtype in LOW_PRECISION else p
                params.append(p), work.append(w), grads.append(g.to(w.dtype)), states.append(state)
                lrs.append(as_float(group["lr"])), decays.append(group["weight_decay"])
        if not params:
            return
        stepping = set(map(id, params))
        # parameters without a gradient now, whose past gradients count (``get`` adds no empty state)
        idle = [s for g in self.param_groups for p in g["params"] if id(p) not in stepping and (s := self.state.get(p))]
        adagrad_norm_(work, grads, states, lr=lrs, weight_decay=decays, idle_states=idle, **self._shared())
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)


register(
    MethodInfo(
        name="adagradnorm",
        cls=AdaGradNorm,
        kind="optimizer",
        paper="AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods",
        arxiv="2402.11215",
        code_url="https://github.com/timlautk/AdAdaGrad",
        summary="AdaGrad-Norm: one step size for the whole model, from the running sum of squared gradient norms",
        hyperparameters={
            "lr": NON_NEGATIVE,
            "eps": NON_NEGATIVE,
            "weight_decay": NON_NEGATIVE,
            "initial_accumulator_value": NON_NEGATIVE,
        },
        lr_range=(1e-2, 1e1),
        batch_scaling="sqrt",
        capabilities=Capabilities(global_state=True),
        exemptions={
            "param_groups": "one accumulator over all groups: grouped parameters are not separate optimizers",
            "missing_gradients": "one accumulator: a late parameter joins the shared running sum of squared norms",
            "convergence": "lr is a distance (the first step moves about lr): the battery's ill-conditioned quadratic "
            "needs lr 3-100, above its grid's 1.0 (tests/optim/test_adadagrad.py checks it there)",
        },
        advice="lr ~ 1 (a first step of about lr in norm), tuned on a log grid; no schedule needed. Pair with "
        "BatchSizeController for AdAdaGrad-Norm.",
    )
)
