"""The trial store: one winner per claim, dead claims reclaimed, torn and corrupt journal lines survived."""

from __future__ import annotations

import json
import multiprocessing
import warnings
from pathlib import Path

from optimlab.bench.records import TrialRecord
from optimlab.bench.store import LockedJournalFile, TrialStore


def record(seed: int = 0) -> TrialRecord:
    return TrialRecord("w", "opt", {"lr": 0.1}, seed, "tune", "ok", "loss", False, 1.0, final_val=0.5)


def _claim_all(path: str, keys: list[str], queue) -> None:
    store = TrialStore(path)
    won = []
    for key in keys:
        trial_id = store.claim(key)
        if trial_id is not None:
            won.append(key)
            store.finish(trial_id, record(int(key)), 0.0)
    queue.put(won)


def test_concurrent_workers_never_win_the_same_trial(tmp_path: Path) -> None:
    path = str(tmp_path / "study.journal")
    TrialStore(path)
    keys = [str(i) for i in range(25)]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_claim_all, args=(path, keys, queue)) for _ in range(3)]
    for w in workers:
        w.start()
    won = [key for _ in workers for key in queue.get(timeout=120)]
    for w in workers:
        w.join(timeout=60)
    assert sorted(won, key=int) == keys  # every trial exactly once
    assert {r.seed for r in TrialStore(path).records().values()} == set(range(25))


def test_a_dead_workers_claim_is_reclaimed(tmp_path: Path) -> None:
    path = str(tmp_path / "study.journal")
    ctx = multiprocessing.get_context("spawn")
    dead = ctx.Process(target=TrialStore(path).claim, args=("k",))
    dead.start()
    dead.join()
    store = TrialStore(path)
    assert store.running() == set()  # its process is gone, so its claim is not live
    assert store.claim("k") is not None


def test_a_live_claim_blocks_others_and_a_finished_trial_is_never_claimed(tmp_path: Path) -> None:
    store = TrialStore(str(tmp_path / "study.journal"))
    first = store.claim("k")
    assert first is not None and store.running() == {"k"}
    assert store.claim("k") is None
    store.finish(first, record(), 0.0)
    assert store.claim("k") is None
    assert list(store.records()) == [record().key]


def test_stale_heartbeat_on_another_host_is_reclaimed(tmp_path: Path, monkeypatch) -> None:
    store = TrialStore(str(tmp_path / "study.journal"), stale_after=0.0)
    monkeypatch.setattr("optimlab.bench.store._HOST", "elsewhere")
    assert store.claim("k") is not None
    monkeypatch.setattr("optimlab.bench.store._HOST", "here")
    assert store.running() == set()


def test_torn_last_line_is_ignored_then_cut_off(tmp_path: Path) -> None:
    journal = LockedJournalFile(tmp_path / "j")
    journal.append_logs([{"a": 1}])
    with open(tmp_path / "j", "ab") as f:
        f.write(b'{"b": 2, "trunc')  # a writer killed mid-line
    assert list(journal.read_logs(0)) == [{"a": 1}]
    journal.append_logs([{"c": 3}])
    assert list(journal.read_logs(0)) == [{"a": 1}, {"c": 3}]
    assert (tmp_path / "j").read_bytes().count(b"\n") == 2


def test_corrupt_line_is_reported_and_skipped(tmp_path: Path) -> None:
    journal = LockedJournalFile(tmp_path / "j")
    journal.append_logs([{"a": 1}])
    with open(tmp_path / "j", "ab") as f:
        f.write(b"\x00garbage\n")
    journal.append_logs([{"c": 3}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list(journal.read_logs(0)) == [{"a": 1}, {"c": 3}]
        assert list(journal.read_logs(1)) == [{"c": 3}]
    assert any("unreadable journal line" in str(w.message) for w in caught)


def test_finished_record_round_trips(tmp_path: Path) -> None:
    store = TrialStore(str(tmp_path / "study.journal"))
    r = record(seed=4)
    r.curve = {"step": [1, 2], "val_metric": [0.5, float("nan")]}
    store.finish(store.claim(r.key), r, 1.0)
    again = TrialStore(str(tmp_path / "study.journal")).records()[r.key]
    assert again.seed == 4 and again.curve["step"] == [1, 2] and json.dumps(again.curve)  # NaN survives


def test_a_database_url_uses_optunas_rdb_storage(tmp_path: Path) -> None:
    """The same claims and records through a database URL (SQLite here; PostgreSQL is the same code path)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    store = TrialStore(url)
    first = store.claim("k")
    assert first is not None and store.claim("k") is None
    store.finish(first, record(), 0.0)
    assert list(TrialStore(url).records()) == [record().key]
