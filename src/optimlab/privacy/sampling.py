r"""Poisson sampling for private training: every record joins each batch independently with probability q.

The privacy accountant's subsampled-Gaussian bound (:mod:`optimlab.privacy.accounting`) assumes exactly this
sampling, not a shuffle into fixed-size batches. A batch therefore has a random size
:math:`|B| \sim \mathrm{Binomial}(N, q)`, mean :math:`qN` and variance :math:`qN(1-q)`, and may be empty; the
private optimizers divide by the *expected* size :math:`qN` (as Opacus does), and an empty batch still takes
a noise-only step (skipping it would make the number of steps depend on the data).

:class:`PoissonBatchSampler` is a ``batch_sampler`` for ``torch.utils.data.DataLoader``, as Opacus's
``UniformWithReplacementSampler``: an epoch is ``steps`` batches (default :math:`\lfloor 1/q \rfloor`), each drawn
as ``torch.rand(N) < q`` from the sampler's own ``torch.Generator`` (seeded by ``seed``). Its ``state_dict``
holds that generator's state and the position in the epoch, so a run resumed from a checkpoint draws the same
batches as an uninterrupted one. The position counts batches *drawn*: with ``num_workers=0`` (the default) that is
the batches consumed; worker processes draw ``prefetch_factor × num_workers`` batches ahead, so save the sampler
at an epoch boundary there. :func:`poisson_loader` builds the ``DataLoader`` with a collate function that turns an
empty batch into tensors with a zero-length batch dimension (the structure of one record), since PyTorch's
default collate cannot collate nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from optimlab._core.validation import Interval

__all__ = ["PoissonBatchSampler", "poisson_loader"]

_SAMPLE_RATE = Interval(0.0, 1.0, low_closed=False)
_SEED = Interval(0, float(2**63), integer=True)  # within what torch.Generator.manual_seed takes


class PoissonBatchSampler(Sampler[list[int]]):
    """Batches of the indices ``0 .. N-1``, each index in each batch independently with probability
    ``sample_rate`` (see the module docstring). ``data_source`` is the data set (its ``len``) or N itself;
    ``steps`` is the number of batches of an epoch (default ``int(1 / sample_rate)``, Opacus's)."""

    def __init__(
        self, data_source: Sized | int, sample_rate: float, *, steps: int | None = None, seed: int = 0
    ) -> None:
        num_samples = data_source if isinstance(data_source, int) else len(data_source)
        Interval(1, integer=True).check("num_samples", num_samples)
        _SAMPLE_RATE.check("sample_rate", sample_rate)
        if steps is None:
            steps = max(1, int(1 / sample_rate))
        Interval(1, integer=True).check("steps", steps)
        _SEED.check("seed", seed)
        self.num_samples, self.sample_rate, self.steps, self.seed = num_samples, float(sample_rate), steps, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # batches drawn in the current epoch

    @property
    def expected_batch_size(self) -> float:
        """qN, the mean batch size (the private optimizers' ``expected_batch_size``)."""
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        # an iterator continues the current epoch (a resumed one from its saved position)
        while self.position < self.steps:
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            self.position += 1
            yield mask.nonzero().flatten().tolist()
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "position": self.position,
            "num_samples": self.num_samples,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (state["num_samples"], state["sample_rate"], state["steps"])
        if saved != (self.num_samples, self.sample_rate, self.steps):
            raise ValueError(
                f"this sampler state is for (num_samples, sample_rate, steps) = {saved}, not "
                f"{(self.num_samples, self.sample_rate, self.steps)}: build the sampler with the saved settings"
            )
        self.generator.set_state(state["generator"])
        self.position = int(state["position"])


def _empty_like(batch: Any) -> Any:
    """``batch`` (a collated batch of one record) with its batch dimension cut to length zero."""
    if isinstance(batch, Tensor):
        return batch[:0]
    if isinstance(batch, dict):
        return {k: _empty_like(v) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_empty_like(v) for v in batch)
    raise TypeError(
        f"an empty Poisson batch needs tensors to give a zero-length batch dimension; the collated records hold "
        f"a {type(batch).__name__}: pass a collate_fn that handles an empty list"
    )


def _collate_with_empty(dataset: Dataset, collate_fn: Callable[[list], Any]) -> Callable[[list], Any]:
    def collate(records: list) -> Any:
        if records:
            return collate_fn(records)
        return _empty_like(collate_fn([dataset[0]]))

    return collate


def poisson_loader(
    dataset: Dataset,
    sample_rate: float,
    *,
    steps: int | None = None,
    seed: int = 0,
    collate_fn: Callable[[list], Any] | None = None,
    **loader_kwargs: Any,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` with a :class:`PoissonBatchSampler` (``loader.batch_sampler``) and a
    collate function that gives an empty batch as zero-length tensors; ``loader_kwargs`` go to the
    ``DataLoader`` (not ``batch_size``, ``shuffle``, ``sampler`` or ``drop_last``, which the sampler replaces)."""
    clashing = {"batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"} & set(loader_kwargs)
    if clashing:
        raise TypeError(f"poisson_loader draws its own batches; do not pass {', '.join(sorted(clashing))}")
    sampler = PoissonBatchSampler(dataset, sample_rate, steps=steps, seed=seed)
    collate = _collate_with_empty(dataset, collate_fn or default_collate)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **loader_kwargs)
