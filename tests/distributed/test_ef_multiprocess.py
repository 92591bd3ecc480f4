"""Error-feedback DDP hooks on real gloo process groups (2 ranks): identity = plain DDP bit for bit, replicas stay
identical and converge with Top-K, the DDP run equals the simulator, the hook state round-trips, bucket rebuilds
keep the state, and the bytes against DDP's all-reduce.

All checks run in ONE launch (:func:`results`, cached for the session; ``test_comm`` reads it too): each rank
returns its numbers, and the tests compare them here.
"""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from optimlab.distributed.comm import Communicator, allreduce_hook
from optimlab.distributed.compressors import Identity
from optimlab.distributed.error_feedback import EF14, EF21, CompressedSGD, EControl
from optimlab.distributed.launch import spawn
from optimlab.distributed.simulator import flat_params

WORLD = 2
D_IN, D_OUT, ROWS = 32, 2, 64  # least squares: Linear(32, 2), 66 parameters, 64 rows per rank
RATIO = 0.25
LR = 0.2
STEPS = 60


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s rows of a heterogeneous least-squares problem (different targets per rank)."""
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(ROWS, D_IN, generator=gen)
    w = torch.randn(D_IN, D_OUT, generator=torch.Generator().manual_seed(7)) + rank
    return x, x @ w + 0.1 * torch.randn(ROWS, D_OUT, generator=gen)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(D_IN, D_OUT)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _train(ddp: nn.Module, batch, steps: int, lr: float = LR) -> list[float]:
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(ddp, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _ddp(model: nn.Module, **kw) -> nn.parallel.DistributedDataParallel:
    return nn.parallel.DistributedDataParallel(model, bucket_cap_mb=25, **kw)


def _run_scheme(method, batch, steps: int = STEPS):
    ddp = _ddp(_model())
    state = method.register(ddp)
    losses = _train(ddp, batch, steps)
    return flat_params(ddp.module), losses, state


def _simulate(method, steps: int = STEPS) -> torch.Tensor:
    model = _model()
    sim = method.simulator(WORLD)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    batches = [_data(r) for r in range(WORLD)]
    for _ in range(steps):
        opt.zero_grad()
        sim.backward(model, _loss, batches)
        opt.step()
    return flat_params(model)


class _FakeBucket:
    """What the hook reads of a ``GradBucket`` (to drive bucket rebuilds by hand)."""

    def __init__(self, index: int, params: list[torch.Tensor]) -> None:
        self._index, self._params = index, params
        self._buffer = torch.cat([p.grad.reshape(-1) for p in params])

    def index(self) -> int:
        return self._index

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def buffer(self) -> torch.Tensor:
        return self._buffer


def _per_parameter(state, sizes: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Each parameter's slices of the hook's bucket states."""
    out = {}
    for index, layout in state._layouts.items():
        offset = 0
        for pos in layout:
            out[pos] = {k: v[offset : offset + sizes[pos]].clone() for k, v in state._states[index].items()}
            offset += sizes[pos]
    return out


def _rebuild_check(rank: int) -> dict:
    """Bucketing changes (2 buckets, then 1, then 3 in another order): every parameter's error-feedback state
    moves into the new buckets unchanged."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    state = EControl("topk", 0.3, eta=0.2).hook(model)
    layouts = [[[0, 1], [2, 3]], [[0, 1, 2, 3]], [[3], [0, 2], [1]], [[3], [0, 2], [1]], [[2, 3], [0, 1]]]
    checked = 0
    for step, layout in enumerate(layouts):
        gen = torch.Generator().manual_seed(10 * step + rank)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        before = _per_parameter(state, sizes)
        buckets = [_FakeBucket(i, [params[j] for j in group]) for i, group in enumerate(layout)]
        for bucket, group in zip(buckets, layout):
            moved = state._state_for(bucket)
            for k, v in moved.items():
                assert torch.equal(v, torch.cat([before[j][k] for j in group])), (step, k)
                checked += 1
            state.run(bucket)
    return {"rebuild_checked": checked, "rebuild_keys": sorted(state._states[0])}


def _rank_checks(rank: int, world: int) -> dict:
    batch = _data(rank)
    out: dict = {}

    # counted collectives (for test_comm): the bytes are numel x element_size of what this rank hands over
    comm = Communicator()
    t = torch.arange(5, dtype=torch.float64) + rank
    comm.all_reduce(t)
    gathered = comm.all_gather(torch.tensor([rank, 1, 2], dtype=torch.int32))
    b = torch.full((4,), float(rank), dtype=torch.bfloat16)
    comm.broadcast(b, src=0)
    chunks = comm.all_to_all_chunks(torch.arange(6.0) + 10 * rank)
    out["comm"] = {
        "bytes": comm.bytes_sent,
        "calls": comm.calls,
        "all_reduce": t,
        "all_gather": gathered,
        "broadcast": b,
        "chunks": chunks,
    }

    # plain DDP, allreduce_hook, identity-compressed schemes
    ddp = _ddp(_model())
    losses = _train(ddp, batch, 5)
    out["plain"] = (flat_params(ddp.module), losses)
    ddp = _ddp(_model())
    comm = Communicator()
    ddp.register_comm_hook(comm, allreduce_hook)
    losses = _train(ddp, batch, 5)
    out["allreduce"] = (flat_params(ddp.module), losses)
    out["allreduce_bytes"] = comm.bytes_sent
    for name, cls in (("none", CompressedSGD), ("ef14", EF14), ("ef21", EF21), ("econtrol", EControl)):
        method = cls(Identity(), eta=0.3) if cls is EControl else cls(Identity())
        params, losses, _ = _run_scheme(method, batch, 5)
        out[f"identity_{name}"] = (params, losses)

    # Top-K: replicas, convergence, bytes, simulator agreement
    for name, cls in (("none", CompressedSGD), ("ef14", EF14), ("ef21", EF21), ("econtrol", EControl)):
        method = cls("topk", RATIO, eta=0.1) if cls is EControl else cls("topk", RATIO)
        params, losses, state = _run_scheme(method, batch)
        out[f"topk_{name}"] = {"params": params, "losses": losses, "bytes": state.comm.bytes_sent}
        if rank == 0:
            out[f"topk_{name}"]["simulated"] = _simulate(method)

    # hook-state round trip: 10 steps, save, then 10 more from the saved state and from the live one
    method = EControl("topk", RATIO, eta=0.1)
    ddp = _ddp(_model())
    state = method.register(ddp)
    _train(ddp, batch, 10)
    buf = io.BytesIO()
    torch.save({"model": ddp.module.state_dict(), "hook": state.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    _train(ddp, batch, 10)
    model2 = _model()
    model2.load_state_dict(saved["model"])
    ddp2 = _ddp(model2)
    state2 = method.register(ddp2)
    state2.load_state_dict(saved["hook"])
    _train(ddp2, batch, 10)
    out["round_trip"] = (flat_params(ddp.module), flat_params(ddp2.module))
    bad = copy.deepcopy(saved["hook"])
    bad["world_size"] = 3
    try:
        state2.load_state_dict(bad)
        out["world_size_error"] = None
    except ValueError as e:
        out["world_size_error"] = str(e)

    # several buckets and DDP's rebuild after the first iteration (a deeper model, tiny buckets)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, D_OUT))
    ddp = nn.parallel.DistributedDataParallel(mlp, bucket_cap_mb=0.001)
    state = EF21("topk", RATIO).register(ddp)
    losses = _train(ddp, batch, 40, lr=0.02)
    out["buckets"] = {"params": flat_params(mlp), "losses": losses, "n_buckets": len(state._states)}
    out.update(_rebuild_check(rank))

    dist.barrier()
    return out


@functools.cache
def results() -> list[dict]:
    """Both ranks' results of the one launch (run on first use)."""
    return spawn(_rank_checks, WORLD)


pytestmark = pytest.mark.timeout(120)


def test_identity_compressor_is_plain_ddp_bit_for_bit() -> None:
    r0, r1 = results()
    plain = r0["plain"][0]
    for name in ("none", "ef14"):
        assert torch.equal(r0[f"identity_{name}"][0], plain), name
        assert r0[f"identity_{name}"][1] == r0["plain"][1]
    for name in ("ef21", "econtrol"):  # h + (g - h) rounds: plain SGD to float32 round-off
        torch.testing.assert_close(r0[f"identity_{name}"][0], plain, rtol=1e-5, atol=1e-6)
    for name in ("none", "ef14", "ef21", "econtrol"):
        assert torch.equal(r0[f"identity_{name}"][0], r1[f"identity_{name}"][0])


def test_topk_replicas_identical_and_error_feedback_converges() -> None:
    r0, r1 = results()
    for name in ("none", "ef14", "ef21", "econtrol"):
        assert torch.equal(r0[f"topk_{name}"]["params"], r1[f"topk_{name}"]["params"]), name
    # excess loss over the least-squares optimum of all ranks' rows, relative to the start
    xs, ys = zip(*(_data(r) for r in range(WORLD)))
    x = torch.cat([torch.cat(xs), torch.ones(WORLD * ROWS, 1)], 1).double()
    y = torch.cat(ys).double()
    optimum = ((x @ torch.linalg.lstsq(x, y).solution - y) ** 2).mean().item()

    def excess(name: str, step: int) -> float:
        loss = (r0[f"topk_{name}"]["losses"][step] + r1[f"topk_{name}"]["losses"][step]) / 2
        return loss - optimum

    for name in ("ef21", "econtrol"):
        assert excess(name, -1) < 1e-3 * excess(name, 0), name
    assert excess("ef14", -1) < 1e-2 * excess("ef14", 0)
    assert excess("none", -1) > 2e-2 * excess("none", 0)  # no error feedback: stalls


def test_ddp_run_equals_simulator() -> None:
    r0, _ = results()
    for name in ("none", "ef14", "ef21", "econtrol"):  # bit for bit: two ranks' sums do not depend on the order
        assert torch.equal(r0[f"topk_{name}"]["params"], r0[f"topk_{name}"]["simulated"]), name


def test_hook_state_round_trip() -> None:
    for r in results():
        live, restored = r["round_trip"]
        assert torch.equal(live, restored)
        assert "world size mismatch" in r["world_size_error"]


def test_bytes_against_allreduce_baseline() -> None:
    r0, _ = results()
    d = D_IN * D_OUT + D_OUT
    assert r0["allreduce_bytes"] == 5 * d * 4
    k = round(RATIO * d)
    for name in ("none", "ef14"):
        assert r0[f"topk_{name}"]["bytes"] == STEPS * k * 8
    for name in ("ef21", "econtrol"):  # the first round is uncompressed
        assert r0[f"topk_{name}"]["bytes"] == d * 4 + (STEPS - 1) * k * 8
    ratio = r0["topk_ef14"]["bytes"] / (STEPS * d * 4)
    assert ratio == pytest.approx(RATIO * (4 + 4) / 4, rel=0.05)


def test_bucket_rebuild_keeps_replicas_and_converges() -> None:
    r0, r1 = results()
    assert torch.equal(r0["buckets"]["params"], r1["buckets"]["params"])
    assert r0["buckets"]["n_buckets"] > 1
    assert r0["buckets"]["losses"][-1] < 0.5 * r0["buckets"]["losses"][0]


def test_bucket_state_moves_with_rebuilt_buckets() -> None:
    for r in results():
        assert r["rebuild_keys"] == ["e", "h", "server_h"]
        assert r["rebuild_checked"] == 3 * (1 + 3 + 3 + 2)  # every key of every bucket after the first step
