"""Run a function in ``world_size`` fresh processes joined in a gloo process group (tests, the bench).

:func:`spawn` is ``torchrun`` in miniature for code that is already a Python function: each rank is a new
interpreter (``spawn`` start method, so nothing leaks from the parent), the group meets through a file in a
temporary directory (no ports to collide), and the group's timeout is seconds, so a hung collective fails
the run quickly instead of after gloo's default 30 minutes. Whatever each rank's function returns comes back
to the caller, in rank order; an exception in any rank is raised in the caller with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optimlab.distributed.comm import DEFAULT_TIMEOUT

__all__ = ["spawn"]


def _rank_main(
    rank: int,
    fn: Callable[..., Any],
    args: tuple,
    world_size: int,
    init_file: str,
    timeout: timedelta,
    threads: int,
    results: Any,
) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timeout
    )
    try:
        # pickled by value here: torch.multiprocessing would pass tensors as handles into this process's shared
        # memory, which is gone once the rank exits and the parent reads the queue
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # report every failure to the parent, which raises it
        results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: timedelta = DEFAULT_TIMEOUT, threads: int = 1
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes sharing a gloo group; return the results.

    ``fn`` and ``args`` must be picklable (a module-level function). Each rank uses ``threads`` intra-op
    threads (default 1: ranks share this machine's cores). Returns the per-rank return values in rank order;
    raises RuntimeError with the failing rank's traceback if any rank raised or died.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="optimlab-pg-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_rank_main, args=(r, fn, args, world_size, init_file, timeout, threads, results))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        # read results while the ranks run: a rank blocks writing a large result into the queue's pipe until the
        # parent reads it, so joining first could deadlock
        collected: dict[int, Any] = {}
        failures = []
        deadline = time.monotonic() + timeout.total_seconds() * 2 + 60
        while len(collected) + len(failures) < world_size and time.monotonic() < deadline:
            if not results.empty():
                rank, ok, value = results.get()
                if ok:
                    collected[rank] = pickle.loads(value)
                else:
                    failures.append(f"rank {rank}:\n{value}")
            elif not any(p.is_alive() for p in procs) and results.empty():
                break
            else:
                time.sleep(0.01)
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        if failures or alive or len(collected) != world_size:
            missing = sorted(set(range(world_size)) - set(collected))
            detail = (
                "\n".join(failures)
                or f"ranks {missing} exited without a result (exit codes {[p.exitcode for p in procs]})"
            )
            raise RuntimeError(f"distributed run of {getattr(fn, '__name__', fn)} failed:\n{detail}")
        return [collected[r] for r in range(world_size)]
