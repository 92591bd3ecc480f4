"""1-bit Adam on two real gloo ranks (one launch): replicas stay identical through warm-up and compression, the
DDP path with the optimizer's hook equals the plain path, both equal the single-process simulator on the same
data, and after warm-up each rank sends at least 16x fewer bytes than DDP's float32 all-reduce."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.distributed as dist

from optimlab.distributed.comm import Communicator, allreduce_hook
from optimlab.distributed.launch import spawn
from optimlab.distributed.onebit_adam import OneBitAdam, make_layout, message_bytes, register_onebit_adam
from optimlab.distributed.simulator import flat_params, worker_gradients

WORLD, STEPS, FREEZE, LR = 2, 7, 3, 1e-2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial replica on every rank
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 32, generator=gen), torch.randn(8, 8, generator=gen)


def _loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _digest(model: torch.nn.Module) -> str:
    """The parameters' exact bytes, hashed (results come back through a pipe: keep them small)."""
    return hashlib.sha256(flat_params(model).numpy().tobytes()).hexdigest()


def _train(rank: int, model: torch.nn.Module, opt: OneBitAdam) -> tuple[list[str], list[int]]:
    history, sent = [], []
    for step in range(STEPS):
        opt.zero_grad()
        before = opt.bytes_sent
        _loss(model, _batch(rank, step)).backward()
        opt.step()
        sent.append(opt.bytes_sent - before)
        history.append(_digest(model))
    return history, sent


def _received(rank: int) -> list[int]:
    """Bytes this rank receives from the collectives at each step of a plain run (the wire, not the counter:
    DeepSpeed's server chunks travel by all-to-all, so a rank receives each worker's signs of its own chunk only)."""
    log: list[int] = []
    gather, to_all = dist.all_gather, dist.all_to_all_single

    def all_gather(outputs, tensor, *args, **kwargs):
        log.append(sum(o.numel() * o.element_size() for o in outputs))
        return gather(outputs, tensor, *args, **kwargs)

    def all_to_all_single(output, tensor, *args, **kwargs):
        log.append(output.numel() * output.element_size())
        return to_all(output, tensor, *args, **kwargs)

    model = _model()
    opt = OneBitAdam(model.parameters(), lr=LR, freeze_step=FREEZE)
    received = []
    dist.all_gather, dist.all_to_all_single = all_gather, all_to_all_single
    try:
        for step in range(STEPS):
            opt.zero_grad()
            _loss(model, _batch(rank, step)).backward()
            log.clear()
            opt.step()
            received.append(sum(log))
    finally:
        dist.all_gather, dist.all_to_all_single = gather, to_all
    return received


def _ranks(rank: int, world_size: int) -> dict:
    plain = _model()
    plain_history, plain_sent = _train(rank, plain, OneBitAdam(plain.parameters(), lr=LR, freeze_step=FREEZE))

    ddp = torch.nn.parallel.DistributedDataParallel(_model())
    opt = OneBitAdam(ddp.parameters(), lr=LR, freeze_step=FREEZE)
    register_onebit_adam(ddp, opt)
    ddp_history, ddp_sent = _train(rank, ddp, opt)

    baseline = torch.nn.parallel.DistributedDataParallel(_model())
    comm = Communicator()
    baseline.register_comm_hook(comm, allreduce_hook)
    _loss(baseline, _batch(rank, 0)).backward()
    return {
        "plain": plain_history,
        "plain_sent": plain_sent,
        "ddp": ddp_history,
        "ddp_sent": ddp_sent,
        "baseline_sent": comm.bytes_sent,
        "world": opt.workers,
        "final": flat_params(plain),
        "received": _received(rank),
    }


@pytest.mark.timeout(120)
def test_real_ranks_agree_with_each_other_with_ddp_and_with_the_simulator() -> None:
    ranks = spawn(_ranks, WORLD)
    first, second = ranks
    assert first["world"] == WORLD
    for key in ("plain", "ddp"):
        for a, b in zip(first[key], second[key], strict=True):  # replicas identical at every step
            assert a == b, key
        # the initialisation step moves nothing, every later step moves the parameters
        assert first[key][0] == _digest(_model()) and len(set(first[key])) == STEPS
    assert first["plain"] == first["ddp"]  # DDP's hook path = the optimizer averaging by itself

    model = _model()
    sim = OneBitAdam(model.parameters(), lr=LR, freeze_step=FREEZE, workers=WORLD)
    sim_sent = []
    for step in range(STEPS):
        grads, _ = worker_gradients(model, _loss, [_batch(r, step) for r in range(WORLD)])
        before = sim.bytes_sent
        sim.step(worker_grads=grads)
        sim_sent.append(sim.bytes_sent - before)
        if step == STEPS - 1:
            torch.testing.assert_close(flat_params(model), first["final"], rtol=0, atol=0)
        assert _digest(model) == first["plain"][step], step  # the simulator = the real run, bit for bit

    d = sum(p.numel() for p in model.parameters())
    layout = make_layout([p.numel() for p in model.parameters()], WORLD)
    compressed = sum(message_bytes(layout, 4))
    assert first["baseline_sent"] == 4 * d
    expected = [0] + [4 * d] * (FREEZE - 1) + [compressed] * (STEPS - FREEZE)
    assert first["plain_sent"] == second["plain_sent"] == sim_sent == expected
    assert first["ddp_sent"] == [4 * d] * FREEZE + [compressed] * (STEPS - FREEZE)  # DDP averages at step 1 too
    assert first["baseline_sent"] / compressed >= 16
    # received per compressed step: every worker's signs of this rank's chunk and its scales, then every server's
    # chunk and scales (an all-gather of the whole grid in the first phase would be n times the signs)
    scales = len(layout.numels) * 4
    per_step = WORLD * (layout.columns // 8 + scales) + WORLD * (layout.columns // 8 + scales)
    for r in ranks:
        assert r["received"][FREEZE:] == [per_step] * (STEPS - FREEZE)
