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

import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OtherCPU, Run, gc_paused, machine_line, parse_args, quartiles, time_calls  # noqa: E402
from optimlab import MFAC  # noqa: E402
from optimlab.optim.mfac import damped_gram_cholesky  # noqa: E402

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
    with OtherCPU() as others:  # other processes' CPU use while timing, in cores
        for r in range(config["rounds"]):
            order = list(contenders)
            rng.shuffle(order)
            print(f"  round {r + 1}/{config['rounds']}: {', '.join(order)}", file=sys.stderr, flush=True)
            with gc_paused():
                for name in order:
                    times[name] += time_calls(contenders[name], config["repeats"])["times_ms"]
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
        "others_cores": others.cores,
    }


def markdown(data: dict) -> str:
    m, r = data["machine"], data["result"]
    lines = [
        f"# MFAC.step() time against its floor — {m['date']}",
        "",
        f"{machine_line(m)} "
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
        q1, med, q3 = quartiles(t)
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
    args = parse_args(__doc__, "smoke run: d = 131,072, m = 128", argv)
    bench = Run(args)
    bench.data["result"] = run(QUICK if args.quick else FULL, args.seed)
    bench.finish("mfac_time", markdown)


if __name__ == "__main__":
    main()
