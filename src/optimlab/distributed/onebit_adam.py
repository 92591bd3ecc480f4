r"""1-bit Adam: Adam's warm-up, then a frozen variance and 1-bit compressed momentum with error compensation.

Paper: Tang, Gan, Awan, Rajbhandari, Li, Lian, Liu, Zhang, He, "1-bit Adam: Communication Efficient Large-Scale
Training with Adam's Convergence Speed", arXiv `2102.02888 <https://arxiv.org/abs/2102.02888>`_ (ICML 2021).
Official code: DeepSpeed, ``deepspeed/runtime/fp16/onebit/adam.py`` (``OnebitAdam``) and
``deepspeed/runtime/comm/nccl.py`` (``compressed_allreduce``); optimlab follows their semantics. DeepSpeed removed
its 1-bit optimizers in 0.19.7 and they never ran on CPU, so the tests check the identities below instead of
parity with it.

With :math:`t` the optimizer's step count, :math:`F` = ``freeze_step``, :math:`n` workers with local gradients
:math:`g_i`, learning rate :math:`\alpha`, decay :math:`\lambda`:

* step 1 (DeepSpeed's *initialisation* step): state is created, nothing else changes (no moment, no parameter
  update); the step count advances.
* warm-up, :math:`2 \le t \le F`: with the averaged gradient :math:`\bar g = \frac1n\sum_i g_i` (full precision),
  Adam **without bias correction**:

  .. math::

      m \leftarrow \beta_1 m + (1-\beta_1)\bar g, \quad v \leftarrow \beta_2 v + (1-\beta_2)\bar g^2, \quad
      \theta \leftarrow \theta - \alpha\Big(\frac{m}{\sqrt v + \epsilon} + \lambda\theta\Big)

* compression, :math:`t > F`: :math:`v` is frozen; the gradients are no longer averaged. Every worker forms its
  own momentum :math:`m_i = \beta_1 m + (1-\beta_1) g_i` (:math:`m` is identical on all workers), the workers
  agree on :math:`m \leftarrow \operatorname{CompressedAllreduce}(\{m_i\})`, and
  :math:`\theta \leftarrow \theta - \alpha(m/(\sqrt v+\epsilon) + \lambda\theta)`.

CompressedAllreduce, per parameter tensor of :math:`d` elements: zero-pad to :math:`d_p`, the next multiple of
:math:`n\cdot\operatorname{lcm}(n, 8)`, so that each of the :math:`n` server chunks of :math:`d_p/n` elements
packs into whole bytes. With the scaled sign :math:`C(x) = \frac{\lVert x\rVert}{\sqrt{\dim x}}\operatorname{sgn}(x)`,
:math:`\operatorname{sgn}(0) = +1` (norm-preserving when :math:`x` has no zero), worker :math:`i` with error
:math:`e_i` (:math:`d_p` long) and server :math:`j` with error :math:`\varepsilon_j` (its chunk):

.. math::

    x_i = m_i + e_i, \quad e_i \leftarrow x_i - C(x_i), \quad
    y_j = \sum_i \tfrac{s_i}{n}\operatorname{sgn}(x_i)[\text{chunk } j] + \varepsilon_j, \quad
    \varepsilon_j \leftarrow y_j - C(y_j),

(:math:`s_i` the scale of :math:`C(x_i)`), and every worker receives :math:`C(y_j)` for every chunk :math:`j`
and crops the padding. On the wire: each worker's signs bit-packed (8 per byte), sent by an all-to-all (row
:math:`j` of the grid to server :math:`j` only, as DeepSpeed's ``all_to_all_single``) beside an all-gather of
its one scale per tensor, then each server's chunk of :math:`d_p/(8n)` bytes and its scales all-gathered. All tensors of all param groups go in one message, with their own scales, so a
step issues three collectives. Per rank and step that is about
:math:`\tfrac{d}{8}(1 + \tfrac1n)` bytes against the :math:`4d` of DDP's float32 all-reduce: 21× fewer for two
workers, 32× for many.

Hyperparameters (defaults), DeepSpeed's: ``lr`` 1e-3, ``betas`` (0.9, 0.999), ``eps`` 1e-8 (added to
:math:`\sqrt v`; DeepSpeed's ``eps_inside_sqrt`` is accepted but unused there, and left out here),
``weight_decay`` 0 (added to the preconditioned update, scaled by :math:`\alpha` only, as in DeepSpeed), and
the warm-up length:

* ``freeze_step``: the absolute step :math:`F` after which the variance freezes (DeepSpeed's argument,
  default 100000 there). At least 2: step 1 only initialises, so :math:`F = 1` would divide by a zero variance.
* ``total_steps`` with ``warmup_fraction`` (default 0.2): :math:`F = \max(2, \lceil 0.2\,T\rceil)`, the DeepSpeed
  tutorial's advice to freeze after 15-25 % of training (then try less). Give ``freeze_step`` or ``total_steps``,
  not both; with neither, ``freeze_step`` is DeepSpeed's 100000, with a warning.
* ``compress_single_worker`` (default False): with one worker DeepSpeed skips the compression; True compresses
  anyway (the error-compensated 1-bit momentum of a single worker).
* ``exp_avg_mask`` (a param-group key, DeepSpeed's): a tensor of the group's parameter's shape multiplied into
  the momentum after every compressed all-reduce, for entries that never get a gradient (DeepSpeed's example:
  BERT's position embeddings beyond the training sequence length). The 1-bit scaled sign gives every entry a
  nonzero value, and an entry whose frozen variance is 0 (or tiny) then takes a step of about
  :math:`\alpha\,s/(\sqrt v + \epsilon)`: without the mask such entries blow up at the first compressed step.
  The same happens to units that stopped getting gradients early in the warm-up (dead ReLU units: measured on
  the bench's 1-D CNN, entries with frozen v of 1e-17 to 1e-11 stepped by 3 to 175 at the first compressed step).
  As in DeepSpeed, the mask is the one the user gives, kept when a checkpoint is loaded.

AMSGrad and DeepSpeed's ``non_freeze`` groups are not supported.

**Running it.** Real training (``torch.distributed``, gloo or NCCL): every rank builds the optimizer on its
replica. The collectives go through :class:`~optimlab.distributed.comm.Communicator` (``comm``; by default one
on the default process group, looked up at the first step, which raises the clear error if no group is running).

* With DDP: ``register_onebit_adam(ddp_model, opt)`` installs the optimizer's communication hook, which averages
  the gradients during warm-up (as DDP would) and hands back the local gradient, without communicating, once the
  variance is frozen (DeepSpeed's ``enable_backward_allreduce = False``).
* Without DDP (a plain model on every rank): the optimizer averages the gradients itself during warm-up (one
  all-reduce of all gradients).

The single-process simulator (``workers=n``): one optimizer holds the shared :math:`m, v`, the :math:`n` worker
errors and the :math:`n` servers' errors, and ``step(worker_grads=G)`` takes the ``(n, d)`` matrix of the
workers' gradients (:func:`optimlab.distributed.simulator.worker_gradients`; columns in the order of the
optimizer's parameters). It runs the same functions as the real path (:func:`scaled_sign_` for every worker's
and every server's compression, :func:`server_average` for the server's sum); only the collectives are replaced
by indexing. ``workers=1`` is plain single-process use (no process group; ``step()`` reads ``p.grad``).

``bytes_sent`` counts the bytes per rank handed to collectives, in both modes (the simulator counts what the
real path would send).

**Checkpoints.** ``state_dict`` holds :math:`m`, :math:`v` and the step count; loading it resets the worker and
server errors to zero, as DeepSpeed does (its reasons: the errors differ per rank, need the same world size to
be meaningful, and resetting them now and then did not hurt BERT pre-training). A checkpoint therefore loads at
any world size, in the simulator or in real training. The errors are not saved.

Every rank must step with gradients for the same parameters; during compression the set of parameters with
gradients must not change (a ``RuntimeError`` says so).

Coming from AdamW: Adam's learning rate and betas, without bias correction (so an lr warm-up matters in the
first steps), weight decay as AdamW's decoupled decay scaled by lr only; freeze the variance after 15-25 % of
training (``total_steps``), and only then does communication drop.
"""

# no "from __future__ import annotations": DDP.register_comm_hook compares the hook's annotations with
# dist.GradBucket and Future[Tensor] themselves, and rejects them as strings

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from optimlab._core.optimizer import LOW_PRECISION, OptimlabOptimizer, as_float, evaluate_closure
from optimlab._core.validation import Flag, Interval, adam_family
from optimlab.distributed.bitpack import pack_signs, unpack_signs
from optimlab.distributed.comm import Communicator, allreduce_hook
from optimlab.registry import MethodInfo, register

__all__ = [
    "OneBitAdam",
    "Layout",
    "make_layout",
    "to_grid",
    "from_grid",
    "signed_scale",
    "scaled_sign_",
    "server_average",
    "compressed_allreduce",
    "simulated_compressed_allreduce",
    "message_bytes",
    "onebit_adam_hook",
    "register_onebit_adam",
    "DEEPSPEED_FREEZE_STEP",
    "WARMUP_FRACTION",
]

DEEPSPEED_FREEZE_STEP = 100_000  # DeepSpeed's default freeze_step
WARMUP_FRACTION = 0.2  # the DeepSpeed tutorial's 15-25 % of training, its middle

_FREEZE_STEP = Interval(2.0, integer=True)
_TOTAL_STEPS = Interval(1.0, integer=True)
_FRACTION = Interval(0.0, 1.0, low_closed=False)
_WORKERS = Interval(1.0, integer=True)


# -- the functional core: one compressor for workers and servers, on a grid of server chunks ----------------------
@dataclass(frozen=True)
class Layout:
    """Where each tensor's padded elements sit in the ``(n, C)`` *grid* the compression works on.

    Tensor ``t`` (``numels[t]`` elements) is zero-padded to ``n * chunks[t]`` and cut into ``n`` server chunks of
    ``chunks[t]``; row ``j`` of the grid holds chunk ``j`` of every tensor, tensor ``t`` in columns
    ``offsets[t] : offsets[t] + chunks[t]``. So server ``j``'s share is the contiguous row ``j``, and one tensor's
    padded vector is its column block read row by row.
    """

    n: int
    numels: tuple[int, ...]
    chunks: tuple[int, ...]
    offsets: tuple[int, ...]
    lengths: Tensor  # (T,) chunk length of each tensor (at least 1, so an empty tensor gets no 0/0)

    @property
    def columns(self) -> int:
        return sum(self.chunks)

    @property
    def tensors(self) -> int:
        return len(self.numels)


def make_layout(numels: Sequence[int], n: int, device: torch.device | str | None = None) -> Layout:
    """The grid layout of tensors of ``numels`` elements for ``n`` workers (padding as DeepSpeed's: to a multiple
    of ``n * lcm(n, 8)``)."""
    quantum = n * math.lcm(n, 8)
    chunks = tuple(-(-d // quantum) * quantum // n for d in numels)
    offsets = tuple(sum(chunks[:t]) for t in range(len(chunks)))
    lengths = torch.tensor(chunks, dtype=torch.long, device=device).clamp_min(1)
    return Layout(n, tuple(numels), chunks, offsets, lengths)


def to_grid(vectors: Sequence[Tensor], layout: Layout) -> Tensor:
    """The ``(..., n, C)`` grid of flat vectors ``(..., numels[t])`` (leading dimensions shared), zero-padded."""
    first = vectors[0]
    grid = first.new_empty((*first.shape[:-1], layout.n, layout.columns), dtype=_common_dtype(vectors))
    for (_, block), v, d, c in zip(_blocks(layout), vectors, layout.numels, layout.chunks, strict=True):
        if c == 0:
            continue
        rows, rest = divmod(d, c)  # full server chunks, then the one the padding starts in
        target = grid[..., block]
        target[..., :rows, :].copy_(v[..., : rows * c].unflatten(-1, (rows, c)))
        if rest:
            target[..., rows, :rest].copy_(v[..., rows * c :])
            target[..., rows, rest:].zero_()
        target[..., rows + (rest > 0) :, :].zero_()
    return grid


def from_grid(grid: Tensor, layout: Layout) -> list[Tensor]:
    """The flat vectors ``(..., numels[t])`` of a ``(..., n, C)`` grid, padding cropped (the inverse of
    :func:`to_grid`)."""
    return [grid[..., o : o + c].flatten(-2)[..., :d] for d, c, o in zip(layout.numels, layout.chunks, layout.offsets)]


def _blocks(layout: Layout) -> Iterable[tuple[int, slice]]:
    return enumerate(slice(o, o + c) for o, c in zip(layout.offsets, layout.chunks))


def signed_scale(positive: Tensor, scale: Tensor, layout: Layout) -> Tensor:
    """``scale * sgn``: ``positive`` ``(..., R, C)`` the signs (True for +1), ``scale`` ``(..., T)`` one per tensor
    (shared by the ``R`` rows)."""
    out = positive.view(torch.uint8).to(scale.dtype).mul_(2).sub_(1)  # via uint8: bool -> float is slow on CPU
    for t, block in _blocks(layout):
        out[..., block].mul_(scale[..., t, None, None])  # one tensor's columns, all rows, times its scale
    return out


def scaled_sign_(x: Tensor, error: Tensor, layout: Layout) -> tuple[Tensor, Tensor]:
    """1-bit compression with error feedback, per tensor of the layout; workers and servers alike.

    ``x`` ``(..., R, C)``: a worker's grid (``R = n``) or a server's chunk (``R = 1``); ``error`` the same shape.
    Adds the error into ``x`` (in place), compresses each tensor's ``R * chunks[t]`` entries to
    :math:`C(x) = \\lVert x\\rVert/\\sqrt{\\dim x}\\,\\operatorname{sgn}(x)` with :math:`\\operatorname{sgn}(0)=+1`,
    stores :math:`x - C(x)` in ``error`` and returns ``(positive, scale)``: the signs (``(..., R, C)`` bool) and
    the scales (``(..., T)``) that go on the wire.
    """
    x.add_(error)
    squares = x * x
    # row sums first, then over the rows: the same reductions whatever the leading (worker) dimensions
    sums = torch.stack([squares[..., block].sum(-1).sum(-1) for _, block in _blocks(layout)], -1)
    scale = sums.div_(layout.lengths * x.shape[-2]).sqrt_()
    positive = x >= 0
    torch.sub(x, signed_scale(positive, scale, layout), out=error)
    return positive, scale


def server_average(positive: Tensor, scales: Tensor, layout: Layout) -> Tensor:
    """A server's sum of the workers' compressed chunks, each scaled by ``1/n``: ``(..., 1, C)``.

    ``positive`` ``(..., W, C)``: every worker's signs on this server's chunk; ``scales`` ``(W, T)`` (or batched
    like ``positive``): every worker's scales. DeepSpeed's order: signs times ``scale / n``, then the sum.
    """
    per_worker = signed_scale(positive.unsqueeze(-2), scales * (1 / scales.shape[-2]), layout)  # (..., W, 1, C)
    return per_worker.sum(-3)


def _message(positive: Tensor, scale: Tensor) -> Tensor:
    """One ``uint8`` message: the signs packed row by row, then the scales' bytes."""
    return torch.cat([pack_signs(positive).flatten(), scale.contiguous().flatten().view(torch.uint8)])


def _scales(raw: Tensor, dtype: torch.dtype) -> Tensor:
    return raw.contiguous().view(dtype)


def message_bytes(layout: Layout, itemsize: int) -> tuple[int, int]:
    """Bytes one rank hands to the collectives of a compressed step: ``(worker message, server message)``
    (signs ``n C / 8`` and ``C / 8`` bytes, ``T`` scales of ``itemsize`` bytes each)."""
    scales = layout.tensors * itemsize
    return layout.n * layout.columns // 8 + scales, layout.columns // 8 + scales


def compressed_allreduce(
    momenta: Sequence[Tensor], worker_error: Tensor, server_error: Tensor, layout: Layout, comm: Communicator
) -> list[Tensor]:
    """DeepSpeed's CompressedAllreduce on real ranks: this rank's flat momenta ``(numels[t],)`` in, the agreed
    momenta out (identical on every rank). ``worker_error`` is ``(n, C)``, ``server_error`` ``(1, C)`` (this rank's
    chunk row); both are updated in place."""
    x = to_grid(momenta, layout)
    positive, scale = scaled_sign_(x, worker_error, layout)
    # DeepSpeed's first phase: row j of the packed signs to server j (all-to-all), the scales to everyone
    mine = comm.all_to_all_chunks(pack_signs(positive))  # (n, C/8): every worker's signs of this rank's chunk
    y = server_average(unpack_signs(mine, layout.columns, torch.bool), comm.all_gather(scale), layout)
    row = layout.columns // 8
    positive, scale = scaled_sign_(y, server_error, layout)
    gathered = comm.all_gather(_message(positive, scale))  # (n, C/8 + scales)
    signs = unpack_signs(gathered[:, :row], layout.columns, torch.bool).unsqueeze(-2)
    return from_grid(signed_scale(signs, _scales(gathered[:, row:], x.dtype), layout).squeeze(-2), layout)


def simulated_compressed_allreduce(
    momenta: Sequence[Tensor], worker_error: Tensor, server_error: Tensor, layout: Layout
) -> list[Tensor]:
    """The same on ``n`` simulated workers in one process: momenta ``(n, numels[t])`` (row ``i`` worker ``i``'s)
    in, the agreed momenta out; ``worker_error`` ``(n, n, C)`` (worker, then its grid), ``server_error``
    ``(n, 1, C)`` (server ``j``'s chunk row), updated in place. The functions are those of
    :func:`compressed_allreduce`; the collectives become indexing."""
    x = to_grid(momenta, layout)
    positive, scale = scaled_sign_(x, worker_error, layout)  # (W, n, C), (W, T)
    y = server_average(positive.transpose(0, 1).contiguous(), scale, layout)  # server j: every worker's row j
    positive, scale = scaled_sign_(y, server_error, layout)  # (n, 1, C), (n, T)
    return from_grid(signed_scale(positive, scale, layout).squeeze(-2), layout)


def _local_momentum(m: Tensor, g: Tensor, beta1: float) -> Tensor:
    """:math:`\\beta_1 m + (1-\\beta_1) g` for one worker's ``g`` or stacked workers' ``(n, ...)``."""
    return torch.add(m * beta1, g, alpha=1 - beta1)


def _update_(p: Tensor, m: Tensor, v: Tensor, *, lr: float, eps: float, weight_decay: float) -> None:
    u = m / (v.sqrt() + eps)
    if weight_decay:
        u.add_(p, alpha=weight_decay)
    p.add_(u, alpha=-lr)


def _common_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    return reduce(torch.promote_types, (t.dtype for t in tensors))


# -- the two ways to communicate ------------------------------------------------------------------------------------
class _Collective:
    """Real ranks: averaging and CompressedAllreduce through a Communicator (looked up at first use)."""

    simulated = False

    def __init__(self, comm: Communicator | None) -> None:
        self._comm = comm

    @property
    def comm(self) -> Communicator:
        if self._comm is None:
            self._comm = Communicator()  # the clear error of require_process_group if no group is running
        return self._comm

    @property
    def workers(self) -> int:
        return self.comm.world_size

    @property
    def bytes_sent(self) -> int:
        return 0 if self._comm is None else self._comm.bytes_sent

    def mean(self, grads: list[Tensor]) -> list[Tensor]:
        n = self.workers
        if n == 1:
            return grads
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(n)  # divided first, as DDP does
        self.comm.all_reduce(flat)
        return [f.view_as(g).to(g.dtype) for f, g in zip(flat.split([g.numel() for g in grads]), grads)]

    def errors(self, layout: Layout, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        c = layout.columns
        return torch.zeros(layout.n, c, dtype=dtype, device=device), torch.zeros(1, c, dtype=dtype, device=device)

    def compressed(self, momenta: list[Tensor], errors: tuple[Tensor, Tensor], layout: Layout) -> list[Tensor]:
        return compressed_allreduce([m.reshape(-1) for m in momenta], *errors, layout, self.comm)


class _Simulated:
    """``n`` workers in this process: gradients carry a leading worker dimension."""

    simulated = True

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.bytes_sent = 0

    def mean(self, grads: list[Tensor]) -> list[Tensor]:
        n = self.workers
        if n > 1:
            self.bytes_sent += sum(g[0].numel() for g in grads) * grads[0].element_size()
        return [g.div(n).sum(0) for g in grads]  # divided first, as DDP does

    def errors(self, layout: Layout, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        n, c = layout.n, layout.columns
        return torch.zeros(n, n, c, dtype=dtype, device=device), torch.zeros(n, 1, c, dtype=dtype, device=device)

    def compressed(self, momenta: list[Tensor], errors: tuple[Tensor, Tensor], layout: Layout) -> list[Tensor]:
        self.bytes_sent += sum(message_bytes(layout, errors[0].element_size()))
        return simulated_compressed_allreduce([m.reshape(self.workers, -1) for m in momenta], *errors, layout)


def _freeze_step(freeze_step: int | None, total_steps: int | None, warmup_fraction: float) -> int:
    _FRACTION.check("warmup_fraction", warmup_fraction)
    if freeze_step is not None:
        if total_steps is not None:
            raise ValueError(
                f"Invalid total_steps: {total_steps!r}; expected None when freeze_step is given (the warm-up is "
                "either freeze_step steps or warmup_fraction of total_steps)"
            )
        if not (isinstance(freeze_step, int) and not isinstance(freeze_step, bool) and freeze_step >= 2):
            raise ValueError(
                f"Invalid freeze_step: {freeze_step!r}; expected an integer >= 2 (step 1 only initialises, so at least "
                "one warm-up step must estimate the variance that is then frozen)"
            )
        return freeze_step
    if total_steps is None:
        warnings.warn(
            f"OneBitAdam: neither freeze_step nor total_steps given, so the variance freezes after DeepSpeed's default "
            f"of {DEEPSPEED_FREEZE_STEP} steps; pass total_steps (freeze after warmup_fraction of it) or freeze_step",
            stacklevel=3,
        )
        return DEEPSPEED_FREEZE_STEP
    _TOTAL_STEPS.check("total_steps", total_steps)
    return max(2, math.ceil(warmup_fraction * total_steps))


class OneBitAdam(OptimlabOptimizer):
    __doc__ = __doc__
    shared_hyperparameters = ("freeze_step",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        freeze_step: int | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        total_steps: int | None = None,
        warmup_fraction: float = WARMUP_FRACTION,
        compress_single_worker: bool = False,
        *,
        comm: Communicator | None = None,
        workers: int | None = None,
    ) -> None:
        freeze = _freeze_step(freeze_step, total_steps, warmup_fraction)
        Flag().check("compress_single_worker", compress_single_worker)
        if workers is not None:
            _WORKERS.check("workers", workers)
            if comm is not None:
                raise ValueError("Invalid workers: give either comm (real ranks) or workers (the simulator), not both")
        if comm is not None and not isinstance(comm, Communicator):
            raise TypeError(f"comm must be an optimlab.distributed.Communicator, got {type(comm).__name__}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "freeze_step": freeze}
        super().__init__(params, defaults)
        self.compress_single_worker = compress_single_worker
        self._exchange: _Collective | _Simulated = _Simulated(workers) if workers is not None else _Collective(comm)
        self._step = 0
        self._errors: tuple[Any, Layout, tuple[Tensor, Tensor]] | None = None
        # set by register_onebit_adam: DDP's hook averages the warm-up gradients, so step() must not again
        self.gradients_averaged = False

    # -- introspection ----------------------------------------------------------------------------------------------
    @property
    def freeze_step(self) -> int:
        return self._shared()["freeze_step"]

    @property
    def steps(self) -> int:
        """Steps taken (the initialisation step included)."""
        return self._step

    @property
    def compressing(self) -> bool:
        """Whether the next step communicates compressed momentum (the variance is frozen, gradients stay local)."""
        return self._step >= self.freeze_step

    @property
    def simulated(self) -> bool:
        return self._exchange.simulated

    @property
    def workers(self) -> int:
        """The number of workers (the world size on real ranks)."""
        return self._exchange.workers

    @property
    def comm(self) -> Communicator:
        """The Communicator of real training (``RuntimeError`` in the simulator, or if no group is running)."""
        if self._exchange.simulated:
            raise RuntimeError("a simulated OneBitAdam (workers=n) has no Communicator")
        return self._exchange.comm

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank handed to collectives (in the simulator: what each real rank would hand over)."""
        return self._exchange.bytes_sent

    # -- the step ---------------------------------------------------------------------------------------------------
    # eager even inside a compiled training step: the phase logic and the collectives run in Python (dynamo's
    # optimizer tracing would drop the step counter's update)
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, worker_grads: Tensor | None = None) -> Any:
        """One step. On real ranks and with ``workers=1``, the gradients are ``p.grad``; with ``workers=n`` pass
        ``worker_grads``, the ``(n, d)`` matrix of the workers' flat gradients (columns in the order of the
        optimizer's parameters)."""
        if worker_grads is not None and not self.simulated:
            raise TypeError("worker_grads is for the simulator (OneBitAdam(..., workers=n)); real ranks read p.grad")
        loss = evaluate_closure(closure)
        n = self._exchange.workers  # on real ranks: the process-group check, at every step
        items = self._collect(worker_grads, n)
        self._step += 1
        if self._step == 1 or not items:
            return loss
        groups, params, grads, states = zip(*items)
        work = [p.float() if p.dtype in LOW_PRECISION else p for p in params]
        grads = [g.to(w.dtype) for g, w in zip(grads, work)]
        if self._step <= self.freeze_step:
            self._warmup(groups, work, grads, states)
        else:
            self._compressed(groups, work, grads, states, params)
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)
        return loss

    def _collect(self, worker_grads: Tensor | None, n: int) -> list[tuple[dict, Tensor, Tensor, dict]]:
        """(group, param, gradient, state) of every parameter that steps; a simulator's gradients are ``(n, ...)``."""
        simulated = self._exchange.simulated
        if worker_grads is None and simulated and n > 1:
            raise TypeError(f"the simulator of {n} workers needs step(worker_grads=G), G of shape ({n}, d)")
        items = []
        if worker_grads is None:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._check_grad(p)
                        items.append((group, p, p.grad.unsqueeze(0) if simulated else p.grad))
        else:
            params = [(g, p) for g in self.param_groups for p in g["params"]]
            d = sum(p.numel() for _, p in params)
            if worker_grads.dim() != 2 or worker_grads.shape != (n, d):
                raise ValueError(
                    f"worker_grads has shape {tuple(worker_grads.shape)}; expected ({n}, {d}): one row per worker "
                    f"(workers={n}), one column per parameter element"
                )
            columns = worker_grads.split([p.numel() for _, p in params], dim=1)
            items = [(g, p, c.view(n, *p.shape)) for (g, p), c in zip(params, columns)]
        out = []
        for group, p, g in items:
            state = self.state[p]
            if not state:
                state.update(self._init_state(p))
            out.append((group, p, g, state))
        return out

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return {"exp_avg": self._zeros(p), "exp_avg_sq": self._zeros(p)}

    def _warmup(self, groups, params, grads, states) -> None:
        if not self.gradients_averaged:
            grads = self._exchange.mean(list(grads))
        for group, p, g, state in zip(groups, params, grads, states):
            beta1, beta2 = group["betas"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            _update_(p, m, v, lr=as_float(group["lr"]), eps=group["eps"], weight_decay=group["weight_decay"])

    def _compressed(self, groups, params, grads, states, originals) -> None:
        # params: the tensors updated (float32 copies of low-precision parameters, new at every step); originals:
        # the parameters themselves, which name the error buffers
        momenta = [_local_momentum(s["exp_avg"], g, grp["betas"][0]) for grp, g, s in zip(groups, grads, states)]
        exchange = self._exchange
        if exchange.workers > 1 or self.compress_single_worker:
            layout, errors = self._error_buffers(momenta, originals)
            momenta = exchange.compressed(momenta, errors, layout)
        elif exchange.simulated:
            momenta = [m[0] for m in momenta]
        for group, p, m, state in zip(groups, params, momenta, states):
            state["exp_avg"].copy_(m.view_as(p))
            _mask_momentum_(state, group.get("exp_avg_mask"))
            _update_(
                p,
                state["exp_avg"],
                state["exp_avg_sq"],
                lr=as_float(group["lr"]),
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )

    def _error_buffers(self, momenta: list[Tensor], params) -> tuple[Layout, tuple[Tensor, Tensor]]:
        dtype, device = _common_dtype(momenta), params[0].device
        key = (tuple(id(p) for p in params), tuple(p.numel() for p in params), dtype, device, self.workers)
        if self._errors is not None and self._errors[0] != key:
            raise RuntimeError(
                "OneBitAdam: the parameters with gradients changed during the compression stage; the worker and "
                "server errors cover a fixed set of parameters. Give every parameter a gradient at every step "
                "(zero_grad(set_to_none=False), DDP's find_unused_parameters), or load a checkpoint (which resets "
                "the errors) after changing the parameters"
            )
        if self._errors is None:
            layout = make_layout(key[1], self.workers, device)
            self._errors = (key, layout, self._exchange.errors(layout, dtype, device))
        return self._errors[1], self._errors[2]

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["optimlab"]["step"] = self._step
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ``m``, ``v``, the step count and the hyperparameters; the errors restart from zero (DeepSpeed's
        choice), so a checkpoint loads at any world size. The ``exp_avg_mask`` of each group stays the one given
        to this optimizer (as DeepSpeed keeps the training script's, which may differ between stages)."""
        step = state_dict.get("optimlab", {}).get("step", 0)
        masks = [group.get("exp_avg_mask") for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, mask in zip(self.param_groups, masks):
            group.pop("exp_avg_mask", None)
            if mask is not None:
                group["exp_avg_mask"] = mask
        self._step = step
        self._errors = None


def _mask_momentum_(state: dict[str, Tensor], mask: Tensor | None) -> None:
    """DeepSpeed's ``exp_avg_mask`` on the momentum after the compressed all-reduce."""
    if mask is None:
        return
    m = state["exp_avg"]
    if mask.numel() != m.numel():
        raise ValueError(
            f"Invalid exp_avg_mask: {mask.numel()} elements for a parameter of shape {tuple(m.shape)}; a masked "
            "param group holds one parameter and a mask of its shape (as in DeepSpeed)"
        )
    m.mul_(mask.to(device=m.device, dtype=m.dtype).view_as(m))


# -- DDP integration --------------------------------------------------------------------------------------------------
def onebit_adam_hook(opt: OneBitAdam, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook of a :class:`OneBitAdam`: averages the bucket (counted by ``opt.comm``) until the
    variance freezes, then hands back the local gradient without communicating (the optimizer compresses the
    momentum instead)."""
    if opt.compressing:
        fut: torch.futures.Future[Tensor] = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut
    return allreduce_hook(opt.comm, bucket)


def register_onebit_adam(ddp_model: torch.nn.parallel.DistributedDataParallel, opt: OneBitAdam) -> None:
    """Install ``opt``'s communication hook on ``ddp_model`` (which then averages gradients only during warm-up),
    and tell ``opt`` that the gradients it sees in warm-up are averaged already. The optimizer uses the DDP
    model's process group unless it was given a Communicator."""
    if not isinstance(opt, OneBitAdam) or opt.simulated:
        raise TypeError("register_onebit_adam needs a OneBitAdam on real ranks (not the simulator, workers=n)")
    exchange = opt._exchange
    if exchange._comm is None:
        exchange._comm = Communicator(ddp_model.process_group)
    elif exchange.comm.world_size != dist.get_world_size(ddp_model.process_group):
        raise ValueError(
            f"the optimizer's Communicator spans {exchange.comm.world_size} ranks, the DDP model's process group "
            f"{dist.get_world_size(ddp_model.process_group)}; give both the same group"
        )
    opt.gradients_averaged = True
    ddp_model.register_comm_hook(opt, onebit_adam_hook)


register(
    MethodInfo(
        name="onebit_adam",
        cls=OneBitAdam,
        kind="optimizer",
        paper="1-bit Adam: Communication Efficient Large-Scale Training with Adam's Convergence Speed",
        arxiv="2102.02888",
        code_url="https://github.com/microsoft/DeepSpeed/blob/06fa7eea772ab82544e0c7ba47ddc01ba8f962ef/deepspeed/runtime/fp16/onebit/adam.py",
        summary="Adam warm-up, then frozen variance and 1-bit compressed momentum with worker and server error "
        "compensation (data-parallel; real ranks or the n-worker simulator)",
        hyperparameters={**adam_family(2), "warmup_fraction": _FRACTION},
        lr_range=(1e-4, 1e-1),  # the range the bench searches for torch's Adam: equal tuning
        batch_scaling="sqrt",
        exemptions={
            "missing_gradients": "the initialisation step, warm-up and freeze follow the optimizer's global step "
            "count (DeepSpeed's semantics), so a parameter that gets its first gradient late joins the current phase",
        },
        advice="Freeze after 15-25 % of training (total_steps=T freezes at 20 %), then try less; lr and weight "
        "decay as for Adam without bias correction. With DDP call register_onebit_adam(ddp_model, opt).",
        usage=(
            "opt = OneBitAdam(ddp_model.parameters(), lr=1e-3, total_steps=T)\n"
            "register_onebit_adam(ddp_model, opt)  # DDP averages only during warm-up\n"
            "# the simulator: sim = OneBitAdam(model.parameters(), total_steps=T, workers=4)\n"
            "#   G, losses = worker_gradients(model, loss_fn, batches); sim.step(worker_grads=G)"
        ),
    )
)
