"""What TrAct costs: forward + backward of first layers, and whole training steps, with and without TrAct.

Settings (float32):

- ``resnet-conv1``: the CIFAR ResNet stem of the paper, ``Conv2d(3, 64, 3, padding=1)`` on a batch of 128 32×32
  images (n = 27, b = 131,072: an n×n solve);
- ``vit-patch-embed``: a ViT-B/16 patch embedding as ``Linear(768, 768)`` on 16×16×3 patches, 196 per 224×224
  image, 32 images (b = 6,272 ≥ n = 768: a 768×768 solve), and 2 images (b = 392 < n: the Woodbury b×b solve);
- ``cnn-step``: one SGD (momentum 0.9) step of a small CIFAR CNN (four 3×3 convolutions, 32-256 channels, batch
  128 of 32×32), first layer plain or TrAct;
- ``mnist1d-cnn-step``: one AdamW step of the bench workload ``mnist1d-cnn``'s model (Conv1d first layer),
  batch 100.

For the layer settings a third contender times TrAct's weight gradient alone (:func:`optimlab.nn.tract_weight_grad`
on the ready input and output-gradient rows: Gram matrix and Cholesky solve). Contenders run in a fresh random
order in every round; each block builds its module afresh, takes warm-up iterations, then times single
iterations; medians over the quiet blocks (as in ``step_time.py``); ratios are of medians of one run.

    python benchmarks/tract_time.py            # full run, results in benchmarks/results/tract_time.{json,md}
    python benchmarks/tract_time.py --quick    # smoke run: smaller batches, fewer repeats
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from _harness import MAX_OTHERS, Run, machine_line, parse_args, run_rounds, summarise, time_block
from optimlab.bench.workloads.mnist1d_cnn import _cnn as mnist1d_cnn
from optimlab.nn import TrAct, tract_weight_grad

PLAIN, TRACT, SOLVE = "plain", "TrAct", "TrAct weight gradient alone"


@dataclass(frozen=True)
class Setting:
    description: str
    build: Callable[[str], Callable[[], object]]  # contender -> the function timed once per iteration
    shape: tuple[int, int]  # (n, b) of the first layer's solve
    contenders: tuple[str, ...] = (PLAIN, TRACT, SOLVE)


def _layer_iteration(make_layer: Callable[[], nn.Module], x: torch.Tensor, contender: str) -> Callable[[], object]:
    """One forward + backward of the layer (input gradient included, as for a layer inside a model)."""
    layer = make_layer()
    if contender == SOLVE:  # the rows TrAct's backward would form, then its solve alone
        rows_x = _rows(layer, x)
        rows_g = torch.randn(rows_x.shape[0], layer.weight.shape[0])
        return lambda: tract_weight_grad(rows_x, rows_g, 0.1)
    if contender == TRACT:
        layer = TrAct(layer)
    x = x.clone().requires_grad_(True)
    upstream = torch.randn_like(layer(x))

    def iteration() -> None:
        layer.weight.grad = x.grad = None
        if layer.bias is not None:
            layer.bias.grad = None
        layer(x).backward(upstream)

    return iteration


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = nn.functional.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _train_iteration(
    make_model: Callable[[], nn.Module], first: str, x: torch.Tensor, y: torch.Tensor, make_opt, contender: str
) -> Callable[[], object]:
    model = make_model()
    if contender == TRACT:
        TrAct.wrap(model, first)
    opt = make_opt(model.parameters())
    loss_fn = nn.CrossEntropyLoss()

    def iteration() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return iteration


def small_cnn() -> nn.Module:
    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 32, 1), *block(32, 64, 2), *block(64, 128, 2), *block(128, 256, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10),
    )  # fmt: skip


def settings(quick: bool) -> dict[str, Setting]:
    gen = torch.Generator().manual_seed(0)
    images = 16 if quick else 128
    cifar = torch.randn(images, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (images,), generator=gen)
    vit_images = 4 if quick else 32
    patches = torch.randn(vit_images, 196, 768, generator=gen)
    signals = torch.randn(100, 1, 40, generator=gen)
    signal_labels = torch.randint(0, 10, (100,), generator=gen)

    def conv1() -> nn.Module:
        return nn.Conv2d(3, 64, 3, padding=1)

    def embed() -> nn.Module:
        return nn.Linear(768, 768)

    def sgd(params):
        return torch.optim.SGD(params, lr=0.08, momentum=0.9)

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)

    train = (PLAIN, TRACT)
    return {
        f"resnet-conv1 (batch {images})": Setting(
            f"Conv2d(3, 64, 3, padding=1), {images}×3×32×32 input",
            lambda c: _layer_iteration(conv1, cifar, c),
            (27, images * 32 * 32),
        ),
        f"vit-patch-embed ({vit_images} images)": Setting(
            f"Linear(768, 768) on {vit_images}×196 patches of 16×16×3",
            lambda c: _layer_iteration(embed, patches, c),
            (768, vit_images * 196),
        ),
        "vit-patch-embed (2 images, Woodbury)": Setting(
            "Linear(768, 768) on 2×196 patches of 16×16×3",
            lambda c: _layer_iteration(embed, patches[:2], c),
            (768, 2 * 196),
        ),
        f"cnn-step (batch {images})": Setting(
            f"SGD step of a 4-conv CNN (32-256 channels, BatchNorm), {images}×3×32×32",
            lambda c: _train_iteration(small_cnn, "0", cifar, labels, sgd, c),
            (27, images * 32 * 32),
            train,
        ),
        "mnist1d-cnn-step (batch 100)": Setting(
            "AdamW step of the mnist1d-cnn workload's model (Conv1d(1, 25, 5, stride 2) first)",
            lambda c: _train_iteration(mnist1d_cnn, "0", signals, signal_labels, adamw, c),
            (5, 100 * 19),
            train,
        ),
    }


def run_setting(setting: Setting, rounds: int, warmup: int, steps: int, rng: random.Random) -> dict:
    out = {c: {"blocks": []} for c in setting.contenders}
    def block(c: str) -> dict:
        torch.manual_seed(0)
        return time_block(setting.build(c), warmup, steps)

    run_rounds(setting.contenders, rounds, rng, out, block, name=str, catch=False)
    for res in out.values():
        summarise(res)
    plain = out[PLAIN]["median_ms"]
    for res in out.values():
        res["x_plain"] = res["median_ms"] / plain
    n, b = setting.shape
    return {"description": setting.description, "n": n, "b": b, "contenders": out}


def markdown(data: dict) -> str:
    m = data["machine"]
    a = data["args"]
    lines = [
        f"# TrAct time — {m['date']}",
        "",
        f"{machine_line(m)} "
        f"{a['rounds']} rounds × {a['steps']} timed iterations after {a['warmup']} warm-up per block; median over "
        f"the quiet blocks (other processes used <= {MAX_OTHERS} cores; all blocks if none was quiet). "
        "Layer settings time forward + backward (input gradient included); step settings a whole training step.",
        "",
        "| setting | n | b | contender | ms | p25–p75 | × plain | quiet blocks |",
        "|---|--:|--:|---|--:|--:|--:|--:|",
    ]
    for name, res in data["settings"].items():
        for c, v in res["contenders"].items():
            lines.append(
                f"| {name} | {res['n']} | {res['b']:,} | {c} | {v['median_ms']:.3f} | {v['q1_ms']:.3f}–{v['q3_ms']:.3f} "
                f"| {v['x_plain']:.2f} | {v['quiet_blocks']}/{len(v['blocks'])} |"
            )
    lines += ["", "Settings:", ""] + [f"- {k}: {v['description']}" for k, v in data["settings"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, "smoke run: smaller batches, few repeats", argv)
    rounds, warmup, steps = (2, 2, 5) if args.quick else (6, 3, 20)
    rng = random.Random(args.seed)
    bench = Run(args, rounds=rounds, warmup=warmup, steps=steps)
    bench.data["settings"] = {}
    for name, setting in settings(args.quick).items():
        print(name, file=sys.stderr, flush=True)
        bench.data["settings"][name] = run_setting(setting, rounds, warmup, steps, rng)
    bench.finish("tract_time", markdown)


if __name__ == "__main__":
    main()
