"""The ``optimlab`` command: ``optimlab bench`` runs a suite and writes a report; ``optimlab report DIR`` rewrites it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run optimizers side by side on the benchmark workloads")
    suite = bench.add_mutually_exclusive_group()
    suite.add_argument("--quick", action="store_const", const="quick", dest="suite", help="the quick suite (default)")
    suite.add_argument("--suite", choices=("quick", "full"), help="which suite to run")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "bench":
            return _bench(args)
        return _report(args.dir, args.claims)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"optimlab {args.command}: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    from optimlab.bench.plan import SUITES, describe
    from optimlab.bench.runner import resolve_optimizer
    from optimlab.bench.study import run_suite
    from optimlab.bench.workloads import get_workload

    suite = SUITES[args.suite or "quick"].with_options(
        optimizers=args.optimizers, workloads=args.workloads, seeds=args.seeds, tuning_trials=args.trials,
        search=args.search,
    )
    for name in suite.workloads:
        get_workload(name)
    for spec in suite.optimizers:
        resolve_optimizer(spec)
    out = args.out or Path("bench-results") / suite.name
    storage = args.storage or str(out / "study.journal")
    for line in describe(suite):
        print(line)
    print(f"  results: {out}/results.jsonl   store: {storage}")
    run_suite(suite, storage, out, jobs=args.jobs, threads=args.threads, progress=not args.no_progress)
    return _report(out, args.claims)


def _report(out: Path, claims: Path | None) -> int:
    from optimlab.bench.report import write_report

    if not (out / "results.jsonl").is_file():
        raise FileNotFoundError(f"no results.jsonl in {out}: run `optimlab bench --out {out}` first")
    write_report(out, claims)
    print(f"report: {out / 'report.html'} and {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
