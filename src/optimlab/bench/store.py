"""The crash-safe record of a study's trials: the single source of truth of ``optimlab bench``.

Trials live in an Optuna storage: a journal file in the output folder by default (Optuna's storage made for
several processes on one machine), or any database URL Optuna's RDB storage takes (``postgresql://…``) so that
workers on several machines share one study.

Claiming a trial, so that no two workers run it: a worker creates a RUNNING Optuna trial that carries the
trial's key in the same write, then reads the study; among the live claims on that key the oldest (lowest
trial number) wins, and a loser marks its own claim FAIL. Every worker reads after its own write, so they
all agree on the winner. A claim is dead when its worker process is gone (same host) or its heartbeat is older
than ``stale_after`` seconds; dead claims are marked FAIL and the trial is claimed again. A finished trial is
COMPLETE with the JSON record attached: it is never run again.

The journal file is written under an ``fcntl`` lock (released by the kernel when a process dies, so a killed
worker never leaves a stale lock), each append fsynced. A process killed mid-append leaves a partial last line:
the next append cuts it off first, and readers skip any line that does not parse (reporting it), so a torn or
corrupt record costs at most that trial, never the study.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import FrozenTrial, TrialState

from optimlab.bench.records import TrialRecord

__all__ = ["TrialStore", "LockedJournalFile"]

STUDY = "optimlab-bench"
_HOST = socket.gethostname()


class LockedJournalFile(BaseJournalBackend):
    """An append-only journal of JSON lines, safe under concurrent writers and killed processes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)
        self._reported: set[int] = set()

    def _locked(self, mode: str):
        f = open(self.path, mode)
        fcntl.flock(f, fcntl.LOCK_EX if "a" in mode or "+" in mode else fcntl.LOCK_SH)
        return f

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        with self._locked("rb") as f:
            data = f.read()
        number = 0
        for offset, line in _complete_lines(data):
            try:
                log = json.loads(line)
            except ValueError:
                if offset not in self._reported:
                    self._reported.add(offset)
                    warnings.warn(f"{self.path}: skipped an unreadable journal line at byte {offset}", stacklevel=2)
                continue
            if number >= log_number_from:
                yield log
            number += 1

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        payload = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
        with self._locked("rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # a writer died mid-line: drop its partial line
                    f.seek(0)
                    f.truncate(f.read().rfind(b"\n") + 1)
            f.seek(0, os.SEEK_END)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())


def _complete_lines(data: bytes) -> Iterable[tuple[int, bytes]]:
    offset = 0
    while True:
        end = data.find(b"\n", offset)
        if end < 0:
            return  # a partial last line is an append in progress (or torn): not a record yet
        yield offset, data[offset:end]
        offset = end + 1


def open_storage(location: str | os.PathLike) -> BaseStorage:
    """An RDB storage for a database URL, else a locked journal file at that path."""
    text = str(location)
    if "://" in text:
        return RDBStorage(text)
    return JournalStorage(LockedJournalFile(text))


class TrialStore:
    """Claims, heartbeats and finished records of one study (see the module docstring)."""

    def __init__(self, location: str | os.PathLike, *, stale_after: float = 600.0, heartbeat: float = 30.0) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage = open_storage(location)
        self.study_id = self._study_id()
        self.stale_after = stale_after
        self.heartbeat = heartbeat

    def _study_id(self) -> int:
        try:
            return self.storage.get_study_id_from_name(STUDY)
        except KeyError:
            try:
                return self.storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], STUDY)
            except optuna.exceptions.DuplicatedStudyError:  # another worker made it first
                return self.storage.get_study_id_from_name(STUDY)

    def _trials(self) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self.study_id, deepcopy=False)

    # -- reading ----------------------------------------------------------------------------------------
    def records(self) -> dict[str, TrialRecord]:
        """Finished trials by key (the first one, should a key ever have finished twice)."""
        out: dict[str, TrialRecord] = {}
        for t in self._trials():
            if t.state == TrialState.COMPLETE and "record" in t.user_attrs:
                try:
                    record = TrialRecord.from_dict(t.user_attrs["record"])
                except (TypeError, ValueError) as err:
                    warnings.warn(f"trial {t.number}: skipped an unreadable record ({err})", stacklevel=2)
                    continue
                out.setdefault(record.key, record)
        return out

    def running(self) -> set[str]:
        """Keys with a live claim (after marking dead claims FAIL)."""
        return {t.user_attrs["key"] for t in self._live_claims()}

    def _live_claims(self) -> list[FrozenTrial]:
        live = []
        for t in self._trials():
            if t.state != TrialState.RUNNING or "key" not in t.user_attrs:
                continue
            if self._dead(t):
                self._fail(t._trial_id)
            else:
                live.append(t)
        return live

    def _dead(self, t: FrozenTrial) -> bool:
        owner = t.user_attrs.get("owner", {})
        if owner.get("host") == _HOST and not _alive(owner.get("pid", -1)):
            return True
        return time.time() - t.user_attrs.get("heartbeat", owner.get("since", 0.0)) > self.stale_after

    # -- writing ----------------------------------------------------------------------------------------
    def claim(self, key: str) -> int | None:
        """Claim trial ``key``; the Optuna trial id when this worker won it, else None."""
        now = time.time()
        template = FrozenTrial(
            number=-1,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=None,
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={"key": key, "owner": {"host": _HOST, "pid": os.getpid(), "since": now}, "heartbeat": now},
            system_attrs={},
            intermediate_values={},
            trial_id=-1,
        )
        mine = self.storage.create_new_trial(self.study_id, template_trial=template)
        contenders = [t for t in self._trials() if t.user_attrs.get("key") == key]
        if any(t.state == TrialState.COMPLETE for t in contenders):
            self._fail(mine)
            return None
        live = [t for t in contenders if t.state == TrialState.RUNNING and (t._trial_id == mine or not self._dead(t))]
        if min(live, key=lambda t: t.number)._trial_id != mine:
            self._fail(mine)
            return None
        return mine

    def finish(self, trial_id: int, record: TrialRecord, score: float) -> None:
        self.storage.set_trial_user_attr(trial_id, "record", json.loads(record.to_json()))
        self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [score])

    def _fail(self, trial_id: int) -> None:
        try:
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except RuntimeError:  # finished meanwhile (someone else marked it)
            pass

    def keep_alive(self, trial_id: int) -> threading.Event:
        """Heartbeat the claim from a background thread until the returned event is set."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat):
                try:
                    self.storage.set_trial_user_attr(trial_id, "heartbeat", time.time())
                except RuntimeError:
                    return

        threading.Thread(target=beat, daemon=True, name=f"optimlab-heartbeat-{trial_id}").start()
        return stop


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
