r"""Coordinate-wise clipped SGD, Adam, Lion and signSGD: the variants of Pan & Li, where the clip sits inside
the method.

Paper: Pan & Li, "Toward Understanding Why Adam Converges Faster Than SGD for Transformers", arXiv
`2306.00204 <https://arxiv.org/abs/2306.00204>`_ (OPT 2022 workshop). Official code:
https://github.com/panyan7/adam-vs-sgd (``landscape_utils.py``: the update of each method as the paper analyses
it; ``torch_optimizer/{sgd_clip,adam_clip,lion,sign_sgd}.py``: the optimizers of its convergence runs;
``algorithm_list.py``: the fractions and learning rates).

:math:`\operatorname{clip}_c` is the coordinate-wise clip of :mod:`optimlab.transforms.coord_clip`: entries
clamped to :math:`\pm s\tau`, where :math:`\tau` is the :math:`(\lfloor c\,d\rfloor+1)`-th largest magnitude over
**all** :math:`d` entries of all parameters' inputs (one threshold over every param group), :math:`s` =
``threshold_scale``; :math:`c = 0` is the identity. :math:`t` counts each parameter's steps, :math:`\eta` is the
learning rate, :math:`\lambda` the weight decay.

**CoordClippedSGD** (SGD with EMA momentum on the clipped gradient; L2 decay added after the clip, as
``sgd_clip.py``):

.. math::

    \hat g = \operatorname{clip}_c(g) + \lambda\theta, \qquad
    m \leftarrow \begin{cases} \hat g & t = 1 \\ \mu m + (1-\mu)\,\hat g & t > 1 \end{cases}, \qquad
    \theta \leftarrow \theta - \eta\, m

(torch's ``SGD(momentum=μ, dampening=μ)`` when :math:`c = 0`).

**CoordClippedSignSGD**: the same momentum, then :math:`\theta \leftarrow \theta - \eta\,\operatorname{sign}(m)`.

**CoordClippedAdam** (only the first moment's input is clipped; the second moment sees the unclipped
gradient; L2 decay added *before* the clip, as ``adam_clip.py``; optional second clip of the update with its own
fraction :math:`c_u` = ``clip_update`` and scale 1, as ``landscape_utils.AdamParams``):

.. math::

    g &\leftarrow g + \lambda\theta \\
    m &\leftarrow \beta_1 m + (1-\beta_1) \operatorname{clip}_c(g), \qquad
    v \leftarrow \beta_2 v + (1-\beta_2)\, g^2 \\
    u &= \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}, \qquad
    \theta \leftarrow \theta - \eta \operatorname{clip}_{c_u}(u)

(:math:`\epsilon` outside the bias-corrected root, as ``torch.optim.Adam`` and the official code: torch's Adam
when :math:`c = c_u = 0`, up to rounding, since torch forms :math:`m` with ``lerp``).

**CoordClippedLion** (the gradient clipped before the momentum, decoupled decay, as ``torch_optimizer/lion.py``):

.. math::

    \hat g = \operatorname{clip}_c(g), \quad k = \beta_1 m + (1-\beta_1)\hat g, \quad
    \theta \leftarrow (1-\eta\lambda)\theta - \eta\, D(k), \quad m \leftarrow \beta_2 m + (1-\beta_2)\hat g

with :math:`D = \operatorname{sign}` for ``clip_update = 1`` (Lion; :func:`optimlab.Lion` when :math:`c = 0`) and
:math:`D = \operatorname{clip}_{c_u}` (scale 1) for ``clip_update`` :math:`c_u < 1`, as
``landscape_utils.LionParams``: the clip *replaces* the sign (the sign is the limit of
:math:`\operatorname{clip}_{c_u}(k)/\tau` as :math:`c_u \to 1`), so such a step has the gradient's scale, not 1
per coordinate: retune :math:`\eta`.

Hyperparameters (defaults):

- CoordClippedSGD: ``lr`` 1e-3, ``momentum`` 0.9, ``weight_decay`` 0.0, ``fraction`` 0.1,
  ``threshold_scale`` 1.0. CoordClippedSignSGD: the same.
- CoordClippedAdam: ``lr`` 1e-3, ``betas`` (0.9, 0.999), ``eps`` 1e-8, ``weight_decay`` 0.0, ``fraction`` 0.5,
  ``clip_update`` 0.0, ``threshold_scale`` 1.0.
- CoordClippedLion: ``lr`` 1e-4, ``betas`` (0.9, 0.99), ``weight_decay`` 0.0, ``fraction`` 0.1, ``clip_update``
  1.0 (the sign), ``threshold_scale`` 1.0.

``fraction``, ``clip_update`` and ``threshold_scale`` act over all param groups at once, so they are set in the
constructor and cannot differ between groups. **The defaults are the fractions of the paper's runs**
(``algorithm_list.py``): ``fraction`` 0.1 for SGD (and normalized SGD), 0.5 for Adam (and Adafactor), each in
its convergence runs; ``threshold_scale`` 1. The paper trains no clipped signSGD or Lion: their gradient clip
takes SGD's 0.1 here, and Lion keeps its sign (``clip_update`` 1) so that Lion's learning rates stay right; the
landscape runs' ``clip_update`` 0.5 (for Adam and Lion) is an option, off by default. Fraction 0 (the official classes' ``coordinate_clip`` default) turns a clip
off. Learning rates of the convergence runs (machine translation): 5e-3 for clipped SGD (1e-3 unclipped), 3e-3
for clipped Adam (2e-3), 2e-3 for Lion and signSGD; (autoregressive) 1.5e-4 for clipped Adam (1e-4).

Where the official code disagrees with itself, optimlab follows the paper's definitions (``landscape_utils.py``),
and says so here:

- *Scope of the threshold.* ``landscape_utils`` clips over all parameters of the model; the ``torch_optimizer``
  classes compute it per param group. optimlab uses all groups (the same with a single group).
- *Momentum.* ``landscape_utils`` uses the EMA form above with :math:`\mu = 0.9` for SGD and signSGD; the
  ``torch_optimizer`` classes take torch's ``momentum``/``dampening`` (default 0, which the convergence runs
  kept). optimlab uses the EMA form with default 0.9; ``momentum=0`` gives plain clipped (sign) SGD.
- *The official SGD, signSGD and Adam optimizers clip only on their ``foreach`` path*, which is off by default
  (``foreach=None`` selects the per-tensor path, which never clips, and signSGD's never takes the sign either)
  and is not switched on in ``algorithm_list.py``; the official Lion always clips. optimlab always clips.
- *Adam's bias correction.* ``landscape_utils.AdamParams`` corrects with :math:`t+1` (its counter starts at 1
  and is advanced before the update is read); optimlab uses :math:`t`, as ``adam_clip.py`` and torch.
- *Weight decay* follows each official optimizer (SGD, signSGD: L2 after the clip; Adam: L2 before it; Lion:
  decoupled); the landscape code has none.

Limitation (of the method): on a noiseless objective, once more than a fraction :math:`1-c` of the coordinates
has converged, :math:`\tau` is the gradient of a converged coordinate and tends to 0, and the clip slows the
remaining ones to a crawl (for Adam most visibly, whose clipped coordinates step by about
:math:`\eta\,\tau/\lvert g\rvert`). With stochastic gradients, as in training, the noise keeps :math:`\tau` up.

Coming from AdamW: ``CoordClippedAdam(params, lr=..., fraction=0.5)`` at Adam's learning rate or up to ~1.5x
higher (the paper's runs); the decay is L2, not decoupled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from optimlab._core.kernels import adam_moments_, add, add_, addcdiv_, kernel, mul_
from optimlab._core.optimizer import OptimlabOptimizer, as_float
from optimlab._core.validation import DECAY_RATE, NON_NEGATIVE, Constraint, Each, adam_family
from optimlab.optim.lion import KAPPAS, lion_k_
from optimlab.registry import Capabilities, MethodInfo, register
from optimlab.transforms.coord_clip import (
    CODE_URL,
    FRACTION,
    GLOBAL_CLIP,
    GLOBAL_CLIP_EXEMPTIONS,
    PAPER,
    clip_top_coordinates_grouped,
)

__all__ = [
    "CoordClippedAdam",
    "CoordClippedLion",
    "CoordClippedSGD",
    "CoordClippedSignSGD",
    "Group",
    "coord_clipped_adam_",
    "coord_clipped_lion_",
    "coord_clipped_sgd_",
    "coord_clipped_sign_sgd_",
]

# one param group for a functional core: its params, their gradients, their states, and the group's
# hyperparameters (``lr`` as a float and the method's per-group ones, e.g. ``betas``)
Group = tuple[list[Tensor], list[Tensor], list[dict[str, Any]], dict[str, Any]]


def _grads(groups: Sequence[Group]) -> list[list[Tensor]]:
    return [grads for _, grads, _, _ in groups]


# -- SGD and signSGD -------------------------------------------------------------------------------------------------
@kernel(read_only=("g",))
def ema_momentum_update(p: Tensor, g: Tensor, m: Tensor, scalars: Any, *, sign: bool) -> None:
    """One tensor's step of SGD (``sign=False``) or signSGD with EMA momentum on ``g``, in place; ``scalars`` as
    made by ``coord_clipped_sgd_``."""
    keep, blend, weight_decay, lr = scalars
    g = add(g, p, weight_decay)
    add_(mul_(m, keep), g, blend)
    add_(p, KAPPAS["sign"](m) if sign else m, -lr)


def coord_clipped_sgd_(
    groups: Sequence[Group], *, fraction: float, threshold_scale: float = 1.0, sign: bool = False
) -> None:
    """Functional coordinate-wise clipped SGD (``sign=True``: signSGD) over all ``groups`` (hyperparameters
    ``lr``, ``momentum``, ``weight_decay``; states ``step``, ``momentum_buffer``), in place."""
    clipped = clip_top_coordinates_grouped(_grads(groups), fraction, threshold_scale)
    for (params, _, states, hyper), group_clipped in zip(groups, clipped, strict=True):
        lr, momentum, weight_decay = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        for p, g, state in zip(params, group_clipped, states, strict=True):
            state["step"] += 1
            # the first step starts the average at the gradient itself (torch's SGD with dampening = momentum)
            keep, blend = (0.0, 1.0) if state["step"] == 1 else (momentum, 1.0 - momentum)
            ema_momentum_update(p, g, state["momentum_buffer"], scalars=(keep, blend, weight_decay, lr), sign=sign)


def coord_clipped_sign_sgd_(groups: Sequence[Group], *, fraction: float, threshold_scale: float = 1.0) -> None:
    """Functional coordinate-wise clipped signSGD: :func:`coord_clipped_sgd_` with ``sign=True``."""
    coord_clipped_sgd_(groups, fraction=fraction, threshold_scale=threshold_scale, sign=True)


# -- Adam ---------------------------------------------------------------------------------------------------------------
@kernel(read_only=("clipped", "g"))
def coord_clipped_adam_update(p: Tensor, clipped: Tensor, g: Tensor, m: Tensor, v: Tensor, scalars: Any) -> None:
    """One tensor's clipped-Adam step without an update clip, in place; the last scalar is ``lr/(1-β1^t)``."""
    denom = adam_moments_(clipped, g, m, v, *scalars[:-1])  # m on the clipped gradient, v on the raw one
    addcdiv_(p, m, denom, -scalars[-1])


@kernel(read_only=("clipped", "g"))
def coord_clipped_adam_direction(clipped: Tensor, g: Tensor, m: Tensor, v: Tensor, out: Tensor, scalars: Any) -> None:
    """Advance one tensor's moments and write its unscaled update ``m̂/(sqrt(v̂)+ε)`` into ``out``; the last
    scalar is ``1/(1-β1^t)``."""
    denom = adam_moments_(clipped, g, m, v, *scalars[:-1])  # m on the clipped gradient, v on the raw one
    out.copy_(mul_(m / denom, scalars[-1]))


def coord_clipped_adam_(
    groups: Sequence[Group], *, fraction: float, clip_update: float = 0.0, threshold_scale: float = 1.0
) -> None:
    """Functional coordinate-wise clipped Adam over all ``groups`` (hyperparameters ``lr``, ``betas``, ``eps``,
    ``weight_decay``; states ``step``, ``exp_avg``, ``exp_avg_sq``), in place."""
    decayed = [
        [add(g, p, hyper["weight_decay"]) for p, g in zip(params, grads, strict=True)]
        for params, grads, _, hyper in groups
    ]
    clipped = clip_top_coordinates_grouped(decayed, fraction, threshold_scale)
    directions: list[list[Tensor]] = []
    for (params, _, states, hyper), group_grads, group_clipped in zip(groups, decayed, clipped, strict=True):
        beta1, beta2 = hyper["betas"]
        directions.append([])
        for p, g, c, state in zip(params, group_grads, group_clipped, states, strict=True):
            state["step"] += 1
            t = state["step"]
            bc1 = 1 - beta1**t
            moments = (beta1, 1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2**t), hyper["eps"])
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if clip_update == 0:
                coord_clipped_adam_update(p, c, g, m, v, scalars=(*moments, hyper["lr"] / bc1))
            else:
                out = torch.empty_like(m)
                coord_clipped_adam_direction(c, g, m, v, out, scalars=(*moments, 1 / bc1))
                directions[-1].append(out)
    if clip_update == 0:
        return
    for (params, _, _, hyper), group_directions in zip(
        groups, clip_top_coordinates_grouped(directions, clip_update), strict=True
    ):
        for p, u in zip(params, group_directions, strict=True):
            add_(p, u, -hyper["lr"])


# -- Lion ---------------------------------------------------------------------------------------------------------------
@kernel(read_only=("g",))
def lion_interpolation(g: Tensor, m: Tensor, out: Tensor, scalars: Any) -> None:
    """Write Lion's interpolation ``β1 m + (1-β1) g`` into ``out``, then advance ``m`` to ``β2 m + (1-β2) g``."""
    beta1, c1, beta2, c2 = scalars
    out.copy_(add(m * beta1, g, c1))
    add_(mul_(m, beta2), g, c2)


def coord_clipped_lion_(
    groups: Sequence[Group], *, fraction: float, clip_update: float = 1.0, threshold_scale: float = 1.0
) -> None:
    """Functional coordinate-wise clipped Lion over all ``groups`` (hyperparameters ``lr``, ``betas``,
    ``weight_decay``; state ``exp_avg``), in place. ``clip_update = 1`` steps with the sign (Lion itself)."""
    clipped = clip_top_coordinates_grouped(_grads(groups), fraction, threshold_scale)
    if clip_update == 1:
        for (params, _, states, hyper), group_clipped in zip(groups, clipped, strict=True):
            lion_k_(
                params, group_clipped, states, lr=hyper["lr"], betas=hyper["betas"], weight_decay=hyper["weight_decay"]
            )
        return
    interpolations: list[list[Tensor]] = []
    for (_, _, states, hyper), group_clipped in zip(groups, clipped, strict=True):
        beta1, beta2 = hyper["betas"]
        interpolations.append([])
        for g, state in zip(group_clipped, states, strict=True):
            out = torch.empty_like(state["exp_avg"])
            lion_interpolation(g, state["exp_avg"], out, scalars=(beta1, 1 - beta1, beta2, 1 - beta2))
            interpolations[-1].append(out)
    for (params, _, _, hyper), directions in zip(
        groups, clip_top_coordinates_grouped(interpolations, clip_update), strict=True
    ):
        for p, direction in zip(params, directions, strict=True):
            add_(mul_(p, 1 - hyper["lr"] * hyper["weight_decay"]), direction, -hyper["lr"])


# -- the classes --------------------------------------------------------------------------------------------------------
class _CoordClipped(OptimlabOptimizer):
    """Shared plumbing: the clip couples every param group, so all groups go to the functional core at once."""

    # options of the global clip (shared by all groups) and the per-group hyperparameters the core reads
    shared_hyperparameters: ClassVar[tuple[str, ...]] = ("fraction", "threshold_scale")
    group_options: ClassVar[tuple[str, ...]]

    def _apply(self, batches: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[dict]]]) -> None:
        # One batch of every group's tensors, so that the base class's handling of 16-bit parameters (float32
        # working copies, written back once) serves the whole step; ``_update_group`` splits it by group again.
        if not batches:
            return
        merged = {"members": [(group, len(params)) for group, params, _, _ in batches]}
        params = [p for _, group_params, _, _ in batches for p in group_params]
        grads = [g for _, _, group_grads, _ in batches for g in group_grads]
        states = [s for _, _, _, group_states in batches for s in group_states]
        super()._apply([(merged, params, grads, states)])

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict]
    ) -> None:
        groups: list[Group] = []
        start = 0
        for member, count in group["members"]:
            hyper = {key: member[key] for key in self.group_options}
            hyper["lr"] = as_float(member["lr"])
            end = start + count
            groups.append((params[start:end], grads[start:end], states[start:end], hyper))
            start = end
        type(self).functional(groups, **self._shared())


class CoordClippedSGD(_CoordClipped):
    __doc__ = __doc__
    functional = staticmethod(coord_clipped_sgd_)
    group_options = ("momentum", "weight_decay")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        fraction: float = 0.1,
        threshold_scale: float = 1.0,
    ) -> None:
        super().__init__(params, self._defaults_from_arguments(locals()))

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return {"step": 0, "momentum_buffer": self._zeros(p)}


class CoordClippedSignSGD(CoordClippedSGD):
    __doc__ = __doc__
    functional = staticmethod(coord_clipped_sign_sgd_)


class CoordClippedAdam(_CoordClipped):
    __doc__ = __doc__
    functional = staticmethod(coord_clipped_adam_)
    shared_hyperparameters = ("fraction", "clip_update", "threshold_scale")
    group_options = ("betas", "eps", "weight_decay")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fraction: float = 0.5,
        clip_update: float = 0.0,
        threshold_scale: float = 1.0,
    ) -> None:
        super().__init__(params, self._defaults_from_arguments(locals()))

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return {"step": 0, "exp_avg": self._zeros(p), "exp_avg_sq": self._zeros(p)}


class CoordClippedLion(_CoordClipped):
    __doc__ = __doc__
    functional = staticmethod(coord_clipped_lion_)
    shared_hyperparameters = ("fraction", "clip_update", "threshold_scale")
    group_options = ("betas", "weight_decay")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        fraction: float = 0.1,
        clip_update: float = 1.0,
        threshold_scale: float = 1.0,
    ) -> None:
        super().__init__(params, self._defaults_from_arguments(locals()))

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return {"exp_avg": self._zeros(p)}


_SGD_RULES: dict[str, Constraint] = {
    "lr": NON_NEGATIVE,
    "momentum": DECAY_RATE,
    "weight_decay": NON_NEGATIVE,
    **GLOBAL_CLIP,
}


def _register(
    name: str,
    cls: type,
    summary: str,
    rules: dict[str, Constraint],
    lr_range: tuple[float, float],
    advice: str,
    batch_scaling: str | None = None,
) -> None:
    register(
        MethodInfo(
            name=name,
            cls=cls,
            kind="optimizer",
            paper=PAPER,
            arxiv="2306.00204",
            code_url=CODE_URL,
            summary=summary,
            hyperparameters=rules,
            lr_range=lr_range,
            capabilities=Capabilities(global_state=True),
            exemptions=GLOBAL_CLIP_EXEMPTIONS,
            advice=advice,
            batch_scaling=batch_scaling,
        )
    )


# lr ranges bracket the paper's runs (SGD 3e-5 to 5e-3, Adam 1e-4 to 3e-3, Lion and signSGD 2e-4 to 2e-3)
_register(
    "coordclip_sgd",
    CoordClippedSGD,
    "SGD with EMA momentum on the coordinate-wise clipped gradient",
    _SGD_RULES,
    (1e-5, 1e-1),
    "A ~5x larger lr than for unclipped SGD (5e-3 vs 1e-3 in the paper's runs, at its fraction 0.1, the default).",
    batch_scaling="linear",
)
_register(
    "coordclip_signsgd",
    CoordClippedSignSGD,
    "signSGD with EMA momentum on the coordinate-wise clipped gradient",
    _SGD_RULES,
    (1e-5, 1e-2),
    "Lion-like learning rates (2e-3 for unclipped signSGD in the paper's runs); the fraction is SGD's 0.1.",
)
_register(
    "coordclip_adam",
    CoordClippedAdam,
    "Adam whose first moment takes the coordinate-wise clipped gradient (its second moment the raw one)",
    {**adam_family(betas=2), **GLOBAL_CLIP, "clip_update": FRACTION},
    (1e-5, 1e-1),
    "Adam's lr or ~1.5x it (3e-3 vs 2e-3 in the paper's runs at its fraction 0.5, the default); the decay is L2, "
    "not decoupled.",
    batch_scaling="sqrt",
)
_register(
    "coordclip_lion",
    CoordClippedLion,
    "Lion on the coordinate-wise clipped gradient; optionally a clip of the update in place of the sign",
    {
        "lr": NON_NEGATIVE,
        "betas": Each((DECAY_RATE, DECAY_RATE)),
        "weight_decay": NON_NEGATIVE,
        **GLOBAL_CLIP,
        "clip_update": FRACTION,
    },
    (1e-5, 1e-2),
    "Lion's settings (lr 3-10x below AdamW's); clip_update < 1 (0.5 in the paper's landscape runs) replaces the "
    "sign by a clip, so the step takes the gradient's scale: retune the lr for it.",
)
