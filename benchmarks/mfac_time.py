"""Wall time of ``MFAC.step()`` with a full gradient window, against the floor it cannot go below.

An M-FAC step must read its m×d gradient window twice: once for the new row of K = GGᵀ (``G @ g``) and once for
the update (``Gᵀ @ y``). The floor is those two matrix-vector products, timed on the optimizer's own window
buffers in the same run; the bar is ``step / floor <= 1.5``. Also timed: the m-space work alone (the float64
Cholesky factorisation and solve of an m×m system) and torch's AdamW (foreach) step on the same parameters.
The window is filled once, untimed, by writing random gradients into it and computing K exactly. Contenders run
in shuffled order in every round; the report gives medians and ratios of medians, and the state bytes against
m·d·4 (float32).

    python benchmarks/mfac_time.py            # d = 1,048,576 float32 parameters, m = 1024 (4 GiB of window)
    python benchmarks/mfac_time.py --quick    # d = 131,072, m = 128 (smoke run, a few seconds)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimlab import MFAC  # noqa: E402
from optimlab.bench._files import write_atomic  # noqa: E402
from optimlab.optim.mfac import damped_gram_cholesky  # noqa: E402
from step_time import cpu_ticks, machine_info  # noqa: E402  (shared with the step benchmark)

# three float32 tensors of 2^20 elements in all (a 768x1024 and a 256x1023 matrix and a bias), or an eighth of it
FULL = {"shapes": [(768, 1024), (256, 1023), (256,)], "ngrads": 1024, "rounds": 5, "repeats": 3}
QUICK = {"shapes": [(96, 1024), (32, 1023), (32,)], "ngrads": 128, "rounds": 3, "repeats": 3}
BAR = 1.5


def fill_window(opt: MFAC, params: list[torch.nn.Parameter], generator: torch.Generator) -> None:
    """Create the state with one step, then overwrite the window with random gradients and K with their exact Gram
    matrix, as if ``ngrads`` steps had been taken."""
    opt.step()
    windows = [opt.state[p]["grad_window"] for p in params]
    for window in windows:
        window.normal_(generator=generator)
    state = opt.state[params[0]]
    gram = state["gram"]
    gram.zero_()
    for window in windows:
        gram.addmm_(window, window.T)
    state["step"], state["next_row"] = gram.shape[0], 0


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


@torch.no_grad()
def run(config: dict, seed: int) -> dict:
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    shapes, m = config["shapes"], config["ngrads"]
    params = [torch.nn.Parameter(torch.randn(s, generator=generator) * 0.02) for s in shapes]
    grads = [torch.randn(s, generator=generator) * 1e-3 for s in shapes]
    d = sum(p.numel() for p in params)
    for p, g in zip(params, grads):
        p.grad = g

    opt = MFAC(params, lr=1e-3, ngrads=m)
    t0 = time.perf_counter()
    fill_window(opt, params, generator)
    fill_s = time.perf_counter() - t0
    windows = [opt.state[p]["grad_window"] for p in params]
    gram = opt.state[params[0]]["gram"]
    state_bytes = sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )

    flat_grads = [g.reshape(-1) for g in grads]
    coefficients = torch.randn(m, generator=generator)

    def floor() -> None:  # the two passes over the window a step cannot avoid
        products = torch.zeros(m)
        for window, g in zip(windows, flat_grads):
            products += torch.mv(window, g)
        for window in windows:
            coefficients @ window

    def m_space() -> None:  # the factorisation and solve of the m×m system, alone
        factor = damped_gram_cholesky(gram, 1e-5)
        unit = torch.zeros(m, 1, dtype=factor.dtype)
        unit[0] = m
        torch.cholesky_solve(unit, factor)

    adamw_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(adamw_params, grads):
        p.grad = g
    adamw = torch.optim.AdamW(adamw_params, lr=1e-3, foreach=True)
    adamw.step()  # creates its state

    contenders = {
        "MFAC.step": opt.step,
        "floor: G@g + y@G": floor,
        "m-space: Cholesky + solve": m_space,
        "torch.AdamW(foreach).step": adamw.step,
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    ticks0, wall0 = cpu_ticks(), time.perf_counter()
    for r in range(config["rounds"]):
        order = list(contenders)
        rng.shuffle(order)
        print(f"  round {r + 1}/{config['rounds']}: {', '.join(order)}", file=sys.stderr, flush=True)
        gc.disable()
        try:
            for name in order:
                times[name] += [timed(contenders[name]) for _ in range(config["repeats"])]
        finally:
            gc.enable()
    ticks1, wall1 = cpu_ticks(), time.perf_counter()
    others = None  # other processes' CPU use while timing, in cores (as step_time.py measures it)
    if ticks0 and ticks1:
        others = ((ticks1[0] - ticks0[0]) - (ticks1[1] - ticks0[1])) / os.sysconf("SC_CLK_TCK") / (wall1 - wall0)
    for p, g in zip(params, grads):
        assert p.grad is g  # the step never replaces or writes the gradients
    medians = {name: statistics.median(t) for name, t in times.items()}
    step, base = medians["MFAC.step"], medians["floor: G@g + y@G"]
    return {
        "d": d,
        "ngrads": m,
        "shapes": shapes,
        "fill_window_s": fill_s,
        "times_ms": times,
        "median_ms": medians,
        "step_over_floor": step / base,
        "m_space_over_floor": medians["m-space: Cholesky + solve"] / base,
        "step_over_adamw": step / medians["torch.AdamW(foreach).step"],
        "state_bytes": state_bytes,
        "window_bytes": m * d * 4,
        "state_over_window": state_bytes / (m * d * 4),
        "rounds": config["rounds"],
        "repeats": config["repeats"],
        "others_cores": others,
    }


def markdown(data: dict) -> str:
    m, r = data["machine"], data["result"]
    lines = [
        f"# MFAC.step() time against its floor — {m['date']}",
        "",
        f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, optimlab {m['optimlab']} ({m['git']}). "
        f"1-min load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end. "
        f"d = {r['d']:,} float32 parameters in {len(r['shapes'])} tensors, window m = {r['ngrads']}, full "
        f"(filled untimed in {r['fill_window_s']:.1f} s). Median of {r['rounds']} rounds × {r['repeats']} timed calls, "
        "contenders in shuffled order each round; ratios are of medians. Other processes used "
        + ("an unknown amount of CPU" if r["others_cores"] is None else f"{r['others_cores']:.2f} cores")
        + " while timing (rerun on an idle machine if this is well above 0).",
        "",
        "| contender | ms (median) | p25–p75 | × floor | × AdamW |",
        "|---|--:|--:|--:|--:|",
    ]
    base, adamw = r["median_ms"]["floor: G@g + y@G"], r["median_ms"]["torch.AdamW(foreach).step"]
    for name, t in r["times_ms"].items():
        q1, med, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else (t[0],) * 3
        lines.append(f"| {name} | {med:.1f} | {q1:.1f}–{q3:.1f} | {med / base:.2f} | {med / adamw:.1f} |")
    verdict = "meets" if r["step_over_floor"] <= BAR else "misses"
    lines += [
        "",
        f"Step / floor = **{r['step_over_floor']:.3f}** ({verdict} the bar of {BAR}); the m-space work alone is "
        f"{r['m_space_over_floor']:.1%} of the floor. State: {r['state_bytes']:,} bytes = "
        f"{r['state_over_window']:.6f} × m·d·4 ({r['window_bytes']:,} bytes; the rest is K, m×m).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="smoke run: d = 131,072, m = 128")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = {"machine": machine_info(args.threads), "args": {**vars(args), "out": str(args.out)}}
    data["result"] = run(QUICK if args.quick else FULL, args.seed)
    data["runtime_s"], data["machine"]["loadavg_end"] = time.perf_counter() - started, os.getloadavg()
    table = markdown(data)
    write_atomic(args.out / "mfac_time.json", lambda f: f.write(json.dumps(data, indent=1) + "\n"))
    write_atomic(args.out / "mfac_time.md", lambda f: f.write(table))
    print(table)
    print(f"runtime {data['runtime_s']:.0f} s; wrote {args.out / 'mfac_time.json'} and mfac_time.md", file=sys.stderr)


if __name__ == "__main__":
    main()
