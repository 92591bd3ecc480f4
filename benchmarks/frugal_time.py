"""FRUGAL's step time and state memory against torch's AdamW and galore-torch's GaLoreAdamW, in one run.

Parameters: the GPT-like set of ``benchmarks/step_time.py`` (``large``: 42.1M float32 parameters; ``--quick``: its
5.3M ``large-reduced`` variant), split as the paper's code does: the 2-D weights inside the transformer blocks
(fused QKV, output projection, MLP in and out) are projectable; embeddings, LayerNorms and biases take plain
AdamW. Every FRUGAL contender runs at ρ = 0.25 and T = 200; GaLore at rank 0.25 of the reduced dimension, with
the same gap. Weight decay 1e-2 everywhere.

A refresh (new subspace: an SVD per matrix, a new random subset, new active blocks) happens once every T steps,
so each block times steady steps and, separately, refresh steps (the gap set to 1 for that one step), and reports
``amortised = steady + (refresh - steady) / T``. State bytes are summed from the state tensors themselves (for
GaLore, its projector objects' matrices too); for block mode also the largest over a whole cycle of refreshes
(measured, outside the timer), since the active tensors differ in size.

    python benchmarks/frugal_time.py            # full run
    python benchmarks/frugal_time.py --quick    # smoke run (~1 min)
"""

from __future__ import annotations

import math
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from optimlab import FRUGAL

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the timing harness and the parameter set of step_time.py
from _harness import (  # noqa: E402
    MAX_OTHERS,
    OtherCPU,
    Run,
    fmt,
    gc_paused,
    machine_line,
    parse_args,
    pooled,
    run_rounds,
    time_calls,
)
from step_time import transformer_shapes  # noqa: E402

DENSITY, GAP, WEIGHT_DECAY = 0.25, 200, 1e-2
BASELINE = "torch.AdamW(foreach)"
SETS = {"large": (transformer_shapes(32000, 1024, 512, 8), 4, 2, 3, 2)}  # shapes, rounds, warm-up, steps, refreshes
QUICK_SETS = {"large-reduced": (transformer_shapes(8000, 256, 256, 4), 2, 1, 2, 1)}


@dataclass(frozen=True)
class Contender:
    name: str
    factory: Callable[[list[dict]], torch.optim.Optimizer]
    force_refresh: Callable[[torch.optim.Optimizer, bool], None] | None = None  # gap 1 for the next step, or back


def _adamw(groups: list[dict]) -> torch.optim.Optimizer:
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(params, weight_decay=WEIGHT_DECAY, foreach=True)


def _frugal(groups: list[dict], **kw) -> torch.optim.Optimizer:
    return FRUGAL(groups, weight_decay=WEIGHT_DECAY, density=DENSITY, update_gap=GAP, **kw)


def _frugal_refresh(opt: torch.optim.Optimizer, on: bool) -> None:
    for group in opt.param_groups:
        group["update_gap"] = 1 if on else GAP


def _galore(groups: list[dict]) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW

    regular, projected = groups
    rank = round(DENSITY * min(projected["params"][0].shape))  # every block matrix has the width as its smaller dim
    galore = {"params": projected["params"], "rank": rank, "update_proj_gap": GAP, "scale": 1.0, "proj_type": "std"}
    return GaLoreAdamW([{"params": regular["params"]}, galore], weight_decay=WEIGHT_DECAY, no_deprecation_warning=True)


def _galore_refresh(opt: torch.optim.Optimizer, on: bool) -> None:
    for state in opt.state.values():
        if "projector" in state:
            state["projector"].update_proj_gap = 1 if on else GAP


def contenders() -> list[Contender]:
    rows = [Contender(BASELINE, _adamw), Contender("galore_torch.GaLoreAdamW", _galore, _galore_refresh)]
    for label, kw in [
        ("block (descending)", {"proj_type": "block"}),
        ("block (random)", {"proj_type": "block", "block_order": "random"}),
        ("columns", {"proj_type": "columns"}),
        ("randk", {"proj_type": "randk"}),
        ("svd", {"proj_type": "svd"}),
        ("random", {"proj_type": "random"}),
    ]:
        rows.append(Contender(f"optimlab.FRUGAL {label}", partial(_frugal, **kw), _frugal_refresh))
    return rows


# -- measurement -------------------------------------------------------------------------------------------------
def split(params: list[torch.Tensor]) -> list[dict]:
    """The paper's split: the blocks' 2-D weights projectable, the rest (embeddings first, norms, biases) regular."""
    n_embeddings = 2  # token and position embeddings lead the list
    projected = [p for i, p in enumerate(params) if i >= n_embeddings and p.dim() == 2]
    ids = {id(p) for p in projected}
    return [{"params": [p for p in params if id(p) not in ids], "project": False}, {"params": projected}]


def state_bytes(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    total = 0
    for p in params:
        for value in opt.state[p].values():
            tensors = [value] if isinstance(value, torch.Tensor) else []
            matrix = getattr(value, "ortho_matrix", None)  # galore-torch keeps its projector in an object
            tensors += [matrix] if isinstance(matrix, torch.Tensor) else list(matrix or [])
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


@torch.no_grad()
def run_block(c: Contender, params, p0, grads, g0, warmup: int, steps: int, refreshes: int) -> dict:
    def reset_grads() -> None:
        for p, g, g_saved in zip(params, grads, g0):
            g.copy_(g_saved)
            p.grad = g

    def refresh_on() -> None:
        c.force_refresh(opt, True)
        reset_grads()

    for p, p_saved in zip(params, p0):
        p.copy_(p_saved)
    groups = split(params)
    projected = groups[1]["params"]
    with OtherCPU() as others:
        opt = c.factory(groups)
        for _ in range(warmup):
            reset_grads()
            opt.step()
        result = {"state_bytes": state_bytes(opt, params), "projected_state_bytes": state_bytes(opt, projected)}
        if isinstance(opt, FRUGAL):
            result["projector_bytes"] = sum(
                opt.state[p][key].numel() * opt.state[p][key].element_size()
                for p in projected
                for key in ("projector", "indices")
                if key in opt.state[p]
            )
        with gc_paused():
            result["steady_ms"] = time_calls(opt.step, steps, before=reset_grads)["times_ms"]
            result["refresh_ms"] = []
            if c.force_refresh is not None:  # each with the gap set to 1 for that step, then back
                refresh = time_calls(opt.step, refreshes, before=refresh_on, after=partial(c.force_refresh, opt, False))
                result["refresh_ms"] = refresh["times_ms"]
    if isinstance(opt, FRUGAL) and opt.param_groups[1]["proj_type"] == "block":
        cycle = math.ceil(len(projected) / max(1, round(len(projected) * DENSITY)))
        peak = result["projected_state_bytes"]
        for _ in range(cycle):  # a whole cycle of refreshes, outside the timer
            c.force_refresh(opt, True)
            reset_grads()
            opt.step()
            c.force_refresh(opt, False)
            peak = max(peak, state_bytes(opt, projected))
        result["projected_state_bytes_cycle_max"] = peak
    result["others_cores"] = others.cores
    return result


def run_set(shapes, rounds, warmup, steps, refreshes, rows: list[Contender], rng: random.Random) -> dict:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    p0 = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    g0 = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    params = [torch.nn.Parameter(p.clone()) for p in p0]
    grads = [g.clone() for g in g0]
    out: dict[str, dict] = {c.name: {"blocks": []} for c in rows}
    def block(c: Contender) -> dict:
        return run_block(c, params, p0, grads, g0, warmup, steps, refreshes)

    keep = ("steady_ms", "refresh_ms", "others_cores")  # the rest of a block's record goes to the contender's
    run_rounds(rows, rounds, rng, out, block, keep=keep)
    for res in out.values():
        steady, n_quiet = pooled(res["blocks"], "steady_ms")
        refresh, _ = pooled(res["blocks"], "refresh_ms")
        if steady:
            res.update(steady_ms=statistics.median(steady), quiet_blocks=n_quiet)
            res["refresh_ms"] = statistics.median(refresh) if refresh else None
            res["amortised_ms"] = res["steady_ms"] + ((res["refresh_ms"] - res["steady_ms"]) / GAP if refresh else 0.0)
    projected = sum(math.prod(s) for i, s in enumerate(shapes) if i >= 2 and len(s) == 2)
    return {
        "n_params": sum(math.prod(s) for s in shapes),
        "n_projectable": projected,
        "n_tensors": len(shapes),
        "rounds": rounds,
        "warmup": warmup,
        "steps": steps,
        "refreshes": refreshes,
        "contenders": out,
    }


def add_ratios(result: dict) -> None:
    res = result["contenders"]
    base = res.get(BASELINE, {})
    for v in res.values():
        if v.get("steady_ms") is None or base.get("steady_ms") is None:
            continue
        v["x_adamw_steady"] = v["steady_ms"] / base["steady_ms"]
        v["x_adamw_amortised"] = v["amortised_ms"] / base["amortised_ms"]
        v["x_adamw_state"] = v["state_bytes"] / base["state_bytes"]
        v["x_adamw_projected_state"] = v["projected_state_bytes"] / base["projected_state_bytes"]
        if "projected_state_bytes_cycle_max" in v:
            v["x_adamw_projected_state_cycle_max"] = (
                v["projected_state_bytes_cycle_max"] / base["projected_state_bytes"]
            )


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"# FRUGAL step time and state — {m['date']}",
        "",
        f"{machine_line(m)} "
        f"ρ = {DENSITY}, T = {GAP}, weight decay {WEIGHT_DECAY}. Medians over the quiet blocks (others used <= "
        f"{MAX_OTHERS} cores; all blocks if none was quiet); ratios are of medians of this run. amortised = steady "
        f"+ (refresh − steady)/T. State: bytes of the state tensors; 'projectable' counts only the blocks' matrices "
        f"(the rest is AdamW for every contender).",
    ]
    for set_name, result in data["sets"].items():
        res = result["contenders"]
        lines += [
            "",
            f"## {set_name}: {result['n_params']:,} parameters in {result['n_tensors']} float32 tensors, "
            f"{result['n_projectable']:,} of them projectable ({result['rounds']} rounds × {result['steps']} steady + "
            f"{result['refreshes']} refresh steps after {result['warmup']} warm-up)",
            "",
            "| contender | steady ms | refresh ms | amortised ms | × AdamW steady | × AdamW amortised | state MB "
            "| × AdamW state | projectable × AdamW | … cycle max | projector MB | quiet blocks |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for name, v in sorted(res.items(), key=lambda kv: kv[1].get("amortised_ms", math.inf)):
            if "steady_ms" not in v:
                lines.append(f"| {name} | failed: {v.get('error', 'not run')} |||||||||||")
                continue
            projector = v.get("projector_bytes")
            lines.append(
                f"| {name} | {v['steady_ms']:.2f} | {fmt(v['refresh_ms'], '.2f')} | {v['amortised_ms']:.2f} "
                f"| {fmt(v.get('x_adamw_steady'), '.2f')} | {fmt(v.get('x_adamw_amortised'), '.2f')} "
                f"| {v['state_bytes'] / 1e6:.1f} | {fmt(v.get('x_adamw_state'), '.3f')} "
                f"| {fmt(v.get('x_adamw_projected_state'), '.3f')} "
                f"| {fmt(v.get('x_adamw_projected_state_cycle_max'), '.3f')} "
                f"| {fmt(None if projector is None else projector / 1e6, '.2f')} "
                f"| {v['quiet_blocks']}/{len(v['blocks'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, "smoke run: the reduced set, few repeats", argv)
    rows = contenders()
    rng = random.Random(args.seed)
    bench = Run(args)
    bench.data["sets"] = {}
    for name, (shapes, rounds, warmup, steps, refreshes) in (QUICK_SETS if args.quick else SETS).items():
        print(f"{name}: {len(rows)} contenders", file=sys.stderr, flush=True)
        bench.data["sets"][name] = run_set(shapes, rounds, warmup, steps, refreshes, rows, rng)
        add_ratios(bench.data["sets"][name])
    bench.finish("frugal_time", markdown)


if __name__ == "__main__":
    main()
