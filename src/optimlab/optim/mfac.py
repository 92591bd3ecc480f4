r"""M-FAC: matrix-free inverse-Fisher-vector products, as an optimizer (dynamic) and for pruning (static).

Paper: Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information",
NeurIPS 2021, arXiv `2107.03356 <https://arxiv.org/abs/2107.03356>`_. Official code:
https://github.com/IST-DASLab/M-FAC (``optim.py``: ``HInvFastUpMulti`` and ``MFAC``; ``prun.py``: the static
algorithm, blocked; ``main_prun.py``: the pruner).

**The curvature.** For :math:`m` gradients :math:`g_1, \dots, g_m \in \mathbb{R}^d`, the rows of
:math:`G \in \mathbb{R}^{m\times d}`, and a dampening :math:`\lambda > 0`, M-FAC works with the damped empirical
Fisher and its inverse, by the Woodbury identity:

.. math::

    \hat F = \lambda I + \frac1m \sum_{i=1}^m g_i g_i^\top = \lambda I + \frac1m G^\top G, \qquad
    \hat F^{-1} x = \frac1\lambda\Big(x - G^\top S^{-1} G x\Big), \qquad S = G G^\top + m\lambda I .

A product costs one :math:`Gx`, one :math:`G^\top y` (:math:`O(md)` each) and an :math:`m\times m` solve; nothing of
size :math:`d\times d` is formed. The normalisation is by :math:`m`, the window size, also while fewer than
:math:`m` gradients have been seen (their rows are zero), as in the official code.

**The optimizer (dynamic algorithm).** :class:`MFAC` keeps the last :math:`m` gradients of *all* parameters (of
all param groups, flattened into one vector) in a ring buffer :math:`G` and :math:`K = GG^\top`. A step with
gradient :math:`g`:

.. math::

    g &\leftarrow g + w\,\theta \qquad\text{(L2 decay, as the official code)} \\
    G_{j,:} &\leftarrow g, \quad K_{j,:} = K_{:,j} \leftarrow G g
        \qquad\text{(j: the oldest row; one pass over } G) \\
    u &= \hat F^{-1} g = m\, G^\top S^{-1} e_j \qquad\text{(one pass over } G) \\
    v &\leftarrow \mu v + (1-\mu)\, u \quad\text{(only if } \mu > 0\text{; then } u \leftarrow v) \\
    \theta &\leftarrow \theta - \eta\, u

The second form of :math:`u` follows from :math:`g = G^\top e_j` and :math:`\hat F^{-1}G^\top = m G^\top (GG^\top +
m\lambda I)^{-1}`: it needs no :math:`1/\lambda` and no cancellation of two :math:`O(1/\lambda)` terms, which in
float32 would lose about :math:`\log_{10}(1/\lambda)` digits. Per step: two :math:`m\times d` matrix-vector
products (the floor), :math:`O(d)` elementwise work, and an :math:`O(m^3/3)` Cholesky factorisation of
:math:`S` in float64 (of size :math:`m^2` only: 20-100 ms at :math:`m = 1024` on a 2-core CPU, 10-20 % of the
two products at :math:`d = 2^{20}`; see ``benchmarks/mfac_time.py``). While fewer than :math:`m` gradients have been
seen, :math:`S` is block-diagonal (zero rows only add :math:`m\lambda` to its diagonal), so only the rows seen so far
enter the products and the solve. **Choice:** the official code recomputes its coefficients (the paper's
:math:`D` and :math:`B` matrices) at every step in :math:`O(m^3)`, from an unpivoted LU of :math:`K/\lambda + mI`,
which CPU torch does not have; optimlab factors :math:`S` by Cholesky at every step instead, also :math:`O(m^3)`:
backward stable at each step, so no error accumulates over a long run (an :math:`O(m^2)` update of an inverse or of
a factor drifts and needs periodic refactoring), and equal to the official result in exact arithmetic. :math:`K`
is kept in the state dtype, the precision its entries are computed in; the solve runs in float64 (float32 on MPS).
:meth:`MFAC.ihvp` multiplies any vector by :math:`\hat F^{-1}` of the current window.

With small :math:`\lambda` the step is sensitive to the rounding of the gradients: along a direction new to the
window it scales by up to :math:`1/\lambda`, so on small noiseless problems float32 or bfloat16 runs do not follow
a float64 run step for step. On the conformance battery's quadratic, at :math:`\lambda` = 1e-5, a float32 run is
~1e-3 away from the float64 one after 5 steps whether M-FAC's own arithmetic runs in float32 or float64, and
float64 runs whose gradients differ by a relative 2e-3 (bfloat16's resolution) end O(1) apart; at
:math:`\lambda` = 1e-2 the same runs agree to 2e-7 and 2e-3. That is the method's conditioning, not rounding in
the implementation.

The state is :math:`G` (``grad_window``: :math:`m \times` numel per parameter, in the parameter's state dtype, so
:math:`m\cdot d` numbers in all), :math:`K` (``gram``, :math:`m\times m`), the ring position and the step count (in the
state of the first parameter of the first group, as ``torch.optim.LBFGS`` keeps its global state), and with
momentum one buffer per parameter. Per-group ``lr``, ``weight_decay`` and ``momentum`` apply to each group's
slice of the one update; ``ngrads`` and ``damp`` describe the one window and must be the same in every group.
A parameter without a gradient in a step contributes a zero slice to that step's gradient and is not moved (its
state, if any, is kept); a parameter added later joins with zero past gradients. The official ``sparse=True``
option (weights that are exactly zero at construction left out) is not implemented.

**Static algorithm (pruning).** :class:`MFACInverse` factors :math:`\hat F` for a fixed :math:`G` once
(:math:`K` and its Cholesky factor: :math:`O(m^2 d)`) and then gives :math:`\hat F^{-1}x` in :math:`O(md)` and the
diagonal

.. math::

    \big[\hat F^{-1}\big]_{kk} = \frac1\lambda\Big(1 - \big\lVert L^{-1} G_{:,k}\big\rVert^2\Big),
    \qquad LL^\top = S ,

the denominators of the optimal-brain-surgeon scores :math:`\rho_k = \theta_k^2 / (2[\hat F^{-1}]_{kk})`
(:func:`obs_prune` applies one pruning step as ``main_prun.py`` does). With ``block_size`` :math:`B` the
coordinates are split into consecutive blocks of :math:`B` (the last one may be shorter) and each block gets its
own :math:`\hat F_b = \lambda I + G_b^\top G_b / m`: the block-diagonal approximation of ``prun.py``.
:func:`mfac_ihvp` and :func:`mfac_inverse_diagonal` are the one-shot forms. The official static code computes
the same quantities by a recursion over the :math:`m` gradients (:math:`v_i = \hat F_{i-1}^{-1} g_i`); the Cholesky
form is equal in exact arithmetic.

Hyperparameters (defaults): ``lr`` 1e-3, ``momentum`` 0.0, ``weight_decay`` 0.0, ``ngrads`` :math:`m` = 1024,
``damp`` :math:`\lambda` = 1e-5 (official ``MFAC`` class and ``main_optim.py``; the README's example uses
``ngrads`` 512 and ``weight_decay`` 0.003). Static: ``damp`` 1e-5, ``block_size`` None (one block; the official
pruning runs use 128 with ``ngrads`` 64).

Coming from AdamW: the step :math:`\hat F^{-1} g` is a natural-gradient step, not a per-coordinate normalised
one: the official runs use ``lr`` 1e-3 with step decay, no warm-up, and weight decay as L2 (0.003). Memory is
:math:`m` copies of the model (1024 by default): 4 GiB of state for a 1M-parameter float32 model; reduce
``ngrads`` for larger models. The first steps, while the window is mostly empty, are long (about :math:`m/\lVert
g\rVert` along :math:`g`, since :math:`\hat F \approx \lambda I + g g^\top / m`); the official runs start without
warm-up, but a short warm-up of ``lr`` is a cheap precaution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from optimlab._core.optimizer import LOW_PRECISION, OptimlabOptimizer, as_float, state_dtype
from optimlab._core.validation import DECAY_RATE, NON_NEGATIVE, POSITIVE, Interval
from optimlab.registry import Capabilities, MethodInfo, register

__all__ = [
    "MFAC",
    "MFACInverse",
    "damped_gram_cholesky",
    "mfac_",
    "mfac_ihvp",
    "mfac_inverse_diagonal",
    "newest_gradient_ihvp",
    "obs_prune",
    "push_gradient_",
    "window_ihvp",
]

_POSITIVE_INT = Interval(1, integer=True)
# the float64 scratch of MFACInverse.diagonal and window_ihvp, in elements (128 MiB): columns are processed in chunks
# this size
_DIAGONAL_CHUNK = 1 << 24


def _solve_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the m-space solves: float64, except on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


# -- m-space maths, shared by the dynamic and the static algorithm --------------------------------------------------
def damped_gram_cholesky(gram: Tensor, damp: float, ngrads: int | None = None) -> Tensor:
    r"""The lower Cholesky factor :math:`L` of :math:`S = K + m\lambda I` (batched over leading dimensions), in the
    solve dtype (float64 except on MPS). ``gram`` is :math:`K = GG^\top` (``(..., n, n)``, the rows in use) and
    ``ngrads`` the :math:`m` of the normalisation (default: ``n``).

    :math:`S` is positive definite for :math:`\lambda > 0`; the factorisation does not check it (that would
    synchronise with the device), so a non-finite :math:`K` gives a non-finite factor, and the step propagates it.
    """
    m = gram.shape[-1] if ngrads is None else ngrads
    shifted = gram.to(_solve_dtype(gram.device), copy=True)
    shifted.diagonal(dim1=-2, dim2=-1).add_(m * damp)
    return torch.linalg.cholesky_ex(shifted).L


# -- the dynamic algorithm: G as column blocks, one (m, numel) buffer per parameter ---------------------------------
def push_gradient_(windows: Sequence[Tensor], gram: Tensor, row: int, filled: int | None = None) -> None:
    r"""After the newest gradient has been written into row ``row`` of every block of :math:`G` (``windows``, one
    ``(m, n_p)`` block per parameter), refresh row and column ``row`` of ``gram`` = :math:`GG^\top` with one pass
    over :math:`G`: :math:`K_{j,:} = K_{:,j} = G g`. Only the first ``filled`` rows (all by default) are read: the
    others are still zero."""
    filled = gram.shape[0] if filled is None else filled
    products = torch.zeros(filled, dtype=gram.dtype, device=gram.device)
    for window in windows:
        products += torch.mv(window[:filled], window[row]).to(gram.device, gram.dtype)
    gram[row, :filled] = products
    gram[:filled, row] = products


def newest_gradient_ihvp(
    windows: Sequence[Tensor], gram: Tensor, row: int, damp: float, filled: int | None = None
) -> list[Tensor]:
    r""":math:`\hat F^{-1} g` for the gradient :math:`g` in row ``row`` of :math:`G`, one ``(n_p,)`` tensor per block:
    :math:`m\,G^\top S^{-1} e_j`, one pass over :math:`G` (see the module docstring for why this form).

    While only the first ``filled`` rows of :math:`G` hold gradients, :math:`S` is block-diagonal (the zero rows
    add :math:`m\lambda` to its diagonal and nothing else), so the solve and the product use those rows alone."""
    m = gram.shape[0]
    filled = m if filled is None else filled
    factor = damped_gram_cholesky(gram[:filled, :filled], damp, m)
    unit = torch.zeros(filled, 1, dtype=factor.dtype, device=factor.device)
    unit[row] = m
    coefficients = torch.cholesky_solve(unit, factor).squeeze(1)
    return [coefficients.to(w.device, w.dtype) @ w[:filled] for w in windows]


def window_ihvp(
    windows: Sequence[Tensor], gram: Tensor | None, vectors: Sequence[Tensor], damp: float, filled: int | None = None
) -> list[Tensor]:
    r""":math:`\hat F^{-1} x = (x - G^\top S^{-1} G x)/\lambda` for any :math:`x`, given as one tensor per block of
    :math:`G` (``vectors[i]`` has ``windows[i].shape[1]`` elements, any shape); the result has their shapes and the
    blocks' dtype. With ``gram`` None (no gradient seen), :math:`\hat F = \lambda I`; only the first ``filled`` rows
    are read.

    For :math:`x` in the span of the gradients the two terms agree to :math:`O(\lambda)` relative and cancel, so an
    error :math:`\delta c` in :math:`c = S^{-1}Gx` reaches the result as :math:`G^\top\delta c/\lambda`. Every
    product with :math:`G` therefore runs in the solve dtype (float64, except on MPS), on column chunks of :math:`G`
    cast one at a time (:math:`O(m\cdot\text{chunk})` scratch, no float64 copy of :math:`G`), and :math:`c` is
    refined against the exact :math:`S = GG^\top + m\lambda I` (one pass over :math:`G` per round): the stored
    :math:`K` of a float32 window is rounded to float32, and its factor alone leaves a relative error of about
    :math:`\epsilon_{32}\lVert K\rVert/(m\lambda)`, O(1) at the default damp (tests/optim/test_mfac.py). The
    refinement converges when :math:`\epsilon_{32}\lVert K\rVert \ll \lambda_{\min}(S)`; a round that does not
    lower the residual is not taken (decided on the device, without a synchronisation). Cost: five passes over
    :math:`G` instead of two."""
    if gram is None or filled == 0:
        return [x / damp for x in vectors]
    m = gram.shape[0]
    filled = m if filled is None else filled
    factor = damped_gram_cholesky(gram[:filled, :filled], damp, m)
    work, device = factor.dtype, factor.device
    flats = [x.reshape(-1) for x in vectors]
    rhs = torch.zeros(filled, dtype=work, device=device)
    for window, x in zip(windows, flats, strict=True):
        for columns in _column_chunks(window.shape[1], filled):
            chunk = window[:filled, columns].to(work)
            rhs += torch.mv(chunk, x[columns].to(chunk.device, work)).to(device)
    coefficients = torch.cholesky_solve(rhs.unsqueeze(1), factor).squeeze(1)
    residual = rhs - _damped_gram_mv(windows, coefficients, m * damp, filled)
    for _ in range(_REFINEMENTS):
        refined = coefficients + torch.cholesky_solve(residual.unsqueeze(1), factor).squeeze(1)
        refined_residual = rhs - _damped_gram_mv(windows, refined, m * damp, filled)
        better = torch.linalg.vector_norm(refined_residual) < torch.linalg.vector_norm(residual)
        coefficients = torch.where(better, refined, coefficients)
        residual = torch.where(better, refined_residual, residual)
    out = []
    for window, x, vector in zip(windows, flats, vectors):
        result = torch.empty(x.numel(), dtype=window.dtype, device=window.device)
        local = coefficients.to(window.device)
        for columns in _column_chunks(window.shape[1], filled):
            difference = x[columns].to(window.device, work) - local @ window[:filled, columns].to(work)
            result[columns] = difference.div_(damp)
        out.append(result.view(vector.shape))
    return out


# rounds of refinement of S⁻¹Gx in window_ihvp: each gains ~log10(λ_min(S)/(ε₃₂‖K‖)) digits (7 on the test's random
# float32 window); two reach the float64 floor on well-conditioned windows
_REFINEMENTS = 2


def _damped_gram_mv(windows: Sequence[Tensor], v: Tensor, shift: float, filled: int) -> Tensor:
    """``(G Gᵀ + shift·I) v`` over the first ``filled`` rows, in ``v``'s dtype (one pass over G, in chunks)."""
    out = v * shift
    for window in windows:
        local = v.to(window.device)
        for columns in _column_chunks(window.shape[1], filled):
            chunk = window[:filled, columns].to(v.dtype)
            out += torch.mv(chunk, local @ chunk).to(out.device)
    return out


def _column_chunks(width: int, rows: int) -> Iterator[slice]:
    """Slices of ``width`` columns whose ``(rows, chunk)`` float64 copies stay within ``_DIAGONAL_CHUNK`` elements."""
    step = max(1, _DIAGONAL_CHUNK // max(rows, 1))
    return (slice(lo, min(width, lo + step)) for lo in range(0, width, step))


def mfac_(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    window: dict[str, Any],
    *,
    lr: float | Sequence[float],
    damp: float,
    momentum: float | Sequence[float] = 0.0,
    weight_decay: float | Sequence[float] = 0.0,
    idle_states: Iterable[dict[str, Any]] = (),
) -> None:
    """Functional M-FAC: one step on ``params`` (``grads`` are only read), in place.

    Each of ``states`` holds ``grad_window``, its parameter's ``(m, numel)`` block of :math:`G` (and
    ``momentum_buffer`` once momentum is used); ``window`` holds ``gram`` (:math:`K`), ``next_row`` (the ring
    position, an int) and ``step``. ``idle_states`` are the states of parameters without a gradient this step: their
    row of :math:`G` is zeroed. ``lr``, ``momentum`` and ``weight_decay`` are numbers or one number per parameter.
    """
    if not params:
        return
    count = len(params)
    lrs, momenta, decays = (_per_param(x, count) for x in (lr, momentum, weight_decay))
    gram, row = window["gram"], window["next_row"]
    for p, g, state, decay in zip(params, grads, states, decays):
        newest = state["grad_window"][row]
        newest.copy_(g.reshape(-1))
        if decay != 0:
            newest.add_(p.reshape(-1), alpha=decay)
    for state in idle_states:
        state["grad_window"][row].zero_()
    # idle blocks hold a zero row now: they add nothing to G g, and their slice of the update is not applied
    windows = [s["grad_window"] for s in states]
    filled = min(window["step"] + 1, gram.shape[0])  # the ring fills rows 0, 1, ... in order
    push_gradient_(windows, gram, row, filled)
    directions = newest_gradient_ihvp(windows, gram, row, damp, filled)
    for p, direction, state, step_size, mu in zip(params, directions, states, lrs, momenta):
        if mu > 0 or "momentum_buffer" in state:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(direction)
            direction = state["momentum_buffer"].mul_(mu).add_(direction, alpha=1 - mu)
        p.add_(direction.view(p.shape), alpha=-step_size)
    window["next_row"] = (row + 1) % gram.shape[0]
    window["step"] += 1


def _per_param(value: float | Sequence[float], count: int) -> list[float]:
    return [value] * count if isinstance(value, int | float) else list(value)


class MFAC(OptimlabOptimizer):
    __doc__ = __doc__
    functional = staticmethod(mfac_)
    shared_hyperparameters = ("ngrads", "damp")  # of the one window over all parameters

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        ngrads: int = 1024,
        damp: float = 1e-5,
    ) -> None:
        super().__init__(params, self._defaults_from_arguments(locals()))

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        ngrads = self.param_groups[0]["ngrads"]
        return {"grad_window": torch.zeros(ngrads, p.numel(), dtype=state_dtype(p), device=p.device)}

    def _anchor(self) -> Tensor:
        return self.param_groups[0]["params"][0]

    def _window(self, ngrads: int, create: bool) -> dict[str, Any] | None:
        """The state holding the window's ``gram``, ``next_row`` and ``step`` (the first parameter's)."""
        anchor = self._anchor()
        state = self.state[anchor] if create else self.state.get(anchor)
        if state is not None and "gram" not in state and create:
            dtype = state_dtype(anchor)  # K's entries sum over every block: keep them in the widest state dtype
            for p in (p for g in self.param_groups for p in g["params"]):
                dtype = torch.promote_types(dtype, state_dtype(p))
            state.update(gram=torch.zeros(ngrads, ngrads, dtype=dtype, device=anchor.device), next_row=0, step=0)
        return state if state is not None and "gram" in state else None

    # Runs eagerly inside a compiled training step: the ring position is a Python int that a trace would
    # specialise on (one recompilation per row), and the step's cost is two BLAS passes and a LAPACK
    # factorisation, which compiling does not make faster.
    @torch.compiler.disable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one update; ``closure`` re-evaluates the loss (with gradients enabled) and returns it."""
        return super().step(closure)

    def _apply(self, batches: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[dict]]]) -> None:
        # one step over every group at once: one gradient vector spans all parameters
        shared = self._shared()
        params, work, grads, states, lrs, momenta, decays = [], [], [], [], [], [], []
        for group, group_params, group_grads, group_states in batches:
            lr = as_float(group["lr"])
            for p, g, state in zip(group_params, group_grads, group_states):
                w = p.float() if p.dtype in LOW_PRECISION else p
                if "grad_window" not in state:  # the first parameter's state may hold only the window's scalars
                    state.update(self._init_state(p))
                params.append(p), work.append(w), grads.append(g.to(w.dtype)), states.append(state)
                lrs.append(lr), momenta.append(group["momentum"])
                decays.append(group["weight_decay"])
        if not params:
            return
        stepping = set(map(id, params))
        # parameters without a gradient now that hold a window (``get`` adds no empty state)
        idle = [
            state
            for group in self.param_groups
            for p in group["params"]
            if id(p) not in stepping and "grad_window" in (state := self.state.get(p, {}))
        ]
        for state in (*states, *idle):
            if state["grad_window"].shape[0] != shared["ngrads"]:
                raise RuntimeError(
                    f"MFAC: ngrads is {shared['ngrads']} but the gradient window holds {state['grad_window'].shape[0]} "
                    "rows; the window size cannot change during a run: build a new optimizer"
                )
        window = self._window(shared["ngrads"], create=True)
        mfac_(
            work,
            grads,
            states,
            window,
            lr=lrs,
            momentum=momenta,
            weight_decay=decays,
            damp=shared["damp"],
            idle_states=idle,
        )
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)

    @torch.no_grad()
    def ihvp(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        r""":math:`\hat F^{-1} x` with the current window, for :math:`x` given as one tensor per parameter (in the
        order of ``param_groups``, shaped like the parameters); returns one tensor per parameter, in the state
        dtype. Parameters that never had a gradient count as zero columns of :math:`G`."""
        params = [p for g in self.param_groups for p in g["params"]]
        if len(vectors) != len(params) or any(x.numel() != p.numel() for x, p in zip(vectors, params)):
            raise ValueError(
                f"ihvp takes one tensor per parameter ({len(params)}, shaped like the parameters); got "
                f"{len(vectors)} tensors"
            )
        shared = self._shared()
        window = self._window(shared["ngrads"], create=False)
        vectors = [x.to(state_dtype(p)) for x, p in zip(vectors, params)]
        if window is None:
            return window_ihvp([], None, vectors, shared["damp"])
        present = [i for i, p in enumerate(params) if "grad_window" in self.state.get(p, {})]
        result = [x / shared["damp"] for x in vectors]
        solved = window_ihvp(
            [self.state[params[i]]["grad_window"] for i in present],
            window["gram"],
            [vectors[i] for i in present],
            shared["damp"],
            min(window["step"], shared["ngrads"]),
        )
        for i, x in zip(present, solved):
            result[i] = x
        return result


# -- the static algorithm -------------------------------------------------------------------------------------------
class MFACInverse:
    r""":math:`\hat F^{-1}` for fixed gradients ``grads`` (the rows of an ``(m, d)`` tensor), factored once; see the
    module docstring. ``block_size`` :math:`B` (an integer, or None for one block) makes :math:`\hat F`
    block-diagonal over consecutive blocks of :math:`B` coordinates. ``grads`` is referenced, not copied:
    do not modify it while the object is in use.

    .. code-block:: python

        inverse = MFACInverse(grads, damp=1e-5, block_size=128)
        update = inverse.mul(vector)  # (λI + GᵀG/m)⁻¹ vector, block by block
        diagonal = inverse.diagonal()  # the diagonal of the same inverse
    """

    def __init__(self, grads: Tensor, damp: float = 1e-5, block_size: int | None = None) -> None:
        if not isinstance(grads, Tensor) or grads.dim() != 2 or not grads.is_floating_point() or grads.shape[0] == 0:
            raise TypeError(
                "grads must be a floating-point (m, d) tensor with one gradient per row (m >= 1); got "
                + (f"shape {tuple(grads.shape)}, dtype {grads.dtype}" if isinstance(grads, Tensor) else repr(grads))
            )
        POSITIVE.check("damp", damp)
        if block_size is not None:
            _POSITIVE_INT.check("block_size", block_size)
        self.grads, self.damp = grads, float(damp)
        m, d = grads.shape
        self.block_size = d if block_size is None or block_size >= d else block_size
        full, rest = divmod(d, self.block_size) if d else (0, 0)
        # (first column, number of blocks, block width): the full blocks, then the shorter last one
        self.segments = [s for s in ((0, full, self.block_size), (full * self.block_size, 1, rest)) if s[1] and s[2]]
        self.factors = [damped_gram_cholesky(self._gram(self._blocks(s)), damp) for s in self.segments]

    @property
    def shape(self) -> tuple[int, int]:
        d = self.grads.shape[1]
        return d, d

    def _blocks(self, segment: tuple[int, int, int]) -> Tensor:
        """The segment's blocks of G as a ``(blocks, m, width)`` view."""
        start, count, width = segment
        m = self.grads.shape[0]
        return self.grads[:, start : start + count * width].reshape(m, count, width).transpose(0, 1)

    @staticmethod
    def _gram(blocks: Tensor) -> Tensor:
        r""":math:`K = GG^\top` per block in the solve dtype, accumulated over column chunks: a float32 :math:`K`
        alone costs :math:`\epsilon_{32}\lVert K\rVert/(m\lambda)` relative error, O(1) at the default damp."""
        count, m, _ = blocks.shape
        work = _solve_dtype(blocks.device)
        gram = torch.zeros(count, m, m, dtype=work, device=blocks.device)
        for columns in _column_chunks(blocks.shape[2], count * m):
            chunk = blocks[..., columns].to(work)
            gram.baddbmm_(chunk, chunk.mT)
        return gram

    def mul(self, vectors: Tensor) -> Tensor:
        r""":math:`\hat F^{-1} x` for ``vectors`` of shape ``(d,)`` or ``(..., d)`` (each row a vector), in the
        gradients' dtype. The products with :math:`G` and the subtraction run in the solve dtype (float64 except
        on MPS), on column chunks of :math:`G` cast one at a time: in float32 the subtraction
        :math:`x - G^\top S^{-1}Gx` cancels to an error of about :math:`\epsilon_{32}\lVert x\rVert/\lambda`."""
        d = self.grads.shape[1]
        if not isinstance(vectors, Tensor) or vectors.dim() == 0 or vectors.shape[-1] != d:
            shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else repr(vectors)
            raise ValueError(f"vectors must have the gradients' dimension d = {d} as their last dimension; got {shape}")
        x = vectors.to(self.grads.device, self.grads.dtype).reshape(-1, d)
        n = x.shape[0]
        out = torch.empty_like(x)
        for segment, factor in zip(self.segments, self.factors):
            start, count, width = segment
            blocks = self._blocks(segment)  # (count, m, width)
            xs = x[:, start : start + count * width].reshape(n, count, width).permute(1, 2, 0)  # (count, width, n)
            chunks = list(_column_chunks(width, count * blocks.shape[1]))
            products = torch.zeros(count, blocks.shape[1], n, dtype=factor.dtype, device=factor.device)
            for columns in chunks:
                products.baddbmm_(blocks[..., columns].to(factor.dtype), xs[:, columns].to(factor.dtype))
            coefficients = torch.cholesky_solve(products, factor)
            view = out[:, start : start + count * width].view(n, count, width)
            for columns in chunks:
                wide = xs[:, columns].to(factor.dtype) - blocks[..., columns].to(factor.dtype).mT @ coefficients
                view[:, :, columns] = wide.div_(self.damp).permute(2, 0, 1).to(out.dtype)
        return out.reshape(vectors.shape)

    __matmul__ = mul

    def diagonal(self) -> Tensor:
        r"""The diagonal of :math:`\hat F^{-1}`, :math:`(1 - \lVert L^{-1}G_{:,k}\rVert^2)/\lambda`, in the gradients'
        dtype (computed in float64, in chunks of columns)."""
        m, d = self.grads.shape
        out = torch.empty(d, dtype=self.grads.dtype, device=self.grads.device)
        for segment, factor in zip(self.segments, self.factors):
            start, count, width = segment
            blocks = self._blocks(segment)
            chunk = max(1, _DIAGONAL_CHUNK // (count * m))
            for lo in range(0, width, chunk):
                hi = min(width, lo + chunk)
                whitened = torch.linalg.solve_triangular(factor, blocks[..., lo:hi].to(factor.dtype), upper=False)
                values = (1 - whitened.square().sum(dim=-2)) / self.damp  # (count, hi - lo)
                view = out[start : start + count * width].view(count, width)
                view[:, lo:hi] = values.to(out.dtype)
        return out


def mfac_ihvp(grads: Tensor, vectors: Tensor, damp: float = 1e-5, block_size: int | None = None) -> Tensor:
    r"""M-FAC's inverse-Hessian-vector product (static algorithm): :math:`(\lambda I + G^\top G/m)^{-1} x`.

    Paper: Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
    Information", NeurIPS 2021, arXiv 2107.03356; official code https://github.com/IST-DASLab/M-FAC (``prun.py``).

    ``grads`` is ``(m, d)``, one gradient per row; ``vectors`` is ``(d,)`` or ``(..., d)``. By the Woodbury
    identity, with :math:`S = GG^\top + m\lambda I` factored by Cholesky (:math:`LL^\top = S`):

    .. math::

        (\lambda I + G^\top G/m)^{-1} x = \frac1\lambda\big(x - G^\top S^{-1} G x\big)

    in :math:`O(m^2 d)` (the Gram matrix) plus :math:`O(md)` per vector; ``block_size`` :math:`B` applies it to
    consecutive blocks of :math:`B` coordinates separately (``prun.py``'s blocked form). To multiply several times
    with the same gradients, or to get the diagonal too, build :class:`MFACInverse` once.

    Hyperparameters (defaults): ``damp`` :math:`\lambda` 1e-5 (official), ``block_size`` None (one block; the
    official pruning runs use 128).

    Coming from a dense solve: ``torch.linalg.solve(damp * I + grads.T @ grads / m, x)`` gives the same result
    without ever forming the :math:`d\times d` matrix; note the normalisation by :math:`m`.
    """
    return MFACInverse(grads, damp, block_size).mul(vectors)


def mfac_inverse_diagonal(grads: Tensor, damp: float = 1e-5, block_size: int | None = None) -> Tensor:
    r"""The diagonal of :math:`(\lambda I + G^\top G/m)^{-1}` (block-diagonal with ``block_size``), the
    denominators of the OBS pruning scores; see :class:`MFACInverse`."""
    return MFACInverse(grads, damp, block_size).diagonal()


def obs_prune(weights: Tensor, inverse: MFACInverse, num_prune: int) -> tuple[Tensor, Tensor]:
    r"""One optimal-brain-surgeon pruning step with the M-FAC inverse, as ``main_prun.py`` takes it.

    ``weights`` is the flat vector of the weights still present and ``inverse`` the :class:`MFACInverse` of their
    gradients (the official pruner restricts both to the unpruned weights, ``w[mask]`` and ``grads[:, mask]``).
    The ``num_prune`` weights with the lowest scores :math:`\rho_k = \theta_k^2 / (2[\hat F^{-1}]_{kk})` are removed
    and the others corrected by the sum of the single-weight OBS updates: :math:`\theta \leftarrow \theta + \hat
    F^{-1} e` with :math:`e_k = -\theta_k / [\hat F^{-1}]_{kk}` on the removed weights and 0 elsewhere; the removed
    weights are then set to exactly zero. Returns the new weights and the mask of the kept ones.
    """
    d = inverse.shape[0]
    if not isinstance(weights, Tensor) or weights.dim() != 1 or weights.numel() != d:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else repr(weights)
        raise ValueError(f"weights must be a flat vector of the inverse's dimension d = {d}; got {shape}")
    Interval(0, d, integer=True).check("num_prune", num_prune)
    diagonal = inverse.diagonal().to(weights.device, weights.dtype)
    drop = torch.topk(weights.square() / (2 * diagonal), num_prune, largest=False).indices
    removal = torch.zeros_like(weights)
    removal[drop] = -weights[drop] / diagonal[drop]
    pruned = weights + inverse.mul(removal).to(weights.dtype)
    kept = torch.ones(d, dtype=torch.bool, device=weights.device)
    kept[drop] = False
    return pruned.masked_fill_(~kept, 0), kept


register(
    MethodInfo(
        name="mfac",
        cls=MFAC,
        kind="optimizer",
        paper="M-FAC: Efficient Matrix-Free Approximations of Second-Order Information",
        arxiv="2107.03356",
        code_url="https://github.com/IST-DASLab/M-FAC",
        summary="natural-gradient steps with the damped empirical Fisher of the last m gradients, matrix-free",
        hyperparameters={
            "lr": NON_NEGATIVE,
            "momentum": DECAY_RATE,
            "weight_decay": NON_NEGATIVE,
            "ngrads": _POSITIVE_INT,
            "damp": POSITIVE,
        },
        lr_range=(1e-4, 1e-2),
        capabilities=Capabilities(global_state=True),
        exemptions={
            "param_groups": "one gradient window over all groups: grouped parameters are not separate optimizers",
            "missing_gradients": "one gradient window: a late parameter joins it with zero past gradients",
            "convergence": "on a noiseless problem the window holds near-collinear gradients, F ~ damp I + g g^T/m, "
            "and the step ~ m g/|g|^2 grows as g vanishes: the method itself (a dense float64 solve) stalls or "
            "diverges on the battery's quadratic and Rosenbrock at every lr of the grid; tests/optim/test_mfac.py "
            "checks convergence on noisy (minibatch) logistic regression",
            "low_precision": "at the default damp 1e-5 the step amplifies gradient perturbations along new "
            "directions by up to 1/damp: on the battery's quadratic a float32 run ends ~1e-3 from the float64 one "
            "whether M-FAC's own arithmetic runs in float32 or float64, and float64 runs whose gradients differ by "
            "bfloat16's resolution end O(1) apart (the method's conditioning); tests/optim/test_mfac.py checks "
            "16-bit parameters and state dtypes at damp 1e-2",
        },
        advice="lr ~ 1e-3 (official), L2 weight decay ~ 3e-3; memory is ngrads copies of the model, so lower "
        "ngrads (e.g. 32-256) for models above ~1M parameters.",
    )
)

register(
    MethodInfo(
        name="mfac_ihvp",
        cls=mfac_ihvp,
        kind="function",
        paper="M-FAC: Efficient Matrix-Free Approximations of Second-Order Information",
        arxiv="2107.03356",
        code_url="https://github.com/IST-DASLab/M-FAC",
        summary="inverse damped empirical Fisher times vectors (static M-FAC, optionally blocked), for OBS pruning",
        hyperparameters={"damp": POSITIVE},
        usage="""
import optimlab
from optimlab.optim.mfac import MFACInverse, obs_prune

# grads: (m, d), one flattened gradient of the (unpruned) weights per row
update = optimlab.mfac_ihvp(grads, vector, damp=1e-5, block_size=128)
# or factor once, then multiply and read the diagonal (OBS scores) as often as needed
inverse = MFACInverse(grads, damp=1e-5, block_size=128)
weights, kept = obs_prune(weights, inverse, num_prune=weights.numel() // 10)
""",
    )
)
