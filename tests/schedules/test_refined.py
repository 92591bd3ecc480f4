"""The refined schedule (arXiv 2310.07831): closed forms, the properties the paper states, and agreement with a
direct NumPy/SciPy transcription of the official pipeline (visual.py + find_schedule.py)."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch

from optimlab.schedules import (
    RefinedLR,
    closed_form_schedule,
    linear_decay,
    load_schedule,
    median_filter,
    refine,
    refine_details,
    resample_linear,
    save_schedule,
    smooth_norms,
)
from optimlab.schedules.refined import _reflect_end


def _linear(total: int) -> torch.Tensor:
    return torch.tensor([(total - 1 - t) / (total - 1) for t in range(total)], dtype=torch.float64)


def _random_log(n: int, seed: int) -> torch.Tensor:
    """A positive, noisy, drifting gradient-norm log."""
    g = torch.Generator().manual_seed(seed)
    drift = torch.randn(n, generator=g, dtype=torch.float64).cumsum(0) / math.sqrt(n)
    return (drift + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).exp()


@pytest.mark.parametrize(
    "norm, length, steps", [("l1", 40, None), ("l2", 3000, None), ("l1", 12_000, None), ("l2", 500, 77)]
)
def test_constant_norms_give_exactly_linear_decay(norm: str, length: int, steps: int | None) -> None:
    multipliers = refine([0.37] * length, norm=norm, steps=steps)
    total = steps or length
    torch.testing.assert_close(multipliers, _linear(total), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed, norm", [(0, "l1"), (1, "l2"), (2, "l1")])
def test_output_is_nonnegative_with_peak_one_and_last_zero(seed: int, norm: str) -> None:
    norms = _random_log(800 + 300 * seed, seed)
    multipliers = refine(norms, norm=norm, steps=257 + seed)
    assert multipliers.dtype == torch.float64 and multipliers.shape == (257 + seed,)
    assert bool((multipliers >= 0).all())
    assert multipliers.max().item() == 1.0
    assert multipliers[-1].item() == 0.0


def test_large_early_norms_give_an_emergent_warmup() -> None:
    # w = G^-p is small where G is large, so a run whose gradients start large starts with small steps: the
    # warm-up of the paper's ViT and RoBERTa schedules. (Small early norms do the opposite: no warm-up.)
    steps = 1000
    early_large = torch.cat([torch.linspace(20.0, 1.0, 200), torch.ones(800)]).double()
    multipliers = refine(early_large, norm="l1")
    peak = int(multipliers.argmax())
    assert peak > 20
    assert bool((multipliers[1 : peak + 1] >= multipliers[:peak]).all())  # it rises to the peak
    assert multipliers[0] < 0.5
    early_small = torch.cat([torch.linspace(0.05, 1.0, 200), torch.ones(800)]).double()
    assert refine(early_small, norm="l1")[0].item() == 1.0
    assert int(refine(early_small, norm="l1", steps=steps).argmax()) == 0


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_rising_late_norms_anneal_earlier_than_linear_decay(norm: str) -> None:
    steps = 2000
    late_rise = torch.cat([torch.ones(1000), torch.linspace(1.0, 8.0, 1000)]).double()
    multipliers = refine(late_rise, norm=norm)
    linear = _linear(steps)
    late = slice(1100, steps - 1)
    assert bool((multipliers[late] < linear[late]).all())
    assert multipliers[1500] < 0.6 * linear[1500]


def test_non_finite_values_are_dropped_before_the_ends_are_trimmed() -> None:
    clean = _random_log(600, 7)
    dirty = clean.clone()
    for position, value in [(0, math.nan), (3, math.inf), (250, -math.inf), (251, math.nan), (599, math.inf)]:
        dirty = torch.cat([dirty[:position], torch.tensor([value], dtype=torch.float64), dirty[position:]])
    torch.testing.assert_close(refine(dirty, norm="l2", steps=300), refine(clean, norm="l2", steps=300), rtol=0, atol=0)


@pytest.mark.parametrize(
    "norms, kwargs, message",
    [
        ([], {}, "Invalid norms"),
        ([1.0] * 5, {}, "at least 6 finite"),
        ([math.nan] * 20, {}, "at least 6 finite"),
        ([1.0] * 10 + [0.0] + [1.0] * 10, {}, "must be positive"),
        ([1.0] * 10 + [-2.0] + [1.0] * 10, {}, "must be positive"),
        ([[1.0, 2.0]] * 10, {}, "1-D"),
        ([1.0] * 20, {"tau": 0.0}, "Invalid tau"),
        ([1.0] * 20, {"tau": -0.1}, "Invalid tau"),
        ([1.0] * 20, {"tau": 1.5}, "Invalid tau"),
        ([1.0] * 20, {"steps": 1}, "Invalid steps"),
        ([1.0] * 20, {"norm": "l3"}, "Invalid norm"),
        ([1.0] * 20, {"grid": 1}, "Invalid grid"),
        ([1.0] * 20, {"trim": -1}, "Invalid trim"),
    ],
)
def test_bad_input_is_a_value_error(norms, kwargs, message: str) -> None:
    kwargs = {"norm": "l2", **kwargs}
    with pytest.raises(ValueError, match=message):
        refine(norms, **kwargs)


@pytest.mark.parametrize("width", [0, -3, 4, 2.0, True])
def test_median_filter_rejects_bad_widths(width) -> None:
    with pytest.raises(ValueError, match="Invalid width"):
        median_filter(torch.ones(5, dtype=torch.float64), width)


@pytest.mark.parametrize("width", [1, 3, 5, 9, 31])
def test_median_filter_matches_a_direct_median_with_nearest_boundary(width: int) -> None:
    values = torch.randn(23, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    half, n = width // 2, len(values)
    direct = [
        statistics.median(values[min(max(j, 0), n - 1)].item() for j in range(i - half, i + half + 1)) for i in range(n)
    ]
    assert median_filter(values, width).tolist() == direct


@pytest.mark.parametrize("n, count", [(2, 7), (3, 5), (5, 17), (10, 40), (50, 3)])
def test_end_reflection_matches_numpy_reflect_padding(n: int, count: int) -> None:
    values = torch.arange(1.0, n + 1, dtype=torch.float64)
    expected = np.pad(values.numpy(), (0, count), mode="reflect")
    assert _reflect_end(values, count).tolist() == expected.tolist()


@pytest.mark.parametrize("n, length", [(2, 9), (7, 3), (10, 10), (101, 1000), (1000, 37), (5, 1), (1, 4)])
def test_resampling_matches_numpy_interp(n: int, length: int) -> None:
    values = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    expected = np.interp(np.linspace(0, 1, length), np.linspace(0, 1, n), values.numpy())
    np.testing.assert_allclose(resample_linear(values, length).numpy(), expected, rtol=0, atol=1e-12)


def test_closed_form_matches_the_direct_sum() -> None:
    smoothed = torch.rand(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.2
    for norm, power in (("l1", -1), ("l2", -2)):
        w = smoothed.pow(power).tolist()
        direct = torch.tensor([w[t] * sum(w[t + 1 :]) for t in range(30)], dtype=torch.float64)
        torch.testing.assert_close(closed_form_schedule(smoothed, norm=norm), direct / direct.max(), rtol=1e-13, atol=0)


def _official_pipeline(norms: np.ndarray, exponent: float, tau: float = 0.1, grid: int = 10_000) -> np.ndarray:
    """visual.py's steps, transcribed with NumPy/SciPy: drop inf, trim 2 at each end, resample a short log to
    the grid, reflect-pad the end by 2w, median-filter ('nearest'), cut, resample to the grid, closed form."""
    from scipy.ndimage import median_filter as scipy_median

    g = norms[~np.isinf(norms)][2:-2]
    if len(g) < grid:
        g = np.interp(np.linspace(0, 1, grid), np.linspace(0, 1, len(g)), g)
    width = 2 * (int(tau * grid) // 2) + 1
    filtered = scipy_median(np.pad(g, (0, 2 * width), mode="reflect"), size=width, mode="nearest")[: -2 * width]
    smoothed = np.interp(np.linspace(0, 1, grid), np.linspace(0, 1, len(g)), filtered)
    weights = smoothed**exponent
    tail = np.flip(np.cumsum(np.flip(weights)))
    schedule = np.append(weights[:-1] * tail[1:] / tail[-1], 0.0)
    return schedule / schedule.max()


@pytest.mark.parametrize("length, tau, norm", [(3000, 0.1, "l1"), (14_000, 0.1, "l2"), (5000, 0.03, "l1")])
def test_agrees_with_the_official_pipeline(length: int, tau: float, norm: str) -> None:
    pytest.importorskip("scipy")
    norms = _random_log(length, length).numpy()
    norms[[5, 1234]] = np.inf
    details = refine_details(norms, norm=norm, steps=10_000, tau=tau)
    expected = _official_pipeline(norms, -1.0 if norm == "l1" else -2.0, tau)
    np.testing.assert_allclose(details.grid_schedule.numpy(), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(details.multipliers.numpy(), expected, rtol=0, atol=1e-12)


def test_smoothing_uses_the_grid_width_even_for_long_logs() -> None:
    # a spike of 2 % of a long log survives a median filter 1001 wide only if it is wider than 500 points
    norms = torch.ones(50_000, dtype=torch.float64)
    norms[20_000:21_000] = 10.0  # 1000 points: wider than half the window, kept
    norms[40_000:40_400] = 10.0  # 400 points: narrower than half the window, removed
    smoothed = smooth_norms(norms)
    assert smoothed.shape == (10_000,)
    assert smoothed[4100].item() == 10.0 and smoothed[8040].item() == 1.0


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [{"params": [torch.zeros(2, requires_grad=True)]}, {"params": [torch.zeros(1, requires_grad=True)], "lr": 3.0}],
        lr=0.2,
        momentum=0.9,
    )


def test_refined_lr_follows_the_multipliers_and_holds_the_last() -> None:
    multipliers = refine(_random_log(40, 1), norm="l1", steps=12)
    opt = _optimizer()
    sched = RefinedLR(opt, multipliers)
    for k in range(15):
        m = multipliers[min(k, 11)].item()
        assert [g["lr"] for g in opt.param_groups] == [0.2 * m, 3.0 * m]
        opt.step()
        sched.step()


def test_refined_lr_state_dict_round_trip(tmp_path) -> None:
    multipliers = refine(_random_log(60, 2), norm="l2", steps=20)
    opt = _optimizer()
    sched = RefinedLR(opt, multipliers)
    for _ in range(5):
        opt.step()
        sched.step()
    torch.save(sched.state_dict(), tmp_path / "s")
    opt2 = _optimizer()
    sched2 = RefinedLR(opt2, [1.0])
    sched2.load_state_dict(torch.load(tmp_path / "s", weights_only=True))
    opt2.load_state_dict(opt.state_dict())
    for _ in range(20):
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("bad", [[], [1.0, -0.1], [1.0, math.nan], [[1.0]]])
def test_refined_lr_rejects_bad_multipliers(bad) -> None:
    with pytest.raises(ValueError, match="Invalid multipliers"):
        RefinedLR(_optimizer(), bad)


def test_schedule_file_round_trip_is_exact(tmp_path) -> None:
    multipliers = refine(_random_log(300, 3), norm="l1", steps=150)
    path = save_schedule(tmp_path / "deep" / "s.json", multipliers, workload="w", lr=0.01, norm="l1")
    loaded, metadata = load_schedule(path)
    assert torch.equal(loaded, multipliers)
    assert metadata == {"workload": "w", "lr": 0.01, "norm": "l1"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.json"]  # no temporary file left behind
    assert linear_decay(0, 2) == 1.0  # the file holds multipliers of the peak lr, as linear_decay returns


def test_load_schedule_rejects_other_files(tmp_path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"multipliers": [1.0, 0.0]}))
    (tmp_path / "b.json").write_text("not json")
    for name in ("a.json", "b.json"):
        with pytest.raises(ValueError, match="not .*schedule file"):
            load_schedule(tmp_path / name)
