"""The bench report: ``report.md`` and a self-contained ``report.html`` from a folder's ``results.jsonl``.

Definitions used in every table and figure:

- A trial is *finished* when its status is "ok" or "diverged". "error" trials are broken runs: they are listed
  as warnings and left out of every number. Lines of ``results.jsonl`` that do not parse are skipped and listed.
- *Time-to-target* of a trial (in steps, gradient evaluations or seconds) is what the runner recorded: the first
  evaluation at which the validation metric reached the workload's target; ∞ when it never did.
- An optimizer *solves* a workload when the median of the time-to-target over its finished final seeds is finite
  (unreached and diverged seeds count as ∞, so strictly more than half of the seeds must reach the target).
  An optimizer without finished final trials on a workload does not solve it.
- *Performance profile* (Dolan & Moré 2002, as used by AlgoPerf, Dahl et al. 2023): over the workloads W that
  have final trials, t[w, o] is that median, r[w, o] = t[w, o] / min over o' of t[w, o'] (∞ when unsolved), and
  ρ_o(τ) = |{w : r[w, o] ≤ τ}| / |W|. ρ_o(1) is the fraction of workloads where o is fastest; ρ_o(τ) for large τ
  is the fraction it solves at all.
- *Profile area* (AlgoPerf's score): (1 / (τ_max − 1)) ∫_1^τ_max ρ_o(τ) dτ with τ_max = 4, which for this step
  function equals Σ_w max(0, τ_max − r[w, o]) / (|W| (τ_max − 1)): 1 means fastest everywhere, 0 means never
  within 4× of the fastest.
- Final validation and test metrics are mean ± sample standard deviation over the "ok" final seeds (diverged
  seeds are counted in their own column). The learning-rate sensitivity is the tune phase's final validation
  metric, averaged over the tune seeds of each learning rate.

Figures are PNGs drawn with matplotlib's Agg renderer (no pyplot, no global backend state) and embedded in the
HTML as base64 data; the Markdown names them and points to the HTML. Both files are written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from optimlab.bench._files import write_atomic
from optimlab.bench.claims import (
    Claim,
    ClaimResult,
    ClaimsFileError,
    Verdict,
    describe_rule,
    evaluate_claim,
    final_trials,
    format_number,
    load_claims,
    time_ratio,
    time_to_target,
)
from optimlab.bench.records import TrialRecord, read_jsonl

__all__ = [
    "PROFILE_METRICS",
    "PROFILE_TAUS",
    "TAU_MAX",
    "Profile",
    "ReportSummary",
    "performance_profile",
    "write_report",
]

PROFILE_METRICS = ("steps_to_target", "seconds_to_target")
PROFILE_TAUS = (1.0, 2.0, 4.0)
TAU_MAX = 4.0
_TIME_COLUMNS = {"steps_to_target": "steps", "grad_evals_to_target": "grad evals", "seconds_to_target": "seconds"}

Index = Mapping[tuple[str, str], Mapping[int, TrialRecord]]


# ------------------------------------------------------------------------------------------------------ the summary


@dataclass(frozen=True)
class Profile:
    """A performance profile for one time measure (definitions in the module docstring)."""

    metric: str
    workloads: tuple[str, ...]
    times: Mapping[str, Mapping[str, float]]  # optimizer -> workload -> median time-to-target (∞: unsolved)
    ratios: Mapping[str, Mapping[str, float]]  # optimizer -> workload -> r[w, o]

    def rho(self, optimizer: str, tau: float) -> float:
        """Fraction of the workloads that ``optimizer`` solves within ``tau`` × the fastest optimizer's time."""
        if not self.workloads:
            return 0.0
        return sum(self.ratios[optimizer][w] <= tau for w in self.workloads) / len(self.workloads)

    def area(self, optimizer: str, tau_max: float = TAU_MAX) -> float:
        """The normalised area under ρ on [1, tau_max] (exact for the step function)."""
        if not self.workloads:
            return 0.0
        total = sum(max(0.0, tau_max - self.ratios[optimizer][w]) for w in self.workloads)
        return total / (len(self.workloads) * (tau_max - 1))


@dataclass(frozen=True)
class ReportSummary:
    """What a report says, for tests and callers: where it is, the warnings, the profiles and the verdicts."""

    markdown: Path
    html: Path
    records: int
    warnings: tuple[str, ...]
    workloads: tuple[str, ...]
    optimizers: tuple[str, ...]
    claims: tuple[ClaimResult, ...]
    profiles: Mapping[str, Profile] = field(default_factory=dict)

    @property
    def verdicts(self) -> dict[str, Verdict]:
        return {result.claim.id: result.verdict for result in self.claims}


# ---------------------------------------------------------------------------------------------------------- loading


def _load(path: Path) -> tuple[list[TrialRecord], list[str]]:
    """Readable records (the last of each trial key) and warnings for everything left out."""
    records, warnings = read_jsonl(path)
    latest = {record.key: record for record in records}
    if len(latest) < len(records):
        warnings.append(f"{len(records) - len(latest)} repeated trial records (same trial key): kept the last of each")
    kept = [r for r in latest.values() if r.phase in ("tune", "final")]
    if len(kept) < len(latest):
        warnings.append(f"{len(latest) - len(kept)} records with a phase other than 'tune' or 'final' were ignored")
    warnings += _error_trials(kept) + _mixed_final_hparams(kept)
    return kept, warnings


def _error_trials(records: Iterable[TrialRecord]) -> list[str]:
    """One warning per (workload, optimizer, phase) with error trials, quoting the first error."""
    errors: dict[tuple[str, str, str], list[TrialRecord]] = {}
    for r in records:
        if r.status == "error":
            errors.setdefault((r.workload, r.optimizer, r.phase), []).append(r)
    return [
        f"{w} / {o}: {len(rs)} {phase} trial(s) ended in an error and are left out (first: {rs[0].error})"
        for (w, o, phase), rs in sorted(errors.items())
    ]


def _mixed_final_hparams(records: Iterable[TrialRecord]) -> list[str]:
    """Final trials of one (workload, optimizer) should share one set of hyperparameters."""
    seen: dict[tuple[str, str], set[str]] = {}
    for r in records:
        if r.phase == "final":
            seen.setdefault((r.workload, r.optimizer), set()).add(_hparams(r.hparams))
    return [
        f"{w} / {o}: final trials with several hyperparameter sets ({'; '.join(sorted(h))}); seeds are pooled"
        for (w, o), h in sorted(seen.items())
        if len(h) > 1
    ]


# ------------------------------------------------------------------------------------------------------- statistics


def _hparams(hparams: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(hparams.items())) or "—"


def _optimizer_order(name: str) -> tuple[bool, str]:
    """Baselines (torch's optimizers) first, then the rest by name."""
    return (not name.startswith("torch:"), name)


def _mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{format_number(values[0])} (1 seed)"
    return f"{format_number(statistics.fmean(values))} ± {statistics.stdev(values):.2g}"


def median_time(trials: Iterable[TrialRecord], metric: str) -> float:
    """Median time-to-target over trials, unreached = ∞ (∞ also when there are no trials)."""
    times = [time_to_target(t, metric) for t in trials]
    return statistics.median(times) if times else math.inf


def _time_cell(trials: Sequence[TrialRecord], metric: str) -> str:
    if not trials:
        return "—"
    reached = sum(math.isfinite(time_to_target(t, metric)) for t in trials)
    return f"{format_number(median_time(trials, metric))} ({reached}/{len(trials)})"


def _tune_by_lr(tune: Iterable[TrialRecord]) -> dict[float, list[TrialRecord]]:
    by_lr: dict[float, list[TrialRecord]] = {}
    for r in tune:
        if "lr" in r.hparams and r.status != "error":
            by_lr.setdefault(float(r.hparams["lr"]), []).append(r)
    return dict(sorted(by_lr.items()))


def _tune_value(trials: Sequence[TrialRecord]) -> float:
    """Mean final validation metric of the ok trials at one learning rate; nan if all diverged."""
    values = [
        r.final_val for r in trials if r.status == "ok" and r.final_val is not None and math.isfinite(r.final_val)
    ]
    return statistics.fmean(values) if values else math.nan


# --------------------------------------------------------------------------------------------- performance profile


def performance_profile(index: Index, workloads: Sequence[str], optimizers: Sequence[str], metric: str) -> Profile:
    """The performance profile of ``optimizers`` over ``workloads`` for one time-to-target ``metric``."""
    times = {o: {w: median_time(index.get((w, o), {}).values(), metric) for w in workloads} for o in optimizers}
    best = {w: min((times[o][w] for o in optimizers), default=math.inf) for w in workloads}
    ratios = {
        o: {w: math.inf if math.isinf(times[o][w]) else time_ratio(times[o][w], best[w]) for w in workloads}
        for o in optimizers
    }
    return Profile(metric, tuple(workloads), times, ratios)


# --------------------------------------------------------------------------------------------------------- figures


def _figure(width: float = 6.4, height: float = 3.4):
    from matplotlib.figure import Figure  # lazily: matplotlib is needed only to write a report

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _colors(optimizers: Sequence[str]) -> dict[str, str]:
    """One colour per optimizer, the same in every figure."""
    palette = [f"C{i}" for i in range(10)]
    return {o: palette[i % len(palette)] for i, o in enumerate(optimizers)}


def _value_axis(ax, higher_is_better: bool) -> None:
    """Losses (lower is better, positive) span decades: show them on a log scale."""
    low = min((y for line in ax.get_lines() for y in line.get_ydata()), default=0.0)
    if not higher_is_better and low > 0:
        ax.set_yscale("log")


def _seed_band(trials: Iterable[TrialRecord]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Steps and the mean, min and max validation metric across seeds at each evaluation step."""
    at_step: dict[float, list[float]] = {}
    for t in trials:
        for step, value in zip(t.curve.get("step", []), t.curve.get("val_metric", [])):
            if value is not None and math.isfinite(value):
                at_step.setdefault(step, []).append(value)
    steps = sorted(at_step)
    return (
        steps,
        [statistics.fmean(at_step[s]) for s in steps],
        [min(at_step[s]) for s in steps],
        [max(at_step[s]) for s in steps],
    )


def _curves_png(first: TrialRecord, finals: Mapping[str, Sequence[TrialRecord]], colors) -> bytes:
    workload, metric, target = first.workload, first.metric, first.target
    fig = _figure()
    ax = fig.subplots()
    for optimizer, trials in finals.items():
        steps, mean, low, high = _seed_band(trials)
        if steps:
            ax.plot(steps, mean, color=colors[optimizer], label=optimizer)
            ax.fill_between(steps, low, high, color=colors[optimizer], alpha=0.2, linewidth=0)
    ax.axhline(target, color="black", linestyle="--", linewidth=1, label="target")
    ax.set(xlabel="step", ylabel=f"validation {metric}", title=f"{workload}: mean and min–max over final seeds")
    _value_axis(ax, first.higher_is_better)
    ax.legend(fontsize="small")
    return _png(fig)


def _target_bars_png(workload: str, finals: Mapping[str, Sequence[TrialRecord]], colors) -> bytes:
    fig = _figure(height=0.6 + 0.45 * max(2, len(finals)))
    names = list(finals)
    for ax, metric in zip(fig.subplots(1, 2), ("steps_to_target", "seconds_to_target")):
        for y, optimizer in enumerate(names):
            median = median_time(finals[optimizer], metric)
            seeds = [time_to_target(t, metric) for t in finals[optimizer]]
            if math.isfinite(median):
                ax.barh(y, median, color=colors[optimizer], alpha=0.7)
            else:
                ax.text(0, y, " not reached (median)", va="center", fontsize="small")
            ax.plot([s for s in seeds if math.isfinite(s)], [y] * sum(map(math.isfinite, seeds)), "k.", markersize=4)
        ax.set_yticks(range(len(names)), names, fontsize="small")
        ax.set_ylim(-0.6, len(names) - 0.4)
        ax.set_xlabel(f"{_TIME_COLUMNS[metric]} to target (bar: median, dots: seeds)")
    fig.suptitle(f"{workload}: time to target")
    return _png(fig)


def _lr_png(first: TrialRecord, tune: Mapping[str, Sequence[TrialRecord]], colors) -> bytes:
    from matplotlib.transforms import blended_transform_factory

    workload, metric, target = first.workload, first.metric, first.target
    fig = _figure()
    ax = fig.subplots()
    bottom = blended_transform_factory(ax.transData, ax.transAxes)
    for optimizer, trials in tune.items():
        by_lr = _tune_by_lr(trials)
        values = {lr: _tune_value(ts) for lr, ts in by_lr.items()}
        finite = {lr: v for lr, v in values.items() if not math.isnan(v)}
        ax.plot(list(finite), list(finite.values()), "o-", color=colors[optimizer], label=optimizer, markersize=4)
        diverged = [lr for lr, v in values.items() if math.isnan(v)]
        ax.plot(diverged, [0.02] * len(diverged), "x", color=colors[optimizer], transform=bottom)
    ax.axhline(target, color="black", linestyle="--", linewidth=1, label="target")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel=f"final validation {metric}", title=f"{workload}: tuning (x: diverged)")
    _value_axis(ax, first.higher_is_better)
    ax.legend(fontsize="small")
    return _png(fig)


def _profile_png(profile: Profile, colors) -> bytes:
    from matplotlib.ticker import FormatStrFormatter

    finite = [r for rs in profile.ratios.values() for r in rs.values() if math.isfinite(r)]
    tau_end = max([TAU_MAX, *finite]) * 1.1
    fig = _figure()
    ax = fig.subplots()
    for optimizer in profile.ratios:
        taus = sorted({1.0, tau_end, *(r for r in profile.ratios[optimizer].values() if math.isfinite(r))})
        ax.step(taus, [profile.rho(optimizer, t) for t in taus], where="post", color=colors[optimizer], label=optimizer)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_ylim(-0.02, 1.02)
    name = _TIME_COLUMNS[profile.metric]
    ax.set(xlabel=f"τ (× the fastest optimizer's {name} to target)", ylabel="fraction of workloads solved")
    ax.set_title(f"Performance profile: {name}")
    ax.legend(fontsize="small")
    return _png(fig)


# ------------------------------------------------------------------------------------------------ document blocks


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Items:
    items: Sequence[str]


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclass(frozen=True)
class Image:
    caption: str
    png: bytes


Block = Heading | Text | Items | Table | Image


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Iterable[Block], figure_files: Mapping[int, str] | None = None) -> str:
    """Markdown of the blocks; ``figure_files`` maps an image block's position to the PNG file it was saved as."""
    out: list[str] = []
    for position, block in enumerate(blocks):
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            out.append(block.text)
        elif isinstance(block, Items):
            out.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            lines = [block.header, ["---"] * len(block.header), *block.rows]
            out.append("\n".join("| " + " | ".join(map(_md_cell, line)) + " |" for line in lines))
        elif isinstance(block, Image) and figure_files and position in figure_files:
            out.append(f"![{_md_cell(block.caption)}]({figure_files[position]})")
        elif isinstance(block, Image):
            out.append(f"*Figure: {block.caption} (embedded in report.html).*")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure { margin: 1rem 0; } img { max-width: 100%; } figcaption { font-size: 0.85rem; color: #555; }
"""


def _html_block(block: Block) -> str:
    e = html.escape
    if isinstance(block, Heading):
        return f"<h{block.level}>{e(block.text)}</h{block.level}>"
    if isinstance(block, Text):
        return f"<p>{e(block.text)}</p>"
    if isinstance(block, Items):
        return "<ul>" + "".join(f"<li>{e(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        head = "".join(f"<th>{e(h)}</th>" for h in block.header)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    data = base64.b64encode(block.png).decode("ascii")
    caption = e(block.caption)
    return (
        f'<figure><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'
    )


def render_html(blocks: Iterable[Block], title: str) -> str:
    """A standalone page: inline CSS, images as data URIs, no scripts and no external references."""
    body = "\n".join(map(_html_block, blocks))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


# -------------------------------------------------------------------------------------------------------- sections


_TIMESTAMPS = ("started", "finished")  # per-trial env stamps, shown as the run's time span


def _environment(records: Sequence[TrialRecord], shown: int = 3) -> list[str]:
    """The run's time span, then the distinct values of every other (flattened) ``record.env`` key."""
    stamps = sorted(str(r.env[k]) for r in records for k in _TIMESTAMPS if r.env.get(k))
    lines = [f"trials ran from {stamps[0]} to {stamps[-1]}"] if stamps else []
    values: dict[str, Counter] = {}
    for r in records:
        for key, value in r.env.items():
            flat = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in flat:
                if key not in _TIMESTAMPS:
                    values.setdefault(key if sub is None else f"{key}.{sub}", Counter())[str(v)] += 1
    for key, counter in sorted(values.items()):
        distinct = [v for v, _ in counter.most_common()]
        more = f" (+{len(distinct) - shown} more)" if len(distinct) > shown else ""
        lines.append(f"{key}: {'; '.join(distinct[:shown])}{more}")
    return lines


def _header(records: Sequence[TrialRecord], warnings: Sequence[str], source: Path) -> list[Block]:
    counts = Counter((r.phase, r.status) for r in records)
    trials = ", ".join(f"{phase} {status}: {n}" for (phase, status), n in sorted(counts.items())) or "none"
    seeds = sorted({r.seed for r in records if r.phase == "final"})
    run = [
        ["workloads", ", ".join(sorted({r.workload for r in records})) or "—"],
        ["optimizers", ", ".join(sorted({r.optimizer for r in records}, key=_optimizer_order)) or "—"],
        ["final seeds", ", ".join(map(str, seeds)) or "—"],
        ["trials", trials],
    ]
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    blocks: list[Block] = [
        Heading("optimlab bench report", 1),
        Text(f"Generated {date} from {source} ({len(records)} trial records)."),
        Heading("Run"),
        Table(["what was run", ""], run),
    ]
    environment = _environment(records)
    if environment:
        blocks += [Heading("Environment", 3), Items(environment)]
    blocks += [Heading("Warnings", 3), Items(list(warnings)) if warnings else Text("None.")]
    return blocks


def _row(
    optimizer: str, metric: str, finals: Sequence[TrialRecord], tune: Sequence[TrialRecord], errors: int
) -> list[str]:
    ok = [t for t in finals if t.status == "ok"]
    chosen = sorted({_hparams(t.hparams) for t in finals})
    tune_diverged = sum(t.status == "diverged" for t in tune)
    seeds = f"{len(finals)}" + (f" (+{errors} error)" if errors else "")
    return [
        optimizer,
        "; ".join(chosen) or "— (no final trials)",
        seeds,
        _mean_std([t.final_val for t in ok]),
        _mean_std([t.test.get(metric) for t in ok]),
        *(_time_cell(finals, m) for m in _TIME_COLUMNS),
        f"final {sum(t.status == 'diverged' for t in finals)}/{len(finals)}, tune {tune_diverged}/{len(tune)}",
    ]


def _sensitivity_row(optimizer: str, tune: Sequence[TrialRecord], finals: Sequence[TrialRecord]) -> list[str]:
    chosen = {float(t.hparams["lr"]) for t in finals if "lr" in t.hparams}
    cells = []
    for lr, trials in _tune_by_lr(tune).items():
        value = _tune_value(trials)
        shown = "diverged" if math.isnan(value) else format_number(value)
        cells.append(f"{lr:g}: {shown}{' *' if lr in chosen else ''}")
    return [optimizer, " · ".join(cells) or "—"]


def _trials(records: Iterable[TrialRecord], optimizer: str, phase: str, *, errors: bool = False) -> list[TrialRecord]:
    """One optimizer's trials of one phase: the finished ones, or (``errors=True``) the failed ones."""
    return [r for r in records if r.optimizer == optimizer and r.phase == phase and (r.status == "error") == errors]


def _workload_section(workload: str, records: Sequence[TrialRecord], colors) -> list[Block]:
    first = records[0]
    optimizers = sorted({r.optimizer for r in records}, key=_optimizer_order)
    finals = {o: _trials(records, o, "final") for o in optimizers}
    tune = {o: _trials(records, o, "tune") for o in optimizers}
    errors = {o: len(_trials(records, o, "final", errors=True)) for o in optimizers}
    direction = "higher" if first.higher_is_better else "lower"
    header = ["optimizer", "chosen hyperparameters", "final seeds", f"val {first.metric}", f"test {first.metric}"]
    header += [f"{name} → target: median (reached)" for name in _TIME_COLUMNS.values()] + ["diverged"]
    blocks: list[Block] = [
        Heading(workload),
        Text(f"Metric: validation {first.metric} ({direction} is better), target {first.target:g}."),
        Table(header, [_row(o, first.metric, finals[o], tune[o], errors[o]) for o in optimizers]),
    ]
    with_finals = {o: ts for o, ts in finals.items() if ts}
    if with_finals:
        blocks += [
            Image(f"{workload}: validation {first.metric} vs step", _curves_png(first, with_finals, colors)),
            Image(f"{workload}: time to target", _target_bars_png(workload, with_finals, colors)),
        ]
    with_tune = {o: ts for o, ts in tune.items() if _tune_by_lr(ts)}
    if with_tune:
        blocks += [
            Heading("Learning-rate sensitivity (tune phase)", 3),
            Text(f"Final validation {first.metric} per learning rate, mean over tune seeds; * marks the chosen one."),
            Table(
                ["optimizer", "learning rate: value"],
                [_sensitivity_row(o, ts, finals[o]) for o, ts in with_tune.items()],
            ),
            Image(f"{workload}: learning-rate sensitivity", _lr_png(first, with_tune, colors)),
        ]
    return blocks


def _profile_section(profiles: Mapping[str, Profile], colors) -> list[Block]:
    blocks: list[Block] = [
        Heading("Performance profiles"),
        Text(
            "An optimizer solves a workload when its median time-to-target over the final seeds is finite "
            "(unreached seeds count as ∞). ρ(τ) is the fraction of workloads it solves within τ × the fastest "
            f"optimizer's median on that workload; the area is the mean of ρ over τ in [1, {TAU_MAX:g}] (1 = "
            "fastest everywhere). Seconds depend on the machine and its load."
        ),
    ]
    for metric, profile in profiles.items():
        if not profile.workloads:
            continue
        header = ["optimizer", *(f"ρ({tau:g})" for tau in PROFILE_TAUS), f"area τ ≤ {TAU_MAX:g}", "unsolved"]
        rows = [
            [
                o,
                *(f"{profile.rho(o, tau):.2f}" for tau in PROFILE_TAUS),
                f"{profile.area(o):.2f}",
                ", ".join(w for w in profile.workloads if math.isinf(profile.ratios[o][w])) or "—",
            ]
            for o in profile.ratios
        ]
        blocks += [
            Heading(_TIME_COLUMNS[metric], 3),
            Table(header, rows),
            Image(f"performance profile ({_TIME_COLUMNS[metric]})", _profile_png(profile, colors)),
        ]
    return blocks


def _claims_section(results: Sequence[ClaimResult], claims_file: str, problem: str | None) -> list[Block]:
    blocks: list[Block] = [
        Heading("Claims"),
        Text(
            f"Each claim was written as a predicate before the run ({claims_file}): ✓ holds, ✗ fails, "
            "inconclusive when seeds are missing, an optimizer or workload was not run, or the seeds disagree."
        ),
    ]
    if problem:
        blocks.append(Text(f"The claims file could not be read: {problem}"))
    rows = [
        [
            r.verdict.symbol,
            f"{r.claim.id}: {r.claim.statement}",
            r.measured
            if r.verdict is not Verdict.INCONCLUSIVE or r.reason == r.measured
            else f"{r.measured} ({r.reason})",
            describe_rule(r.claim),
            f"{r.claim.paper} (arXiv {r.claim.arxiv}); {r.claim.source}",
        ]
        for r in results
    ]
    if rows:
        blocks.append(Table(["verdict", "claim", "measured", "rule", "paper"], rows))
    return blocks


# ------------------------------------------------------------------------------------------------------- the report


def _save_figures(blocks: Sequence[Block], folder: Path) -> dict[int, str]:
    """Each figure as a PNG file (for report.md and for reuse), named after its position and caption."""
    files = {}
    for position, block in enumerate(blocks):
        if isinstance(block, Image):
            slug = re.sub(r"[^a-z0-9]+", "-", block.caption.lower()).strip("-")[:60]
            name = f"{len(files) + 1:02d}-{slug}.png"
            write_atomic(folder / name, lambda f, png=block.png: f.write(png), binary=True)
            files[position] = f"{folder.name}/{name}"
    return files


def _claims(claims_path: Path | None) -> tuple[list[Claim], str | None]:
    """The claims to judge, or none and the reason when the file is malformed (the report is written anyway)."""
    try:
        return load_claims(claims_path), None
    except (ClaimsFileError, OSError) as err:
        return [], str(err)


def write_report(out_dir: Path, claims_path: Path | None = None) -> ReportSummary:
    """Write ``out_dir/report.md`` and ``out_dir/report.html`` from ``out_dir/results.jsonl``.

    ``claims_path`` defaults to the claims shipped with the package. Unreadable result lines and a malformed
    claims file become warnings in the report; only a missing results file is an error.
    """
    out_dir = Path(out_dir)
    source = out_dir / "results.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"no results to report: {source} does not exist")
    records, warnings = _load(source)
    index = final_trials(records)
    workloads = sorted({r.workload for r in records})
    optimizers = sorted({r.optimizer for r in records}, key=_optimizer_order)
    colors = _colors(optimizers)
    finished_workloads = sorted({w for w, _ in index})
    profiled = sorted({o for _, o in index}, key=_optimizer_order)
    profiles = {m: performance_profile(index, finished_workloads, profiled, m) for m in PROFILE_METRICS}
    claims, problem = _claims(claims_path)
    if problem:
        warnings.append(f"claims not judged: {problem}")
    results = [evaluate_claim(claim, index) for claim in claims]

    blocks = _header(records, warnings, source)
    for workload in workloads:
        blocks += _workload_section(workload, [r for r in records if r.workload == workload], colors)
    blocks += _profile_section(profiles, colors)
    blocks += _claims_section(results, str(claims_path or "the claims shipped in optimlab/bench/claims.toml"), problem)

    markdown, page = out_dir / "report.md", out_dir / "report.html"
    figure_files = _save_figures(blocks, out_dir / "figures")
    write_atomic(markdown, lambda f: f.write(render_markdown(blocks, figure_files)))
    write_atomic(page, lambda f: f.write(render_html(blocks, f"optimlab bench report: {out_dir.name}")))
    return ReportSummary(
        markdown, page, len(records), tuple(warnings), tuple(workloads), tuple(optimizers), tuple(results), profiles
    )
