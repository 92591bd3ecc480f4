r"""AdaHessian: Adam whose second moment tracks a Hutchinson estimate of the Hessian diagonal.

Paper: Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, "ADAHESSIAN: An Adaptive Second Order Optimizer for
Machine Learning", AAAI 2021, arXiv `2006.00719 <https://arxiv.org/abs/2006.00719>`_.
Official code: https://github.com/amirgholami/adahessian (``image_classification/optim_adahessian.py``; the
3-D rule of the spatial average from ``instruction/adahessian.py``). optimlab follows the image-classification
code, the one the paper's ResNet results come from.

Every step draws one Rademacher probe :math:`z \in \{-1, +1\}^d` (from the optimizer's own generator) and takes
one Hessian-vector product through the graph of the gradient, over every parameter of every param group:

.. math::

    Hz &= \nabla_\theta \langle \nabla_\theta L, z \rangle \qquad (\mathbb{E}[z \odot Hz] = \operatorname{diag} H) \\
    D &= \operatorname{avg}_s(\lvert Hz \rvert) \quad\text{(``abs_before_avg=True``, official)}
       \qquad\text{or}\qquad \operatorname{avg}_s(z \odot Hz) \quad\text{(paper)} \\
    m &\leftarrow \beta_1 m + (1-\beta_1)\, g, \qquad v \leftarrow \beta_2 v + (1-\beta_2)\, D^2 \\
    \theta &\leftarrow \theta - \eta \left( \frac{m / (1-\beta_1^t)}
        {\bigl(\sqrt{v} / \sqrt{1-\beta_2^t}\bigr)^{k} + \epsilon} + \lambda\theta \right)

:math:`\operatorname{avg}_s` is the spatial average: a tensor with three or more dimensions (a convolution kernel
``(out, in, *kernel)``) is averaged over its kernel dimensions, so :math:`D` is constant over each kernel (the
official code: Conv2d ``(2, 3)``, Conv1d ``(2,)``; optimlab extends the rule to Conv3d); tensors with at most two
dimensions are left as they are (the image-classification code; the instruction version's whole-row average of
matrices is not used). ``spatial_average=False`` switches it off. With ``abs_before_avg=True`` (the official code)
the absolute value is taken before the average, which is what the paper's results used; ``False`` averages the
paper's unbiased :math:`z \odot Hz`. Without averaging both give the same :math:`D^2`. Where :math:`D` is averaged,
:math:`v` is constant over each kernel and is kept once per kernel (``exp_hessian_diag_sq`` has shape
``(out, in, 1, 1)`` for a Conv2d weight): half the state memory of such a tensor.

The decay :math:`\lambda\theta` is added to the step and not preconditioned (decoupled, as in the official
code; its ResNet recipe sets :math:`\lambda` = 5e-4 / lr). :math:`k` is the Hessian power (1: Newton-like
scaling; the docstring of the official code suggests trying 0.5).

``update_each`` :math:`= n > 1` computes :math:`D` on every n-th step only (a third of the backward cost saved on
the others) and reuses the last :math:`D` in between, so :math:`v` keeps its per-step average and its bias
correction stays exact (pytorch-optimizer instead freezes :math:`v` between updates). :attr:`AdaHessian.hessian_due`
says whether the next step computes one, so the backward before the other steps may skip ``create_graph``: it is
also True while some parameter (with ``requires_grad``) has no estimate yet, because the first step that gives such a
parameter a gradient must compute one (so a parameter that never receives a gradient keeps every step due: leave
it out of the optimizer). The last :math:`D` is kept in the state as ``hessian_diag``, a third full-size tensor
per parameter that is not spatially averaged (3× its numel of state instead of 2×).

Hyperparameters (defaults), the official code's: ``lr`` 0.15, ``betas`` (0.9, 0.999), ``eps`` 1e-4,
``weight_decay`` 0.0, ``hessian_power`` 1.0 (in [0, 1]); optimlab's options: ``update_each`` 1,
``spatial_average`` True, ``abs_before_avg`` True, ``seed`` 0 (the probes' generator).

Usage: the gradient must carry its autograd graph, so ``loss.backward(create_graph=True)`` before ``step()``; free
the graph with ``zero_grad()`` (``set_to_none=True``, the default)::

    opt = optimlab.AdaHessian(model.parameters())
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward(create_graph=True)
        opt.step()

Limitations: ``torch.compile`` cannot run it (AOTAutograd's compiled backward is not differentiable twice); a
``torch.amp.GradScaler`` is refused (it unscales ``p.grad`` outside autograd, so the Hessian-vector product would
stay scaled): use bfloat16 autocast, which needs no scaler.

Coming from AdamW: a larger learning rate (0.15 for ResNets on CIFAR-10, 0.047 with a warm-up for the paper's
transformers), eps 1e-4, and about three times AdamW's time per iteration (the backward keeps its graph, and the
Hessian-vector product is one more backward pass through it; ``benchmarks/adahessian_time.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from optimlab._core.kernels import addcdiv_, get_kernel_mode, kernel, mul_
from optimlab._core.optimizer import OptimlabOptimizer, state_dtype
from optimlab._core.validation import Flag, Interval, adam_family
from optimlab.registry import Capabilities, MethodInfo, register

__all__ = ["AdaHessian", "adahessian_", "adahessian_update", "hessian_diagonals", "rademacher_probes"]

_MISSING_GRAPH = (
    "AdaHessian differentiates the gradient a second time, but no p.grad carries an autograd graph: call "
    "loss.backward(create_graph=True) before step() (and give the optimizer the gradients backward made: a "
    "copy, a detached or a wrapper-transformed gradient has no graph)"
)


_NO_ESTIMATE_YET = (
    "AdaHessian: parameter {index} of param group {group} (shape {shape}) has no Hessian estimate yet; call "
    "loss.backward(create_graph=True) on this step (AdaHessian.hessian_due is True until every parameter has one)"
)


_BITS = 31  # random_() on int32 fills [0, 2**31 - 1]: 31 independent fair bits per draw
_MINUS_ONE = 0x3F800000 - 2**31  # the bits of float32 -1.0 as an int32: 1.0's exponent and the sign bit


def rademacher_probes(tensors: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """One Rademacher probe (entries ±1, each with probability ½, independent) shaped like each tensor, in its
    dtype and on its device, from one draw of ``generator``: every probe is a slice of one flat sample, in order.

    Each random 31-bit word gives 31 entries: bit j is moved to the sign bit, alone, and xor-ed with the bits of -1.0
    (in float32; cast where a tensor has another dtype), so a set bit is +1 and a clear one -1 (the stream of earlier
    versions): three integer passes over the sample, a third to a fifth of the cost of one draw per entry on a CPU
    (``benchmarks/adahessian_time.py``).
    """
    if not tensors:
        return []
    sizes = [t.numel() for t in tensors]
    total, device = sum(sizes), generator.device
    words = torch.empty(-(-total // _BITS), dtype=torch.int32, device=device).random_(generator=generator)
    to_sign_bit = torch.arange(_BITS, 0, -1, dtype=torch.int32, device=device)  # bit j moves to bit 31
    signs = words.unsqueeze(1).bitwise_left_shift(to_sign_bit).view(-1)[:total]
    flat = signs.bitwise_and_(-(2**31)).bitwise_xor_(_MINUS_ONE).view(torch.float32)
    return [
        z.view_as(t) if z.dtype == t.dtype and z.device == t.device else z.to(t.device, t.dtype).view_as(t)
        for z, t in zip(flat.split_with_sizes(sizes), tensors)
    ]


def hessian_diagonals(
    hzs: Sequence[Tensor],
    probes: Sequence[Tensor],
    *,
    abs_before_avg: bool = True,
    spatial_average: bool = True,
    dtypes: Sequence[torch.dtype] | None = None,
) -> list[Tensor]:
    """The estimates ``D`` from Hessian-vector products ``hzs`` and their ``probes`` (cast to ``dtypes``, if given).

    With ``spatial_average``, a tensor of 3+ dimensions is averaged over dimensions 2 and up (the kernel of a
    convolution) and returned with those dimensions of size 1, for broadcasting: the mean of ``|hz|`` (=
    ``|probe * hz|``) or, with ``abs_before_avg=False``, of ``probe * hz``. Any other tensor is returned as ``hz``
    itself: the update uses only ``D²``, and ``|hz|²`` = ``(probe * hz)²`` = ``hz²``, so the sign is left out
    rather than computed. The inputs are not modified.
    """
    out = [hz if dtypes is None or hz.dtype == dtypes[i] else hz.to(dtypes[i]) for i, hz in enumerate(hzs)]
    kernels = [i for i, hz in enumerate(out) if hz.dim() >= 3] if spatial_average else []
    if not kernels:
        return out
    # one call for all the kernels' |hz| (or z * hz), and one averaging vector per kernel size and dtype
    if abs_before_avg:
        signed = torch._foreach_abs([out[i] for i in kernels])
    else:
        signed = [out[i] * probes[i] for i in kernels]
    averagers: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
    for i, x in zip(kernels, signed):
        out[i] = _kernel_mean(x, averagers)
    return out


def _kernel_mean(x: Tensor, averagers: dict[tuple[int, torch.dtype, torch.device], Tensor]) -> Tensor:
    """The mean over dimensions 2 and up, kept as size-1 dimensions (``averagers`` caches the vectors of
    ``1/kernel_size``). A matrix-vector product over the flat kernels takes half the time of ``mean()`` over the
    last dims on a CPU (3x3 kernels), and no copy: a conv weight's Hessian-vector product comes out (in, out)-major,
    which is read as it is, transposed."""
    swap = x.stride(0) < x.stride(1)
    kernel_size, ones = math.prod(x.shape[2:]), (1,) * (x.dim() - 2)
    rows = (x.transpose(0, 1) if swap else x).reshape(-1, kernel_size)
    key = (kernel_size, x.dtype, x.device)
    if key not in averagers:
        averagers[key] = rows.new_full((kernel_size,), 1 / kernel_size)
    mean = rows.mv(averagers[key])
    if swap:
        return mean.view(x.shape[1], x.shape[0], *ones).transpose(0, 1)
    return mean.view(*x.shape[:2], *ones)


@kernel(read_only=("g", "d"))
def adahessian_update(p: Tensor, g: Tensor, d: Tensor, m: Tensor, v: Tensor, scalars: Any, *, power: float) -> None:
    """One tensor's AdaHessian update, in place; ``scalars`` as made by ``adahessian_``.

    The bias correction of v is moved out of the denominator: (√v/√bc2)^k + ε = bc2^(-k/2)·(v^(k/2) + ε·bc2^(k/2)),
    so the step size carries bc2^(k/2) and the denominator takes two passes.
    """
    c1, c2, eps_scaled, shrink, step_size = scalars
    _lerp_(m, g, c1)
    _lerp_(v, d * d, c2)  # D is small where it is spatially averaged: square it before it broadcasts
    denom = v.sqrt() if power == 1.0 else v.pow(power / 2)
    addcdiv_(mul_(p, shrink), m, denom.add_(eps_scaled), -step_size)


def _lerp_(x: Tensor, y: Tensor, weight: float | Tensor) -> Tensor:
    """``x += weight * (y - x)``: one fused op for a number; compiled, the same arithmetic (torch.lerp takes no
    float64 weight tensor for float32 ``x``)."""
    return x.add_((y - x) * weight) if isinstance(weight, Tensor) else x.lerp_(y, weight)


# The eager update is six light operations, so a compiled call's fixed cost pays off only from a larger tensor than
# the shared threshold: measured crossover ~75k elements at 1 thread, ~150-300k at 2 (2-core CPU).
_COMPILED_FROM = 4


def adahessian_(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    hessian_diags: list[Tensor],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    hessian_power: float,
) -> None:
    """Functional AdaHessian: update ``params`` and ``states`` (``step``, ``exp_avg``, ``exp_hessian_diag_sq``) in
    place from the gradients and the Hessian-diagonal estimates ``hessian_diags`` (each shaped like its parameter,
    or with size-1 kernel dimensions where it is spatially averaged, and then so is its ``exp_hessian_diag_sq``; in
    the state dtype); ``grads`` and ``hessian_diags`` are only read."""
    beta1, beta2 = betas
    power = float(hessian_power)
    shrink = 1 - lr * weight_decay
    mode, min_numel = get_kernel_mode()
    min_numel = _COMPILED_FROM * min_numel if mode == "compiled" else None
    eager: list[int] = []
    for i, (p, g, d, state) in enumerate(zip(params, grads, hessian_diags, states)):
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_hessian_diag_sq"]
        if v.shape != d.shape:
            v = state["exp_hessian_diag_sq"] = _second_moment_like(v, d, state["step"])
        if min_numel is None or p.numel() < min_numel or not adahessian_update.eligible((p, g, m, v)):
            eager.append(i)  # (a spatially averaged tensor too: its v is small, only m and θ are full size)
            continue
        eps_scaled, step_size = _bias_corrections(state["step"], beta1, beta2, power, eps, lr)
        scalars = (1 - beta1, 1 - beta2, eps_scaled, shrink, step_size)
        adahessian_update(p, g, d, m, v, scalars=scalars, power=power)
    if not eager:
        return
    # the kernel's eager path for the rest, one torch._foreach_* call per operation (the same operations in the
    # same order, so the same rounding) instead of one call per tensor, which is what small tensors cost
    params, grads = [params[i] for i in eager], [grads[i] for i in eager]
    diags, states = [hessian_diags[i] for i in eager], [states[i] for i in eager]
    ms, vs = [s["exp_avg"] for s in states], [s["exp_hessian_diag_sq"] for s in states]
    corrections = {t: _bias_corrections(t, beta1, beta2, power, eps, lr) for t in {s["step"] for s in states}}
    eps_scaled, step_sizes = zip(*(corrections[s["step"]] for s in states))
    torch._foreach_lerp_(ms, grads, 1 - beta1)
    torch._foreach_lerp_(vs, torch._foreach_mul(diags, diags), 1 - beta2)
    denom = torch._foreach_sqrt(vs) if power == 1.0 else torch._foreach_pow(vs, power / 2)
    torch._foreach_add_(denom, list(eps_scaled))
    if shrink != 1.0:
        torch._foreach_mul_(params, shrink)
    torch._foreach_addcdiv_(params, ms, denom, [-x for x in step_sizes])


def _second_moment_like(v: Tensor, d: Tensor, step: int) -> Tensor:
    """v in the shape of D. A spatially averaged D is constant over each kernel, and so is v: it is kept once per
    kernel (the first step makes it so; switching ``spatial_average`` later averages or broadcasts it)."""
    if step == 1:
        return v.new_zeros(d.shape)
    if v.numel() > d.numel():
        return v.mean(dim=tuple(i for i, (a, b) in enumerate(zip(v.shape, d.shape)) if a != b), keepdim=True)
    return v.expand(d.shape).clone()


def _bias_corrections(t: int, beta1: float, beta2: float, power: float, eps: float, lr: float) -> tuple[float, float]:
    """ε·bc2^(k/2) and lr·bc2^(k/2)/bc1 (see ``adahessian_update``)."""
    scale = (1 - beta2**t) ** (power / 2)
    return eps * scale, lr * scale / (1 - beta1**t)


class AdaHessian(OptimlabOptimizer):
    __doc__ = __doc__
    functional = staticmethod(adahessian_)
    # one Hessian-vector product and one probe stream serve every param group
    shared_hyperparameters = ("update_each", "seed")
    # lets torch.amp.GradScaler announce itself (it sets ``grad_scale``/``found_inf``), so step() can refuse it
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_each: int = 1,
        spatial_average: bool = True,
        abs_before_avg: bool = True,
        seed: int = 0,
    ) -> None:
        self._steps = 0  # steps taken (with any gradient): every update_each-th computes a Hessian diagonal
        self._diags: dict[int, list[Tensor]] = {}
        super().__init__(params, self._defaults_from_arguments(locals()))

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return {"step": 0, "exp_avg": self._zeros(p), "exp_hessian_diag_sq": self._zeros(p)}

    @property
    def hessian_due(self) -> bool:
        """Whether the next ``step()`` computes a Hessian-vector product (its backward needs ``create_graph=True``;
        a parameter without an estimate yet also forces one)."""
        update_each = self._shared()["update_each"]
        if self._steps % update_each == 0:
            return True
        # a parameter could first get its gradient on this step, which then computes its D whatever the schedule
        # says: the backward must keep the graph for it (only state keys are read, so nothing waits for a device)
        return update_each > 1 and any(
            p.requires_grad and "hessian_diag" not in self.state.get(p, ())
            for group in self.param_groups
            for p in group["params"]
        )

    # never traced: a compiled step would still differentiate the model's compiled backward, which AOTAutograd
    # cannot do twice; eager, that case raises autograd's own clear error (no_grad: the base class's step)
    @torch.compiler.disable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if getattr(self, "found_inf", None) is not None or getattr(self, "grad_scale", None) is not None:
            raise RuntimeError(
                "AdaHessian does not support torch.amp.GradScaler: it unscales p.grad outside autograd, so the "
                "Hessian-vector product through the gradient's graph would keep the loss scale; train in bfloat16 "
                "(torch.autocast(dtype=torch.bfloat16) needs no scaler) or in float32"
            )
        return super().step(closure)

    def _apply(self, batches: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[dict]]]) -> None:
        if not batches:
            return
        update_each = self._shared()["update_each"]
        keep = update_each > 1
        states = [s for _, _, _, batch_states in batches for s in batch_states]
        scheduled = self._steps % update_each == 0
        if scheduled or (keep and any("hessian_diag" not in s for s in states)):
            diags = self._estimate(batches, scheduled)
            if keep:
                for state, d in zip(states, (d for batch in diags for d in batch)):
                    state["hessian_diag"] = d
        else:
            diags = [[s["hessian_diag"] for s in batch_states] for _, _, _, batch_states in batches]
        self._diags = {id(group): d for (group, *_), d in zip(batches, diags)}
        self._steps += 1
        try:
            super()._apply(batches)
        finally:
            self._diags = {}

    def _estimate(
        self, batches: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[dict]]], scheduled: bool = True
    ) -> list[list]:
        """One Hutchinson estimate of the Hessian diagonal for every parameter of every batch (one HVP);
        ``scheduled`` False when only a parameter without an estimate forces it (for the error message)."""
        params = [p for _, ps, _, _ in batches for p in ps]
        grads = [g for _, _, gs, _ in batches for g in gs]
        # a gradient without a graph is constant in θ (a parameter the loss is linear in): its Hessian rows are 0
        linked = [i for i, g in enumerate(grads) if g.requires_grad]
        if not linked:
            if scheduled:
                raise RuntimeError(_MISSING_GRAPH)
            raise RuntimeError(self._no_estimate_message(batches))
        probes = rademacher_probes(grads, self.generator(grads[0].device))
        hzs = torch.autograd.grad(
            [grads[i] for i in linked],
            params,
            grad_outputs=[probes[i] for i in linked],
            retain_graph=True,  # the graph belongs to the caller (zero_grad frees it), who may differentiate again
            allow_unused=True,
            materialize_grads=True,
        )
        diags, start = [], 0
        for group, ps, _, _ in batches:
            end = start + len(ps)
            diags.append(
                hessian_diagonals(
                    hzs[start:end],
                    probes[start:end],
                    abs_before_avg=group["abs_before_avg"],
                    spatial_average=group["spatial_average"],
                    dtypes=[state_dtype(p) for p in ps],
                )
            )
            start = end
        return diags

    def _no_estimate_message(self, batches: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[dict]]]) -> str:
        """The error for an unscheduled step forced by a parameter that has no estimate yet, naming the first one."""
        for group, ps, _, batch_states in batches:
            for p, state in zip(ps, batch_states):
                if "hessian_diag" not in state:
                    index = next(i for i, q in enumerate(group["params"]) if q is p)
                    group_index = next(i for i, g in enumerate(self.param_groups) if g is group)
                    return _NO_ESTIMATE_YET.format(index=index, group=group_index, shape=tuple(p.shape))
        return _MISSING_GRAPH

    def _core_arguments(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super()._core_arguments(group), "hessian_diags": self._diags[id(group)]}

    # the step counter of update_each travels with the checkpoint
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["optimlab"]["steps"] = self._steps
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        steps = state_dict.get("optimlab", {}).get("steps", 0)
        super().load_state_dict(state_dict)
        self._steps = steps

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_steps", 0)
        state.setdefault("_diags", {})
        super().__setstate__(state)


register(
    MethodInfo(
        name="adahessian",
        cls=AdaHessian,
        kind="optimizer",
        paper="ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning",
        arxiv="2006.00719",
        code_url="https://github.com/amirgholami/adahessian",
        summary="Adam whose second moment is an average of squared Hutchinson estimates of the Hessian diagonal",
        hyperparameters={
            **adam_family(betas=2),
            "hessian_power": Interval(0.0, 1.0),
            "update_each": Interval(1, integer=True),
            "spatial_average": Flag(),
            "abs_before_avg": Flag(),
            "seed": Interval(0, 2**32 - 1, integer=True),
        },
        lr_range=(1e-2, 1.0),
        batch_scaling="sqrt",
        # global_state: one Hessian-vector product over all parameters, so a non-finite value anywhere in the
        # loss graph can reach every tensor's D
        capabilities=Capabilities(needs_create_graph=True, stochastic=True, global_state=True, compilable=False),
        exemptions={
            "compile": "torch.compile's AOTAutograd backward cannot be differentiated twice, so the Hessian-vector "
            "product through a compiled model's gradient raises; compile nothing around the training step",
            "grad_scaler": "GradScaler unscales p.grad outside autograd, so the Hessian-vector product would keep the "
            "loss scale; step() refuses it (train in bfloat16 or float32)",
            "convergence": "the step is Newton-like (lr 1 = a Newton step on a diagonal Hessian) and on Rosenbrock "
            "|Hz| sees the off-diagonal curvature, so the valley needs lr 1.5-3, above the battery grid's 1.0; "
            "tests/optim/test_adahessian.py checks Rosenbrock at lr 2 and the one-step solve of a quadratic",
        },
        advice="lr 0.15 (ResNets) to ~0.05 with warm-up (transformers); decay is decoupled (official recipe "
        "weight_decay = 5e-4 / lr); call loss.backward(create_graph=True).",
    )
)
