"""The ``optimlab`` command: ``optimlab bench`` runs a suite and writes a report; ``optimlab report DIR`` rewrites it."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

__all__ = ["main"]


SUITE_NAMES = ("quick", "full", "aids", "curvature-memory", "distributed")  # optimlab.bench.plan.SUITES (not imported here: start-up stays light)


def _csv(text: str) -> tuple[str, ...]:
    """Comma-separated items; commas inside brackets or parentheses (``torch:AdamW[betas=(0.9,0.98)]``) are
    part of an item."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text + ","):
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    return tuple(x for x in items if x)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 2 (a schedule has a first and a last step), got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run optimizers side by side on the benchmark workloads")
    suite = bench.add_mutually_exclusive_group()
    suite.add_argument("--quick", action="store_const", const="quick", dest="suite", help="the quick suite (default)")
    suite.add_argument("--suite", choices=SUITE_NAMES, help="which suite to run (aids: refined schedules and "
                       "StableMax + ⊥Grad; curvature-memory: AdaHessian, M-FAC, FRUGAL, TrAct, WTA-CRS; "
                       "distributed: EControl/EF21/EF14, robust aggregation, 1-bit Adam in the n-worker simulator)")
    bench.add_argument("--torchrun", action="store_true", help="run the data-parallel trials (distributed suite) on "
                       "real processes, one per worker, launched by torchrun (gloo) instead of the simulator")
    bench.add_argument("--optimizers", type=_csv, help="comma-separated optimizer specs (overrides the suite's)")
    bench.add_argument("--workloads", type=_csv, help="comma-separated workload names (overrides the suite's)")
    bench.add_argument("--out", type=Path, help="output folder (default: bench-results/<suite>)")
    bench.add_argument("--seeds", type=_positive, help="final seeds per (workload, optimizer)")
    bench.add_argument("--trials", type=_positive, help="tuning trials (learning rates) per (workload, optimizer)")
    bench.add_argument("--search", choices=("grid", "tpe"), help="how tuning picks learning rates: a log-spaced grid "
                       "(default) or Optuna's TPE sampler")
    bench.add_argument("--jobs", type=_positive, default=1, help="local worker processes (default 1)")
    bench.add_argument("--threads", type=_positive, help="torch threads per trial (default: the workload's, 1 or 2, "
                       "at most cores / jobs)")
    bench.add_argument("--storage", help="Optuna storage: a database URL shared by several machines "
                       "(default: a journal file in the output folder)")
    bench.add_argument("--claims", type=Path, help="claims file (default: the one shipped with optimlab)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")

    report = sub.add_parser("report", help="write report.md and report.html for a bench output folder")
    report.add_argument("dir", type=Path)
    report.add_argument("--claims", type=Path, help="claims file (default: the one shipped with optimlab)")

    schedule = sub.add_parser("schedule", help="learning-rate schedules from bench runs")
    schedule_sub = schedule.add_subparsers(dest="schedule_command", required=True)
    refine = schedule_sub.add_parser(
        "refine",
        help="the refined schedule (arXiv 2310.07831) from the gradient norms a bench run logged",
        description="Compute the refined learning-rate schedule from the per-step gradient norms of one finished "
        "bench trial (a '@linear' trial logs them) and write it as JSON, with a PNG plot beside it.",
    )
    refine.add_argument("results", type=Path, help="bench output folder (holds results.jsonl)")
    refine.add_argument("--workload", required=True, help="workload of the source trial")
    refine.add_argument("--optimizer", required=True, help="optimizer spec of the source trial, as in results.jsonl")
    refine.add_argument("--lr", type=float, help="learning rate of the source trial (when several were logged)")
    refine.add_argument("--seed", type=int, help="seed of the source trial (when several were logged)")
    refine.add_argument(
        "--norm",
        choices=("l1", "l2"),
        help="which logged norm to use (default: l2 for SGD, l1 for every other optimizer, as in the paper's runs)",
    )
    refine.add_argument("--steps", type=_at_least_two, help="length of the schedule (default: the source trial's steps)")
    refine.add_argument(
        "--tau",
        type=float,
        default=0.1,
        help="median-filter width as a fraction of the 10,000-point grid (default 0.1)",
    )
    refine.add_argument(
        "--out",
        type=Path,
        help="schedule file (default: RESULTS/schedules/<workload>-<optimizer>.json); the plot goes beside it as .png",
    )

    steplaw = sub.add_parser(
        "steplaw", help="Step Law (arXiv 2503.04715): optimal peak lr and batch size for LLM pretraining"
    )
    steplaw.add_argument("--params", type=float, required=True, help="non-embedding parameters N")
    steplaw.add_argument("--tokens", type=float, required=True, help="training tokens D")
    steplaw.add_argument("--seq-len", type=int, help="sequence length, to give the batch size in sequences too")
    steplaw.add_argument(
        "--coefficients",
        choices=("paper", "tool"),
        default="paper",
        help="the paper's rounded constants (default) or the released fitting tool's unrounded ones",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "bench":
            return _bench(args)
        if args.command == "schedule":
            return _schedule_refine(args)
        if args.command == "steplaw":
            return _steplaw(args)
        return _report(args.dir, args.claims)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"optimlab {args.command}: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    from optimlab.bench.plan import SUITES, describe
    from optimlab.bench.runner import check_spec
    from optimlab.bench.study import run_suite
    from optimlab.bench.workloads import get_workload

    suite = SUITES[args.suite or "quick"].with_options(
        optimizers=args.optimizers, workloads=args.workloads, seeds=args.seeds, tuning_trials=args.trials,
        search=args.search,
    )
    for workload, spec in suite.pairs():
        check_spec(spec, get_workload(workload))
    out = args.out or Path("bench-results") / (suite.name + ("-torchrun" if args.torchrun else ""))
    storage = args.storage or str(out / "study.journal")
    for line in describe(suite):
        print(line)
    print(f"  results: {out}/results.jsonl   store: {storage}")
    run_suite(suite, storage, out, jobs=args.jobs, threads=args.threads, progress=not args.no_progress,
              torchrun=args.torchrun)
    return _report(out, args.claims)


def _report(out: Path, claims: Path | None) -> int:
    from optimlab.bench.report import write_report

    if not (out / "results.jsonl").is_file():
        raise FileNotFoundError(f"no results.jsonl in {out}: run `optimlab bench --out {out}` first")
    write_report(out, claims)
    print(f"report: {out / 'report.html'} and {out / 'report.md'}")
    return 0


def _schedule_refine(args: argparse.Namespace) -> int:
    from optimlab.bench.records import read_jsonl
    from optimlab.bench.specs import parse_spec
    from optimlab.schedules import linear_decay, refine_details, save_schedule

    path = args.results / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no results.jsonl in {args.results}: run `optimlab bench --out {args.results}` first")
    records, _ = read_jsonl(path)
    norm = args.norm or parse_spec(args.optimizer).refinement_norm
    source = _refinement_source(records, args, norm)
    norms = source.grad_norms[norm]
    steps = args.steps or source.steps
    details = refine_details(norms, norm=norm, steps=steps, tau=args.tau)
    lr = source.hparams.get("lr")
    out = (
        args.out
        or args.results / "schedules" / f"{args.workload}-{re.sub(r'[^A-Za-z0-9._-]+', '_', args.optimizer)}.json"
    )
    save_schedule(
        out,
        details.multipliers,
        paper="arXiv 2310.07831",
        results=str(path),
        workload=source.workload,
        optimizer=source.optimizer,
        lr=lr,
        seed=source.seed,
        phase=source.phase,
        source_steps=source.steps,
        norm=norm,
        tau=args.tau,
        steps=steps,
    )
    print(
        f"schedule: {out} ({steps} steps, from the {norm} norms of {source.workload} / {source.optimizer}, "
        f"lr {lr}, seed {source.seed}; multiply by the peak lr)"
    )
    try:
        import matplotlib
    except ImportError:
        print("plot: skipped (matplotlib is not installed; pip install 'optimlab[bench]')")
        return 0
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def percent(n: int) -> list[float]:
        return [100.0 * i / max(n - 1, 1) for i in range(n)]

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(percent(len(details.norms)), details.norms.tolist(), lw=0.5, alpha=0.5, label="logged")
    left.plot(percent(len(details.smoothed)), details.smoothed.tolist(), lw=1.5, label="median-filtered")
    left.set(
        xlabel="training progress (%)",
        ylabel=f"gradient {norm} norm",
        yscale="log",
        title=f"{source.workload} / {source.optimizer}",
    )
    left.legend()
    right.plot(percent(steps), details.multipliers.tolist(), lw=1.5, label="refined")
    right.plot(percent(steps), [linear_decay(t, steps) for t in range(steps)], lw=1, ls="--", label="linear decay")
    right.set(
        xlabel="training progress (%)",
        ylabel="multiplier of the peak lr",
        ylim=(0, 1.05),
        title=f"refined schedule (arXiv 2310.07831), tau = {args.tau:g}",
    )
    right.legend()
    fig.tight_layout()
    plot = out.with_suffix(".png")
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    print(f"plot: {plot}")
    return 0


def _refinement_source(records: list, args: argparse.Namespace, norm: str):
    """The one finished trial matching the filters with a full-length ``norm`` log; ``ValueError`` listing the
    candidates when there is none or several with different logs."""
    import math

    def describe(r) -> str:
        logged = len(r.grad_norms.get(norm, []))
        return (
            f"  lr={r.hparams.get('lr')} seed={r.seed} phase={r.phase} status={r.status} steps={r.steps} "
            f"{norm}-norms logged={logged}"
        )

    same = [r for r in records if r.workload == args.workload and r.optimizer == args.optimizer]
    if not same:
        pairs = sorted({f"  --workload {r.workload} --optimizer {r.optimizer}" for r in records})
        raise ValueError(
            f"no trial of {args.workload} / {args.optimizer} in {args.results / 'results.jsonl'}; "
            "the results hold:\n" + "\n".join(pairs or ["  (nothing)"])
        )
    filtered = [
        r
        for r in same
        if (args.lr is None or math.isclose(float(r.hparams.get("lr", math.nan)), args.lr, rel_tol=1e-6))
        and (args.seed is None or r.seed == args.seed)
    ]
    usable = [r for r in filtered if r.status == "ok" and r.steps > 0 and len(r.grad_norms.get(norm, [])) == r.steps]
    listing = "\n".join(describe(r) for r in same)
    if not usable:
        raise ValueError(
            f"no finished trial of {args.workload} / {args.optimizer}{_filters(args)} logged its {norm} gradient norms "
            f"over its full length (a '@linear' trial does); the trials are:\n{listing}"
        )
    if any(r.grad_norms[norm] != usable[0].grad_norms[norm] for r in usable[1:]):
        raise ValueError(
            f"{len(usable)} trials of {args.workload} / {args.optimizer}{_filters(args)} have different norm logs; "
            f"choose one with --lr and --seed:\n" + "\n".join(describe(r) for r in usable)
        )
    return usable[0]


def _filters(args: argparse.Namespace) -> str:
    parts = [f"lr={args.lr}" if args.lr is not None else "", f"seed={args.seed}" if args.seed is not None else ""]
    text = ", ".join(p for p in parts if p)
    return f" ({text})" if text else ""


def _steplaw(args: argparse.Namespace) -> int:
    from optimlab.schedules import step_law

    result = step_law(args.params, args.tokens, seq_len=args.seq_len, coefficients=args.coefficients)
    print(
        f"Step Law (arXiv 2503.04715, {args.coefficients} coefficients) for N = {args.params:.4g} non-embedding "
        f"parameters and D = {args.tokens:.4g} training tokens:"
    )
    print(f"  peak learning rate  {result.lr:.4e}")
    batch = f"  batch size          {result.batch_tokens:.4e} tokens"
    if result.batch_sequences is not None:
        batch += f" = {result.batch_sequences:.1f} sequences of {args.seq_len} tokens"
    print(batch)
    for warning in result.warnings:
        print(f"optimlab steplaw: warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
