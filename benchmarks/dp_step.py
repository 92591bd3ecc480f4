"""Private training step time: optimlab's DPSGD and DiceSGD against Opacus's DPOptimizer + GradSampleModule, in one run.

A timed call is one whole private step on a fixed batch, per-sample gradients included: for optimlab,
``opt.step_batch(model, loss, x, y)`` (``torch.func`` per-sample gradients, clipping over all parameters, noise,
update); for Opacus 1.6.0, ``zero_grad``, forward and backward through a ``GradSampleModule`` (its hooks compute
``grad_sample``) and ``DPOptimizer.step`` around ``torch.optim.SGD`` (clip, noise, scale by the expected batch
size, update). A non-private ``torch.optim.SGD`` step (forward, backward, step) is the floor. Same model,
initial weights, batch, clipping norm 1.0, noise multiplier 1.0 and expected batch size for everyone; ratios
are of medians to Opacus's.

Models: ``mlp`` (784-512-256-10, tanh; 535k parameters) and ``cnn`` (Opacus's MNIST ``SampleConvNet``: two
convolutions with max pooling, two linear layers; 26k parameters) on 28x28 inputs, batch 128.

    python benchmarks/dp_step.py            # full run (~3 min on an idle 2-core machine)
    python benchmarks/dp_step.py --quick    # smoke run (mlp only, few blocks)
"""

from __future__ import annotations

import copy
import random
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from optimlab.privacy import DPSGD, DiceSGD

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the timing harness
from _harness import MAX_OTHERS, Run, fmt, machine_line, parse_args, run_rounds, summarise, time_block  # noqa: E402

BASELINE = "opacus DPOptimizer + GradSampleModule"
BATCH, CLIP, SIGMA, LR = 128, 1.0, 1.0, 0.1


class SampleConvNet(nn.Module):
    """Opacus's MNIST example network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 1)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 1)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.Tanh(), nn.Linear(512, 256), nn.Tanh(), nn.Linear(256, 10)
    )


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "cnn": SampleConvNet}


@dataclass(frozen=True)
class Contender:
    name: str
    # (model, x, y) -> a function doing one whole step
    build: Callable[[nn.Module, torch.Tensor, torch.Tensor], Callable[[], object]]


def _optimlab(cls: type, **kw) -> Callable:
    def build(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
        opt = cls(
            model.parameters(), lr=LR, max_grad_norm=CLIP, noise_multiplier=SIGMA, expected_batch_size=BATCH, **kw
        )
        return lambda: opt.step_batch(model, F.cross_entropy, x, y)

    return build


def _opacus(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    module = GradSampleModule(model)
    opt = DPOptimizer(
        torch.optim.SGD(module.parameters(), lr=LR),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=BATCH,
    )

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()

    return step


def _sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


CONTENDERS = [
    Contender(BASELINE, _opacus),
    Contender("optimlab DPSGD.step_batch", _optimlab(DPSGD)),
    Contender("optimlab DiceSGD.step_batch", _optimlab(DiceSGD, error_clip_ratio=1.0)),
    Contender("torch SGD (not private)", _sgd),
]


def run_model(name: str, rounds: int, warmup: int, steps: int, rng: random.Random) -> dict:
    torch.manual_seed(rng.randrange(2**31))
    reference = MODELS[name]()
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    out: dict[str, dict] = {c.name: {"blocks": []} for c in CONTENDERS}

    def block(c: Contender) -> dict:
        step = c.build(copy.deepcopy(reference), x, y)
        return time_block(step, warmup, steps)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's secure-RNG and backward-hook notices, once per block
        run_rounds(CONTENDERS, rounds, rng, out, block, keep=["times_ms", "others_cores"], label=f"{name} ")
    for res in out.values():
        summarise(res)
    base = out[BASELINE].get("median_ms")
    for res in out.values():
        if base and "median_ms" in res:
            res["x_opacus"] = res["median_ms"] / base
    return {
        "n_params": sum(p.numel() for p in reference.parameters()),
        "batch": BATCH,
        "rounds": rounds,
        "warmup": warmup,
        "steps": steps,
        "contenders": out,
    }


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"# Private step time — {m['date']}",
        "",
        f"{machine_line(m)} One call = one whole private step on a batch of {BATCH}, per-sample gradients included "
        f"(clipping norm {CLIP}, noise multiplier {SIGMA}). Medians over the quiet blocks (others used <= "
        f"{MAX_OTHERS} cores; all blocks if none was quiet); × Opacus is the ratio of medians in this run.",
    ]
    for name, result in data["models"].items():
        res = result["contenders"]
        lines += [
            "",
            f"## {name}: {result['n_params']:,} parameters ({result['rounds']} rounds × {result['steps']} steps after "
            f"{result['warmup']} warm-up)",
            "",
            "| contender | median ms | q1–q3 ms | × Opacus | quiet blocks |",
            "|---|--:|--:|--:|--:|",
        ]
        for cname, v in res.items():
            if "median_ms" not in v:
                lines.append(f"| {cname} | failed: {v.get('error', 'not run')} ||||")
                continue
            lines.append(
                f"| {cname} | {v['median_ms']:.2f} | {v['q1_ms']:.2f}–{v['q3_ms']:.2f} "
                f"| {fmt(v.get('x_opacus'), '.2f')} | {v['quiet_blocks']}/{len(v['blocks'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, "smoke run: the mlp only, 2 rounds of few steps", argv)
    run = Run(args)
    rng = random.Random(args.seed)
    plan = {"mlp": (2, 2, 5)} if args.quick else {"mlp": (5, 3, 20), "cnn": (5, 3, 20)}
    run.data["models"] = {name: run_model(name, *p, rng) for name, p in plan.items()}
    run.finish("dp_step", markdown)


if __name__ == "__main__":
    main()
