"""Aggregation time of each robust rule on n workers' gradients of d parameters, as ratios to the plain mean.

Each contender maps the same ``(n, d)`` float32 matrix (n = 15 workers, the Flag paper's setting, d = 2^20
parameters; ``--quick``: d = 2^17) to one d-vector: the mean, the coordinate-wise median, the trimmed mean
(f = 3), Krum and multi-Krum (f = 3, m = n − f), and Flag at its defaults (one IRLS step, r = 1), with more
steps (n_its = 5), with the pairwise augmentation (λ = 1: n + n(n−1)/2 = 120 weighted columns) and with r = 3.
A last contender runs one Flag step the way the official code forms it (an SVD of the d×n weighted matrix,
``torch.linalg.svd``), to show what the Gram-matrix formulation of :mod:`optimlab.distributed.flag` saves.
Contenders run in a fresh random order in every round; medians over the quiet blocks (``_harness``); ratios are
of medians of one run.

    python benchmarks/aggregators.py            # results in benchmarks/results/aggregators.{json,md}
    python benchmarks/aggregators.py --quick    # smoke run
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import MAX_OTHERS, Run, machine_line, parse_args, run_rounds, summarise, time_block  # noqa: E402
from optimlab.distributed.aggregators import CoordinateMedian, Krum, Mean, TrimmedMean  # noqa: E402
from optimlab.distributed.flag import Flag, flag_init  # noqa: E402

N, F = 15, 3
BASELINE = "mean"


def flag_svd_step(grads: torch.Tensor) -> torch.Tensor:
    """One Flag IRLS step as the official code forms it: weights from the start, then the SVD of the d×n matrix."""
    units = torch.nn.functional.normalize(grads, dim=1)
    start = flag_init(grads.shape[1], 1, torch.Generator().manual_seed(1), dtype=grads.dtype)
    weights = ((1 - (units @ start).square().sum(1)).abs() + 1e-7).pow(-0.25)
    basis = torch.linalg.svd((units * weights[:, None]).T, full_matrices=False).U[:, :1]
    return basis @ (basis.T @ units.sum(0))


@dataclass(frozen=True)
class Contender:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]


CONTENDERS = [
    Contender(BASELINE, Mean()),
    Contender("coordinate_median", CoordinateMedian()),
    Contender(f"trimmed_mean (f={F})", TrimmedMean(f=F)),
    Contender(f"krum (f={F})", Krum(f=F)),
    Contender(f"multi-krum (f={F}, m={N - F})", Krum(f=F, m=N - F)),
    Contender("flag (defaults: r=1, n_its=1)", Flag()),
    Contender("flag (n_its=5)", Flag(n_its=5)),
    Contender("flag (lam=1)", Flag(lam=1.0)),
    Contender("flag (r=3)", Flag(r=3)),
    Contender("flag, one step as an SVD of the d×n matrix", flag_svd_step),
]


def markdown(data: dict) -> str:
    m, a = data["machine"], data["args"]
    lines = [
        f"# Aggregation time — {m['date']}",
        "",
        f"{machine_line(m)} n = {a['n']} rows of d = {a['d']:,} float32 values. {a['rounds']} rounds × "
        f"{a['steps']} timed calls after {a['warmup']} warm-up per block; median over the quiet blocks (other "
        f"processes used <= {MAX_OTHERS} cores; all blocks if none was quiet). One run.",
        "",
        "| rule | ms | p25–p75 | × mean | quiet blocks |",
        "|---|--:|--:|--:|--:|",
    ]
    for name, v in data["contenders"].items():
        lines.append(
            f"| {name} | {v['median_ms']:.2f} | {v['q1_ms']:.2f}–{v['q3_ms']:.2f} | {v['x_mean']:.1f} "
            f"| {v['quiet_blocks']}/{len(v['blocks'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, "smoke run: d = 2^17, few repeats", argv)
    d = 2**17 if args.quick else 2**20
    rounds, warmup, steps = (2, 1, 3) if args.quick else (5, 2, 10)
    bench = Run(args, n=N, d=d, rounds=rounds, warmup=warmup, steps=steps)
    gen = torch.Generator().manual_seed(args.seed)
    grads = torch.randn(d, generator=gen) + torch.randn(N, d, generator=gen)  # correlated honest-like rows
    grads[-F:] = 100 * torch.randn(F, d, generator=gen)  # and f large-noise rows
    out: dict[str, dict] = {c.name: {"blocks": []} for c in CONTENDERS}
    run_rounds(
        CONTENDERS, rounds, random.Random(args.seed), out, lambda c: time_block(lambda: c.fn(grads), warmup, steps)
    )
    for res in out.values():
        summarise(res)
    base = out[BASELINE].get("median_ms")
    for res in out.values():
        res["x_mean"] = res["median_ms"] / base if base and "median_ms" in res else None
    bench.data["contenders"] = out
    bench.finish("aggregators", markdown)


if __name__ == "__main__":
    main()
