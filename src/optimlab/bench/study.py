"""Running a suite: workers that claim trials from the store until the suite is finished.

Any number of workers (``--jobs`` processes here, or processes on other machines sharing a database URL) run
the same loop: read what is finished, compute what can run now (tuning first, then the chosen learning rate
on more seeds), claim one trial, run it, record it. The store guarantees that no trial runs twice; a killed
worker loses only the trial it was running, and rerunning the command resumes.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from optimlab.bench.plan import Suite, pending, planned_count, score, source_key
from optimlab.bench.records import TrialRecord, write_jsonl_atomic
from optimlab.bench.runner import environment, run_trial
from optimlab.bench.store import TrialStore
from optimlab.bench.torchrun import run_trial_torchrun
from optimlab.bench.workloads import Workload, get_workload

__all__ = ["run_worker", "run_suite", "export"]


def export(done: Mapping[str, TrialRecord], out: Path) -> list[TrialRecord]:
    """Rewrite ``out/results.jsonl`` from the store's finished records (atomically), in a stable order."""
    records = sorted(done.values(), key=lambda r: (r.workload, r.optimizer, r.phase, r.seed, r.key))
    write_jsonl_atomic(out / "results.jsonl", records)
    return records


def trial_threads(workload: Workload, threads: int | None, jobs: int) -> int:
    """``threads`` if given, else the workload's own count, at most the cores each of ``jobs`` workers gets."""
    return threads or max(1, min(workload.threads, (os.cpu_count() or 1) // jobs))


def run_worker(
    suite: Suite,
    storage: str,
    out: Path,
    threads: int | None,
    jobs: int,
    on_finish: Callable[[list[TrialRecord], int], None] | None = None,
    poll: float = 0.5,
    torchrun: bool = False,
) -> None:
    """Claim and run trials until the suite is finished. ``on_finish(new_records, finished_count)`` is called
    whenever this worker sees trials finished (by it or by other workers) that it had not seen. With ``torchrun``,
    trials on data-parallel workloads run on real processes (:mod:`optimlab.bench.torchrun`)."""
    store = TrialStore(storage)
    env = environment(jobs)  # once per worker: it runs git and reads /proc/cpuinfo
    done = store.records()

    def refresh() -> None:
        nonlocal done
        seen, done = done, store.records()
        new = [r for key, r in done.items() if key not in seen]
        if new and on_finish is not None:
            on_finish(new, len(done))

    while True:
        ready, finished = pending(suite, done)
        if finished:
            return
        running = store.running()
        for spec in ready:
            if spec.key in running:
                continue
            trial_id = store.claim(spec.key)
            if trial_id is None:
                continue
            stop = store.keep_alive(trial_id)
            try:
                workload = get_workload(spec.workload)
                n = trial_threads(workload, threads, jobs)
                torch.set_num_threads(n)
                if torchrun and workload.workers > 1:
                    record = run_trial_torchrun(
                        workload, spec.optimizer, spec.hparams, spec.seed, phase=spec.phase, env=env,
                        schedule_source=done.get(source_key(spec) or ""),
                    )
                else:
                    record = run_trial(
                        workload, spec.optimizer, spec.hparams, spec.seed, phase=spec.phase,
                        env={**env, "threads": n}, schedule_source=done.get(source_key(spec) or ""),
                    )
                store.finish(trial_id, record, score(record))
            finally:
                stop.set()
            refresh()
            export(done, out)
            break
        else:
            time.sleep(poll)  # every runnable trial is claimed by another worker: wait for results
            refresh()


def run_suite(
    suite: Suite,
    storage: str,
    out: Path,
    *,
    jobs: int = 1,
    threads: int | None = None,
    progress: bool = True,
    torchrun: bool = False,
) -> list[TrialRecord]:
    """Run the suite with ``jobs`` local worker processes (this one included); return every record. Each trial
    runs with ``threads`` intra-op threads, by default its workload's count (see ``trial_threads``); with
    ``torchrun``, a data-parallel trial runs as one single-threaded process per worker instead."""
    out.mkdir(parents=True, exist_ok=True)
    store = TrialStore(storage)
    total = planned_count(suite)
    bar = _progress(total, len(store.records()), enabled=progress)

    def on_finish(records: list[TrialRecord], finished: int) -> None:
        for record in records:
            bar.write(_line(record))
        bar.n = min(total, finished)
        bar.refresh()

    helpers = [
        multiprocessing.get_context("spawn").Process(target=run_worker, args=(suite, storage, out, threads, jobs, None, 0.5, torchrun), daemon=True)
        for _ in range(jobs - 1)
    ]
    for p in helpers:
        p.start()
    try:
        run_worker(suite, storage, out, threads, jobs, on_finish, torchrun=torchrun)
        for p in helpers:
            p.join()
    finally:
        for p in helpers:
            if p.is_alive():
                p.terminate()
        bar.close()
    return export(store.records(), out)


def _line(r: TrialRecord) -> str:
    reached = f"target at step {r.steps_to_target}" if r.steps_to_target else "target not reached"
    final = f"{r.final_val:.4g}" if r.final_val is not None else "-"
    return (
        f"{r.workload:16s} {r.optimizer:24s} lr={r.hparams.get('lr', '-'):<8} seed={r.seed} {r.phase:5s} "
        f"{r.status:8s} val {r.metric}={final:8s} {reached} ({r.seconds:.1f}s)"
    )


def _progress(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="trials", unit="trial", disable=not enabled, dynamic_ncols=True)
