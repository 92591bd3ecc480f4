"""What the compiled fast path costs up front: the first ``step()`` of each optimlab method in a new process.

For every registry method with a compiled kernel, three fresh processes each build the method on one
512x512 float32 parameter (above the compiled path's size threshold) and time their first and a later step:

* ``cold``: an empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR`` pointing at a new folder): trace and compile;
* ``warm``: the same folder again, as a second run of a training script finds it: trace, load the kernel;
* ``eager``: ``OPTIMLAB_KERNELS=eager``, the reference path, for scale.

    python benchmarks/compile_time.py            # results in benchmarks/results/compile_time.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import optimlab
from optimlab.bench._files import write_atomic

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
import optimlab
name = sys.argv[1]
p = torch.nn.Parameter(torch.randn(512, 512))
info = optimlab.get(name)
opt = optimlab.create(name, [p], inner="adamw") if info.kind == "wrapper" else optimlab.create(name, [p])
times = []
for _ in range(5):
    p.grad = torch.randn_like(p)
    t0 = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"first_s": times[0], "later_ms": 1e3 * min(times[1:])}))
"""


def run_child(name: str, threads: int, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(threads)], env={**os.environ, **env}, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"{name}: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="cold/warm/eager processes per method (median reported)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    names = [
        n
        for n in optimlab.available()
        if optimlab.get(n).kind in ("optimizer", "wrapper")
        and optimlab.get(n).capabilities.compilable  # AdaHessian differentiates twice: autograd refuses compiling
    ]
    rows = {}
    for name in names:
        runs: dict[str, list[dict]] = {"cold": [], "warm": [], "eager": []}
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                runs["cold"].append(run_child(name, args.threads, {"TORCHINDUCTOR_CACHE_DIR": cache}))
                runs["warm"].append(run_child(name, args.threads, {"TORCHINDUCTOR_CACHE_DIR": cache}))
            runs["eager"].append(run_child(name, args.threads, {"OPTIMLAB_KERNELS": "eager"}))
        rows[name] = {
            mode: {k: statistics.median(r[k] for r in rs) for k in ("first_s", "later_ms")} for mode, rs in runs.items()
        }
        print(name, rows[name], file=sys.stderr, flush=True)
    lines = [
        "# First step of each method in a new process (compile cost)",
        "",
        f"One 512x512 float32 parameter, {args.threads} threads, median of {args.repeats} processes per cell; "
        "wrappers wrap torch's AdamW. cold: empty Inductor cache; warm: the cache the cold run left; eager: "
        "`OPTIMLAB_KERNELS=eager`.",
        "",
        "| method | cold first step s | warm first step s | eager first step s | compiled later step ms "
        "| eager later step ms |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['cold']['first_s']:.2f} | {r['warm']['first_s']:.2f} | {r['eager']['first_s']:.3f} "
            f"| {r['warm']['later_ms']:.3f} | {r['eager']['later_ms']:.3f} |"
        )
    table = "\n".join(lines) + "\n"
    write_atomic(args.out / "compile_time.json", lambda f: f.write(json.dumps(rows, indent=1) + "\n"))
    write_atomic(args.out / "compile_time.md", lambda f: f.write(table))
    print(table)


if __name__ == "__main__":
    main()
