"""The baseline aggregators: closed forms, Krum against a brute-force definition, errors, the registry."""

from __future__ import annotations

import itertools

import pytest
import torch

from optimlab.distributed.aggregators import (
    Aggregator,
    CoordinateMedian,
    Krum,
    Mean,
    TrimmedMean,
    coordinate_median,
    krum,
    krum_scores,
    mean,
    sort_rows,
    trimmed_mean,
)
from optimlab.registry import available, get


def test_mean_and_median_closed_forms():
    rows = torch.tensor([[1.0, 10.0], [3.0, -2.0], [2.0, 7.0], [100.0, 0.0]])
    torch.testing.assert_close(mean(rows), torch.tensor([26.5, 3.75]))
    torch.testing.assert_close(Mean()(rows), torch.tensor([26.5, 3.75]))
    # even n: the mean of the two middle values (1,2,3,100 -> 2.5; -2,0,7,10 -> 3.5)
    torch.testing.assert_close(coordinate_median(rows), torch.tensor([2.5, 3.5]))
    # odd n: the middle value
    torch.testing.assert_close(CoordinateMedian()(rows[:3]), torch.tensor([2.0, 7.0]))


def test_trimmed_mean_closed_form_and_beta():
    rows = torch.tensor([[1.0], [2.0], [3.0], [4.0], [1000.0], [-50.0], [5.0]])
    torch.testing.assert_close(trimmed_mean(rows, 0), rows.mean(0))
    torch.testing.assert_close(trimmed_mean(rows, 1), torch.tensor([3.0]))  # drops -50 and 1000
    torch.testing.assert_close(trimmed_mean(rows, 3), torch.tensor([3.0]))  # the median for f = (n-1)/2
    torch.testing.assert_close(TrimmedMean(f=2)(rows), torch.tensor([3.0]))
    assert TrimmedMean(beta=0.2).trimmed(7) == 1 and TrimmedMean(beta=0.3).trimmed(7) == 2  # floor(beta n)
    torch.testing.assert_close(TrimmedMean(beta=0.2)(rows), torch.tensor([3.0]))
    assert TrimmedMean(beta=0.45, f=0).trimmed(7) == 0  # f, when given, wins


def brute_force_krum_scores(rows, f):
    n = rows.shape[0]
    scores = []
    for i in range(n):
        d = sorted((rows[i] - rows[j]).square().sum().item() for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return torch.tensor(scores, dtype=rows.dtype)


@pytest.mark.parametrize("n,f", [(5, 1), (7, 2), (10, 3), (12, 1)])
def test_krum_scores_match_definition(n, f):
    rows = torch.randn(n, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(n + f))
    torch.testing.assert_close(krum_scores(rows, f), brute_force_krum_scores(rows, f))


def test_krum_picks_an_honest_row_and_multi_krum_averages_the_best():
    gen = torch.Generator().manual_seed(0)
    n, f = 11, 4
    honest = torch.randn(20, generator=gen) + 0.3 * torch.randn(n - f, 20, generator=gen)
    rows = torch.cat([50 * torch.randn(2, 20, generator=gen), honest, 50 * torch.randn(2, 20, generator=gen)])
    picked = Krum(f=f)(rows)
    assert any(torch.equal(picked, h) for h in honest)
    order = krum_scores(rows, f).argsort()
    assert set(order[: n - f].tolist()) == set(range(2, 2 + n - f))  # the honest rows score best
    torch.testing.assert_close(Krum(f=f, m=3)(rows), rows[order[:3]].mean(0))
    torch.testing.assert_close(krum(rows, f, m=n - f), honest.mean(0))


def test_krum_distances_survive_a_large_shared_component():
    """Gradients that agree closely relative to their norm (large batches): squared distances from the Gram
    matrix, |a|^2 + |b|^2 - 2 a.b, cancel to float32 noise (every score was 0 or 0.25 here, row 0 picked);
    Krum's scores are those of the exact distances."""
    gen = torch.Generator().manual_seed(0)
    d = 10_000
    noise = 1e-3 * torch.randn(6, d, generator=gen)
    noise[2] *= 0.1  # row 2 is the centre of the cloud
    rows = 10 * torch.randn(d, generator=gen) + noise
    exact = brute_force_krum_scores(rows.double(), 1)
    torch.testing.assert_close(krum_scores(rows, 1).double(), exact, rtol=1e-3, atol=0)
    assert torch.equal(krum(rows, 1), rows[2])
    half = krum_scores(rows[:, :64].bfloat16(), 1)  # half precision: distances in float32
    assert half.dtype == torch.float32 and half.isfinite().all()


def test_krum_ties_go_to_the_lowest_index():
    rows = torch.tensor([[0.0], [1.0], [1.0], [1.0], [1.0], [0.0]])
    assert krum_scores(rows, 1).tolist() == [2.0, 0.0, 0.0, 0.0, 0.0, 2.0]
    torch.testing.assert_close(krum(rows, 1), torch.tensor([1.0]))


@pytest.mark.parametrize("cls", [Mean, CoordinateMedian, TrimmedMean, Krum])
def test_device_dtype_follow_input_and_no_state(cls):
    rows = torch.randn(9, 7, dtype=torch.float64)
    out = cls()(rows)
    assert out.dtype == torch.float64 and out.shape == (7,)
    agg = cls()
    assert agg.state_dict() == {}
    agg.load_state_dict({})
    assert isinstance(agg, Aggregator)


def test_invalid_arguments():
    rows = torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"Invalid f: 3; the trimmed mean of n=6 rows needs 0 <= f < n/2"):
        TrimmedMean(f=3)(rows)
    with pytest.raises(ValueError, match=r"Invalid f: 2; Krum on n=6 rows needs n > 2f \+ 2"):
        Krum(f=2)(rows)
    with pytest.raises(ValueError, match=r"Invalid m: 7"):
        Krum(f=1, m=7)(rows)
    with pytest.raises(ValueError, match="Invalid beta"):
        TrimmedMean(beta=0.5)
    with pytest.raises(ValueError, match="Invalid f"):
        TrimmedMean(f=-1)
    with pytest.raises(ValueError, match="Invalid f"):
        Krum(f=1.0)
    with pytest.raises(ValueError, match="Invalid m"):
        Krum(m=0)
    with pytest.raises(ValueError, match="Invalid f"):
        trimmed_mean(rows, -1)
    with pytest.raises(ValueError, match=r"\(n, d\) matrix"):
        Mean()(torch.randn(3, 2, 2))
    with pytest.raises(ValueError, match=r"\(n, d\) matrix"):
        CoordinateMedian()(torch.randn(0, 4))
    with pytest.raises(TypeError, match="floating-point"):
        Krum()(torch.ones(6, 3, dtype=torch.int64))


def test_registry_entries():
    assert set(available("aggregator")) >= {"mean", "coordinate_median", "trimmed_mean", "krum"}
    assert get("krum").arxiv == "1703.02757" and get("krum").cls is Krum
    for name in ("coordinate_median", "trimmed_mean"):
        assert get(name).arxiv == "1803.01498"
    assert get("krum").defaults == {"f": 1, "m": 1}
    assert get("trimmed_mean").defaults == {"beta": 0.1, "f": None}
    assert repr(Krum(f=2)) == "Krum(f=2, m=1)"


@pytest.mark.parametrize("n", [5, 6])
def test_coordinate_rules_are_permutation_equivariant_per_coordinate(n):
    # coordinate-wise rules aggregate every coordinate on its own: permuting coordinates permutes the result
    rows = torch.randn(n, 12, generator=torch.Generator().manual_seed(n))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    for agg in (Mean(), CoordinateMedian(), TrimmedMean(f=1)):
        torch.testing.assert_close(agg(rows[:, perm]), agg(rows)[perm])
    for p in itertools.islice(itertools.permutations(range(n)), 5):
        torch.testing.assert_close(Krum(f=1)(rows[list(p)]), Krum(f=1)(rows))


@pytest.mark.parametrize("n", [1, 2, 7, 15, 64, 65])
def test_sort_rows_matches_torch_sort_with_nan_as_inf(n):
    rows = torch.randn(n, 33, generator=torch.Generator().manual_seed(n))
    rows[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    expected = rows.nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=-float("inf")).sort(0).values
    assert torch.equal(sort_rows(rows), expected)


def test_a_nan_row_does_not_poison_the_median_or_the_trimmed_mean():
    rows = torch.randn(7, 10, generator=torch.Generator().manual_seed(0))
    attacked = rows.clone()
    attacked[6] = float("nan")
    honest = rows[:6]
    for agg in (coordinate_median(attacked), trimmed_mean(attacked, 1)):
        assert agg.isfinite().all()
        assert ((agg >= honest.min(0).values) & (agg <= honest.max(0).values)).all()
