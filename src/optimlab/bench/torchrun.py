"""Data-parallel trials on real processes: ``optimlab bench --torchrun``.

With ``--torchrun``, every trial on a workload with ``workers > 1`` runs as ``workers`` processes launched by
``torchrun`` (``python -m torch.distributed.run --standalone``) in a gloo group (the workloads' models are on the CPU):
each rank trains its share of every minibatch through DDP with the method's communication hook
(:class:`optimlab.bench.data_parallel.DDPStep`), so the bytes in the record are what the ranks handed to
``torch.distributed``. All ranks evaluate their (identical) replicas; rank 0 writes the record, atomically, to a
file the launcher reads. A trial that fails or hangs (the group's timeout is seconds, the launch's a multiple of
the workload's wall-clock budget) becomes an ``error`` record with the tail of the ranks' output, like any other
failed trial; a launch past its timeout has its ranks stopped, not orphaned.

Rank entry point (what the launcher runs): ``python -m optimlab.bench.torchrun REQUEST.json RECORD.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from optimlab.bench._files import write_atomic
from optimlab.bench.records import TrialRecord
from optimlab.bench.workloads import Workload, get_workload

__all__ = ["run_trial_torchrun", "OVERRIDABLE"]

# workload fields a request may change (tests run short trials on fewer workers)
OVERRIDABLE = ("max_steps", "eval_every", "workers", "byzantine", "max_seconds")


def _workload(name: str, overrides: dict[str, Any]) -> Workload:
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise ValueError(f"cannot override {sorted(unknown)} of a workload; only {', '.join(OVERRIDABLE)}")
    return replace(get_workload(name), **overrides)


def run_trial_torchrun(
    workload: Workload | str,
    optimizer: str,
    hparams: dict[str, Any],
    seed: int,
    *,
    phase: str,
    env: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    threads: int = 1,
    timeout: float | None = None,
    schedule_source: TrialRecord | None = None,
) -> TrialRecord:
    """Run one data-parallel trial on ``workload.workers`` real processes and return rank 0's record.

        ``workload`` is a registered workload (or its name); ``overrides`` change the fields in :data:`OVERRIDABLE`
        (the record names the workload as registered). Each rank uses ``threads`` intra-op threads; ``schedule_source``
    is the linear-decay trial a ``refined`` spec's schedule is computed from, as for :func:`run_trial`. ``timeout``
        (seconds; default a multiple of the workload's wall-clock budget) bounds the launch: past it the ranks are
        stopped and the trial is an ``error`` record.
    """
    name = workload if isinstance(workload, str) else workload.name
    resolved = _workload(name, overrides or {})
    request = {
        "workload": name,
        "overrides": overrides or {},
        "optimizer": optimizer,
        "hparams": hparams,
        "seed": seed,
        "phase": phase,
        "env": {**(env or {}), "launcher": "torchrun", "threads": threads},
        "schedule_source": None if schedule_source is None else json.loads(schedule_source.to_json()),
    }
    with tempfile.TemporaryDirectory(prefix="optimlab-torchrun-") as tmp:
        request_path, record_path = Path(tmp, "request.json"), Path(tmp, "record.json")
        request_path.write_text(json.dumps(request), encoding="utf-8")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={resolved.workers}",
            "-m",
            "optimlab.bench.torchrun",
            str(request_path),
            str(record_path),
        ]
        environ = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if timeout is None:
            timeout = 60 + 3 * resolved.max_seconds + 10 * resolved.workers
        output, why = _launch(command, environ, timeout)
        if record_path.is_file():
            return TrialRecord.from_dict(json.loads(record_path.read_text(encoding="utf-8")))
    record = TrialRecord(
        workload=name,
        optimizer=optimizer,
        hparams=dict(hparams),
        seed=seed,
        phase=phase,
        status="error",
        metric=resolved.metric,
        higher_is_better=resolved.higher_is_better,
        target=resolved.target,
        env=request["env"],
    )
    tail = "\n".join(output.splitlines()[-30:])
    record.error = f"torchrun trial failed ({why}):\n{tail}"
    return record


def _launch(command: list[str], environ: dict[str, str], timeout: float) -> tuple[str, str]:
    """Run torchrun to completion or ``timeout``; return its output and how it ended (for an error record).

    On timeout torchrun gets SIGTERM, on which its agent stops the ranks (SIGTERM, then SIGKILL after its own
    30 s grace) before exiting: the ranks run in sessions of their own, so killing torchrun outright would leave
    them running. SIGKILL follows only if the agent itself does not exit."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
            why = f"exit status {process.returncode}, no record written"
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                output, _ = process.communicate(timeout=45)
            except subprocess.TimeoutExpired:
                process.kill()
                output, _ = process.communicate()
            why = f"timed out after {timeout:.0f} s"
    return output.strip(), why


def main(argv: list[str] | None = None) -> int:
    """One rank of a trial (run by torchrun, which sets RANK, WORLD_SIZE and the rendezvous)."""
    import torch
    import torch.distributed as dist

    from optimlab.bench.runner import run_trial
    from optimlab.distributed.comm import DEFAULT_TIMEOUT

    request_path, record_path = argv if argv is not None else sys.argv[1:]
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    torch.set_num_threads(int(request["env"].get("threads", 1)))
    dist.init_process_group("gloo", timeout=DEFAULT_TIMEOUT)
    try:
        workload = _workload(request["workload"], request["overrides"])
        record = run_trial(
            workload,
            request["optimizer"],
            request["hparams"],
            request["seed"],
            phase=request["phase"],
            env=request["env"],
            schedule_source=None
            if request["schedule_source"] is None
            else TrialRecord.from_dict(request["schedule_source"]),
            ranks=True,
        )
        record.workload = request["workload"]
        if dist.get_rank() == 0:
            write_atomic(record_path, lambda f: f.write(record.to_json()))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
