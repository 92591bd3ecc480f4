"""The report: written whatever the results file holds, self-contained, with hand-checkable profiles and claims."""

from __future__ import annotations

import base64
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from optimlab.bench.claims import Verdict, final_trials
from optimlab.bench.records import TrialRecord
from optimlab.bench.report import Profile, ReportSummary, performance_profile, write_report
from tests.bench.test_claims import reaching_at, seeds, trial

CLAIMS = """
[[claim]]
id = "fast-halves-steps"
paper = "A fast optimizer"
arxiv = "2208.06677"
source = "abstract, paraphrased"
statement = "fast reaches the target in at most half the steps of torch:AdamW"
workload = "alpha"
metric = "steps_to_target"
candidate = "fast"
baseline = "torch:AdamW"
budget = 1000
min_seeds = 3
rule = { kind = "speedup", ratio = 0.5 }

[[claim]]
id = "frozen-halves-steps"
paper = "A frozen optimizer"
arxiv = "2302.06675"
source = "abstract, paraphrased"
statement = "frozen reaches the target in at most half the steps of torch:AdamW"
workload = "alpha"
metric = "steps_to_target"
candidate = "frozen"
baseline = "torch:AdamW"
budget = 1000
min_seeds = 3
rule = { kind = "speedup", ratio = 0.5 }

[[claim]]
id = "fast-on-a-workload-not-run"
paper = "A fast optimizer"
arxiv = "2208.06677"
source = "abstract, paraphrased"
statement = "fast is better than torch:AdamW on charlm"
workload = "charlm"
metric = "final_val"
candidate = "fast"
baseline = "torch:AdamW"
budget = 1000
min_seeds = 3
rule = { kind = "better", margin = 0.0 }
"""


def study() -> list[TrialRecord]:
    """Two workloads; "fast" reaches the target in 200 steps, AdamW in 500-600, "frozen" (lr = 0) never."""
    records = []
    for workload in ("alpha", "beta"):
        records += seeds("torch:AdamW", [500, 500, 600], workload=workload)
        records += seeds("fast", [200, 200, 300], workload=workload)
        records += [trial("frozen", s, [0.1] * 10, lr=0.0, workload=workload) for s in (1, 2, 3)]
        for optimizer in ("torch:AdamW", "fast"):
            records += [
                trial(optimizer, 0, reaching_at(400), lr=lr, phase="tune", workload=workload) for lr in (1e-4, 1e-3)
            ]
            records.append(trial(optimizer, 0, [0.5, math.nan], lr=1e-1, phase="tune", workload=workload))
    return records


def write_results(out: Path, records: list[TrialRecord], *extra_lines: str) -> None:
    lines = [r.to_json() for r in records] + list(extra_lines)
    (out / "results.jsonl").write_text("\n".join(lines), encoding="utf-8")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> ReportSummary:
    """A report from a file with a corrupt line in the middle and a truncated last line."""
    out = tmp_path_factory.mktemp("bench")
    records = study()
    lines = [r.to_json() for r in records[:-1]]
    lines.insert(5, "{not json")
    lines.append(records[-1].to_json()[:40])  # a worker killed mid-write
    (out / "results.jsonl").write_text("\n".join(lines), encoding="utf-8")
    claims = out / "claims.toml"
    claims.write_text(CLAIMS, encoding="utf-8")
    return write_report(out, claims)


def test_corrupt_and_truncated_lines_are_skipped_and_listed(report: ReportSummary) -> None:
    assert report.records == len(study()) - 1
    skipped = [w for w in report.warnings if "skipped an unreadable record" in w]
    assert [re.search(r":(\d+): ", w).group(1) for w in skipped] == ["6", str(len(study()) + 1)]
    markdown = report.markdown.read_text(encoding="utf-8")
    assert all(w in markdown for w in skipped)


def test_only_the_reports_and_their_figures_are_left_in_the_folder(report: ReportSummary) -> None:
    folder = report.markdown.parent
    assert sorted(p.name for p in folder.iterdir()) == ["claims.toml", "figures", "report.html", "report.md", "results.jsonl"]
    figures = sorted(p.name for p in (folder / "figures").iterdir())
    assert figures and all(name.endswith(".png") for name in figures)  # no temporary files left behind
    markdown = report.markdown.read_text(encoding="utf-8")
    assert all(f"](figures/{name})" in markdown for name in figures)


def test_html_is_self_contained_with_embedded_pngs(report: ReportSummary) -> None:
    page = report.html.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 * 3 + 2  # per workload: curves, time to target, lr sensitivity; two profiles
    assert all(base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n") for data in images)


def test_workload_table_has_the_aggregates(report: ReportSummary) -> None:
    markdown = report.markdown.read_text(encoding="utf-8")
    section = markdown.split("## alpha")[1].split("## beta")[0]
    row = next(line for line in section.splitlines() if line.startswith("| fast |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "lr=0.001"
    assert cells[2] == "3"
    assert cells[3] == "0.9 ± 0"  # every seed ends at 0.9
    assert cells[5:8] == ["200 (3/3)", "200 (3/3)", "2 (3/3)"]  # medians: steps, gradient evaluations, seconds
    assert cells[8] == "final 0/3, tune 1/3"
    frozen = next(line for line in section.splitlines() if line.startswith("| frozen |"))
    assert "∞ (0/3)" in frozen  # median over seeds, none reached
    assert "0.0001: 0.9 · 0.001: 0.9 * · 0.1: diverged" in section  # sensitivity, chosen lr starred


def test_environment_and_run_dates_are_in_the_header(report: ReportSummary) -> None:
    markdown = report.markdown.read_text(encoding="utf-8")
    assert "torch: 2.x" in markdown
    assert "trials ran from 2025-01-01" in markdown


def test_claims_are_judged_in_the_report(report: ReportSummary) -> None:
    assert report.verdicts == {
        "fast-halves-steps": Verdict.HOLDS,  # median 200 vs 500
        "frozen-halves-steps": Verdict.FAILS,  # lr = 0 never reaches the target
        "fast-on-a-workload-not-run": Verdict.INCONCLUSIVE,
    }
    markdown = report.markdown.read_text(encoding="utf-8")
    claims = markdown.split("## Claims")[1]
    assert "| ✓ | fast-halves-steps" in claims and "ratio 0.4" in claims
    assert "| ✗ | frozen-halves-steps" in claims
    assert "| inconclusive | fast-on-a-workload-not-run" in claims and "charlm is not in the results" in claims


def test_lr_zero_is_unsolved_in_the_profiles(report: ReportSummary) -> None:
    for profile in report.profiles.values():
        assert profile.workloads == ("alpha", "beta")
        assert all(profile.rho("frozen", tau) == 0 for tau in (1, 2, 4, 1e9))
        assert profile.rho("fast", 1) == 1  # fastest everywhere
        assert profile.rho("torch:AdamW", 2) == 0 and profile.rho("torch:AdamW", 2.5) == 1  # 500 / 200


def test_performance_profile_on_a_hand_computed_example() -> None:
    # median steps-to-target (3 seeds, unreached = ∞):
    #        w1          w2          w3
    #   A   100         300         ∞ (1 of 3 seeds reached)
    #   B   200         100         400
    #   C   ∞ (never)   ∞ (not run) 100
    records = (
        seeds("A", [90, 100, 500], workload="w1")
        + seeds("A", [300, 300, 300], workload="w2")
        + seeds("A", [100, None, None], workload="w3")
        + seeds("B", [200, 200, 200], workload="w1")
        + seeds("B", [100, 100, 200], workload="w2")
        + seeds("B", [400, 400, 400], workload="w3")
        + seeds("C", [None, None, None], workload="w1")
        + seeds("C", [100, 100, 100], workload="w3")
    )
    profile = performance_profile(final_trials(records), ["w1", "w2", "w3"], ["A", "B", "C"], "steps_to_target")
    assert profile.times["A"] == {"w1": 100, "w2": 300, "w3": math.inf}
    assert profile.ratios["A"] == {"w1": 1, "w2": 3, "w3": math.inf}
    assert profile.ratios["B"] == {"w1": 2, "w2": 1, "w3": 4}
    assert profile.ratios["C"] == {"w1": math.inf, "w2": math.inf, "w3": 1}
    expected = {"A": (1 / 3, 1 / 3, 2 / 3), "B": (1 / 3, 2 / 3, 1), "C": (1 / 3, 1 / 3, 1 / 3)}
    for optimizer, rhos in expected.items():
        assert [profile.rho(optimizer, tau) for tau in (1, 2, 4)] == pytest.approx(rhos)
    # area on [1, 4]: Σ max(0, 4 − r) / (3 workloads × 3)
    assert profile.area("A") == pytest.approx((3 + 1) / 9)
    assert profile.area("B") == pytest.approx((2 + 3 + 0) / 9)
    assert profile.area("C") == pytest.approx(3 / 9)


def test_an_empty_profile_has_no_solved_fraction() -> None:
    assert Profile("steps_to_target", (), {}, {}).rho("A", 4) == 0


def test_a_results_file_with_nothing_readable_still_gives_a_report(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text('{"workload": "alpha"}\n{broken\n', encoding="utf-8")
    summary = write_report(tmp_path)  # the shipped claims: all inconclusive
    assert summary.records == 0 and len(summary.warnings) == 2
    assert summary.claims and set(summary.verdicts.values()) == {Verdict.INCONCLUSIVE}
    assert "skipped an unreadable record" in summary.html.read_text(encoding="utf-8")


def test_problems_in_the_inputs_become_warnings(tmp_path: Path) -> None:
    loss = {"workload": "bowl", "metric": "loss", "higher_is_better": False, "target": 1e-3}
    records = [trial("fast", s, [1.0, 1e-2, 1e-4], **loss) for s in (1, 2, 3)]
    records += [records[0], trial("fast", 4, [1.0], phase="smoke", **loss)]  # a repeated trial, an unknown phase
    records.append(replace(trial("slow", 1, [1.0], **loss), status="error", error="RuntimeError: boom"))
    write_results(tmp_path, records)
    (tmp_path / "claims.toml").write_text('[[claim]]\nid = "x"\n', encoding="utf-8")
    summary = write_report(tmp_path, tmp_path / "claims.toml")
    assert summary.claims == ()
    warnings = "\n".join(summary.warnings)
    assert "claims not judged" in warnings and "missing keys" in warnings
    assert "1 repeated trial records" in warnings
    assert "1 records with a phase other than" in warnings
    assert "bowl / slow: 1 final trial(s) ended in an error" in warnings and "RuntimeError: boom" in warnings
    assert summary.profiles["steps_to_target"].times["fast"] == {"bowl": 300}
    assert "slow" not in summary.profiles["steps_to_target"].times


def test_a_missing_results_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="results.jsonl"):
        write_report(tmp_path)
