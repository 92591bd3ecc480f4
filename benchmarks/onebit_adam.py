"""1-bit Adam against torch's Adam with DDP's all-reduce on real gloo ranks: bytes per rank per step and step time.

Two ranks (``optimlab.distributed.launch.spawn``: fresh processes, one thread each, a gloo group over a file)
hold the same float32 parameter set and random gradients (different per rank). Per rank, three contenders are
timed in blocks (rounds in a shuffled order, the same on both ranks, since every contender's collectives must
match), each call with the gradients restored outside the timer:

* ``torch.Adam + all-reduce``: the baseline. DDP's averaging (all gradients in one flat buffer, divided by the
  world size and all-reduced through a counted :class:`~optimlab.distributed.comm.Communicator`, exactly what
  ``allreduce_hook`` hands over), then ``torch.optim.Adam.step()`` (its default implementation).
* ``OneBitAdam warm-up``: ``step()`` during warm-up (it all-reduces the gradients itself, then Adam without bias
  correction).
* ``OneBitAdam compressed``: ``step()`` after the freeze: local momentum, the two all-gathers of bit-packed signs
  and scales, the frozen-variance update.

Bytes are the Communicator's count of what a rank hands to ``torch.distributed`` per step (numel × element size),
for the baseline the same count around the all-reduce. The table also gives the bytes the simulator counts for
4-16 workers (the same message sizes; tests check simulator = real ranks). Step times are each rank's wall time
per call, median over blocks; both ranks share this machine's cores, so no block is "quiet" here (the other rank
always runs) and the medians pool all blocks. Ratios are to the baseline.

    python benchmarks/onebit_adam.py            # full run
    python benchmarks/onebit_adam.py --quick    # smoke run (~1 min)
"""

from __future__ import annotations

import math
import random
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

from optimlab.distributed.comm import Communicator
from optimlab.distributed.launch import spawn
from optimlab.distributed.onebit_adam import OneBitAdam, make_layout, message_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OtherCPU, Run, fmt, machine_line, parse_args, time_calls  # noqa: E402

WORLD = 2
BASELINE = "torch.Adam + all-reduce"
CONTENDERS = (BASELINE, "OneBitAdam warm-up", "OneBitAdam compressed")
# an MLP's tensors: (name, shapes)
SETS = {
    "mlp-4M": [(2048, 1024), (2048,), (1024, 2048), (1024,), (10, 1024), (10,)],
    "mlp-70k": [(256, 256), (256,), (10, 256), (10,)],
}
QUICK_SETS = {"mlp-70k": SETS["mlp-70k"]}
SIMULATED_WORKERS = (2, 4, 8, 16)


def _contender(name: str, params: list[torch.nn.Parameter], comm: Communicator):
    """(optimizer, the timed call, untimed warm-up calls) of one contender."""
    if name == BASELINE:
        flat = torch.zeros(sum(p.numel() for p in params))
        views = flat.split([p.numel() for p in params])
        for p, v in zip(params, views):
            p.grad = v.view_as(p)  # DDP's gradients are views of its bucket
        opt = torch.optim.Adam(params, lr=1e-4)

        def call() -> None:
            comm.all_reduce(flat.div_(WORLD))
            opt.step()

        return opt, call, 1
    freeze = 2 if name.endswith("compressed") else 10**9
    opt = OneBitAdam(params, lr=1e-4, freeze_step=freeze, comm=comm)
    return opt, opt.step, 3  # initialisation, warm-up, and (compressed) the first compressed step


def _restore(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    """The saved gradients back into ``p.grad`` (in place where there is one: the baseline's are bucket views)."""
    for p, g in zip(params, saved):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def _rank(rank: int, world_size: int, sets: dict, rounds: int, steps: int, seed: int) -> dict:
    comm = Communicator()
    rng = random.Random(seed)  # the same order on every rank: the collectives must match
    out = {}
    for set_name, shapes in sets.items():
        gen = torch.Generator().manual_seed(seed + rank)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        saved = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
        res = {c: {"times_ms": [], "others_cores": []} for c in CONTENDERS}
        for _ in range(rounds):
            order = list(CONTENDERS)
            rng.shuffle(order)
            for name in order:
                for p in params:
                    p.grad = None
                opt, call, warmup = _contender(name, params, comm)
                restore = partial(_restore, params, saved)
                for _ in range(warmup):
                    restore()
                    call()
                before = comm.bytes_sent
                with OtherCPU() as others:
                    times = time_calls(call, steps, before=restore)["times_ms"]
                res[name]["bytes_per_step"] = (comm.bytes_sent - before) // steps
                res[name]["times_ms"] += times
                res[name]["others_cores"].append(others.cores)
                del opt
        out[set_name] = {"n_params": sum(math.prod(s) for s in shapes), "n_tensors": len(shapes), "results": res}
    return out


def _simulated_bytes(shapes) -> dict[int, int]:
    numels = [math.prod(s) for s in shapes]
    return {n: sum(message_bytes(make_layout(numels, n), 4)) for n in SIMULATED_WORKERS}


def markdown(data: dict) -> str:
    lines = [
        "# 1-bit Adam: bytes and step time against torch's Adam with DDP's all-reduce",
        "",
        machine_line(data["machine"]),
        f"{WORLD} gloo ranks, one thread each; step times: wall ms per call on each rank, median over "
        f"{data['args']['rounds']} rounds × {data['args']['steps']} calls (both ranks share the cores, so every block "
        "is busy by the harness's rule). Bytes: handed to torch.distributed per rank per step.",
        "",
    ]
    for set_name, res in data["sets"].items():
        lines += [
            f"## {set_name}: {res['n_params']:,} float32 parameters in {res['n_tensors']} tensors",
            "",
            "| contender | bytes / rank / step | bytes vs baseline | rank 0 ms (q1–q3) | rank 1 ms | time vs baseline |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        base = res["ranks"][0][BASELINE]
        for name in CONTENDERS:
            r0, r1 = res["ranks"][0][name], res["ranks"][1][name]
            ratio = base["bytes_per_step"] / r0["bytes_per_step"]
            lines.append(
                f"| {name} | {r0['bytes_per_step']:,} | {fmt(ratio, '.1f')}× fewer | {r0['median_ms']:.3f} "
                f"({r0['q1_ms']:.3f}–{r0['q3_ms']:.3f}) | {r1['median_ms']:.3f} | "
                f"{r0['median_ms'] / base['median_ms']:.2f}× |"
            )
        lines += [
            "",
            "Compressed bytes per rank per step at other worker counts (the simulator's count; float32 all-reduce "
            f"{4 * res['n_params']:,} bytes):",
            "",
            "| workers | bytes / rank / step | fewer than all-reduce |",
            "|--:|--:|--:|",
        ]
        for n, b in res["simulated_bytes"].items():
            lines.append(f"| {n} | {b:,} | {4 * res['n_params'] / b:.1f}× |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, "the 70k-parameter set only, 2 rounds", argv)
    sets = QUICK_SETS if args.quick else SETS
    rounds, steps = (2, 5) if args.quick else (5, 10)
    run = Run(args, rounds=rounds, steps=steps, world=WORLD)
    ranks = spawn(_rank, WORLD, sets, rounds, steps, args.seed)
    run.data["sets"] = {}
    for set_name, shapes in sets.items():
        per_rank = []
        for r in ranks:
            res = r[set_name]["results"]
            for rec in res.values():
                t = rec.pop("times_ms")
                q1, med, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else (t[0],) * 3
                rec.update(median_ms=med, q1_ms=q1, q3_ms=q3, calls=len(t))
            per_rank.append(res)
        run.data["sets"][set_name] = {
            "n_params": ranks[0][set_name]["n_params"],
            "n_tensors": ranks[0][set_name]["n_tensors"],
            "ranks": per_rank,
            "simulated_bytes": _simulated_bytes(shapes),
        }
    run.finish("onebit_adam", markdown)


if __name__ == "__main__":
    main()
