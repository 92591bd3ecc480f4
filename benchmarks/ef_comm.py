"""Bytes per rank per step and hook time of the error-feedback DDP hooks (EF14, EF21, EControl, no feedback)
against DDP's default all-reduce, on 2 real gloo ranks.

Each contender trains the same MLP with DDP (one gradient bucket) and plain SGD; the baseline is DDP's averaging
as ``allreduce_hook``, whose bytes the same :class:`~optimlab.distributed.comm.Communicator` counts. Per step:
the bytes this rank handed to ``torch.distributed`` (steady state; EF21 and EControl also send one uncompressed
first round, reported separately), the wall time of the communication hook from its call until its result is
ready (the baseline's asynchronous all-reduce is waited for inside the timer, so both sides time the same span),
and the wall time of the whole training step. Ratios are to the baseline in the same run. Both ranks run the
contenders in the same shuffled order in every round (collectives must match); rank 0's times are reported.
The two ranks share this machine's cores, so the quiet-block rule of the other scripts does not apply.

    python benchmarks/ef_comm.py            # full run
    python benchmarks/ef_comm.py --quick    # smoke run (~1 min)
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from optimlab.distributed.comm import Communicator, allreduce_hook
from optimlab.distributed.compressors import Identity, RandK, ScaledSign, TopK
from optimlab.distributed.error_feedback import EF14, EF21, CompressedSGD, EControl
from optimlab.distributed.hooks import error_feedback_hook
from optimlab.distributed.launch import spawn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Run, fmt, machine_line, parse_args, quartiles  # noqa: E402

BASELINE = "allreduce (DDP default)"
WORLD = 2


def contenders() -> dict[str, object]:
    """Name -> scheme (None for the baseline)."""
    top = TopK(0.01)
    return {
        BASELINE: None,
        "EF14 / identity": EF14(Identity()),
        "none / top-k 1%": CompressedSGD(top),
        "EF14 / top-k 1%": EF14(top),
        "EF21 / top-k 1%": EF21(top),
        "EControl η=0.1 / top-k 1%": EControl(top, eta=0.1),
        "EF14 / top-k 10%": EF14(TopK(0.1)),
        "EF14 / rand-k 1%": EF14(RandK(0.01)),
        "EF14 / scaled sign": EF14(ScaledSign()),
    }


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, 2 * width), nn.ReLU(), nn.Linear(2 * width, 10)
    )


def _timed(hook, times: list[float]):
    def wrapper(state, bucket):
        t0 = time.perf_counter_ns()
        fut = hook(state, bucket)
        fut.wait()
        times.append((time.perf_counter_ns() - t0) / 1e6)
        return fut

    wrapper.__annotations__ = dict(hook.__annotations__)  # DDP checks the hook's annotations
    return wrapper


def _rank(rank: int, world: int, width: int, batch: int, rounds: int, warmup: int, steps: int, seed: int) -> dict:
    schemes = contenders()
    gen = torch.Generator().manual_seed(1000 + rank)
    x, y = torch.randn(batch, width, generator=gen), torch.randint(10, (batch,), generator=gen)
    runs = {}
    for name, scheme in schemes.items():
        ddp = nn.parallel.DistributedDataParallel(_model(width), bucket_cap_mb=1024)
        hook_ms: list[float] = []
        if scheme is None:
            state = Communicator()
            ddp.register_comm_hook(state, _timed(allreduce_hook, hook_ms))
        else:
            state = scheme.hook(ddp.module)
            ddp.register_comm_hook(state, _timed(error_feedback_hook, hook_ms))
        runs[name] = {
            "ddp": ddp,
            "opt": torch.optim.SGD(ddp.parameters(), lr=0.01),
            "hook_ms": hook_ms,
            "comm": state if scheme is None else state.comm,
        }
    out = {name: {"step_ms": [], "hook_ms": [], "bytes_per_step": None, "first_step_bytes": None} for name in runs}
    rng = random.Random(seed)  # the same order on every rank

    def step(run) -> None:
        run["opt"].zero_grad()
        nn.functional.cross_entropy(run["ddp"](x), y).backward()
        run["opt"].step()

    for _ in range(rounds):
        order = list(runs)
        rng.shuffle(order)
        for name in order:
            run, res = runs[name], out[name]
            if res["first_step_bytes"] is None:
                run["comm"].reset()
                step(run)
                res["first_step_bytes"] = run["comm"].reset()
            for _ in range(warmup):
                step(run)
            run["comm"].reset()
            run["hook_ms"].clear()
            for _ in range(steps):
                t0 = time.perf_counter_ns()
                step(run)
                res["step_ms"].append((time.perf_counter_ns() - t0) / 1e6)
            res["hook_ms"] += run["hook_ms"]
            res["bytes_per_step"] = run["comm"].reset() / steps
    d = sum(p.numel() for p in runs[BASELINE]["ddp"].parameters())
    return {"d": d, "contenders": out}


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"# Error-feedback DDP hooks: bytes and hook time against DDP's all-reduce — {m['date']}",
        "",
        f"{machine_line(m)} {WORLD} gloo ranks on this machine, MLP of {data['d']:,} parameters in one bucket, "
        f"batch {data['args']['batch']} per rank; {data['rounds']} rounds × {data['steps']} timed steps. Bytes: "
        "handed to torch.distributed by one rank per step (steady state), counted by the same Communicator for "
        "every row. Times: median (25th–75th percentile) on rank 0.",
        "",
        "| scheme / compressor | bytes per step | × all-reduce | first step bytes | hook ms | × all-reduce "
        "| step ms | × all-reduce |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, v in data["contenders"].items():
        lines.append(
            f"| {name} | {v['bytes_per_step']:,.0f} | {v['x_bytes']:.4f} | {v['first_step_bytes']:,} "
            f"| {v['hook_ms']:.2f} ({v['hook_q1']:.2f}–{v['hook_q3']:.2f}) | {fmt(v['x_hook'], '.2f')} "
            f"| {v['step_ms']:.1f} ({v['step_q1']:.1f}–{v['step_q3']:.1f}) | {fmt(v['x_step'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    def add(ap) -> None:
        ap.add_argument("--width", type=int, default=512, help="MLP width (default 512: 1.3M parameters)")
        ap.add_argument("--batch", type=int, default=64)

    args = parse_args(__doc__, "smoke run: narrower MLP, one round of few steps", argv, add)
    width = 128 if args.quick else args.width
    rounds, warmup, steps = (1, 1, 5) if args.quick else (4, 2, 10)
    bench = Run(args)
    per_rank = spawn(_rank, WORLD, width, args.batch, rounds, warmup, steps, args.seed, threads=1)
    rank0 = per_rank[0]
    base = rank0["contenders"][BASELINE]
    base_hook, base_step = statistics.median(base["hook_ms"]), statistics.median(base["step_ms"])
    results = {}
    for name, v in rank0["contenders"].items():
        hq1, hmed, hq3 = quartiles(v["hook_ms"])
        sq1, smed, sq3 = quartiles(v["step_ms"])
        results[name] = {
            "bytes_per_step": v["bytes_per_step"],
            "bytes_per_step_rank1": per_rank[1]["contenders"][name]["bytes_per_step"],
            "first_step_bytes": v["first_step_bytes"],
            "x_bytes": v["bytes_per_step"] / base["bytes_per_step"],
            "hook_ms": hmed,
            "hook_q1": hq1,
            "hook_q3": hq3,
            "x_hook": hmed / base_hook,
            "step_ms": smed,
            "step_q1": sq1,
            "step_q3": sq3,
            "x_step": smed / base_step,
            "hook_times_ms": v["hook_ms"],
            "step_times_ms": v["step_ms"],
        }
    bench.data.update(d=rank0["d"], rounds=rounds, warmup=warmup, steps=steps, width=width, contenders=results)
    bench.finish("ef_comm", markdown)


if __name__ == "__main__":
    main()
