"""Helpers every workload family shares: seed derivation, seeded model init, minibatch order, the data cache.

Reproducibility rule: everything random in a task is drawn from a generator seeded by ``derive_seed(seed,
...)`` and never from the global RNGs, so building a task neither depends on nor disturbs the caller's random
state, and minibatch ``step`` is a pure function of ``(seed, step)`` (a resumed run sees the same batches).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch

__all__ = ["EpochBatches", "cache_dir", "derive_seed", "evaluating", "generator", "seeded_init"]

M = TypeVar("M", bound=torch.nn.Module)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a fixed function of ``parts`` (e.g. ``(seed, "init")``), stable across runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*parts: object) -> torch.Generator:
    """A fresh CPU generator seeded by ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def seeded_init(factory: Callable[[], M], seed: int) -> M:
    """``factory()`` with torch's default initializers drawing from ``(seed, "init")``; the global RNG is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init"))
        return factory()


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` under ``torch.no_grad()`` inside the block; the previous train/eval mode is restored."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


class EpochBatches:
    """Minibatch indices: epoch ``e`` is a permutation of ``range(n)`` drawn from ``(seed, "batches", e)``, cut into
    ``n // batch_size`` batches (the remainder is left out of that epoch). ``self(step)`` depends only on
    ``(seed, step)``; the current epoch's permutation is memoized, so sequential access costs one ``randperm`` per
    epoch and a resumed run (any starting step) sees the same batches."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if not 0 < batch_size <= n:
            raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, step: int) -> torch.Tensor:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._perm = torch.randperm(self.n, generator=generator(self.seed, "batches", epoch))
            self._epoch = epoch
        return self._perm[k * self.batch_size : (k + 1) * self.batch_size]


def cache_dir() -> Path:
    """Where generated data sets are kept: ``$OPTIMLAB_CACHE``, else ``~/.cache/optimlab``."""
    return Path(os.environ.get("OPTIMLAB_CACHE") or Path.home() / ".cache" / "optimlab")
