"""Poisson sampling: batch sizes with the binomial's mean and variance, independent inclusions, resumable state,
empty batches through the DataLoader."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import TensorDataset

from optimlab.privacy import PoissonBatchSampler, poisson_loader


def test_batch_sizes_are_binomial() -> None:
    n, q, draws = 1000, 0.05, 4000
    sampler = PoissonBatchSampler(n, q, steps=draws, seed=1)
    batches = list(sampler)
    assert len(batches) == draws == len(sampler)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    mean, var = q * n, q * n * (1 - q)
    # five standard errors of the sample mean and of the sample variance (normal approximation)
    assert abs(sizes.mean().item() - mean) < 5 * (var / draws) ** 0.5
    assert abs(sizes.var().item() - var) < 5 * var * (2 / (draws - 1)) ** 0.5
    # every record is included at rate q, in sorted order and without repeats within a batch
    counts = torch.zeros(n)
    for b in batches:
        assert b == sorted(set(b))
        counts[b] += 1
    rate = counts / draws
    assert (rate - q).abs().max() < 5 * (q * (1 - q) / draws) ** 0.5 * 1.5  # a margin for the max over n records


def test_epoch_length_seeds_and_expected_batch_size() -> None:
    s = PoissonBatchSampler(range(200), 0.03)
    assert len(s) == int(1 / 0.03) == 33 and s.num_samples == 200
    assert s.expected_batch_size == pytest.approx(6.0)
    assert list(PoissonBatchSampler(200, 0.1, seed=4)) == list(PoissonBatchSampler(200, 0.1, seed=4))
    assert list(PoissonBatchSampler(200, 0.1, seed=4)) != list(PoissonBatchSampler(200, 0.1, seed=5))
    assert len(list(PoissonBatchSampler(10, 1.0))) == 1 and list(PoissonBatchSampler(10, 1.0))[0] == list(range(10))


def test_state_dict_resumes_the_same_batches() -> None:
    reference = PoissonBatchSampler(300, 0.1, seed=7)
    expected = list(reference) + list(reference)  # two epochs

    sampler = PoissonBatchSampler(300, 0.1, seed=7)
    it = iter(sampler)
    first = [next(it) for _ in range(4)]
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    buffer.seek(0)
    resumed = PoissonBatchSampler(300, 0.1, seed=123)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert first + list(resumed) + list(resumed) == expected


def test_loader_gives_empty_batches_as_zero_length_tensors() -> None:
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.arange(10)
    loader = poisson_loader(TensorDataset(x, y), 1e-4, steps=20, seed=0)
    shapes = {(tuple(bx.shape), tuple(by.shape), bx.dtype, by.dtype) for bx, by in loader}
    assert ((0, 5), (0,), torch.float64, torch.int64) in shapes

    records = [{"a": torch.ones(2), "b": (torch.zeros(3), torch.tensor(1))} for _ in range(4)]
    batch = next(iter(poisson_loader(records, 1e-6, steps=1)))
    assert batch["a"].shape == (0, 2) and batch["b"][0].shape == (0, 3) and batch["b"][1].shape == (0,)

    full = next(iter(poisson_loader(TensorDataset(x, y), 1.0)))
    assert torch.equal(full[0], x)


def test_bad_inputs_raise() -> None:
    for q in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="Invalid sample_rate"):
            PoissonBatchSampler(10, q)
    with pytest.raises(ValueError, match="Invalid num_samples"):
        PoissonBatchSampler(0, 0.5)
    with pytest.raises(ValueError, match="Invalid steps"):
        PoissonBatchSampler(10, 0.5, steps=0)
    with pytest.raises(TypeError, match="batch_size"):
        poisson_loader(TensorDataset(torch.zeros(4)), 0.5, batch_size=2)
    with pytest.raises(ValueError, match="sampler state"):
        PoissonBatchSampler(11, 0.5).load_state_dict(PoissonBatchSampler(10, 0.5).state_dict())
