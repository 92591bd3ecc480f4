r"""FRUGAL: AdamW inside a low-dimensional subspace of each matrix, a state-free rule on the rest.

Paper: Zmushko, Beznosikov, Takáč, Horváth, "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
Scalable Training", arXiv `2411.07837 <https://arxiv.org/abs/2411.07837>`_ (ICML 2025).
Official code: https://github.com/fzmushko/FRUGAL (``frugal/proj_optimizer_templates.py``, ``galore_projector.py``,
``coordinate_projector.py``, ``adamw.py``); optimlab follows its semantics. The paper's pre-training set-up
needs the parameter split of :func:`frugal_param_groups`: ``FRUGAL(frugal_param_groups(model))`` (or
``FRUGAL(FRUGAL.model_param_groups(model))``) projects the Linear weights of attention and MLP modules and keeps
embeddings, the output layer, norms and biases on full AdamW; ``FRUGAL(model.parameters())`` makes every 2-D
tensor projectable, embeddings and output layer included.

Every *projectable* parameter :math:`W` (by default every non-empty 2-D parameter of a param group; a group with
``project=False`` holds none) has its gradient :math:`G` split by a projector into a state-full part, updated by
Adam with moments kept in the projected (small) shape, and a state-free remainder, updated by signSGD (or SGD, or
not at all). With :math:`\eta` the group's learning rate, :math:`\lambda` the weight decay, :math:`s_p` =
``proj_lr_scale``, :math:`s_f` = ``inactive_lr_scale`` and :math:`t` the Adam step count since the statistics
were last reset:

.. math::

    G_a &= \operatorname{down}(G), \qquad G_f = G - \operatorname{up}(G_a) \\
    m &\leftarrow \beta_1 m + (1-\beta_1)\, G_a, \qquad v \leftarrow \beta_2 v + (1-\beta_2)\, G_a^2 \\
    U_a &= \frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon}, \qquad
    U_f = \begin{cases} \operatorname{sign}(G_f) & \texttt{"sign\_sgd"} \\ G_f & \texttt{"sgd"} \\
        0 & \texttt{"no"} \end{cases} \\
    W &\leftarrow W\,(1 - \eta\lambda) - \eta s_p\, \operatorname{up}(U_a) - \eta s_p s_f\, U_f

Parameters that are not projectable take a plain AdamW step (decoupled decay, learning rate :math:`\eta`).
``proj_type`` picks the projection of an :math:`r\times c` matrix:

* ``"block"`` (default; BAdam-like): exactly :math:`\operatorname{round}(N\rho)` of the group's :math:`N`
  projectable tensors are *active* and take a full AdamW step (:math:`\operatorname{down} = \operatorname{up}
  = \mathrm{id}`); the others take the state-free step (:math:`G_a = 0`). ``block_order`` picks them at each
  refresh: ``"descending"`` (default) a window of consecutive tensors in the group's order that starts at the
  last one and moves towards the first by :math:`\operatorname{round}(N\rho)` per refresh (cyclically);
  ``"ascending"`` the same from the first; ``"mirror"`` the same window over the order :math:`0, N-1, 1, N-2,
  \dots` (pairs from both ends inwards); ``"random"`` a uniformly random subset. A deactivated tensor's moments
  are freed. Tensors with ``requires_grad=False`` are not blocks (as the code's split leaves them out).
* ``"svd"``, ``"random"``, ``"randperm"`` (GaLore-like): on the *right*, :math:`P \in \mathbb{R}^{k\times c}`
  with orthonormal rows, :math:`k = \operatorname{round}(c\rho)`, :math:`\operatorname{down}(G) = G P^\top`,
  :math:`\operatorname{up}(X) = X P`; on the *left*, :math:`P \in \mathbb{R}^{r\times k}`, :math:`k =
  \operatorname{round}(r\rho)`, :math:`\operatorname{down}(G) = P^\top G`, :math:`\operatorname{up}(X) = P X`.
  ``proj_side="std"`` projects on the right when :math:`r \ge c`, else on the left (the smaller dimension is
  reduced); ``"reverse_std"`` the opposite. :math:`P` holds the top-:math:`k` singular vectors of :math:`G`
  (``"svd"``), a random (Haar) semi-orthogonal matrix (``"random"``) or :math:`k` rows of a random permutation
  matrix (``"randperm"``). A thin SVD has only :math:`\min(r, c)` singular vectors, so ``"svd"`` takes
  :math:`k = \min(k, r, c)` (as the code's ``Vh[:k]``; only ``"reverse_std"`` can ask for more).
* ``"columns"``, ``"rows"``, ``"randk"`` (coordinate, RandK-like): :math:`\operatorname{down}` gathers a random
  subset of :math:`\lfloor n\rho\rfloor` of the :math:`n` columns, rows or single entries and
  :math:`\operatorname{up}` scatters into zeros; the state holds the (sorted) indices instead of a matrix.

The subspace is refreshed, from the current gradient, on a parameter's first step and then every
``update_gap`` :math:`T` steps; with ``reset_statistics`` the moments restart from zero with the refresh (and so
does the bias correction), otherwise they carry over into the new subspace. In block mode one refresh schedule
serves the whole param group (the group's step count is kept in the group as ``"block_step"``); otherwise each
parameter counts its own steps.

Hyperparameters (defaults): ``lr`` 1e-3, ``betas`` (0.9, 0.999), ``eps`` 1e-8, ``weight_decay`` 0.01,
``density`` :math:`\rho` 0.25, ``update_gap`` :math:`T` 200, ``proj_type`` ``"block"``, ``block_order``
``"descending"``, ``proj_side`` ``"std"``, ``inactive_update_rule`` ``"sign_sgd"``, ``inactive_lr_scale`` 1.0
(the authors use 0.1 for fine-tuning), ``proj_lr_scale`` 1.0, ``reset_statistics`` True, ``project`` True,
``seed`` 0 (of the optimizer's own generator, which draws the random subsets and projections).

Choices between paper and code, and deviations:

* the official code has no single default projection: its classes default to SVD (``GaloreAdamW``), a random
  block order (``BlockAdamW``) and columns (``CoordAdamW``), its README to RandK; its ``--optimizer frugal`` is
  the block optimizer, which every pre-training script of the paper runs with ``block_order descending`` (the
  fine-tuning scripts run the coordinate optimizer with columns). optimlab's defaults are the paper's
  pre-training set-up: ``"block"``, ``"descending"`` (on :func:`frugal_param_groups`). ``weight_decay`` 0.01 is
  the code's default (the pre-training scripts set 0, the GLUE ones 0.1); ``eps`` 1e-8 is the code's value (its
  docstring says 1e-6);
* the code's ``CoordAdamW(coord_choice=x)`` is ``proj_type=x`` here; its forced ``"left"``/``"right"``/``"full"``
  sides are not offered;
* ``"mirror"`` equals the code's order whenever the code accepts it (an even number of active tensors out of an
  even :math:`N`); the code rejects an odd count and never activates the middle tensor of an odd :math:`N`;
* the refresh of a GaLore-like or coordinate projection is judged per parameter on its own step count; the
  code judges the whole group on its first tensor's count. They agree when every parameter has a gradient at
  every step;
* with ``reset_statistics=False`` a tensor that stays active across a block refresh keeps its moments (the code
  re-initialises every active tensor at each refresh, as ``reset_statistics=True`` does);
* the projectable set defaults to every non-empty 2-D parameter (embeddings and output layers included);
  :func:`frugal_param_groups` reproduces the code's name-based split (Linear weights of attention and MLP
  modules projectable; embeddings, norms and the output layer regular). Its default module keys add ``"qkv"``
  and ``".proj"`` to the code's list (fused attention input and output, as timm-style models and optimlab's
  bench transformer name them), and ``project_embeddings`` takes every ``nn.Embedding`` where the code matches
  the name ``"embed_tokens"``;
* at :math:`\rho = 1` a GaLore-like projector is square and the remainder is zero: optimlab skips its state-free
  step, where the code takes the sign of the rounding noise of :math:`G - G P^\top P` (a full-size random step).
  A thin-SVD projector capped at :math:`\min(r, c)` (``"reverse_std"``) is not square and keeps the code's
  behaviour: at its refresh step the remainder is rounding noise, and its sign is taken;
* SVD and QR run in the state dtype (float32 for 16-bit parameters, float64 for float64 ones); Adam's bias
  correction is always on (the code's ``correct_bias=True``); ``sign(NaN)`` is NaN, so a non-finite gradient
  shows in the parameters (``torch.sign`` would give 0), and so does one in a part the rule ``"no"`` leaves
  alone.

Memory: the Adam state of a projectable :math:`r\times c` matrix is :math:`2\rho rc` numbers, plus :math:`P` for
the GaLore-like projections (:math:`kc` or :math:`rk` numbers), plus :math:`k` int64 indices for the coordinate
ones: negligible for columns and rows, which keep at most :math:`\rho` of AdamW's state exactly; as many bytes as
the moments for ``"randk"`` with float32 parameters, which so costs :math:`2\rho`. Block mode counts tensors, not
elements (:math:`\operatorname{round}(N\rho)`, as the code): its state stays within :math:`\rho + 0.05` of the
projectable elements' AdamW state when the blocks are layer-aligned (whole equal layers per window, as in the
paper's configurations), but misaligned shapes can exceed it (two LLaMA layers with :math:`d = 512`, :math:`f =
1376` at :math:`\rho = 0.25`: up to 0.376 in a descending cycle), and so can a flat parameter list whose largest
tensor is the output layer. At each refresh the optimizer computes, from the shapes, the active share of the
group's projectable elements (for a deterministic order the largest over one cycle of windows) and warns once
when it exceeds :math:`\rho + 0.05`.

Costs: an SVD per matrix every :math:`T` steps for ``"svd"``; with ``block_order="random"`` the drawn subset is
read on the host once per refresh (a device synchronisation every :math:`T` steps on GPU). A non-finite gradient
at a refresh step makes ``torch.linalg.svd`` fail or return non-finite vectors.

Coming from AdamW: keep AdamW's learning rate (the paper: 1e-3 for LLaMA pre-training, the state-free part at the
same rate) and expect quality close to AdamW's at :math:`\rho = 0.25`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from optimlab._core.kernels import adam_moments_, add_, addcdiv_, kernel, mul_
from optimlab._core.optimizer import OptimlabOptimizer, state_dtype
from optimlab._core.validation import NON_NEGATIVE, Choice, Flag, Interval, adam_family
from optimlab.optim.lion import KAPPAS
from optimlab.registry import Capabilities, MethodInfo, register

__all__ = [
    "FRUGAL",
    "PROJ_TYPES",
    "adam_direction",
    "adamw_update",
    "frugal_",
    "frugal_param_groups",
    "is_projectable",
    "peak_block_share",
    "refresh_blocks_",
    "select_blocks",
    "state_free_update",
]

COORDINATE_TYPES = ("columns", "rows", "randk")
PROJ_TYPES = ("block", "svd", "random", "randperm", *COORDINATE_TYPES)
BLOCK_ORDERS = ("descending", "ascending", "mirror", "random")
PROJ_SIDES = ("std", "reverse_std")
INACTIVE_RULES = ("sign_sgd", "sgd", "no")
_MOMENTS = ("exp_avg", "exp_avg_sq")
# the module-name keys of the official code's split (attention and MLP Linear layers of LLaMA/BERT-style models),
# then ours: fused attention input and output named directly under a block (timm-style, optimlab's bench
# transformer), which the official keys miss when there is no "attn" parent
DEFAULT_TARGET_MODULES = (
    "attn", "mlp", "q_proj", "v_proj", "up_proj", "down_proj", "gate_proj", "k_proj", "o_proj",
    "query", "value", "key", "intermediate.dense", "output.dense",
    "qkv", ".proj",
)  # fmt: skip
# how far above the density block mode's active share may go before the optimizer warns
BLOCK_MEMORY_SLACK = 0.05


# -- kernels ------------------------------------------------------------------------------------------------------
@kernel(read_only=("g",))
def adamw_update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, scalars: Any) -> None:
    """One tensor's AdamW step, in place; ``scalars`` are ``(shrink, β1, 1-β1, β2, 1-β2, sqrt(1-β2^t), ε,
    lr/(1-β1^t))`` with the decoupled decay ``shrink = 1 - lr·λ``."""
    shrink, *moments, step_size = scalars
    mul_(p, shrink)
    addcdiv_(p, m, adam_moments_(g, g, m, v, *moments), -step_size)


@kernel(read_only=("g",))
def adam_direction(g: Tensor, m: Tensor, v: Tensor, out: Tensor, scalars: Any) -> None:
    """Advance Adam's moments with ``g`` and write ``m / (sqrt(v/(1-β2^t)) + ε)`` into ``out`` (the caller scales
    it by ``-lr/(1-β1^t)``); ``scalars`` are ``(β1, 1-β1, β2, 1-β2, sqrt(1-β2^t), ε)``."""
    out.copy_(m / adam_moments_(g, g, m, v, *scalars))


@kernel(read_only=("g",))
def state_free_update(p: Tensor, g: Tensor, scalars: Any, *, rule: str) -> None:
    """``p ← shrink·p − lr·U(g)`` with ``U`` the state-free rule: sign, identity, or 0·g for ``"no"`` (zero, but a
    non-finite gradient still shows, as 0·NaN and 0·inf are NaN); ``scalars`` are ``(shrink, lr)``."""
    shrink, lr = scalars
    mul_(p, shrink)
    if rule == "sign_sgd":
        add_(p, KAPPAS["sign"](g), -lr)  # a NaN stays NaN (torch.sign(nan) is 0)
    else:
        add_(p, g, -lr if rule == "sgd" else 0.0)


# -- which tensors, which subspace ----------------------------------------------------------------------------------
def is_projectable(p: Tensor) -> bool:
    """Whether FRUGAL splits ``p``'s gradient (in a group with ``project=True``): a non-empty 2-D tensor."""
    return p.dim() == 2 and p.numel() > 0


def _right_side(shape: torch.Size, proj_side: str) -> bool:
    """Whether the GaLore-like projection acts on the right (reducing the columns)."""
    rows, cols = shape
    return rows >= cols if proj_side == "std" else rows < cols


def _dense_rank(shape: torch.Size, density: float, right: bool, proj_type: str) -> int:
    k = round((shape[1] if right else shape[0]) * density)
    # a thin SVD has min(r, c) singular vectors: the code's Vh[:k] / U[:, :k] silently stop there
    return min(k, *shape) if proj_type == "svd" else k


def _coordinate_pool(shape: torch.Size, proj_type: str) -> int:
    """How many columns, rows or entries a coordinate projection chooses from."""
    return {"columns": shape[1], "rows": shape[0]}.get(proj_type, shape[0] * shape[1])


def _coordinate_count(shape: torch.Size, density: float, proj_type: str) -> int:
    # as the official code: rounded down, where the GaLore-like rank and the block count round to nearest
    return int(_coordinate_pool(shape, proj_type) * density)


def _draw_on(generator: torch.Generator, device: torch.device, fn: Any) -> Tensor:
    """``fn(device)`` drawn with ``generator`` (on its own device), then moved to ``device``."""
    return fn(generator.device).to(device)


def _dense_projector(g: Tensor, k: int, right: bool, proj_type: str, generator: torch.Generator | None) -> Tensor:
    """The projector for ``g`` (``k×c`` on the right, ``r×k`` on the left), in ``g``'s dtype."""
    rows, cols = g.shape
    n = cols if right else rows
    if proj_type == "svd":
        if k == 0:  # ρ = 0: nothing to span, and an SVD every update_gap steps would be wasted
            return g.new_zeros((0, cols) if right else (rows, 0))
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        return vh[:k].clone() if right else u[:, :k].clone()
    if generator is None:
        raise RuntimeError(f"proj_type={proj_type!r} draws random numbers: pass a torch.Generator as generator")
    if proj_type == "random":
        gauss = _draw_on(generator, g.device, lambda d: torch.randn(n, k, generator=generator, device=d, dtype=g.dtype))
        q, r = torch.linalg.qr(gauss)
        basis = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)  # Haar-distributed: fix QR's sign choice
        return basis.t().contiguous() if right else basis
    chosen = _draw_on(generator, g.device, lambda d: torch.randperm(n, generator=generator, device=d)[:k])
    projector = torch.zeros((k, n) if right else (n, k), dtype=g.dtype, device=g.device)
    slots = torch.arange(k, device=g.device)
    projector[(slots, chosen) if right else (chosen, slots)] = 1.0
    return projector


def _coordinate_indices(shape: torch.Size, k: int, proj_type: str, generator: torch.Generator | None, device) -> Tensor:
    if generator is None:
        raise RuntimeError(f"proj_type={proj_type!r} draws random numbers: pass a torch.Generator as generator")
    n = _coordinate_pool(shape, proj_type)
    chosen = _draw_on(generator, device, lambda d: torch.randperm(n, generator=generator, device=d)[:k])
    return chosen.sort().values  # sorted: the gathers and scatters walk memory in order


def select_blocks(
    n_tensors: int, n_active: int, order: str, refresh_index: int, generator: torch.Generator | None = None
) -> list[int]:
    """The sorted positions of the active tensors at refresh number ``refresh_index`` (0, 1, ...) of block mode."""
    if n_active == 0:
        return []
    if order == "random":
        if generator is None:
            raise RuntimeError("block_order='random' draws random numbers: pass a torch.Generator as generator")
        perm = torch.randperm(n_tensors, generator=generator, device=generator.device)
        return sorted(perm[:n_active].tolist())
    if order == "ascending":
        start = refresh_index * n_active
        return sorted({(start + i) % n_tensors for i in range(n_active)})
    if order == "descending":
        start = n_tensors - 1 - refresh_index * n_active
        return sorted({(start - i) % n_tensors for i in range(n_active)})
    if order == "mirror":  # the window runs over the positions 0, N-1, 1, N-2, ...: pairs from both ends inwards
        outside_in = [i // 2 if i % 2 == 0 else n_tensors - 1 - i // 2 for i in range(n_tensors)]
        start = refresh_index * n_active
        return sorted({outside_in[(start + i) % n_tensors] for i in range(n_active)})
    raise ValueError(f"Invalid block_order: {order!r}; expected one of {', '.join(BLOCK_ORDERS)}")


def peak_block_share(numels: Sequence[int], n_active: int, order: str, active: Iterable[int]) -> float:
    """The largest share of the elements (``numels``: one count per block) that block mode keeps active: over one
    cycle of windows for a deterministic ``order``, of the current ``active`` positions for ``"random"``."""
    total = sum(numels)
    if total == 0 or n_active == 0:
        return 0.0
    n = len(numels)
    # the windows of a deterministic order start n_active further on each refresh: they repeat after n/gcd refreshes
    windows = (
        [active]
        if order == "random"
        else (select_blocks(n, n_active, order, r) for r in range(n // math.gcd(n, n_active)))
    )
    return max(sum(numels[i] for i in window) for window in windows) / total


def refresh_blocks_(
    params: list[Tensor], states: list[dict[str, Any]], active: Iterable[int], *, reset_statistics: bool = True
) -> None:
    """Mark the tensors at positions ``active`` active (fresh moments, or kept ones for a tensor that stays active
    when ``reset_statistics`` is False) and free the others' moments."""
    active = set(active)
    for i, (p, state) in enumerate(zip(params, states, strict=True)):
        state.setdefault("step", 0)
        if i not in active:
            for key in (*_MOMENTS, "adam_step"):
                state.pop(key, None)
            state["active"] = False
        elif reset_statistics or not state.get("active", False):
            state.update(active=True, adam_step=0)
            for key in _MOMENTS:
                state[key] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)


def _reset_moments(state: dict[str, Any], shape: tuple[int, ...], like: Tensor, reset: bool) -> None:
    """Zero moments of ``shape`` (and a restarted bias correction) unless they exist, fit and ``reset`` is False."""
    if "exp_avg" not in state or tuple(state["exp_avg"].shape) != shape:
        for key in _MOMENTS:
            state[key] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        state["adam_step"] = 0
    elif reset:
        for key in _MOMENTS:
            state[key].zero_()
        state["adam_step"] = 0


# -- the functional core --------------------------------------------------------------------------------------------
def frugal_(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    density: float,
    update_gap: int,
    proj_type: str = "block",
    proj_side: str = "std",
    inactive_update_rule: str = "sign_sgd",
    inactive_lr_scale: float = 1.0,
    proj_lr_scale: float = 1.0,
    reset_statistics: bool = True,
    project: bool = True,
    generator: torch.Generator | None = None,
) -> None:
    """Functional FRUGAL: update ``params`` and ``states`` in place (``grads`` are only read).

    A state starts as ``{}`` or ``{"step": 0}``. A regular parameter's holds ``step``, ``exp_avg``,
    ``exp_avg_sq``; a projectable one's ``step`` (its update count, which drives the refresh), ``adam_step`` (the
    bias correction's count since the last reset), the moments in projected shape and ``projector`` (GaLore-like)
    or ``indices`` (coordinate). In block mode the caller sets ``active`` first (:func:`refresh_blocks_`): a
    ``RuntimeError`` if no projectable state has it, and a state without it next to ones with it is inactive.
    ``generator`` draws the random projections.
    """
    if project and proj_type == "block":
        blocks = [state for p, state in zip(params, states, strict=True) if is_projectable(p)]
        if blocks and not any("active" in state for state in blocks):  # (dict keys only: no device sync)
            raise RuntimeError(
                "frugal_ with proj_type='block' needs the active tensors chosen first: call refresh_blocks_ on "
                "the states (every update_gap steps), or use the FRUGAL class, which does"
            )
    shrink = 1 - lr * weight_decay
    lr_active = lr * proj_lr_scale
    lr_free = lr_active * inactive_lr_scale
    for p, g, state in zip(params, grads, states, strict=True):
        state["step"] = state.get("step", 0) + 1
        if not (project and is_projectable(p)):
            _adamw(p, g, state, "step", shrink, lr, betas, eps)
        elif proj_type == "block":
            if state.get("active", False):
                _adamw(p, g, state, "adam_step", shrink, lr_active, betas, eps)
            else:
                state_free_update(p, g, scalars=(shrink, lr_free), rule=inactive_update_rule)
        elif proj_type in COORDINATE_TYPES:
            k = _coordinate_count(p.shape, density, proj_type)
            refresh = "indices" not in state or state["indices"].numel() != k or (state["step"] - 1) % update_gap == 0
            if refresh:
                state["indices"] = _coordinate_indices(p.shape, k, proj_type, generator, p.device)
            _coordinate_step(p, g, state, proj_type, shrink, lr_active, lr_free, betas, eps,
                             reset_statistics, refresh, inactive_update_rule)  # fmt: skip
        else:
            right = _right_side(p.shape, proj_side)
            k = _dense_rank(p.shape, density, right, proj_type)
            shape = (k, p.shape[1]) if right else (p.shape[0], k)
            refresh = (
                "projector" not in state
                or tuple(state["projector"].shape) != shape
                or (state["step"] - 1) % update_gap == 0
            )
            if refresh:
                state["projector"] = _dense_projector(g, k, right, proj_type, generator)
            _dense_step(p, g, state, right, shrink, lr_active, lr_free, betas, eps,
                        reset_statistics, refresh, inactive_update_rule)  # fmt: skip


def _adamw(p: Tensor, g: Tensor, state: dict, count: str, shrink: float, lr: float, betas, eps: float) -> None:
    """A full AdamW step, its bias correction from ``state[count]`` (advanced here for ``"adam_step"``)."""
    if "exp_avg" not in state:
        for key in _MOMENTS:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state.setdefault(count, 0)
    if count != "step":  # the parameter's own count is advanced by the caller
        state[count] += 1
    beta1, beta2 = betas
    t = state[count]
    scalars = (shrink, beta1, 1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2**t), eps, lr / (1 - beta1**t))
    adamw_update(p, g, state["exp_avg"], state["exp_avg_sq"], scalars=scalars)


def _projected_adam(ga: Tensor, state: dict, betas, eps: float, refreshed: bool, reset: bool) -> tuple[Tensor, float]:
    """Adam's direction for the projected gradient ``ga`` (moments reset at a refresh when ``reset``), and
    ``1/(1-β1^t)``."""
    if refreshed:
        _reset_moments(state, tuple(ga.shape), ga, reset)
    beta1, beta2 = betas
    state["adam_step"] += 1
    t = state["adam_step"]
    out = torch.empty_like(ga)
    adam_direction(ga, state["exp_avg"], state["exp_avg_sq"], out,
                   scalars=(beta1, 1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2**t), eps))  # fmt: skip
    return out, 1 / (1 - beta1**t)


def _dense_step(p, g, state, right, shrink, lr_active, lr_free, betas, eps, reset, refreshed, rule) -> None:
    projector = state["projector"]
    ga = g @ projector.t() if right else projector.t() @ g
    direction, inv_bc1 = _projected_adam(ga, state, betas, eps, refreshed, reset)
    if rule == "no" or projector.shape[0] == projector.shape[1]:
        # (a square projector spans everything: the remainder is zero, and its sign would be rounding noise)
        mul_(p, shrink)
    else:  # the remainder G − up(down(G)), in one pass
        residual = torch.addmm(g, ga, projector, alpha=-1) if right else torch.addmm(g, projector, ga, alpha=-1)
        state_free_update(p, residual, scalars=(shrink, lr_free), rule=rule)
    if right:
        p.addmm_(direction, projector, alpha=-lr_active * inv_bc1)
    else:
        p.addmm_(projector, direction, alpha=-lr_active * inv_bc1)


def _coordinate_step(p, g, state, choice, shrink, lr_active, lr_free, betas, eps, reset, refreshed, rule) -> None:
    indices = state["indices"]
    dim = {"columns": 1, "rows": 0}.get(choice)
    ga = g.reshape(-1).index_select(0, indices) if dim is None else g.index_select(dim, indices)
    direction, inv_bc1 = _projected_adam(ga, state, betas, eps, refreshed, reset)
    if rule == "no":
        state_free_update(p, g, scalars=(shrink, 0.0), rule=rule)
    else:  # the remainder: G with the selected coordinates zeroed
        residual = g.clone(memory_format=torch.contiguous_format)
        (residual.view(-1).index_fill_(0, indices, 0) if dim is None else residual.index_fill_(dim, indices, 0))
        state_free_update(p, residual, scalars=(shrink, lr_free), rule=rule)
    alpha = -lr_active * inv_bc1
    if dim is not None:
        p.index_add_(dim, indices, direction, alpha=alpha)
    elif p.is_contiguous():
        p.view(-1).index_add_(0, indices, direction, alpha=alpha)
    else:
        scattered = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        scattered.view(-1).index_copy_(0, indices, direction)
        p.add_(scattered, alpha=alpha)


# -- the class ------------------------------------------------------------------------------------------------------
class FRUGAL(OptimlabOptimizer):
    __doc__ = __doc__

    functional = staticmethod(frugal_)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        density: float = 0.25,
        update_gap: int = 200,
        proj_type: str = "block",
        block_order: str = "descending",
        proj_side: str = "std",
        inactive_update_rule: str = "sign_sgd",
        inactive_lr_scale: float = 1.0,
        proj_lr_scale: float = 1.0,
        reset_statistics: bool = True,
        project: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(params, self._defaults_from_arguments(locals()))
        self._block_memory_warned = False
        # made now, not on first use: torch.compile loses a generator created inside a traced step
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if first is not None:
            self.generator(first.device)

    @classmethod
    def model_param_groups(cls, model: nn.Module) -> list[dict[str, Any]]:
        """The paper's split of ``model``'s parameters, :func:`frugal_param_groups` (the benchmark runner builds
        FRUGAL on it)."""
        return frugal_param_groups(model)

    @staticmethod
    def _blocks(group: dict[str, Any]) -> list[Tensor]:
        # a frozen tensor gets no gradient: as a block it would only take an active slot and hold moments
        return [p for p in group["params"] if p.requires_grad and is_projectable(p)]

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return {"step": 0}  # the core creates the rest: its shape depends on the projection

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict]
    ) -> None:
        if group["project"] and group["proj_type"] == "block":
            self._refresh_blocks_if_due(group)
        frugal_(params, grads, states, **self._core_arguments(group), generator=self._generator)

    def _refresh_blocks_if_due(self, group: dict[str, Any]) -> None:
        """Block mode: count the group's step and, every ``update_gap`` of them, choose the active tensors."""
        step = group.get("block_step", 0)
        group["block_step"] = step + 1
        blocks = self._blocks(group) if step % group["update_gap"] == 0 else []
        if blocks:
            n_active = round(len(blocks) * group["density"])
            active = select_blocks(
                len(blocks),
                n_active,
                group["block_order"],
                step // group["update_gap"],
                self.generator(blocks[0].device),
            )
            if not self._block_memory_warned:
                self._warn_if_blocks_exceed_density(group, blocks, n_active, active)
            refresh_blocks_(blocks, [self.state[p] for p in blocks], active, reset_statistics=group["reset_statistics"])

    def _warn_if_blocks_exceed_density(
        self, group: dict[str, Any], blocks: list[Tensor], n_active: int, active: list[int]
    ) -> None:
        share = peak_block_share([p.numel() for p in blocks], n_active, group["block_order"], active)
        if share > group["density"] + BLOCK_MEMORY_SLACK:
            self._block_memory_warned = True
            warnings.warn(
                f"FRUGAL block mode: the active tensors hold up to {share:.3f} of the projectable elements, more "
                f"than density={group['density']} + {BLOCK_MEMORY_SLACK} (blocks are counted, not sized), so the "
                "optimizer state will exceed the nominal density; build the optimizer on "
                "frugal_param_groups(model) (layer-aligned blocks, embeddings and output layer regular) or use "
                "proj_type='columns'",
                stacklevel=2,
            )


def frugal_param_groups(
    model: nn.Module,
    target_modules: Iterable[str] = DEFAULT_TARGET_MODULES,
    *,
    project_embeddings: bool = False,
    project_logits: bool = False,
) -> list[dict[str, Any]]:
    """Param groups with the official code's split: the weights of ``nn.Linear`` modules whose qualified name
    contains one of ``target_modules`` are projectable (``project=True``), everything else regular
    (``project=False``, full AdamW). ``project_embeddings`` adds ``nn.Embedding`` weights (the code: parameters
    named ``embed_tokens``), ``project_logits`` the weights of modules named ``lm_head``; as in the code they
    follow the Linear weights, in ``named_parameters`` order (the order block mode walks). Parameters with
    ``requires_grad=False`` are left out.
    """
    keys = tuple(target_modules)
    chosen: dict[int, Tensor] = {}
    extra: set[int] = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or not weight.requires_grad:
            continue
        if isinstance(module, nn.Linear) and any(key in name for key in keys):
            chosen[id(weight)] = weight
        elif (project_embeddings and isinstance(module, nn.Embedding)) or (
            project_logits and name.rsplit(".", 1)[-1] == "lm_head"
        ):
            extra.add(id(weight))
    for p in model.parameters():
        if id(p) in extra:
            chosen.setdefault(id(p), p)
    regular = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    return [{"params": regular, "project": False}, {"params": list(chosen.values()), "project": True}]


register(
    MethodInfo(
        name="frugal",
        cls=FRUGAL,
        kind="optimizer",
        paper="FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training",
        arxiv="2411.07837",
        code_url="https://github.com/fzmushko/FRUGAL",
        summary="AdamW in a refreshed subspace of each matrix (blocks, SVD, random, coordinates), signSGD on the rest",
        hyperparameters={
            **adam_family(betas=2),
            "density": Interval(0.0, 1.0),
            "update_gap": Interval(1, integer=True),
            "proj_type": Choice(PROJ_TYPES),
            "block_order": Choice(BLOCK_ORDERS),
            "proj_side": Choice(PROJ_SIDES),
            "inactive_update_rule": Choice(INACTIVE_RULES),
            "inactive_lr_scale": NON_NEGATIVE,
            "proj_lr_scale": NON_NEGATIVE,
            "reset_statistics": Flag(),
            "project": Flag(),
            "seed": Interval(0, float(2**63), integer=True),  # within what torch.Generator.manual_seed takes
        },
        lr_range=(1e-4, 1e-2),
        capabilities=Capabilities(global_state=True, stochastic=True),
        advice=(
            "AdamW's learning rate (the paper: 1e-3 for LLaMA pre-training, the state-free part at the same rate; "
            "inactive_lr_scale 0.1 for fine-tuning); density 0.25 keeps about a quarter of AdamW's state. For the "
            "paper's set-up build it on frugal_param_groups(model) (embeddings, lm_head, norms and biases on full "
            "AdamW): FRUGAL(model.parameters()) projects every 2-D tensor, embeddings and head included."
        ),
    )
)
