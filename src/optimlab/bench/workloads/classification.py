"""A supervised classification task on in-memory tensors (digits, MNIST-1D, modular addition).

Training loss: mean cross-entropy of minibatch ``step`` (``EpochBatches``: shuffled epochs, a pure function of
``(seed, step)``), or another loss of (logits, labels) such as StableMax's. Evaluation: the whole split in one
vectorized forward pass under ``torch.no_grad``; it returns ``"loss"`` (the same loss) and ``"accuracy"``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from optimlab.bench.workloads._common import EpochBatches, evaluating

__all__ = ["Arrays", "ClassificationTask"]

Arrays = tuple[torch.Tensor, torch.Tensor]  # (inputs, integer labels)


class ClassificationTask:
    def __init__(
        self,
        model: torch.nn.Module,
        train: Arrays,
        val: Arrays,
        test: Arrays,
        batch_size: int,
        seed: int,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    ) -> None:
        self.model = model
        self.loss = loss
        self.x, self.y = train
        self.splits = {"val": val, "test": test}
        self.batches = EpochBatches(len(self.y), batch_size, seed)

    def train_loss(self, step: int) -> torch.Tensor:
        idx = self.batches(step)
        return self.loss(self.model(self.x[idx]), self.y[idx])

    def worker_loss(self, step: int, n: int, i: int) -> torch.Tensor:
        """Share ``i`` of minibatch ``step`` cut into ``n`` contiguous shares (sizes differ by at most one)."""
        part = self.batches(step).tensor_split(n)[i]
        return self.loss(self.model(self.x[part]), self.y[part])

    def evaluate(self, split: str) -> dict[str, float]:
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; expected one of {', '.join(self.splits)}")
        x, y = self.splits[split]
        with evaluating(self.model):
            logits = self.model(x)
        return {
            "loss": self.loss(logits, y).item(),
            "accuracy": (logits.argmax(-1) == y).double().mean().item(),
        }
