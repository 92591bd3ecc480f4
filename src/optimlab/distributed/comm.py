"""Counted collectives: the one place where optimlab hands tensors to ``torch.distributed``.

Every distributed method in optimlab communicates through a :class:`Communicator`, which forwards each call to
``torch.distributed`` unchanged and adds ``numel × element_size`` of the tensor this rank hands over to
:attr:`Communicator.bytes_sent`. Methods are compared by that counter, and the baseline is the same counter
around DDP's default all-reduce (:func:`allreduce_hook`), so both sides are measured the same way.

What counts as "sent" is the rank's input to the collective: the tensor given to ``all_reduce`` or
``broadcast`` (source rank only), the local tensor given to ``all_gather``. Gloo's and NCCL's internal
algorithms (ring, tree) move a small constant multiple of that, the same multiple for every method that uses
the same collective.
"""

# no "from __future__ import annotations" here: DDP.register_comm_hook compares the hook's annotations with
# dist.GradBucket and Future[Tensor] themselves, and rejects them as strings

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Communicator", "allreduce_hook", "require_process_group", "DEFAULT_TIMEOUT"]

#: Process-group timeout for optimlab's own launches and tests: a hung collective fails in seconds, not in
#: gloo's default 30 minutes.
DEFAULT_TIMEOUT = timedelta(seconds=60)


def require_process_group(what: str) -> None:
    """Raise a RuntimeError that says how to start a process group, unless one is running."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs a torch.distributed process group, and none is initialised: launch with torchrun and "
            "call torch.distributed.init_process_group('gloo' or 'nccl') first, or use the single-process "
            "simulator in optimlab.distributed.simulator"
        )


class Communicator:
    """Collectives on one process group, with the bytes this rank hands over counted.

    Args:
        group: the process group (default: the default group, which must be initialised).

    Attributes:
        rank, world_size: of this process in ``group``.
        bytes_sent: bytes handed to collectives since construction or the last :meth:`reset` (a Python int,
            computed from shapes and dtypes, so counting never synchronises with the device).
        calls: number of collectives issued.
    """

    def __init__(self, group: Any = None) -> None:
        require_process_group(type(self).__name__)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bytes_sent = 0
        self.calls = 0

    def _count(self, tensor: Tensor) -> None:
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.calls += 1

    def reset(self) -> int:
        """Zero the counters; return the bytes counted before."""
        sent, self.bytes_sent, self.calls = self.bytes_sent, 0, 0
        return sent

    def all_reduce(self, tensor: Tensor, op: Any = dist.ReduceOp.SUM, async_op: bool = False) -> Any:
        """In-place all-reduce of ``tensor`` (see ``torch.distributed.all_reduce``)."""
        self._count(tensor)
        return dist.all_reduce(tensor, op=op, group=self.group, async_op=async_op)

    def all_gather(self, tensor: Tensor, *, counted: bool = True) -> Tensor:
        """Every rank's ``tensor``, stacked along a new first dimension (rank order). ``counted=False`` leaves the
        bytes out of :attr:`bytes_sent`: for traffic that simulates something other than the method (an
        attacker's view of the honest gradients)."""
        output = tensor.new_empty((self.world_size, *tensor.shape))
        if counted:
            self._count(tensor)
        # the list form (rows of one output tensor) works on every backend; the single-tensor form's shape
        # rules differ between gloo and nccl
        dist.all_gather(list(output.unbind(0)), tensor.contiguous(), group=self.group)
        return output

    def broadcast(self, tensor: Tensor, src: int = 0, async_op: bool = False) -> Any:
        """Broadcast ``tensor`` from rank ``src`` (a group rank); only the source counts the bytes."""
        if self.rank == src:
            self._count(tensor)
        return dist.broadcast(
            tensor,
            src=dist.get_global_rank(self.group, src) if self.group else src,
            group=self.group,
            async_op=async_op,
        )

    def all_to_all_chunks(self, tensor: Tensor) -> Tensor:
        """Chunk ``j`` of every rank's ``tensor``, for this rank ``j``: a ``(world_size, chunk)`` tensor.

        ``tensor`` is split into ``world_size`` equal chunks along its flattened length (which must divide);
        one ``all_to_all_single`` (gloo and NCCL both have it) sends chunk ``j`` to rank ``j`` only, so a rank
        receives one chunk from every rank. The counted bytes are the whole ``tensor`` this rank hands over.
        """
        flat = tensor.reshape(-1).contiguous()
        if flat.numel() % self.world_size:
            raise ValueError(f"tensor of {flat.numel()} elements does not split into {self.world_size} chunks")
        output = torch.empty_like(flat)
        self._count(flat)
        dist.all_to_all_single(output, flat, group=self.group)
        return output.view(self.world_size, -1)


def allreduce_hook(comm: Communicator, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP's default gradient averaging as a communication hook, with its bytes counted by ``comm``.

    Register with ``ddp_model.register_comm_hook(Communicator(), allreduce_hook)``; the result equals DDP
    without a hook (sum all-reduce of the bucket, divided by the world size).
    """
    buffer = bucket.buffer().div_(comm.world_size)
    fut = comm.all_reduce(buffer, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
