r"""WTA-CRS: a linear layer whose backward pass estimates the weight gradient from a sample of the saved rows.

Paper: Liu, Wang, Zhong, Xu, Zha, Tang, Jiang, Zhou, Chaudhary, Xu, Hu, "Winner-Take-All Column Row Sampling for
Memory Efficient Adaptation of Language Model", NeurIPS 2023, arXiv `2305.15265
<https://arxiv.org/abs/2305.15265>`_. Official code: https://github.com/zirui-ray-liu/WTACRS
(``seq2seq/approxlinear/functional.py``, ``scheme.py``, ``config.py``, ``scripts/level_setup.sh``).

A linear layer :math:`Y = XW^\top + b` with :math:`X \in \mathbb R^{N\times d}` (all leading dimensions of the
input flattened into :math:`N` rows, i.e. tokens) keeps :math:`X` for the backward pass only to form the weight
gradient :math:`\nabla W = \Delta Y^\top X = \sum_{i=1}^N \delta y_i x_i^\top`; the input gradient
:math:`\Delta Y\, W` needs :math:`W` alone. WTA-CRS keeps :math:`k \ll N` rows of :math:`X` and estimates the
sum without bias. With probabilities :math:`p_i` over the rows, a budget of
:math:`k = \min(\max(\lfloor N\cdot\text{budget}\rfloor, \text{minimal\_k}), N)` rows, the deterministic set
:math:`C` of the :math:`|C|` most probable rows and :math:`s = k - |C|` rows :math:`j_1, \dots, j_s` drawn
i.i.d. with replacement from the complement with probabilities :math:`p_j / (1 - P_C)`,
:math:`P_C = \sum_{c\in C} p_c`:

.. math::

    p_i &= \frac{\lVert x_i\rVert\,\lVert\delta y_i\rVert + \epsilon}
               {\sum_j \lVert x_j\rVert\,\lVert\delta y_j\rVert + \epsilon}, \qquad \epsilon = 10^{-8} \\
    \widehat{\nabla W} &= \sum_{c\in C} \delta y_c\, x_c^\top
        + \frac{1}{s}\sum_{r=1}^{s} \frac{1 - P_C}{p_{j_r}}\, \delta y_{j_r} x_{j_r}^\top,
    \qquad \mathbb E\,\widehat{\nabla W} = \nabla W .

:math:`|C|` (``deter_adaptive=True``, the default) minimises the paper's variance bound: with :math:`q_c` the sum
of the :math:`c` largest probabilities,

.. math::

    |C| = \operatorname*{arg\,min}_{1 \le c < k} \frac{1 - q_c}{k - c}
    \quad\text{unless}\quad \frac1k < \min_{1 \le c < k} \frac{1 - q_c}{k - c},
    \ \text{in which case } |C| = 0 \text{ (plain column-row sampling)};

with ``deter_adaptive=False`` it is :math:`\lfloor k\cdot\text{deter\_ratio}\rfloor`. When :math:`P_C > 1 - 10^{-3}`
the sampled part is dropped (the official code's "long tail" rule). :math:`k = N` is the exact layer.

The forward pass is the exact :math:`Y = XW^\top + b`; it draws the sample (from the layer's own
:class:`torch.Generator`) and saves only the :math:`k` chosen rows of :math:`X`, their int64 indices and float32
weights, never :math:`X` itself. The backward pass returns the exact input gradient :math:`\Delta Y W`, the exact
bias gradient and the estimate of :math:`\nabla W`. At budget 0.3 the layer saves 0.3 of the activation bytes
of ``nn.Linear``, plus an int64 index and a float32 weight per kept row.

:math:`\lVert\delta y_i\rVert` is not known in the forward pass. As in the official code, it is read from a
per-example cache that the backward pass fills: when the caller says which training examples a batch holds
(:func:`wtacrs_example_ids`), the layer keeps :math:`\lVert\delta y\rVert` per (example id, row position within the
example) in bfloat16 on the CPU and uses the value from the example's previous visit. Without example ids, or
while a batch's cached norms are all zero (the first epoch), :math:`p_i \propto \lVert x_i\rVert` (the
documented fallback).

Where optimlab departs from or chooses within the official code:

- the sampled rows are reweighted by :math:`(1-P_C)/(s\,p_j)` also when the cache is empty. The official
  ``sample_with_replacement_3D`` skips the division by :math:`s\,p_j` in that case, which makes its first-epoch
  estimate biased (too small by about :math:`s/N`); the paper's estimator is unbiased, and so is this one;
- :math:`1 - P_C` is computed as the mass of the complement, :math:`\sum_{j\notin C} p_j`, the normaliser the
  sampler really uses (the smoothed :math:`p` sums to slightly more than 1), so the estimate is unbiased exactly;
- the score at :math:`c = k` (zero denominator) is excluded, and the whole rule runs on the device without a
  host synchronisation: the layer always saves :math:`k` rows, :math:`|C|` deterministic and :math:`k - |C|`
  sampled;
- ``mix_replacement`` of the paper's "level 2" runs (when the rule picks :math:`|C| = 0`, draw without
  replacement and do not reweight) is not offered: it is biased. ``sample_replacement=False`` is the official
  code's other biased mode (:math:`k` distinct rows drawn by :math:`p`, no deterministic set, no reweighting),
  kept for ablations only;
- the cache is per layer, not a process-wide buffer, and grows to the largest example id and row count seen
  (doubling its capacity, so increasing ids cost a logarithmic number of copies; :class:`ExampleNormCache` can
  also be preallocated).

Hyperparameters (defaults) of :class:`WTACRSLinear`, besides those of ``nn.Linear``: ``budget`` 0.3 (the
fraction of rows kept; the paper's main GLUE runs use 0.3, its "level 2" configuration; the official
``ApproxLinearConfig`` default 1.0 means off), ``minimal_k`` 10, ``deter_adaptive`` True, ``deter_ratio`` 0.5
(used only when ``deter_adaptive`` is False), ``sample_replacement`` True, ``seed`` 0 (of the layer's generator;
:func:`replace_linear_layers` gives the i-th swapped layer ``seed + i``).

Coming from ``nn.Linear``: swap the layers of a model with :func:`replace_linear_layers` (parameters are
shared, so an optimizer built before or after keeps working). The paper's main runs ("level 2") sample the
attention output projection and the feed-forward layers, not the query/key/value projections. In ``eval()``
mode, under ``torch.no_grad()`` or for a frozen weight the layer is exactly ``nn.Linear``. Its ``state_dict`` is
``nn.Linear``'s (the generator and the norm cache are not saved), so checkpoints load into either.

Resuming: to continue a run with the same draws, save :func:`wtacrs_rng_state` next to the ``state_dict`` and
restore it with :func:`load_wtacrs_rng_state` after moving the model to its device::

    torch.save({"model": model.state_dict(), "wtacrs_rng": wtacrs_rng_state(model)}, path)
    ...
    checkpoint = torch.load(path, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    load_wtacrs_rng_state(model, checkpoint["wtacrs_rng"])

The norm cache is not part of it: with example ids, the resumed run samples by :math:`\lVert x\rVert` until each
example's next visit refills the cache, so its draws differ from the uninterrupted run's for that epoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimlab._core.validation import Flag, Interval, check_hyperparameters
from optimlab.registry import Capabilities, MethodInfo, register

__all__ = [
    "ExampleNormCache",
    "WTACRSLinear",
    "deterministic_count",
    "load_wtacrs_rng_state",
    "replace_linear_layers",
    "row_probabilities",
    "sample_size",
    "wtacrs_example_ids",
    "wtacrs_linear",
    "wtacrs_rng_state",
    "wtacrs_sample",
]

EPS = 1e-8  # smoothing of the probabilities (official value)
LONG_TAIL = 1e-3  # the sampled part is dropped when the deterministic set holds more than 1 - LONG_TAIL


@dataclass(frozen=True)
class _ExplainedInterval(Interval):
    """An interval whose error message also says why the bound is there."""

    reason: str = ""

    def describe(self, name: str) -> str:
        return f"{super().describe(name)} ({self.reason})"


# the rules of the hyperparameters that shape the sample, shared by the functional form, the layer's constructor
# and its setters
SAMPLING_HYPERPARAMETERS = {
    "budget": Interval(0.0, 1.0, low_closed=False),
    "minimal_k": Interval(1, integer=True),
    "deter_ratio": _ExplainedInterval(
        0.0,
        1.0,
        high_closed=False,
        reason="at 1 every kept row would be deterministic: a top-k estimate with no sampled part, biased; "
        "use budget=1.0 for the exact gradient",
    ),
}


# -- functional core ------------------------------------------------------------------------------------------
def sample_size(n_rows: int, budget: float, minimal_k: int) -> int:
    """:math:`k = \\min(\\max(\\lfloor N\\cdot\\text{budget}\\rfloor, \\text{minimal\\_k}), N)`."""
    return min(max(int(n_rows * budget), minimal_k), n_rows)


def row_probabilities(x_norms: Tensor, grad_norms: Tensor | None = None) -> Tensor:
    """:math:`p_i \\propto \\lVert x_i\\rVert\\lVert\\delta y_i\\rVert`, smoothed as in the official code; without
    ``grad_norms``, or when they are all zero, :math:`p_i \\propto \\lVert x_i\\rVert`. Float32 or wider."""
    scores = x_norms
    if grad_norms is not None:
        scores = torch.where(grad_norms.sum() == 0, x_norms, x_norms * grad_norms)
    return (scores + EPS) / (scores.sum() + EPS)


def deterministic_count(top_probs: Tensor, *, adaptive: bool = True, deter_ratio: float = 0.5) -> Tensor:
    """:math:`|C|` as a 0-dim int64 tensor, from the :math:`k` largest probabilities in descending order.

    Adaptive: the :math:`c \\in [1, k)` minimising :math:`(1 - q_c)/(k - c)`, or 0 if :math:`1/k` is below that
    minimum; otherwise :math:`\\lfloor k\\cdot\\text{deter\\_ratio}\\rfloor`."""
    k = top_probs.numel()
    if not adaptive:
        return torch.tensor(int(k * deter_ratio), device=top_probs.device)
    if k < 2:
        return torch.zeros((), dtype=torch.long, device=top_probs.device)
    c = torch.arange(1, k, device=top_probs.device)
    scores = (1 - torch.cumsum(top_probs, 0)[: k - 1]) / (k - c)
    best, at = scores.min(0)
    return torch.where(best > 1 / k, 0, at + 1)


def wtacrs_sample(
    probs: Tensor,
    k: int,
    *,
    adaptive: bool = True,
    deter_ratio: float = 0.5,
    replacement: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw the rows of the estimator: ``(rows, weights)``, both of length ``k``, such that
    :math:`\\sum_r \\text{weights}_r\\, \\delta y_{\\text{rows}_r} x_{\\text{rows}_r}^\\top` estimates
    :math:`\\sum_i \\delta y_i x_i^\\top` without bias. The first :math:`|C|` entries are the deterministic set
    (weight 1), the others the draws from its complement. ``probs`` is a 1-d float tensor summing to ~1."""
    if not replacement:  # the official code's without-replacement mode: biased, no reweighting
        rows = torch.multinomial(probs, k, replacement=False, generator=generator)
        return rows, torch.ones(k, dtype=probs.dtype, device=probs.device)
    top, top_rows = torch.topk(probs, k)
    n_det = deterministic_count(top, adaptive=adaptive, deter_ratio=deter_ratio)
    is_det = torch.arange(k, device=probs.device) < n_det
    complement = probs.scatter(0, top_rows, torch.where(is_det, 0, top))
    mass = complement.sum()  # the sampler's normaliser, so the weights below make the estimate exactly unbiased
    long_tail = torch.where(is_det, top, 0).sum() > 1 - LONG_TAIL
    # in the long-tail case the draws are discarded (weight 0); sampling uniformly keeps the shapes fixed
    draws = torch.multinomial(torch.where(long_tail, 1.0, complement), k, replacement=True, generator=generator)
    rows = torch.where(is_det, top_rows, draws)
    sampled_weight = mass / ((k - n_det) * probs[draws])
    weights = torch.where(is_det, 1.0, torch.where(long_tail, 0.0, sampled_weight))
    return rows, weights


class ExampleNormCache:
    """:math:`\\lVert\\delta y\\rVert` per (example id, row position within the example), bfloat16 on the CPU (as in
    the official code: it can be large), zero until the backward pass of the example's first visit writes it.

    ``num_examples`` and ``max_rows`` preallocate it (e.g. the dataset's size and sequence length). Beyond that it
    grows as ids and row counts arrive, each dimension to at least twice its previous capacity, so that increasing
    ids (an unshuffled loader) cost a logarithmic number of reallocations, not one per batch (quadratic copying)."""

    def __init__(self, num_examples: int = 0, max_rows: int = 0) -> None:
        check_hyperparameters(_CACHE_SIZES, {"num_examples": num_examples, "max_rows": max_rows})
        self._initial = (num_examples, max_rows)
        self.clear()

    @property
    def norms(self) -> Tensor:
        """The cached norms, ``(largest example id seen + 1, most rows seen)``: a view of the preallocated buffer."""
        return self._buffer[: self._examples, : self._rows]

    @property
    def capacity(self) -> tuple[int, int]:
        """The allocated ``(examples, rows)``, at least the shape of :attr:`norms`."""
        return tuple(self._buffer.shape)

    def _ensure(self, n_examples: int, rows: int) -> None:
        old = self._buffer
        if n_examples > old.shape[0] or rows > old.shape[1]:
            grown = torch.zeros(_grow(old.shape[0], n_examples), _grow(old.shape[1], rows), dtype=old.dtype)
            grown[: self._examples, : self._rows] = self.norms
            self._buffer = grown
        self._examples, self._rows = max(self._examples, n_examples), max(self._rows, rows)

    def read(self, ids: Tensor, rows: int, device: torch.device) -> Tensor:
        """The cached norms of the examples ``ids`` (CPU int64), ``rows`` each, flattened, float32 on ``device``."""
        self._ensure(int(ids.max()) + 1, rows)
        return self._buffer[ids, :rows].reshape(-1).to(device=device, dtype=torch.float32)

    def write(self, ids: Tensor, norms: Tensor) -> None:
        """Store ``norms`` of shape (len(ids), rows) for the examples ``ids``."""
        self._ensure(int(ids.max()) + 1, norms.shape[1])
        self._buffer[ids, : norms.shape[1]] = norms.detach().to(device="cpu", dtype=torch.bfloat16)

    def clear(self) -> None:
        """Forget every norm (back to the constructor's preallocation)."""
        self._buffer = torch.zeros(*self._initial, dtype=torch.bfloat16)
        self._examples = self._rows = 0


_CACHE_SIZES = {"num_examples": Interval(0, integer=True), "max_rows": Interval(0, integer=True)}


def _grow(capacity: int, needed: int) -> int:
    """The new capacity of one dimension: unchanged if it suffices, else at least doubled."""
    return capacity if needed <= capacity else max(needed, 2 * capacity)


class _WTACRSLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        k: int,
        options: dict[str, Any],
        example_ids: Tensor | None,
        cache: ExampleNormCache | None,
    ) -> Tensor:
        y = F.linear(x, weight, bias)
        x2d = x.reshape(-1, x.shape[-1])
        n = x2d.shape[0]
        ctx.has_bias, ctx.input_shape = bias is not None, x.shape
        ctx.example_ids, ctx.cache = example_ids, cache
        if k >= n:
            ctx.save_for_backward(x2d, None, None, weight)
            return y
        with torch.no_grad():
            grad_norms = None
            if example_ids is not None and cache is not None:
                grad_norms = cache.read(example_ids, n // example_ids.numel(), x.device)
            work = torch.promote_types(x.dtype, torch.float32)
            probs = row_probabilities(torch.linalg.vector_norm(x2d.to(work), dim=1), grad_norms)
            rows, weights = wtacrs_sample(probs, k, **options)
            ctx.save_for_backward(x2d[rows], rows, weights, weight)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x_rows, rows, weights, weight = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (dy @ weight).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            if rows is None:
                grad_w = dy.t() @ x_rows  # the product nn.Linear's backward forms: k = N is bit-identical
            else:
                grad_w = (dy[rows].to(weights.dtype) * weights[:, None]).to(dy.dtype).t() @ x_rows
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dy.sum(0)
        if ctx.example_ids is not None and ctx.cache is not None and ctx.example_ids.numel():
            norms = torch.linalg.vector_norm(dy.float(), dim=1)
            ctx.cache.write(ctx.example_ids, norms.view(ctx.example_ids.numel(), -1))
        return grad_x, grad_w, grad_b, None, None, None, None


def wtacrs_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    budget: float = 0.3,
    minimal_k: int = 10,
    deter_adaptive: bool = True,
    deter_ratio: float = 0.5,
    sample_replacement: bool = True,
    generator: torch.Generator | None = None,
    example_ids: Tensor | None = None,
    cache: ExampleNormCache | None = None,
) -> Tensor:
    """``F.linear(x, weight, bias)`` whose backward pass estimates the weight gradient by WTA-CRS (see the module
    docstring). ``example_ids`` (one int per entry of ``x``'s first dimension) and ``cache`` switch on the
    gradient-norm probabilities. Under ``torch.autocast`` the inputs are cast to the autocast dtype first, as
    ``nn.Linear`` would compute in it, so the saved rows are in that dtype too."""
    check_hyperparameters(
        SAMPLING_HYPERPARAMETERS, {"budget": budget, "minimal_k": minimal_k, "deter_ratio": deter_ratio}
    )
    if x.is_complex() or weight.is_complex():
        raise TypeError("WTA-CRS layers take real floating-point inputs and weights; use nn.Linear for complex ones")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if example_ids is not None:
        example_ids = _check_example_ids(example_ids, x)
    k = sample_size(x.numel() // x.shape[-1] if x.dim() else 1, budget, minimal_k)
    options = {
        "adaptive": deter_adaptive,
        "deter_ratio": deter_ratio,
        "replacement": sample_replacement,
        "generator": generator,
    }
    with torch.autocast(device_type, enabled=False):
        return _WTACRSLinearFunction.apply(x, weight, bias, k, options, example_ids, cache)


def _check_example_ids(ids: Tensor, x: Tensor) -> Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
        raise TypeError(
            f"example ids must be a 1-d integer tensor (one id per example), got {ids.dtype} {tuple(ids.shape)}"
        )
    if x.dim() < 2 or x.shape[0] != ids.numel():
        raise ValueError(
            f"{ids.numel()} example ids for an input of shape {tuple(x.shape)}: the input's first dimension must be "
            "the batch, one id per example"
        )
    ids = ids.to("cpu", torch.long)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("example ids must be non-negative (they index the gradient-norm cache)")
    return ids


# -- the layer -------------------------------------------------------------------------------------------------
class WTACRSLinear(nn.Linear):
    __doc__ = __doc__

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        budget: float = 0.3,
        minimal_k: int = 10,
        deter_adaptive: bool = True,
        deter_ratio: float = 0.5,
        sample_replacement: bool = True,
        seed: int = 0,
    ) -> None:
        options = {
            "budget": budget,
            "minimal_k": minimal_k,
            "deter_adaptive": deter_adaptive,
            "deter_ratio": deter_ratio,
            "sample_replacement": sample_replacement,
            "seed": seed,
        }
        check_hyperparameters(WTACRSLinear.info.hyperparameters, options)
        super().__init__(in_features, out_features, bias, device, dtype)
        self._budget, self._minimal_k, self._deter_ratio, self.seed = budget, minimal_k, deter_ratio, seed
        self.deter_adaptive, self.sample_replacement = deter_adaptive, sample_replacement
        self.norm_cache = ExampleNormCache()
        self.example_ids: Tensor | None = None  # set per batch by wtacrs_example_ids
        self._generator: torch.Generator | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> WTACRSLinear:
        """A WTA-CRS layer that shares ``linear``'s weight and bias (the same ``Parameter`` objects)."""
        if type(linear) is not nn.Linear:
            raise TypeError(
                f"WTACRSLinear.from_linear takes a torch.nn.Linear, got {type(linear).__name__}; subclasses of "
                "nn.Linear may compute something else in forward() and are not converted"
            )
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **options)
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.train(linear.training)
        return layer

    # settable, and checked where they are set rather than at the next forward, as TrAct.lam is
    @property
    def budget(self) -> float:
        """The fraction of rows kept, in (0, 1]."""
        return self._budget

    @budget.setter
    def budget(self, value: float) -> None:
        self._budget = _checked("budget", value)

    @property
    def minimal_k(self) -> int:
        """The least number of rows kept (an integer >= 1)."""
        return self._minimal_k

    @minimal_k.setter
    def minimal_k(self, value: int) -> None:
        self._minimal_k = _checked("minimal_k", value)

    @property
    def deter_ratio(self) -> float:
        """The deterministic fraction of the kept rows when ``deter_adaptive`` is False, in [0, 1)."""
        return self._deter_ratio

    @deter_ratio.setter
    def deter_ratio(self, value: float) -> None:
        self._deter_ratio = _checked("deter_ratio", value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # layers pickled before these became properties hold them under their public names
        for name in SAMPLING_HYPERPARAMETERS:
            if name in state:
                state[f"_{name}"] = state.pop(name)
        super().__setstate__(state)

    @property
    def generator(self) -> torch.Generator:
        """The layer's own generator, on the weight's device, seeded from ``seed`` when created (again after a
        move to another device)."""
        device = self.weight.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device).manual_seed(self.seed)
        return self._generator

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.weight.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, self.weight, self.bias)
        return wtacrs_linear(
            x,
            self.weight,
            self.bias,
            budget=self.budget,
            minimal_k=self.minimal_k,
            deter_adaptive=self.deter_adaptive,
            deter_ratio=self.deter_ratio,
            sample_replacement=self.sample_replacement,
            generator=self.generator,
            example_ids=self.example_ids,
            cache=self.norm_cache if self.example_ids is not None else None,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, budget={self.budget}, deter_adaptive={self.deter_adaptive}, seed={self.seed}"


def _checked(name: str, value: Any) -> Any:
    SAMPLING_HYPERPARAMETERS[name].check(name, value)
    return value


def wtacrs_rng_state(model: nn.Module) -> dict[str, Tensor]:
    """The generator state of every :class:`WTACRSLinear` in ``model``, keyed by module name (``""`` for the model
    itself): CPU byte tensors only, so ``torch.load(..., weights_only=True)`` reads it back. Save it with the
    ``state_dict`` (which leaves the generators out, so that it loads into plain ``nn.Linear`` layers too)."""
    return {name: m.generator.get_state() for name, m in model.named_modules() if isinstance(m, WTACRSLinear)}


def load_wtacrs_rng_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Restore the generators saved by :func:`wtacrs_rng_state`, so that a resumed run draws the same rows.

    ``model`` must hold :class:`WTACRSLinear` layers under exactly the saved names (else ``KeyError``, before any
    generator changes), on the device they will train on: a layer moved to another device afterwards starts a
    new generator from its ``seed``."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, WTACRSLinear)}
    missing, unexpected = sorted(layers.keys() - state.keys()), sorted(state.keys() - layers.keys())
    if missing or unexpected:
        raise KeyError(
            f"the saved WTA-CRS generator states do not match the model's WTACRSLinear layers: missing {missing}, "
            f"unexpected {unexpected}"
        )
    for name, layer in layers.items():
        # set_state takes a CPU byte tensor: a checkpoint loaded with map_location onto a device is moved back
        layer.generator.set_state(state[name].to("cpu", torch.uint8))


@contextlib.contextmanager
def wtacrs_example_ids(module: nn.Module, example_ids: Tensor | Iterable[int]) -> Iterator[None]:
    """Within the block, every :class:`WTACRSLinear` in ``module`` knows which training examples the batch holds
    (one id per entry of the batch dimension, stable across epochs, e.g. dataset indices), and so samples by
    :math:`\\lVert x\\rVert\\,\\lVert\\delta y\\rVert` with the norms cached at the examples' previous visit::

        for ids, x, y in loader:
            with wtacrs_example_ids(model, ids):
                loss = loss_fn(model(x), y)
            loss.backward()  # may run after the block: each forward pass keeps its ids

    A context manager rather than a ``forward`` argument: the layers sit deep inside models whose ``forward`` does
    not pass extra arguments down, and no process-wide state is involved (two models do not interfere)."""
    ids = torch.as_tensor(example_ids)
    layers = [m for m in module.modules() if isinstance(m, WTACRSLinear)]
    previous = [layer.example_ids for layer in layers]
    for layer in layers:
        layer.example_ids = ids
    try:
        yield
    finally:
        for layer, before in zip(layers, previous):
            layer.example_ids = before


def replace_linear_layers(
    model: nn.Module,
    *,
    names: Iterable[str] | None = None,
    predicate: Callable[[str, nn.Linear], bool] | None = None,
    seed: int = 0,
    **options: Any,
) -> nn.Module:
    """Swap ``model``'s ``nn.Linear`` submodules for :class:`WTACRSLinear` layers sharing their parameters, in
    place, and return ``model``.

    ``names`` lists qualified module names to swap (each must be an ``nn.Linear``); otherwise ``predicate(name,
    module)`` chooses among all ``nn.Linear`` submodules (default: all of them). Subclasses of ``nn.Linear`` are
    never swapped implicitly (their ``forward`` may differ). The i-th swapped layer gets ``seed + i``; the other
    ``options`` (``budget``, ``minimal_k``, ...) go to every layer. For example, the paper's "level 2" choice in a
    GPT-style block: ``predicate=lambda name, m: name.endswith(("proj", "mlp.0", "mlp.2"))`` (not the query/key/value
    projection, not the read-out)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_linear_layers takes an nn.Module, got {type(model).__name__}")
    if names is not None and predicate is not None:
        raise ValueError("pass either names or predicate, not both")
    modules = dict(model.named_modules())
    if names is not None:
        names = list(names)
        for name in names:
            if name not in modules:
                raise KeyError(f"{type(model).__name__} has no submodule {name!r}")
            if type(modules[name]) is not nn.Linear:
                raise TypeError(f"{name!r} is a {type(modules[name]).__name__}, not a torch.nn.Linear: cannot swap it")
        chosen = names
    else:
        chosen = [n for n, m in modules.items() if type(m) is nn.Linear and (predicate is None or predicate(n, m))]
    if "" in chosen:
        raise TypeError("the model itself is an nn.Linear: use WTACRSLinear.from_linear(model) instead")
    for i, name in enumerate(chosen):
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, WTACRSLinear.from_linear(modules[name], seed=seed + i, **options))
    return model


register(
    MethodInfo(
        name="wtacrs_linear",
        cls=WTACRSLinear,
        kind="layer",
        paper="Winner-Take-All Column Row Sampling for Memory Efficient Adaptation of Language Model",
        arxiv="2305.15265",
        code_url="https://github.com/zirui-ray-liu/WTACRS",
        summary="nn.Linear whose backward pass estimates the weight gradient without bias from k sampled rows of "
        "the input (the most probable rows kept, the rest sampled), saving only those rows",
        hyperparameters={
            "budget": SAMPLING_HYPERPARAMETERS["budget"],
            "minimal_k": SAMPLING_HYPERPARAMETERS["minimal_k"],
            "deter_adaptive": Flag(),
            "deter_ratio": SAMPLING_HYPERPARAMETERS["deter_ratio"],
            "sample_replacement": Flag(),
            "seed": Interval(0, integer=True),
        },
        capabilities=Capabilities(stochastic=True),  # torch.compile: same draws as eager (tests/nn, slow)
        advice="Swap the attention-output and feed-forward layers with replace_linear_layers(model, budget=0.3); "
        "pass example ids (wtacrs_example_ids) for the gradient-norm probabilities.",
    )
)
