"""Wall time of ``optimizer.step()`` for optimlab's optimizers, torch's AdamW and peer implementations.

Two parameter sets: ``large``, a 42.1M-parameter GPT-shaped list of float32 tensors (memory-bandwidth bound),
and ``small``, 108k parameters in 100 tensors (per-tensor Python overhead bound). Gradients are random and set
before every timed step, outside the timer, so peers that modify ``p.grad`` see the same input every step.
Contenders run in shuffled order in every round; each block builds a fresh optimizer, takes warm-up steps
(which create the state) and then times single steps. See ``benchmarks/README.md``.

    python benchmarks/step_time.py                 # full run, results in benchmarks/results/
    python benchmarks/step_time.py --quick         # smoke run (< 1 min)
    python benchmarks/step_time.py --only lion,adamw
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

import optimlab
from _harness import MAX_OTHERS, OtherCPU, Run, fmt, machine_line, parse_args, run_rounds, summarise, time_calls
from optimlab._core.kernels import kernel_mode

WEIGHT_DECAY = 1e-2  # every contender decays (cost depends only on decay being on), all else at defaults
BASELINE, FUSED = "torch.AdamW(foreach)", "torch.AdamW(fused)"


@dataclass(frozen=True)
class Contender:
    name: str
    algorithm: str  # contenders of one algorithm are compared with each other
    source: str  # "torch", "optimlab" or the peer's package
    factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    inner: str | None = None  # for a wrapper: the contender it wraps (its overhead is measured against it)
    kernels: str = "compiled"  # optimlab's kernel mode during the block (the default, or the eager reference)


def _adamw(params: list[torch.Tensor], **kw: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, weight_decay=WEIGHT_DECAY, **kw)


def _peer(path: str, params: list[torch.Tensor], wrapper: bool = False, **kw: bool) -> torch.optim.Optimizer:
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(_adamw(params, foreach=True), **kw) if wrapper else cls(params, weight_decay=WEIGHT_DECAY, **kw)


def contenders() -> list[Contender]:
    rows = [
        Contender(BASELINE, "adamw", "torch", partial(_adamw, foreach=True)),
        Contender(FUSED, "adamw", "torch", partial(_adamw, fused=True)),
        Contender("torch.AdamW(for-loop)", "adamw", "torch", partial(_adamw, foreach=False)),
    ]
    # every optimizer and wrapper in optimlab's registry (wrappers around torch's foreach AdamW)
    special = {"lionk": ("(sign)", "lion", {"kappa": "sign"})}
    for name in optimlab.available("optimizer"):
        info = optimlab.get(name)
        if info.capabilities.needs_closure:  # its step re-evaluates the model: not a step-time comparison
            continue
        if info.capabilities.needs_create_graph:  # its iteration differentiates twice: adahessian_time.py
            continue
        if name == "mfac":  # its window is ngrads (1024) copies of the model, 172 GB here: mfac_time.py
            continue
        suffix, algorithm, kw = special.get(name, ("", name, {}))
        label = f"optimlab.{info.cls.__name__}{suffix}"
        decay = {"weight_decay": WEIGHT_DECAY} if "weight_decay" in info.defaults else {}
        make = partial(optimlab.create, name, **decay, **kw)
        rows.append(Contender(label, algorithm, "optimlab", make))
        rows.append(Contender(f"{label} eager", algorithm, "optimlab", make, kernels="eager"))
    for name in optimlab.available("wrapper"):
        make = partial(optimlab.create, name, inner="adamw", foreach=True, weight_decay=WEIGHT_DECAY)
        label = f"optimlab.{optimlab.get(name).cls.__name__}(AdamW)"
        rows.append(Contender(label, f"{name}+adamw", "optimlab", make, inner=BASELINE))
        rows.append(Contender(f"{label} eager", f"{name}+adamw", "optimlab", make, inner=BASELINE, kernels="eager"))
    # peers, at their defaults (pytorch_optimizer's foreach=None means foreach on CPU for Adan, DiffGrad and Lion,
    # per-tensor for EXAdam and OrthoGrad, so those two also run with foreach=True)
    peers = [  # (label, class, algorithm, keyword arguments)
        ("pytorch_optimizer.Adan", "pytorch_optimizer.Adan", "adan", {}),
        ("adan_pytorch.Adan", "adan_pytorch.Adan", "adan", {}),
        ("pytorch_optimizer.EXAdam", "pytorch_optimizer.EXAdam", "exadam", {}),
        ("pytorch_optimizer.EXAdam(foreach)", "pytorch_optimizer.EXAdam", "exadam", {"foreach": True}),
        ("torch_optimizer.DiffGrad", "torch_optimizer.DiffGrad", "diffgrad", {}),
        ("pytorch_optimizer.DiffGrad", "pytorch_optimizer.DiffGrad", "diffgrad", {}),
        ("lion_pytorch.Lion", "lion_pytorch.Lion", "lion", {}),
        ("pytorch_optimizer.Lion", "pytorch_optimizer.Lion", "lion", {}),
    ]
    for label, path, algorithm, kw in peers:
        rows.append(Contender(label, algorithm, path.split(".")[0], partial(_peer, path, **kw)))
    for suffix, kw in [("", {}), (", foreach", {"foreach": True})]:
        label = f"pytorch_optimizer.OrthoGrad(AdamW{suffix})"
        make = partial(_peer, "pytorch_optimizer.OrthoGrad", wrapper=True, **kw)
        rows.append(Contender(label, "orthograd+adamw", "pytorch_optimizer", make, inner=BASELINE))
    return rows


# -- parameter sets ----------------------------------------------------------------------------------------
def transformer_shapes(vocab: int, ctx: int, d: int, layers: int) -> list[tuple[int, ...]]:
    """Token and position embeddings, pre-LN blocks (fused QKV, 4x MLP, biases), final LN; tied LM head."""
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [(vocab, d), (ctx, d)] + block * layers + [(d,), (d,)]


SETS = {  # name: (shapes, rounds, warm-up steps, timed steps per block)
    "small": (transformer_shapes(128, 64, 32, 8), 10, 3, 30),
    "large": (transformer_shapes(32000, 1024, 512, 8), 6, 2, 3),
}
QUICK_SETS = {
    "small": (transformer_shapes(128, 64, 32, 8), 2, 2, 5),
    "large-reduced": (transformer_shapes(8000, 256, 256, 4), 2, 1, 2),
}


# -- measurement (the machinery is benchmarks/_harness.py) --------------------------------------------------
@torch.no_grad()
def run_block(c: Contender, params: list, p0: list, grads: list, g0: list, warmup: int, steps: int) -> dict:
    """Fresh optimizer from the same parameters; ``warmup`` untimed steps, then ``steps`` timed ones."""
    with kernel_mode(c.kernels):
        return _run_block(c, params, p0, grads, g0, warmup, steps)


def _run_block(c: Contender, params: list, p0: list, grads: list, g0: list, warmup: int, steps: int) -> dict:

    def reset_grads() -> None:
        for p, g, g_saved in zip(params, grads, g0):
            g.copy_(g_saved)
            p.grad = g

    for p, p_saved in zip(params, p0):
        p.copy_(p_saved)
    reset_grads()
    with OtherCPU() as others:  # other processes' CPU use during the block, in cores
        opt, mutated = c.factory(params), False
        for _ in range(warmup):
            opt.step()
            mutated |= any(p.grad is not g or not torch.equal(g, g_saved) for p, g, g_saved in zip(params, grads, g0))
            reset_grads()
        state_bytes = sum(
            v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )
        block = time_calls(opt.step, steps, before=reset_grads)
    return {**block, "others_cores": others.cores, "state_bytes": state_bytes, "mutates_grad": mutated}


@torch.no_grad()
def triad_gb_s(n: int, repeats: int = 5) -> float:
    """Streaming triad ``a = b + s * c`` over ``n`` float32 elements: the best of ``repeats``, in GB/s, counting
    the compulsory traffic (two arrays read, one written)."""
    a, b, c = (torch.rand(n) for _ in range(3))
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        t0 = time.perf_counter()
        torch.add(b, c, alpha=1.5, out=a)
        best = min(best, time.perf_counter() - t0)
    return 3 * 4 * n / best / 1e9


def run_set(shapes: list, rounds: int, warmup: int, steps: int, rows: list[Contender], rng: random.Random) -> dict:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    p0 = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    g0 = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    params = [torch.nn.Parameter(p.clone()) for p in p0]
    grads = [g.clone() for g in g0]
    n = sum(p.numel() for p in p0)
    out = {c.name: {"algorithm": c.algorithm, "source": c.source, "inner": c.inner, "blocks": []} for c in rows}
    triads = []
    def block(c: Contender) -> dict:
        record = run_block(c, params, p0, grads, g0, warmup, steps)
        return {**record, "state_bytes_per_param": record["state_bytes"] / n}

    keep = ("times_ms", "others_cores")  # the rest of a block's record goes to the contender's
    run_rounds(rows, rounds, rng, out, block, keep=keep, each_round=lambda: triads.append(triad_gb_s(n)))
    for res in out.values():
        summarise(res)
    params_info = {"n_params": n, "n_tensors": len(shapes), "shapes": shapes}
    triad = {"triad_gb_s": statistics.median(triads), "triad_runs_gb_s": triads}
    return {**params_info, **triad, "rounds": rounds, "warmup": warmup, "steps": steps, "contenders": out}


# -- report ------------------------------------------------------------------------------------------------
def add_ratios(result: dict) -> None:
    res = result["contenders"]
    med = {k: v.get("median_ms") for k, v in res.items()}
    for v in res.values():
        if v.get("median_ms") is None:
            continue
        peers = [
            w["median_ms"]
            for w in res.values()
            if w["algorithm"] == v["algorithm"] and w["source"] != "optimlab" and w.get("median_ms")
        ]
        v["x_adamw_foreach"] = v["median_ms"] / med[BASELINE] if med.get(BASELINE) else None
        v["x_adamw_fused"] = v["median_ms"] / med[FUSED] if med.get(FUSED) else None
        v["x_fastest_peer"] = v["median_ms"] / min(peers) if peers else None
        if v["inner"] and med.get(v["inner"]):
            v["overhead_ms"] = v["median_ms"] - med[v["inner"]]
            v["overhead_ratio"] = v["overhead_ms"] / med[v["inner"]]
        else:  # compulsory traffic: parameter read and written, gradient read, every state buffer read and written
            traffic = result["n_params"] * 4 * 3 + 2 * v["state_bytes"]
            v["gb_s"] = traffic / v["median_ms"] / 1e6
            v["of_triad"] = v["gb_s"] / result["triad_gb_s"]


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"# optimizer.step() time — {m['date']}",
        "",
        f"{machine_line(m)} Median over the timed steps of the quiet blocks (other processes used <= {MAX_OTHERS} "
        f"cores; all blocks if none was quiet); ratios are of medians. Weight decay {WEIGHT_DECAY} everywhere.",
    ]
    for set_name, result in data["sets"].items():
        res = result["contenders"]
        lines += [
            "",
            f"## {set_name}: {result['n_params']:,} parameters in {result['n_tensors']} float32 tensors "
            f"({result['rounds']} rounds × {result['steps']} timed steps after {result['warmup']} warm-up). "
            f"Streaming triad: {result['triad_gb_s']:.1f} GB/s (median of the rounds); \"of triad\" is the "
            "compulsory traffic (parameter and state read and written, gradient read) per step time over it.",
            "",
            "| contender | algorithm | ms/step | p25–p75 | × AdamW foreach | × AdamW fused | × fastest peer "
            "| of triad | state B/param | mutates grad | quiet blocks |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|:-:|--:|",
        ]
        groups = list(dict.fromkeys(v["algorithm"] for v in res.values()))
        for name, v in sorted(
            res.items(), key=lambda kv: (groups.index(kv[1]["algorithm"]), kv[1].get("median_ms", float("inf")))
        ):
            if "median_ms" not in v:
                lines.append(f"| {name} | {v['algorithm']} | failed: {v.get('error', 'not run')} |||||||||")
                continue
            lines.append(
                f"| {name} | {v['algorithm']} | {v['median_ms']:.3f} | {v['q1_ms']:.3f}–{v['q3_ms']:.3f} "
                f"| {fmt(v['x_adamw_foreach'], '.2f')} | {fmt(v['x_adamw_fused'], '.2f')} "
                f"| {fmt(v['x_fastest_peer'], '.2f')} | {fmt(v.get('of_triad'), '.0%')} "
                f"| {v['state_bytes_per_param']:.1f} "
                f"| {'yes' if v['mutates_grad'] else 'no'} | {v['quiet_blocks']}/{len(v['blocks'])} |"
            )
        wrappers = {k: v for k, v in res.items() if "overhead_ms" in v}
        if wrappers:
            lines += [
                "",
                "Wrapper overhead (wrapper step minus the step of the optimizer it wraps):",
                "",
                "| wrapper | inner | wrapper ms | inner ms | overhead ms | overhead / inner step |",
                "|---|---|--:|--:|--:|--:|",
            ]
            for name, v in sorted(wrappers.items(), key=lambda kv: kv[1]["overhead_ms"]):
                lines.append(
                    f"| {name} | {v['inner']} | {v['median_ms']:.3f} | {res[v['inner']]['median_ms']:.3f} "
                    f"| {v['overhead_ms']:.3f} | {v['overhead_ratio']:+.1%} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    def only(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--only", default="", help="comma-separated substrings of contender names (case-insensitive)")

    args = parse_args(__doc__, "smoke run: few repeats, small and reduced large set", argv, add=only)
    rows = contenders()
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",") if k.strip()]
        rows = [c for c in rows if any(k in c.name.lower() for k in keys)]
    rng = random.Random(args.seed)
    bench = Run(args)
    bench.data["sets"] = {}
    for name, (shapes, rounds, warmup, steps) in (QUICK_SETS if args.quick else SETS).items():
        print(f"{name}: {len(rows)} contenders", file=sys.stderr, flush=True)
        bench.data["sets"][name] = run_set(shapes, rounds, warmup, steps, rows, rng)
        add_ratios(bench.data["sets"][name])
    bench.finish("step_time", markdown)


if __name__ == "__main__":
    main()
