"""The shared distributed machinery: counted collectives (bytes = numel × element_size of what a rank hands over),
``allreduce_hook`` = DDP without a hook bit for bit, ``spawn`` reporting a rank that raises, and the error when no
process group runs.

The 2-rank checks read the one launch of ``test_ef_multiprocess`` (cached for the session); the failing rank is a
second, short launch.
"""

from __future__ import annotations

import pytest
import torch

from optimlab.distributed.comm import DEFAULT_TIMEOUT, Communicator, require_process_group
from optimlab.distributed.launch import spawn
from tests.distributed.test_ef_multiprocess import D_IN, D_OUT, WORLD, results

pytestmark = pytest.mark.timeout(120)


def test_bytes_are_numel_times_element_size() -> None:
    for rank, r in enumerate(results()):
        c = r["comm"]
        broadcast = 4 * 2 if rank == 0 else 0  # only the source of a broadcast sends
        assert c["bytes"] == 5 * 8 + 3 * 4 + broadcast + 6 * 4
        assert c["calls"] == (4 if rank == 0 else 3)


def test_collectives_compute_the_right_values() -> None:
    for rank, r in enumerate(results()):
        c = r["comm"]
        assert torch.equal(c["all_reduce"], 2 * torch.arange(5, dtype=torch.float64) + 1)
        assert torch.equal(c["all_gather"], torch.tensor([[0, 1, 2], [1, 1, 2]], dtype=torch.int32))
        assert torch.equal(c["broadcast"], torch.zeros(4, dtype=torch.bfloat16))
        expected = torch.stack([torch.arange(6.0)[3 * rank : 3 * rank + 3] + 10 * j for j in range(WORLD)])
        assert torch.equal(c["chunks"], expected)


def test_allreduce_hook_equals_ddp_without_hook_bit_for_bit() -> None:
    r0, r1 = results()
    for r in (r0, r1):
        assert torch.equal(r["allreduce"][0], r["plain"][0])
        assert r["allreduce"][1] == r["plain"][1]
    d = D_IN * D_OUT + D_OUT
    assert r0["allreduce_bytes"] == 5 * d * 4  # one fp32 bucket per step, 5 steps


def _raise_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    return rank


def test_a_rank_that_raises_is_reported() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)rank 1:.*ValueError: rank one fails on purpose"):
        spawn(_raise_on_rank_one, 2)


def test_missing_process_group_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="needs a torch.distributed process group.*torchrun"):
        Communicator()
    with pytest.raises(RuntimeError, match="my method needs a torch.distributed process group"):
        require_process_group("my method")


def test_spawn_rejects_bad_world_size_and_has_a_short_timeout() -> None:
    with pytest.raises(ValueError, match="world_size"):
        spawn(_raise_on_rank_one, 0)
    assert DEFAULT_TIMEOUT.total_seconds() <= 120
