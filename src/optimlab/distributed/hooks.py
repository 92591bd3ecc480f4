"""DDP communication hooks for compressed communication with error feedback (EF14, EF21, EControl, none).

Use::

    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = EControl("topk", 0.1, eta=0.05).register(ddp)     # or, by hand:
    state = EControl("topk", 0.1, eta=0.05).hook(model)
    ddp.register_comm_hook(state, error_feedback_hook)

In each bucket, every rank runs the scheme's worker maths (:func:`~optimlab.distributed.error_feedback.worker_message`,
the same function the simulator uses) on its bucket of gradients, the messages are averaged through a counted
:class:`~optimlab.distributed.comm.Communicator` — an all-reduce of the values when every worker's message has
the same support (identity, shared-seed rand-k), otherwise an all-gather of the wire bytes (Top-K's values and
``int32`` indices, the sign's packed bits and scale) densified and summed on every rank — and the server maths
(:func:`~optimlab.distributed.error_feedback.server_direction`; EF21 and EControl keep the server's ``h``
replicated on every rank) gives the direction that DDP writes into ``p.grad``.

The state is kept per bucket (``bucket.index()``), created lazily. DDP rebuilds its buckets after the first
iteration (and may bucket differently after a restart), so each bucket's state remembers which parameters it
covers; when the buckets change, the per-parameter slices are reassembled into the new buckets, exactly.
"""

# no "from __future__ import annotations": DDP.register_comm_hook checks the hook's annotations as objects

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from optimlab.distributed.comm import Communicator
from optimlab.distributed.compressors import Compressor, Wire
from optimlab.distributed.error_feedback import _make_generator, _Scheme, prescale, server_direction

__all__ = ["ErrorFeedbackHook", "error_feedback_hook"]


class ErrorFeedbackHook:
    """The state of one rank's error-feedback communication hook for ``model`` (the module DDP wraps).

    Args:
        method: the scheme (:class:`~optimlab.distributed.error_feedback.EF14`, ``EF21``, ``EControl``,
            ``CompressedSGD``), constructed alike on every rank (rand-k's shared seed).
        model: the wrapped module (its parameter order names the buckets' contents in :meth:`state_dict`).
        group: the process group (default: the default group, which must be initialised).

    Attributes:
        comm: the :class:`~optimlab.distributed.comm.Communicator`; ``comm.bytes_sent`` counts this rank's bytes.
        steps: hook calls of bucket 0 (training iterations).
    """

    def __init__(self, method: _Scheme, model: nn.Module, group: Any = None) -> None:
        self.comm = Communicator(group)
        self.method = method
        self.model = model
        self.steps = 0
        self._states: dict[int, dict[str, Tensor]] = {}
        self._layouts: dict[int, tuple[int, ...]] = {}  # bucket index -> positions of its parameters in model
        self._retired: dict[int, dict[str, Tensor]] = {}  # parameter position -> its slices of a retired bucket
        self._positions: dict[int, int] | None = None
        self._generator: torch.Generator | None = None
        self._saved_generator: Tensor | None = None

    # -- bucket state ----------------------------------------------------------------------------------------
    def _layout(self, bucket: dist.GradBucket) -> tuple[int, ...]:
        params = bucket.parameters()
        if self._positions is None or any(p.data_ptr() not in self._positions for p in params):
            self._positions = {p.data_ptr(): i for i, p in enumerate(self.model.parameters())}
        try:
            layout = tuple(self._positions[p.data_ptr()] for p in params)
        except KeyError:
            raise RuntimeError(
                "the bucket holds parameters that are not the hook's model's: pass the module DDP wraps (ddp.module)"
            ) from None
        if sum(p.numel() for p in params) != bucket.buffer().numel():
            raise RuntimeError(
                "bucket buffer and parameter sizes differ (several dtypes or devices in one model "
                "are not supported by this hook)"
            )
        return layout

    def _retire_all(self) -> None:
        sizes = [p.numel() for p in self.model.parameters()]
        for index, layout in self._layouts.items():
            offset = 0
            for pos in layout:
                n = sizes[pos]
                self._retired[pos] = {k: v[offset : offset + n] for k, v in self._states[index].items()}
                offset += n
        self._states.clear()
        self._layouts.clear()

    def _state_for(self, bucket: dist.GradBucket) -> dict[str, Tensor]:
        index, layout = bucket.index(), self._layout(bucket)
        if self._layouts.get(index) == layout:
            return self._states[index]
        live = {pos for lay in self._layouts.values() for pos in lay}
        if index in self._layouts or live.intersection(layout):  # DDP rebuilt its buckets
            self._retire_all()
        pieces = [self._retired.pop(pos, None) for pos in layout]
        if all(p is None for p in pieces):
            state: dict[str, Tensor] = {}
        elif any(p is None for p in pieces) or len({tuple(sorted(p)) for p in pieces}) != 1:
            raise RuntimeError("bucket state covers only part of the bucket's parameters; the model changed?")
        else:
            state = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
        self._states[index], self._layouts[index] = state, layout
        return state

    # -- communication ---------------------------------------------------------------------------------------
    def _mean(self, compressor: Compressor, wire: Wire, ctx: Any, d: int) -> Tensor:
        """The average over ranks of the decoded messages (this rank sends ``wire``, divided by the world size)."""
        wire = prescale(compressor, wire, self.comm.world_size)
        if compressor.summable:
            for t in wire:
                self.comm.all_reduce(t)
            return compressor.decode(wire, ctx, d)
        # one all-gather of all wire tensors as bytes, split again on arrival
        flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in wire]
        gathered = self.comm.all_gather(torch.cat(flat))
        stacked, offset = [], 0
        for t, b in zip(wire, flat):
            part = gathered[:, offset : offset + b.numel()].contiguous().view(t.dtype)
            stacked.append(part.reshape(self.comm.world_size, *t.shape))
            offset += b.numel()
        return compressor.decode_sum(tuple(stacked), ctx, d)

    def run(self, bucket: dist.GradBucket) -> Tensor:
        """One bucket's round: worker maths, averaged messages, server maths; returns the bucket's direction."""
        buffer = bucket.buffer()
        if bucket.index() == 0:
            self.steps += 1
        if self._generator is None and self.method.compressor.needs_generator:
            self._generator = _make_generator(self.method.seed, buffer.device, self._saved_generator)
        state = self._state_for(bucket)
        compressor, wire, ctx = self.method.worker_message(state, buffer, self._generator)
        mean = self._mean(compressor, wire, ctx, buffer.numel())
        return buffer.copy_(server_direction(self.method.scheme, state, mean))

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: per-bucket tensors and parameter positions, the generator, counters."""
        gen = self._generator.get_state() if self._generator is not None else self._saved_generator
        return {
            "scheme": self.method.scheme,
            "world_size": self.comm.world_size,
            "rank": self.comm.rank,
            "buckets": {i: {k: v.clone() for k, v in s.items()} for i, s in self._states.items()},
            "layouts": {i: list(lay) for i, lay in self._layouts.items()},
            "retired": {i: {k: v.clone() for k, v in s.items()} for i, s in self._retired.items()},
            "generator": gen,
            "steps": self.steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by the same rank of a run with the same world size and model."""
        if state_dict["scheme"] != self.method.scheme:
            raise ValueError(f"state of scheme {state_dict['scheme']!r} cannot load into {self.method.scheme!r}")
        if state_dict["world_size"] != self.comm.world_size:
            raise ValueError(
                f"world size mismatch: the state was saved by {state_dict['world_size']} ranks, this group has "
                f"{self.comm.world_size}"
            )
        if state_dict["rank"] != self.comm.rank:
            raise ValueError(f"the state is rank {state_dict['rank']}'s; this is rank {self.comm.rank}")
        self._states = {int(i): {k: v.clone() for k, v in s.items()} for i, s in state_dict["buckets"].items()}
        self._layouts = {int(i): tuple(lay) for i, lay in state_dict["layouts"].items()}
        self._retired = {int(i): {k: v.clone() for k, v in s.items()} for i, s in state_dict["retired"].items()}
        self._saved_generator = state_dict["generator"]
        self._generator = None
        self.steps = state_dict["steps"]


def error_feedback_hook(state: ErrorFeedbackHook, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """The DDP communication hook: ``ddp.register_comm_hook(state, error_feedback_hook)``."""
    fut: torch.futures.Future[Tensor] = torch.futures.Future()
    fut.set_result(state.run(bucket))
    return fut
