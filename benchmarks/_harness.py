"""The timing machinery the benchmark scripts share: blocks of timed calls, the quiet-block rule, the machine record,
the command line and the writing of ``<name>.json`` and ``<name>.md``.

A script times its contenders in *blocks*, in rounds with the contenders in a fresh random order in each
(:func:`run_rounds`). A block takes untimed warm-up calls, then times single calls with
``time.perf_counter_ns`` (and, on request, ``time.process_time_ns`` for this process's CPU time) with the garbage
collector off, each call's setup (``before``/``after``) outside the timer. Over a block, :class:`OtherCPU` reads
``/proc/stat`` and ``/proc/self/stat`` at both ends to measure how many CPU cores *other* processes used on
average. A block is *quiet* if that is at most :data:`MAX_OTHERS` cores (or unknown, where ``/proc`` is missing);
statistics pool the timed calls of the quiet blocks, or of all blocks if none was quiet (:func:`pooled`), and
report the median with the 25th and 75th percentiles (:func:`summarise`).

The scripts import this module as ``_harness`` (their own directory is ``sys.path[0]`` when run as
``python benchmarks/<name>.py``; importing :mod:`_harness` from elsewhere needs that directory on the path).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from operator import attrgetter
from pathlib import Path
from typing import TypeVar

import torch

import optimlab
from optimlab.bench._files import write_atomic

MAX_OTHERS = 0.2  # a block during which other processes used more CPU cores than this on average is "busy"
PEER_PACKAGES = ("pytorch_optimizer", "torch_optimizer", "adan_pytorch", "lion_pytorch")  # versions in every record
RESULTS = Path(__file__).resolve().parent / "results"
T = TypeVar("T")


# -- measurement -------------------------------------------------------------------------------------------------
def cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of all CPUs, ticks of this process), or None where /proc is missing."""
    try:
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return sum(cpu) - cpu[3] - cpu[4], int(own[11]) + int(own[12])  # minus idle and iowait; utime + stime


class OtherCPU:
    """Other processes' CPU use during a ``with`` block, in cores: ``.cores`` after the block (None without /proc).

    ::

        with OtherCPU() as others:
            ...
        block["others_cores"] = others.cores
    """

    cores: float | None = None

    def __enter__(self) -> OtherCPU:
        self._ticks, self._wall = cpu_ticks(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        ticks, wall = cpu_ticks(), time.perf_counter()
        if self._ticks and ticks:
            others = (ticks[0] - self._ticks[0]) - (ticks[1] - self._ticks[1])
            self.cores = others / os.sysconf("SC_CLK_TCK") / (wall - self._wall)


@contextmanager
def gc_paused() -> Iterator[None]:
    """The garbage collector off for the block (and back on after it only if it was on: blocks nest)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_calls(
    fn: Callable[[], object],
    n: int,
    *,
    before: Callable[[], object] | None = None,
    after: Callable[[], object] | None = None,
    cpu: bool = False,
) -> dict[str, list[float]]:
    """``n`` timed calls of ``fn`` with the garbage collector off: ``{"times_ms": [wall ms of each call]}``, and
    with ``cpu`` also ``"cpu_ms"`` (this process's CPU time of each call). ``before`` and ``after`` run around every
    call, outside the timers."""
    times: list[float] = []
    cpu_times: list[float] = []
    with gc_paused():
        for _ in range(n):
            if before is not None:
                before()
            c0 = time.process_time_ns() if cpu else 0
            t0 = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - t0) / 1e6)
            if cpu:
                cpu_times.append((time.process_time_ns() - c0) / 1e6)
            if after is not None:
                after()
    return {"times_ms": times, "cpu_ms": cpu_times} if cpu else {"times_ms": times}


def time_block(fn: Callable[[], object], warmup: int, steps: int) -> dict:
    """A block: ``warmup`` untimed calls of ``fn``, then ``steps`` timed ones (:func:`time_calls`), with the other
    processes' CPU use over the timed calls: ``{"times_ms": [...], "others_cores": ...}``."""
    for _ in range(warmup):
        fn()
    with OtherCPU() as others:
        block = time_calls(fn, steps)
    return {**block, "others_cores": others.cores}


def run_rounds(
    rows: Sequence[T],
    rounds: int,
    rng: random.Random,
    out: dict[str, dict],
    block: Callable[[T], dict],
    *,
    name: Callable[[T], str] = attrgetter("name"),
    keep: Sequence[str] | None = None,
    label: str = "",
    catch: bool = True,
    each_round: Callable[[], object] | None = None,
) -> None:
    """``rounds`` rounds of blocks; in each, the contenders ``rows`` (those that have not failed) in a fresh order
    shuffled by ``rng``, one block each. ``block(c)`` runs one and returns its record: its ``keep`` keys (all if
    None) are appended to ``out[name(c)]["blocks"]``, the rest merged into ``out[name(c)]``. With ``catch``, a
    contender whose block raises (e.g. a missing package) gets ``out[name(c)]["error"]`` and is not run again. The
    garbage collector runs after every block (freeing the block's optimizer and state). ``each_round`` runs at the
    start of every round."""
    for r in range(rounds):
        if each_round is not None:
            each_round()
        order = [c for c in rows if "error" not in out[name(c)]]
        rng.shuffle(order)
        for c in order:
            res = out[name(c)]
            print(f"  {label}round {r + 1}/{rounds}: {name(c)}", file=sys.stderr, flush=True)
            try:
                record = block(c)
            except Exception as e:
                if not catch:
                    raise
                res["error"] = f"{type(e).__name__}: {e}"
                continue
            finally:
                gc.collect()
            res["blocks"].append({k: record.pop(k) for k in (list(record) if keep is None else keep)})
            res.update(record)


# -- statistics --------------------------------------------------------------------------------------------------
def is_quiet(block: dict) -> bool:
    """Whether other processes used at most :data:`MAX_OTHERS` cores during the block (or it is unknown)."""
    return block["others_cores"] is None or block["others_cores"] <= MAX_OTHERS


def pooled(blocks: Sequence[dict], key: str = "times_ms") -> tuple[list[float], int]:
    """The values of ``key`` pooled over the quiet blocks (over all blocks if none was quiet: busy blocks count
    only if all are), and the number of quiet blocks."""
    quiet = [b for b in blocks if is_quiet(b)]
    return [x for b in quiet or blocks for x in b[key]], len(quiet)


def quartiles(t: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile) of ``t`` (all three the value itself for one value)."""
    q1, med, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else (t[0],) * 3
    return q1, med, q3


def summarise(res: dict, key: str = "times_ms") -> None:
    """Adds ``median_ms``, ``q1_ms``, ``q3_ms`` and ``quiet_blocks`` of ``res["blocks"]`` to ``res`` (the quiet-block
    rule of :func:`pooled`); nothing if there are no values (a contender that failed)."""
    t, n_quiet = pooled(res["blocks"], key)
    if t:
        q1, med, q3 = quartiles(t)
        res.update(median_ms=med, q1_ms=q1, q3_ms=q3, quiet_blocks=n_quiet)


# -- record and report -------------------------------------------------------------------------------------------
def machine_info(threads: int, peers: Sequence[str] = PEER_PACKAGES) -> dict:
    """CPU model, thread counts, versions (torch, optimlab and its git revision, Python, the ``peers``), the date and
    the 1-min load average at the start (:meth:`Run.finish` adds the one at the end)."""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((x.split(":", 1)[1].strip() for x in info if x.startswith("model name")), platform.processor())
    try:
        root = Path(__file__).resolve().parents[1]
        git = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        git = "unknown"
    versions = {}
    for pkg in peers:
        try:
            versions[pkg] = importlib.metadata.version(pkg.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "optimlab": optimlab.__version__,
        "git": git,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "peers": versions,
        "loadavg_start": os.getloadavg(),
    }


def machine_line(m: dict) -> str:
    """The report's first sentences: the machine, the versions and the load average at start and end."""
    return (
        f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, optimlab {m['optimlab']} ({m['git']}). "
        f"1-min load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end."
    )


def fmt(x: float | None, spec: str) -> str:
    """``x`` formatted with ``spec``, or a dash for None (a table cell)."""
    return "—" if x is None else format(x, spec)


def parse_args(
    doc: str,
    quick: str,
    argv: list[str] | None = None,
    add: Callable[[argparse.ArgumentParser], object] | None = None,
) -> argparse.Namespace:
    """The common command line (``--threads``, ``--quick``, ``--out``, ``--seed``; ``add`` adds a script's own options
    after ``--quick``), described by the first paragraph of ``doc``, with ``quick`` as the help of ``--quick``.
    Applies ``--threads`` (``torch.set_num_threads``)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help=quick)
    if add is not None:
        add(ap)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


class Run:
    """One run of a script: ``data`` (the JSON record) starts as ``{"machine": ..., "args": {..., **extra}}``; the
    script adds its results and :meth:`finish` adds ``runtime_s`` and the end load average and writes the files."""

    def __init__(self, args: argparse.Namespace, **extra: object) -> None:
        self.args = args
        self.started = time.perf_counter()
        self.data: dict = {"machine": machine_info(args.threads), "args": {**vars(args), "out": str(args.out), **extra}}

    def finish(self, name: str, markdown: Callable[[dict], str]) -> None:
        """Writes ``<out>/<name>.json`` and ``<out>/<name>.md`` (atomically) and prints the table."""
        data, out = self.data, self.args.out
        data["runtime_s"], data["machine"]["loadavg_end"] = time.perf_counter() - self.started, os.getloadavg()
        table = markdown(data)
        write_atomic(out / f"{name}.json", lambda f: f.write(json.dumps(data, indent=1) + "\n"))
        write_atomic(out / f"{name}.md", lambda f: f.write(table))
        print(table)
        print(f"runtime {data['runtime_s']:.0f} s; wrote {out / f'{name}.json'} and {name}.md", file=sys.stderr)
