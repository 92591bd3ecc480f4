r"""Error feedback for compressed data-parallel SGD: EF14, EF21 and EControl, plus uncompensated compression.

Papers: EF14 — Seide, Fu, Droppo, Li, Yu, "1-Bit Stochastic Gradient Descent and its Application to
Data-Parallel Distributed Training of Speech DNNs" (Interspeech 2014, no arXiv) and Stich, Cordonnier, Jaggi,
"Sparsified SGD with Memory", arXiv `1809.07599 <https://arxiv.org/abs/1809.07599>`_ (code:
https://github.com/epfml/sparsifiedSGD); EF21 — Richtárik, Sokolov, Fatkhullin, "EF21: A New, Simpler,
Theoretically Better, and Practically Faster Error Feedback", arXiv `2106.05203 <https://arxiv.org/abs/2106.05203>`_
(code: https://github.com/IgorSokoloff/ef21_experiments_source_code); EControl — Gao, Islamov, Stich,
"EControl: Fast Distributed Optimization with Compression and Error Control", arXiv
`2311.05645 <https://arxiv.org/abs/2311.05645>`_ (no official code published).

One functional core serves both ways of running a scheme: :func:`worker_message` is worker i's maths (its
error buffer :math:`e_i`, its estimate :math:`h_i`, the message it sends), :func:`server_direction` the
server's (the replicated :math:`h=\tfrac1n\sum_i h_i`). The :class:`Simulator` applies them to the rows of an
``(n, d)`` gradient matrix; the DDP hook (:mod:`optimlab.distributed.hooks`) to one rank's gradient bucket,
with the messages averaged by real collectives. Every scheme's step is :math:`x \leftarrow x - \gamma\,v` with
the direction :math:`v` below (any ``torch.optim`` optimizer can take it; plain SGD gives the papers' methods).
The residuals are kept in gradient units (the form of the EControl and EF21 experiment code), so the hook needs
no learning rate; with a constant step this is exactly the memory :math:`m_i=\gamma e_i` of Stich et al.

Compressors: :mod:`optimlab.distributed.compressors` (Top-K is the one of the papers' experiments). The
compressor acts on the whole flat gradient in the simulator and on each DDP bucket in the hook (use one bucket
to match the simulator; Top-K per bucket is a different compressor than global Top-K).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from optimlab._core.validation import Interval
from optimlab.distributed.compressors import RATIO, Compressor, Identity, Wire, make_compressor
from optimlab.distributed.simulator import assign_gradient, worker_gradients
from optimlab.registry import MethodInfo, register

__all__ = [
    "SCHEMES",
    "worker_message",
    "server_direction",
    "prescale",
    "CompressedSGD",
    "EF14",
    "EF21",
    "EControl",
    "Simulator",
]

SCHEMES = ("none", "ef14", "ef21", "econtrol")
ETA = Interval(0.0, 1.0)
_IDENTITY = Identity()


def worker_message(
    scheme: str,
    state: dict[str, Tensor],
    grad: Tensor,
    compressor: Compressor,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
) -> tuple[Compressor, Wire, Any]:
    r"""One round of worker maths: update the worker state in place and return what it sends.

    ``grad`` is ``(..., d)`` (one worker's vector, or the rows of n workers); ``state`` holds ``"e"`` and/or
    ``"h"`` of the same shape (absent before the first round). Returns ``(compressor used, wire, ctx)``: the
    first round of EF21 and EControl sends :math:`g_i^0` uncompressed (the :class:`Identity`), every other round
    :math:`\Delta_i=\mathcal C(\cdot)` as in the schemes' docstrings.
    """
    if scheme == "none":
        return (compressor, *compressor.encode(grad, generator))
    d = grad.shape[-1]
    if scheme == "ef14":
        p = grad + state["e"] if "e" in state else grad.clone()
        wire, ctx = compressor.encode(p, generator)
        state["e"] = p - compressor.decode(wire, ctx, d)  # not in place: the identity's wire is p itself
        return compressor, wire, ctx
    if scheme not in ("ef21", "econtrol"):
        raise ValueError(f"Invalid scheme: {scheme!r}; expected one of {', '.join(map(repr, SCHEMES))}")
    if "h" not in state:  # first round: h_i = g_i^0, sent uncompressed (and counted)
        state["h"] = grad.clone()
        if scheme == "econtrol":
            state["e"] = torch.zeros_like(grad)
        return (_IDENTITY, *_IDENTITY.encode(grad))
    h = state["h"]
    v = grad - h
    if scheme == "ef21":
        wire, ctx = compressor.encode(v, generator)
        h.add_(compressor.decode(wire, ctx, d))
        return compressor, wire, ctx
    e = state["e"]
    wire, ctx = compressor.encode(torch.add(v, e, alpha=eta), generator)
    delta = compressor.decode(wire, ctx, d)
    e.add_(v).sub_(delta)  # e_i + g_i - h_i - Δ_i, with the h_i before its update
    h.add_(delta)
    return compressor, wire, ctx


def server_direction(scheme: str, state: dict[str, Tensor], mean_message: Tensor) -> Tensor:
    r"""The direction every replica applies, from the workers' averaged message.

    EF14 and uncompensated compression apply the average itself; EF21 and EControl add it to the server's
    :math:`h` (``state["server_h"]``, set to the first round's average :math:`\tfrac1n\sum_i g_i^0`) and apply
    the *updated* :math:`h`. The returned tensor may be the state itself: copy it before modifying it.
    """
    if scheme in ("none", "ef14"):
        return mean_message
    if "server_h" not in state:
        state["server_h"] = mean_message.clone()
    else:
        state["server_h"].add_(mean_message)
    return state["server_h"]


def prescale(compressor: Compressor, wire: Wire, n: int) -> Wire:
    """``wire`` with its value tensors divided by ``n`` (new tensors), so that summing the workers' messages
    averages them — in the order DDP's own averaging uses (divide, then sum)."""
    return tuple(t / n if i in compressor.value_slots else t for i, t in enumerate(wire))


def _make_generator(seed: int, device: torch.device, saved: Tensor | None) -> torch.Generator:
    gen = torch.Generator(device=device)
    if saved is not None:
        gen.set_state(saved)
    else:
        gen.manual_seed(seed)
    return gen


class _Scheme:
    """Shared constructor and factories of the user-facing scheme classes."""

    scheme = "none"

    def __init__(self, compressor: str | Compressor = "topk", ratio: float = 0.1, *, seed: int = 0) -> None:
        RATIO.check("ratio", ratio)
        Interval(0, integer=True).check("seed", seed)
        self.compressor = make_compressor(compressor, ratio)
        self.ratio = ratio
        self.seed = seed
        self.eta = 0.0

    def worker_message(
        self, state: dict[str, Tensor], grad: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Compressor, Wire, Any]:
        """:func:`worker_message` with this scheme's compressor and η."""
        return worker_message(self.scheme, state, grad, self.compressor, generator, self.eta)

    def simulator(self, n_workers: int) -> Simulator:
        """A single-process simulator of ``n_workers`` workers running this scheme."""
        return Simulator(self, n_workers)

    def hook(self, model: nn.Module, group: Any = None) -> Any:
        """The DDP communication-hook state for ``model`` (the module DDP wraps) on ``group``; register it with
        ``ddp.register_comm_hook(state, optimlab.distributed.hooks.error_feedback_hook)``."""
        from optimlab.distributed.hooks import ErrorFeedbackHook

        return ErrorFeedbackHook(self, model, group)

    def register(self, ddp_model: nn.parallel.DistributedDataParallel, group: Any = None) -> Any:
        """Register this scheme as ``ddp_model``'s communication hook; returns the hook state (bytes counter,
        ``state_dict``)."""
        from optimlab.distributed.hooks import error_feedback_hook

        state = self.hook(ddp_model.module, group)
        ddp_model.register_comm_hook(state, error_feedback_hook)
        return state

    def __repr__(self) -> str:
        eta = f", eta={self.eta:g}" if self.scheme == "econtrol" else ""
        return f"{type(self).__name__}({self.compressor!r}{eta}, seed={self.seed})"


class CompressedSGD(_Scheme):
    r"""Compressed distributed SGD without error feedback (the baseline error feedback is measured against).

    .. math::

        v = \tfrac1n \textstyle\sum_i \mathcal C(g_i)

    With a biased compressor such as Top-K this need not converge (the EControl paper's point; Stich,
    Cordonnier, Jaggi, arXiv 1809.07599, introduce memory to fix it).

    Hyperparameters (defaults): ``compressor`` ``"topk"``, ``ratio`` 0.1, ``seed`` 0 (rand-k's shared seed).
    Coming from uncompressed data-parallel SGD: same learning rate; expect a bias with Top-K.
    """

    scheme = "none"


class EF14(_Scheme):
    r"""EF14: classic error feedback (Seide et al. 2014; Stich, Cordonnier, Jaggi, arXiv 1809.07599).

    Per worker, residual :math:`e_i^0=0`:

    .. math::

        p_i = g_i + e_i,\qquad \Delta_i = \mathcal C(p_i),\qquad e_i \leftarrow p_i - \Delta_i,\qquad
        v = \tfrac1n \textstyle\sum_i \Delta_i

    The virtual iterate :math:`\tilde x = x - \gamma\,\tfrac1n\sum_i e_i` follows plain SGD exactly. The paper
    (Mem-SGD) keeps :math:`m_i=\gamma e_i`; the same method for a constant step, and no learning rate in the hook.

    Hyperparameters (defaults): ``compressor`` ``"topk"``, ``ratio`` 0.1, ``seed`` 0.
    Coming from uncompressed data-parallel SGD: same learning rate (Stich et al. use the uncompressed one).
    """

    scheme = "ef14"


class EF21(_Scheme):
    r"""EF21 (Richtárik, Sokolov, Fatkhullin, arXiv 2106.05203): compress the change of a tracked gradient.

    Per worker, :math:`h_i^0 = g_i^0` sent uncompressed in the first round; then

    .. math::

        \Delta_i = \mathcal C(g_i - h_i),\qquad h_i \leftarrow h_i + \Delta_i,\qquad
        h \leftarrow h + \tfrac1n \textstyle\sum_i \Delta_i,\qquad v = h

    (the server's :math:`h=\tfrac1n\sum_i h_i` is replicated on every rank; only :math:`\Delta_i` is sent).
    The official code initialises with the uncompressed gradient as here; its theory step for Top-K is
    :math:`\gamma = 1/(L + \tilde L\sqrt{\beta/\theta})` with :math:`\alpha=k/d`, :math:`t=1/\sqrt{1-\alpha}-1`,
    :math:`\theta=1-(1-\alpha)(1+t)`, :math:`\beta=(1-\alpha)(1+1/t)` (experiments multiply it by a factor).

    Hyperparameters (defaults): ``compressor`` ``"topk"``, ``ratio`` 0.1, ``seed`` 0.
    Coming from uncompressed data-parallel SGD: a smaller step for strong compression (the theory step above).
    """

    scheme = "ef21"


class EControl(_Scheme):
    r"""EControl (Gao, Islamov, Stich, arXiv 2311.05645): error feedback with a controlled feedback strength η.

    Per worker, :math:`e_i^0=0`, :math:`h_i^0=g_i^0` sent uncompressed in the first round; then

    .. math::

        \Delta_i &= \mathcal C(\eta\,e_i + g_i - h_i) \\
        e_i &\leftarrow e_i + g_i - h_i - \Delta_i \\
        h_i &\leftarrow h_i + \Delta_i,\qquad h \leftarrow h + \tfrac1n \textstyle\sum_i \Delta_i,\qquad v = h

    The step uses the *updated* :math:`h` (as both independent implementations of the method do): only this
    order makes the virtual iterate :math:`\tilde x = x - \gamma\,\tfrac1n\sum_i e_i` follow plain SGD exactly
    (:math:`\tilde x_{t+1}=\tilde x_t-\gamma\,\tfrac1n\sum_i g_i^t` for every η and compressor), and makes the
    identity compressor give plain SGD. With η = 0 it is EF21 step for step.

    Hyperparameters (defaults): ``eta`` required, in [0, 1] — the theory value is :math:`\eta=\delta/400`
    (:meth:`theory_eta`; δ = k/d for Top-K), the practical range 0.1–0.001 (tuned in the paper's experiments;
    0.1 with Top-K 10 % on ResNet-18/CIFAR-10 in the experiment code); ``compressor`` ``"topk"``, ``ratio``
    0.1, ``seed`` 0.
    Coming from EF21: the same step size, and η from the practical range.
    """

    scheme = "econtrol"

    def __init__(self, compressor: str | Compressor = "topk", ratio: float = 0.1, *, eta: float, seed: int = 0) -> None:
        super().__init__(compressor, ratio, seed=seed)
        ETA.check("eta", eta)
        self.eta = float(eta)

    def theory_eta(self, d: int) -> float:
        """The paper's theoretical feedback strength δ/400 for ``d``-vectors (ValueError without a δ)."""
        delta = self.compressor.delta(d)
        if delta is None:
            raise ValueError(f"{self.compressor!r} is not contractive: it has no δ, so no theoretical η")
        return delta / 400


class Simulator:
    """n workers of a scheme in one process: maps the ``(n, d)`` gradient matrix to the direction all replicas apply.

    ``sim(G)`` runs one round: every worker's :func:`worker_message` on its row of ``G`` (all rows in one call),
    the average of the messages as the wire tensors would give it, and :func:`server_direction`. Randomness
    (rand-k) comes from one generator seeded with the scheme's ``seed``, shared by the workers like the shared
    seed of the real run.

    Attributes:
        bytes_per_worker: bytes each worker sent in the last round (the size of its wire tensors; the first
            round of EF21/EControl is uncompressed).
        bytes_sent: bytes each worker sent since construction.
        steps: rounds run.
    """

    def __init__(self, method: _Scheme, n_workers: int) -> None:
        Interval(1, integer=True).check("n_workers", n_workers)
        self.method = method
        self.n_workers = n_workers
        self.state: dict[str, Tensor] = {}
        self.bytes_per_worker = 0
        self.bytes_sent = 0
        self.steps = 0
        self._generator: torch.Generator | None = None
        self._saved_generator: Tensor | None = None

    def __call__(self, grads: Tensor) -> Tensor:
        """The direction (a new ``d``-vector) for the workers' gradients ``grads`` (``(n_workers, d)``)."""
        if grads.dim() != 2 or grads.shape[0] != self.n_workers:
            raise ValueError(f"grads must be ({self.n_workers}, d), one row per worker; got {tuple(grads.shape)}")
        if self._generator is None and self.method.compressor.needs_generator:
            self._generator = _make_generator(self.method.seed, grads.device, self._saved_generator)
        compressor, wire, ctx = self.method.worker_message(self.state, grads, self._generator)
        self.bytes_per_worker = sum(t[0].numel() * t.element_size() for t in wire)
        self.bytes_sent += self.bytes_per_worker
        self.steps += 1
        mean = compressor.decode_sum(prescale(compressor, wire, self.n_workers), ctx, grads.shape[1])
        return server_direction(self.method.scheme, self.state, mean).clone()

    step = __call__

    def backward(
        self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], worker_batches: Sequence[Any]
    ) -> Tensor:
        """Every worker's gradient on its batch, the round, and the direction written to ``p.grad``; returns the
        workers' losses (``(n,)``). Follow with ``optimizer.step()``."""
        if len(worker_batches) != self.n_workers:
            raise ValueError(f"expected {self.n_workers} worker batches, got {len(worker_batches)}")
        grads, losses = worker_gradients(model, loss_fn, worker_batches)
        assign_gradient(model, self(grads))
        return losses

    def state_dict(self) -> dict[str, Any]:
        gen = self._generator.get_state() if self._generator is not None else self._saved_generator
        return {
            "scheme": self.method.scheme,
            "n_workers": self.n_workers,
            "state": {k: v.clone() for k, v in self.state.items()},
            "steps": self.steps,
            "bytes_sent": self.bytes_sent,
            "generator": gen,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["scheme"] != self.method.scheme:
            raise ValueError(f"state of scheme {state_dict['scheme']!r} cannot load into {self.method.scheme!r}")
        if state_dict["n_workers"] != self.n_workers:
            raise ValueError(
                f"world size mismatch: the state has {state_dict['n_workers']} workers, this simulator {self.n_workers}"
            )
        self.state = {k: v.clone() for k, v in state_dict["state"].items()}
        self.steps = state_dict["steps"]
        self.bytes_sent = state_dict["bytes_sent"]
        self._saved_generator = state_dict["generator"]
        self._generator = None


_RATIO_RULES = {"ratio": RATIO, "seed": Interval(0, integer=True)}
# the schemes feed plain SGD: its step size is what the bench tunes
_SGD_LR_RANGE = (1e-3, 1.0)

register(
    MethodInfo(
        name="compressed_sgd",
        cls=CompressedSGD,
        kind="communication",
        paper="Sparsified SGD with Memory (the uncompensated baseline it improves on)",
        arxiv="1809.07599",
        summary="compressed gradients averaged with no error feedback: the baseline the schemes are measured against",
        hyperparameters=_RATIO_RULES,
        lr_range=_SGD_LR_RANGE,
        advice="Biased compressors (Top-K) leave a bias that error feedback removes.",
        batch_scaling="linear",
    )
)
register(
    MethodInfo(
        name="ef14",
        cls=EF14,
        kind="communication",
        paper="Sparsified SGD with Memory (and Seide et al. 2014, 1-Bit Stochastic Gradient Descent)",
        arxiv="1809.07599",
        code_url="https://github.com/epfml/sparsifiedSGD",
        summary="classic error feedback: compress gradient plus residual, keep what was not sent",
        hyperparameters=_RATIO_RULES,
        lr_range=_SGD_LR_RANGE,
        advice="Top-K with EF14 keeps the uncompressed learning rate.",
        batch_scaling="linear",
    )
)
register(
    MethodInfo(
        name="ef21",
        cls=EF21,
        kind="communication",
        paper="EF21: A New, Simpler, Theoretically Better, and Practically Faster Error Feedback",
        arxiv="2106.05203",
        code_url="https://github.com/IgorSokoloff/ef21_experiments_source_code",
        summary="compress the change of a tracked per-worker gradient estimate; server keeps their mean",
        hyperparameters=_RATIO_RULES,
        lr_range=_SGD_LR_RANGE,
        advice="First round uncompressed; a smaller step than uncompressed SGD for strong compression.",
        batch_scaling="linear",
    )
)
register(
    MethodInfo(
        name="econtrol",
        cls=EControl,
        kind="communication",
        paper="EControl: Fast Distributed Optimization with Compression and Error Control",
        arxiv="2311.05645",
        summary="EF21's estimate plus an error buffer fed back with strength eta; no heterogeneity assumption",
        hyperparameters=_RATIO_RULES,
        lr_range=_SGD_LR_RANGE,
        advice="eta is required: theory delta/400, practice 0.1-0.001 (tune).",
        batch_scaling="linear",
    )
)
