"""The trial record: one finished (workload, optimizer, hyperparameters, seed), as one JSON line.

``results.jsonl`` in a bench output folder holds one record per line. Readers skip (and report) lines that do
not parse, so a truncated or corrupt line never stops a report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from optimlab.bench._files import write_atomic

__all__ = ["CURVE_COLUMNS", "TrialRecord", "read_jsonl", "trial_key", "write_jsonl_atomic"]

# per-evaluation columns of TrialRecord.curve (lists of equal length)
CURVE_COLUMNS = ("step", "grad_evals", "seconds", "train_loss", "val_loss", "val_metric", "grad_l1", "grad_l2")


def trial_key(workload: str, optimizer: str, hparams: dict[str, Any], seed: int) -> str:
    """A trial's identity: equal keys are the same trial, whoever runs it."""
    return json.dumps([workload, optimizer, hparams, seed], sort_keys=True, separators=(",", ":"))


@dataclass
class TrialRecord:
    workload: str
    optimizer: str  # a registry name, "torch:<Class>" or "package.module:Class"
    hparams: dict[str, Any]
    seed: int
    phase: str  # "tune" (learning-rate search, scored on validation) or "final" (the chosen lr, more seeds)
    status: str  # "ok", "diverged" (a non-finite loss; the NaN policy) or "error"
    metric: str
    higher_is_better: bool
    target: float
    curve: dict[str, list[float]] = field(default_factory=dict)
    # per training step (index i: the raw gradient step i + 1 used), when the suite logs them: {"l1": [...], "l2": [...]}
    grad_norms: dict[str, list[float]] = field(default_factory=dict)
    steps: int = 0
    grad_evals: int = 0
    seconds: float = 0.0
    steps_to_target: int | None = None
    grad_evals_to_target: int | None = None
    seconds_to_target: float | None = None
    final_val: float | None = None  # validation metric at the end of the run
    best_val: float | None = None
    test: dict[str, float] = field(default_factory=dict)  # test metrics at the end of the run
    state_bytes: int = 0
    error: str | None = None
    env: dict[str, Any] = field(default_factory=dict)  # versions, git sha, machine, threads, times

    @property
    def key(self) -> str:
        return trial_key(self.workload, self.optimizer, self.hparams, self.seed)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), allow_nan=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        return cls(**data)


def read_jsonl(path: str | os.PathLike) -> tuple[list[TrialRecord], list[str]]:
    """Records of a results file, and a description of each line that was skipped."""
    records, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(TrialRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError) as err:
                problems.append(f"{path}:{number}: skipped an unreadable record ({type(err).__name__}: {err})")
    return records, problems


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[TrialRecord]) -> None:
    """Write all records to ``path`` atomically: readers never see half a file."""
    write_atomic(path, lambda f: f.writelines(record.to_json() + "\n" for record in records))
