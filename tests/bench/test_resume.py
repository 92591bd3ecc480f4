"""Killing a study at random moments (SIGKILL) and rerunning it gives the uninterrupted run's trials and
step-based metrics, reusing the finished ones; two workers on one study run every trial exactly once."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from optuna.trial import TrialState

from optimlab.bench.plan import SUITES, planned_count
from optimlab.bench.records import read_jsonl
from optimlab.bench.store import TrialStore

SUITE = dict(workloads=("quadratic", "rosenbrock"), optimizers=("torch:AdamW", "lion"), tuning_trials=2, seeds=1)
RUN = (
    "import sys; from pathlib import Path; from optimlab.bench.plan import SUITES; "
    "from optimlab.bench.study import run_suite; "
    f"suite = SUITES['quick'].with_options(**{SUITE!r}); "
    "out = Path(sys.argv[1]); storage = sys.argv[3] if len(sys.argv) > 3 else str(out / 'study.journal'); "
    "run_suite(suite, storage, out, jobs=int(sys.argv[2]), threads=1, progress=False)"
)


def run(out: Path, jobs: int = 1, storage: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUN, str(out), str(jobs), *([storage] if storage else [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def step_based(out: Path) -> dict[str, tuple]:
    records, problems = read_jsonl(out / "results.jsonl")
    assert not problems
    return {
        r.key: (
            r.status,
            r.phase,
            r.steps_to_target,
            r.grad_evals_to_target,
            r.final_val,
            r.best_val,
            r.steps,
            tuple(sorted(r.test.items())),
            tuple((k, tuple(v)) for k, v in sorted(r.curve.items()) if k != "seconds"),
        )
        for r in records
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, tuple]:
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = run(out)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    result = step_based(out)
    assert len(result) == planned_count(SUITES["quick"].with_options(**SUITE))
    return result


def test_repeated_sigkills_lose_nothing_and_repeat_nothing(tmp_path: Path, reference) -> None:
    rng = random.Random(0)
    kills = 0
    for attempt in range(30):
        proc = run(tmp_path)
        if attempt < 12:
            time.sleep(rng.uniform(2.5, 6.0))  # start-up takes ~2 s; then trials are mid-flight
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
        break
    assert kills >= 3, "the run finished before it could be killed: make the study longer"
    assert step_based(tmp_path) == reference
    store = TrialStore(str(tmp_path / "study.journal"))
    completed = Counter(t.user_attrs["key"] for t in store._trials() if t.state == TrialState.COMPLETE)
    assert set(completed) == set(reference) and max(completed.values()) == 1


def test_two_workers_share_one_study(tmp_path: Path, reference) -> None:
    proc = run(tmp_path, jobs=2)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    assert step_based(tmp_path) == reference
    store = TrialStore(str(tmp_path / "study.journal"))
    completed = Counter(t.user_attrs["key"] for t in store._trials() if t.state == TrialState.COMPLETE)
    assert max(completed.values()) == 1


@pytest.fixture(scope="module")
def postgres() -> Iterator[tuple[str, int]]:
    """A throwaway PostgreSQL server listening on a Unix socket only: (socket folder, port)."""
    pytest.importorskip("psycopg2", reason="needs the psycopg2 driver (the test extra)")
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        pytest.skip("needs a PostgreSQL server installation (initdb and pg_ctl on PATH)")
    root, as_server_user = Path(tempfile.mkdtemp(prefix="optimlab-pg-")), []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the installation's own user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_server_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", 5432
    subprocess.run([*as_server_user, "initdb", "-D", str(data), "-A", "trust", "-U", "bench"], check=True, capture_output=True)
    options = f"-k {root} -p {port} -c listen_addresses=''"
    subprocess.run(
        [*as_server_user, "pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield str(root), port
    finally:
        subprocess.run([*as_server_user, "pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_study_through_postgresql(tmp_path: Path, reference, postgres) -> None:
    """Workers on several machines share a study through a database URL: the same trials, each run once."""
    import psycopg2

    host, port = postgres
    admin = psycopg2.connect(host=host, port=port, user="bench", dbname="postgres")
    admin.autocommit = True
    admin.cursor().execute("CREATE DATABASE study")
    admin.close()
    url = f"postgresql+psycopg2://bench@/study?host={host}&port={port}"
    proc = run(tmp_path, jobs=2, storage=url)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    assert step_based(tmp_path) == reference
    completed = Counter(t.user_attrs["key"] for t in TrialStore(url)._trials() if t.state == TrialState.COMPLETE)
    assert max(completed.values()) == 1
