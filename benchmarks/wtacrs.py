"""Saved-activation memory, forward+backward time and gradient error of WTA-CRS layers against ``nn.Linear``.

Two models, each run with its linear layers as ``nn.Linear`` and swapped for ``WTACRSLinear`` at budgets 0.3 and
0.1 (parameters shared, so every contender sees the same weights and inputs):

* ``mlp-stack``: a GPT-like feed-forward stack (pre-LN residual blocks Linear(d, 4d), GELU, Linear(4d, d)), every
  linear layer swapped, at a realistic token count;
* ``charlm``: the ``charlm`` bench workload's transformer (4 blocks of width 64, batch 32 x 64 characters) with the
  paper's "level 2" choice: attention output projection and both feed-forward layers swapped, not the fused
  query/key/value projection nor the read-out.

Per contender: bytes the forward pass saves for backward (distinct storages, parameters excluded; via
``torch.autograd.graph.saved_tensors_hooks``), for the swapped layers alone and for the whole model; the median
wall time of forward + backward; and the relative error ‖ĝ − g‖/‖g‖ of the swapped layers' weight gradients
against the exact ones (mean over draws). Ratios are taken against ``nn.Linear`` within the same run; contenders
run in shuffled order in every round.

    python benchmarks/wtacrs.py            # full run
    python benchmarks/wtacrs.py --quick    # smoke run (~1 min on an idle 2-core machine)
"""

from __future__ import annotations

import copy
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from optimlab.nn.wtacrs import replace_linear_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import MAX_OTHERS, Run, machine_line, parse_args, pooled, run_rounds, time_block  # noqa: E402

BASELINE = "nn.Linear"
BUDGETS = (0.3, 0.1)


class MLPStack(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)) for _ in range(depth)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + mlp(norm(h))
        return h


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    model: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    swap: Callable[[str, nn.Linear], bool]


def workloads(quick: bool) -> list[Workload]:
    from optimlab.bench.workloads.charlm import BATCH, CONTEXT, HEADS, LAYERS, WIDTH, charlm_splits
    from optimlab.bench.workloads.transformer import Transformer

    width, depth, batch, tokens = (256, 2, 4, 128) if quick else (512, 4, 8, 512)
    vocab = charlm_splits()[0]

    def mlp_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(batch, tokens, width, generator=gen), torch.randn(batch, tokens, width, generator=gen)

    def charlm_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(vocab, (BATCH, CONTEXT + 1), generator=gen)
        return rows[:, :-1], rows[:, 1:]

    return [
        Workload(
            "mlp-stack",
            f"{depth} pre-LN MLP blocks of width {width} (hidden {4 * width}), {batch} x {tokens} tokens, all "
            f"{2 * depth} linear layers swapped",
            lambda: MLPStack(width, depth),
            mlp_batch,
            F.mse_loss,
            lambda name, m: True,
        ),
        Workload(
            "charlm",
            f"charlm transformer ({LAYERS} x {WIDTH}), {BATCH} x {CONTEXT} characters, proj + mlp.0 + mlp.2 of "
            "every block swapped (level 2)",
            lambda: Transformer(vocab, vocab, CONTEXT, WIDTH, LAYERS, HEADS, 4 * WIDTH, True),
            charlm_batch,
            lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()),
            lambda name, m: name.endswith(("proj", "mlp.0", "mlp.2")),
        ),
    ]


def swapped_names(model: nn.Module, swap: Callable[[str, nn.Linear], bool]) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and swap(n, m)]


def contender_model(base: nn.Module, names: list[str], budget: float) -> nn.Module:
    """A copy of ``base`` (the same weights) whose layers ``names`` are WTA-CRS layers at ``budget``."""
    return replace_linear_layers(copy.deepcopy(base), names=names, budget=budget)


def saved_bytes(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, int]:
    """Distinct storages saved for backward during one forward pass, parameters excluded: in total, and those
    saved by the layers ``names`` (also when another op saves the same storage, e.g. an attention output that
    is the projection's input: swapping the layer then does not free it, which the total shows)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}
    inside = [False]

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = (s.nbytes(), inside[0] or seen.get(s.data_ptr(), (0, False))[1])
        return t

    modules = dict(model.named_modules())
    handles = []
    for name in names:
        handles.append(modules[name].register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)))
        handles.append(modules[name].register_forward_hook(lambda *_: inside.__setitem__(0, False)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {
        "saved_total": sum(b for b, _ in seen.values()),
        "saved_layers": sum(b for b, layer in seen.values() if layer),
    }


def weight_grads(model: nn.Module, names: list[str], w: Workload, x: torch.Tensor, y: torch.Tensor) -> list:
    modules = dict(model.named_modules())
    model.zero_grad(set_to_none=True)
    w.loss(model(x), y).backward()
    return [modules[n].weight.grad.clone() for n in names]


def gradient_error(model, exact: list[torch.Tensor], names, w, x, y, draws: int) -> float:
    errors = []
    for _ in range(draws):
        est = weight_grads(model, names, w, x, y)
        errors.append(statistics.fmean(float((e - g).norm() / g.norm()) for e, g in zip(est, exact)))
    return statistics.fmean(errors)


def fwd_bwd(model: nn.Module, w: Workload, x, y) -> Callable[[], None]:
    """One forward + backward of ``model`` (the timed call)."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        w.loss(model(x), y).backward()

    return step


def run_workload(w: Workload, rounds: int, warmup: int, steps: int, draws: int, rng: random.Random) -> dict:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.randrange(2**31))
        base = w.model()
    base.train()
    names = swapped_names(base, w.swap)
    x, y = w.batch(gen)
    labels = [BASELINE] + [f"WTA-CRS@{b}" for b in BUDGETS]
    models = {BASELINE: base} | {f"WTA-CRS@{b}": contender_model(base, names, b) for b in BUDGETS}
    exact = weight_grads(base, names, w, x, y)
    out = {}
    for label in labels:
        model = models[label]
        out[label] = {"budget": getattr(dict(model.named_modules())[names[0]], "budget", None), "blocks": []}
        out[label].update(saved_bytes(model, names, x))
        out[label]["grad_rel_error"] = 0.0 if label == BASELINE else gradient_error(model, exact, names, w, x, y, draws)
    run_rounds(
        labels,
        rounds,
        rng,
        out,
        lambda label: time_block(fwd_bwd(models[label], w, x, y), warmup, steps),
        name=str,
        label=f"{w.name} ",
        catch=False,
    )
    for res in out.values():
        t, n_quiet = pooled(res["blocks"])
        res.update(median_ms=statistics.median(t), quiet_blocks=n_quiet)
    base_res = out[BASELINE]
    for res in out.values():
        res["x_time"] = res["median_ms"] / base_res["median_ms"]
        res["x_saved_layers"] = res["saved_layers"] / base_res["saved_layers"]
        res["x_saved_total"] = res["saved_total"] / base_res["saved_total"]
    n_params = sum(p.numel() for p in base.parameters())
    info = {"description": w.description, "n_params": n_params, "swapped": names, "tokens": x.shape[0] * x.shape[1]}
    return {**info, "rounds": rounds, "warmup": warmup, "steps": steps, "draws": draws, "contenders": out}


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"# WTA-CRS: saved activations and forward+backward time — {m['date']}",
        "",
        f"{machine_line(m)} Saved bytes: "
        "distinct storages saved for backward in one forward pass, parameters excluded. Time: median forward + "
        f"backward over the quiet blocks (other processes used <= {MAX_OTHERS} cores; all blocks if none was). "
        "Gradient error: mean over draws of ‖ĝ − g‖/‖g‖ of the swapped layers' weight gradients.",
    ]
    for name, res in data["workloads"].items():
        lines += [
            "",
            f"## {name}: {res['description']} ({res['n_params']:,} parameters, {res['tokens']:,} tokens; "
            f"{res['rounds']} rounds × {res['steps']} timed steps)",
            "",
            "| contender | saved by swapped layers | × nn.Linear | saved, whole model | × nn.Linear | fwd+bwd ms "
            "| × nn.Linear | grad rel. error | quiet blocks |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for label, v in res["contenders"].items():
            lines.append(
                f"| {label} | {v['saved_layers'] / 2**20:.2f} MiB | {v['x_saved_layers']:.3f} "
                f"| {v['saved_total'] / 2**20:.2f} MiB | {v['x_saved_total']:.3f} | {v['median_ms']:.1f} "
                f"| {v['x_time']:.2f} | {v['grad_rel_error']:.3f} | {v['quiet_blocks']}/{len(v['blocks'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, "smoke run: smaller MLP stack, few repeats", argv)
    rounds, warmup, steps, draws = (2, 1, 2, 2) if args.quick else (6, 2, 10, 10)
    rng = random.Random(args.seed)
    bench = Run(args)
    bench.data["workloads"] = {}
    for w in workloads(args.quick):
        print(f"{w.name}: {w.description}", file=sys.stderr, flush=True)
        bench.data["workloads"][w.name] = run_workload(w, rounds, warmup, steps, draws, rng)
    bench.finish("wtacrs", markdown)


if __name__ == "__main__":
    main()
