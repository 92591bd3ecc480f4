"""Robust aggregation on real torch.distributed ranks (gloo, 4 processes, one launch): the DDP hook's result is the
aggregator of the gathered rows, replicas stay identical, bytes are counted, and a Byzantine rank is resisted."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from optimlab.distributed.aggregators import CoordinateMedian, Krum, Mean, RobustHookState, robust_hook
from optimlab.distributed.attacks import large_noise, sign_flip
from optimlab.distributed.comm import Communicator
from optimlab.distributed.flag import Flag
from optimlab.distributed.launch import spawn
from optimlab.distributed.simulator import flat_params

WORLD = 4
BYZANTINE = 3


class _Recorder:
    """Hook state that logs each bucket as handed to the hook and the hook's result."""

    def __init__(self, inner: RobustHookState) -> None:
        self.inner, self.buckets, self.results = inner, [], []


def _recording_hook(state: _Recorder, bucket):
    state.buckets.append(bucket.buffer().clone())
    fut = robust_hook(state.inner, bucket)
    state.results.append(fut.value().clone())
    return fut


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same start on every rank
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def _data(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(64, 6, generator=gen)
    return x, x @ torch.linspace(-1, 1, 6)[:, None] + 0.1 * torch.randn(64, 1, generator=gen)


def _gather(t: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def _angle(a, b) -> float:
    return math.degrees(math.acos(torch.nn.functional.cosine_similarity(a, b, dim=0).clamp(-1, 1).item()))


def _train(rank, aggregator, attack, steps):
    """SGD through DDP with the robust hook, rank BYZANTINE attacking; per step the aggregate's angle to the honest
    mean, the honest loss, and whether the replicas' parameters agree bitwise."""
    comm = Communicator()
    byz = (BYZANTINE,) if attack is not None else ()
    state = _Recorder(RobustHookState(comm, aggregator, byz, attack, torch.Generator().manual_seed(7)))
    model = DDP(_model(), bucket_cap_mb=100)
    model.register_comm_hook(state, _recording_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data(rank)
    angles, losses, identical = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        honest = _gather(state.buckets[-1])
        angles.append(_angle(state.results[-1], honest[:BYZANTINE].mean(0)))
        losses.append(_gather(loss.detach().reshape(1))[:BYZANTINE].mean().item())
        opt.step()
        params = _gather(flat_params(model.module))
        identical.append(bool((params == params[0]).all()))
    return {"angles": angles, "losses": losses, "identical": identical, "buckets": len(state.buckets) // steps}


def _robust_ranks(rank: int, world_size: int) -> dict:
    torch.use_deterministic_algorithms(True)
    out: dict = {}
    # 1. without attack: the hook's result is the aggregator of the gathered buckets (one bucket: whole vector)
    x, y = _data(rank)
    for name, agg in [("flag", Flag()), ("mean", Mean()), ("median", CoordinateMedian()), ("krum", Krum(f=0))]:
        comm = Communicator()
        state = _Recorder(RobustHookState(comm, agg))
        model = DDP(_model(), bucket_cap_mb=100)
        model.register_comm_hook(state, _recording_hook)
        nn.functional.mse_loss(model(x), y).backward()
        (bucket,), (result,) = state.buckets, state.results
        rows = _gather(bucket)
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        out[name] = {
            "equal_to_aggregator": torch.equal(result, agg(rows)),
            "bytes": comm.bytes_sent,
            "numel": bucket.numel(),
            "grads_identical": bool((_gather(grads) == grads).all()),
            "mean_is_allreduce": name != "mean" or torch.allclose(result, rows.mean(0)),
        }
    # robust_hook itself registered on DDP (the recorder above wraps it, so DDP never checks its annotations: with
    # "from __future__ import annotations" in its module, register_comm_hook rejected them as strings)
    model = DDP(_model(), bucket_cap_mb=100)
    model.register_comm_hook(RobustHookState(Communicator(), Mean()), robust_hook)
    nn.functional.mse_loss(model(x), y).backward()
    local = _model()
    nn.functional.mse_loss(local(x), y).backward()
    out["direct"] = {
        "ddp": torch.cat([p.grad.reshape(-1) for p in model.parameters()]),
        "mean": _gather(torch.cat([p.grad.reshape(-1) for p in local.parameters()])).mean(0),
    }
    # 2. a Byzantine rank: what it sends is the attack's row, and the aggregate is computed from what was sent
    flip = functools.partial(sign_flip, scale=10.0)
    comm = Communicator()
    state = _Recorder(RobustHookState(comm, Flag(), (BYZANTINE,), flip))
    model = DDP(_model(), bucket_cap_mb=100)
    model.register_comm_hook(state, _recording_hook)
    nn.functional.mse_loss(model(x), y).backward()
    rows = _gather(state.buckets[0])
    out["byzantine_hook"] = {
        "equal_to_attacked_aggregate": torch.equal(state.results[0], Flag()(flip(rows, [BYZANTINE]))),
        "bytes": comm.bytes_sent,
        "numel": rows.shape[1],
    }
    # 3. training with rank 3 sending large noise: Flag resists, the mean does not
    noise = functools.partial(large_noise, std=100.0)
    out["train_flag"] = _train(rank, Flag(), noise, steps=15)
    out["train_mean"] = _train(rank, Mean(), noise, steps=3)
    return out


@pytest.mark.timeout(120)
def test_robust_hook_on_real_ranks():
    results = spawn(_robust_ranks, WORLD)
    for res in results:
        for name in ("flag", "mean", "median", "krum"):
            r = res[name]
            assert r["equal_to_aggregator"], name
            assert r["grads_identical"], name
            assert r["mean_is_allreduce"]
            assert r["bytes"] == 4 * r["numel"]  # one all-gather of the float32 bucket, as DDP's all-reduce
        torch.testing.assert_close(res["direct"]["ddp"], res["direct"]["mean"], rtol=1e-6, atol=1e-7)
        byz = res["byzantine_hook"]
        assert byz["equal_to_attacked_aggregate"]
        assert byz["bytes"] == 4 * byz["numel"]  # the attacker's view of the honest rows is not the method's traffic
        flag, mean = res["train_flag"], res["train_mean"]
        assert flag["buckets"] == 1
        assert all(flag["identical"]) and all(mean["identical"])
        assert max(flag["angles"]) < 30
        assert flag["losses"][-1] < 0.5 * flag["losses"][0]
        assert min(mean["angles"]) > 60  # the noise dominates the average
        assert mean["losses"][-1] > 5 * mean["losses"][0]  # 2.9 -> 56 -> 35 here
    # every rank saw the same training
    assert all(res["train_flag"]["losses"] == results[0]["train_flag"]["losses"] for res in results)
