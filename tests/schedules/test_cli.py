"""``optimlab schedule refine`` and ``optimlab steplaw`` end to end, through ``optimlab.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from optimlab.bench.records import TrialRecord
from optimlab.cli import main
from optimlab.schedules import linear_decay, load_schedule, refine


def _record(
    optimizer: str = "torch:AdamW@linear",
    *,
    lr: float = 0.01,
    seed: int = 0,
    steps: int = 60,
    l1=None,
    l2=None,
    status: str = "ok",
    workload: str = "quadratic",
) -> TrialRecord:
    l1 = [2.0] * steps if l1 is None else l1
    l2 = [float(1 + (i % 7)) for i in range(steps)] if l2 is None else l2
    return TrialRecord(
        workload=workload,
        optimizer=optimizer,
        hparams={"lr": lr},
        seed=seed,
        phase="tune",
        status=status,
        metric="loss",
        higher_is_better=False,
        target=0.1,
        grad_norms={"l1": l1, "l2": l2} if l1 or l2 else {},
        steps=steps,
    )


def _results(tmp_path: Path, *records: TrialRecord) -> Path:
    (tmp_path / "results.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    return tmp_path


def test_refine_writes_schedule_and_plot(tmp_path: Path, capsys) -> None:
    results = _results(tmp_path, _record(), _record("sgd@linear", lr=0.5), _record(status="diverged", lr=1.0))
    assert (
        main(["schedule", "refine", str(results), "--workload", "quadratic", "--optimizer", "torch:AdamW@linear"]) == 0
    )
    out = capsys.readouterr().out
    path = tmp_path / "schedules" / "quadratic-torch_AdamW_linear.json"
    assert str(path) in out and str(path.with_suffix(".png")) in out
    assert path.with_suffix(".png").stat().st_size > 0
    multipliers, metadata = load_schedule(path)
    # AdamW: the l1 log, constant here, so exactly linear decay over the trial's 60 steps
    expected = torch.tensor([linear_decay(t, 60) for t in range(60)], dtype=torch.float64)
    torch.testing.assert_close(multipliers, expected, rtol=0, atol=1e-12)
    assert metadata["norm"] == "l1" and metadata["lr"] == 0.01 and metadata["seed"] == 0 and metadata["steps"] == 60
    document = json.loads(path.read_text())
    assert document["format"] == "optimlab.schedule" and len(document["multipliers"]) == 60


def test_refine_uses_l2_norms_for_sgd_and_honours_options(tmp_path: Path, capsys) -> None:
    results = _results(tmp_path, _record("sgd@linear", lr=0.5))
    out = tmp_path / "mine.json"
    args = [
        "schedule",
        "refine",
        str(results),
        "--workload",
        "quadratic",
        "--optimizer",
        "sgd@linear",
        "--steps",
        "40",
        "--tau",
        "0.2",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    multipliers, metadata = load_schedule(out)
    assert metadata["norm"] == "l2" and metadata["tau"] == 0.2
    record = _record()
    torch.testing.assert_close(multipliers, refine(record.grad_norms["l2"], norm="l2", steps=40, tau=0.2))


def test_refine_several_trials_need_a_choice(tmp_path: Path, capsys) -> None:
    results = _results(tmp_path, _record(seed=0), _record(seed=1, l1=[float(i + 1) for i in range(60)]))
    base = ["schedule", "refine", str(results), "--workload", "quadratic", "--optimizer", "torch:AdamW@linear"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("optimlab schedule: error: 2 trials") and "seed=0" in err and "seed=1" in err
    assert main([*base, "--lr", "0.01", "--seed", "1", "--norm", "l2"]) == 0
    assert load_schedule(tmp_path / "schedules" / "quadratic-torch_AdamW_linear.json")[1]["norm"] == "l2"


@pytest.mark.parametrize(
    "records, args, message",
    [
        ([], ["--workload", "quadratic", "--optimizer", "sgd"], "(nothing)"),
        (
            [_record()],
            ["--workload", "mnist", "--optimizer", "torch:AdamW@linear"],
            "--workload quadratic --optimizer torch:AdamW@linear",
        ),
        (
            [_record(l1=[], l2=[])],
            ["--workload", "quadratic", "--optimizer", "torch:AdamW@linear"],
            "l1-norms logged=0",
        ),
        (
            [_record(l1=[1.0] * 30)],
            ["--workload", "quadratic", "--optimizer", "torch:AdamW@linear"],
            "over its full length",
        ),
        (
            [_record(status="diverged")],
            ["--workload", "quadratic", "--optimizer", "torch:AdamW@linear"],
            "status=diverged",
        ),
        ([_record()], ["--workload", "quadratic", "--optimizer", "torch:AdamW@linear", "--lr", "0.1"], "(lr=0.1)"),
        ([_record()], ["--workload", "quadratic", "--optimizer", "torch:AdamW@linear", "--tau", "0"], "Invalid tau"),
    ],
)
def test_refine_errors_exit_2(tmp_path: Path, capsys, records, args, message: str) -> None:
    results = _results(tmp_path, *records)
    assert main(["schedule", "refine", str(results), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("optimlab schedule: error:") and message in err
    assert not (tmp_path / "schedules").exists()


def test_refine_without_results_is_an_error(tmp_path: Path, capsys) -> None:
    assert main(["schedule", "refine", str(tmp_path), "--workload", "w", "--optimizer", "sgd"]) == 2
    assert "no results.jsonl" in capsys.readouterr().err


def test_steplaw_prints_lr_and_batch(capsys) -> None:
    assert main(["steplaw", "--params", "1e9", "--tokens", "1e11", "--seq-len", "2048"]) == 0
    captured = capsys.readouterr()
    assert "1.6325e-03" in captured.out and "1.1077e+06 tokens" in captured.out
    assert "540.9 sequences of 2048 tokens" in captured.out
    assert captured.err == ""
    assert main(["steplaw", "--params", "1e9", "--tokens", "1e11", "--coefficients", "tool"]) == 0
    captured = capsys.readouterr()
    assert "1.6624e-03" in captured.out and "sequences" not in captured.out


def test_steplaw_warns_outside_the_fitted_range(capsys) -> None:
    assert main(["steplaw", "--params", "1e8", "--tokens", "1e10"]) == 0
    captured = capsys.readouterr()
    assert "4.1577e-03" in captured.out
    assert captured.err.startswith("optimlab steplaw: warning: params = 1e+08 is outside")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--params", "0", "--tokens", "1e10"], "Invalid params"),
        (["--params", "1e9", "--tokens", "-5"], "Invalid tokens"),
        (["--params", "1e9", "--tokens", "1e10", "--seq-len", "0"], "seq_len"),
    ],
)
def test_steplaw_bad_input_exits_2(args, message: str, capsys) -> None:
    assert main(["steplaw", *args]) == 2
    assert message in capsys.readouterr().err
