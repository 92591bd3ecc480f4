"""``modadd-grokking``: a 1-layer transformer learns ``(a + b) mod 97``, the grokking set-up (Power et al., 2022;
Nanda et al., 2023).

Data: all 97^2 = 9,409 pairs, made locally. One fixed shuffle (the same for every trial) puts half of them in
train (4,704) and splits the rest into validation (2,352) and test (2,353). Inputs are the token sequences
``[a, b, =]`` (vocabulary 98); the label is ``(a + b) mod 97``, read out at the last position. The trial seed
drives the initialization and the minibatch order (batch 512, shuffled epochs of 9 batches).

Model: ``Transformer`` with 1 causal block of width 128, 4 heads, MLP width 512 (0.22M parameters), weights
initialized N(0, 0.2) rather than GPT's 0.02: a large initialization is what delays generalization (Liu et al.,
2023, "Omnigrok"); from 0.02 the model generalizes as soon as it fits, at ~400 steps. Only the last position's
output is computed in the block (``last_only``), which halves the step time.

Measured with the classic recipe (torch AdamW, lr 1e-3, weight decay 1, betas (0.9, 0.98)), 1 thread, on this
project's 2-core CPU: a step takes ~18 ms (~11 ms at 2 threads, the workload's count), a validation pass ~35 ms
(~24 ms). Training accuracy reaches ~100% by step 600-800 while validation accuracy is still below 2% (seed 0: 5%
at step 1,000, 47% at 1,400); with a constant lr validation passes the 0.95 target at step 1,200-1,800 (seeds 0-2).
A trial has 2,500 steps (~30 s at 2 threads); under the runner's protocol (2% warm-up, cosine decay to 0 at step
2,500) the recipe at lr 2e-3 reaches the target at step 900 (seed 0; at lr 1e-3 and 3,000 steps it ends at 0.77).
With AdamW's default hyperparameters (weight decay 0.01, betas (0.9, 0.999)) and only the lr tuned, it depends on
the seed: lr 2.5e-2 reaches 0.95 at step 900 on seed 0, and with 3,000 steps never on seed 1 (0.7% validation
accuracy at the end); how much decay an optimizer applies is what this workload tests.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache, partial

import torch
import torch.nn.functional as F

from optimlab.bench.workloads._common import generator, seeded_init
from optimlab.bench.workloads.base import Workload
from optimlab.bench.workloads.classification import Arrays, ClassificationTask
from optimlab.bench.workloads.transformer import Transformer
from optimlab.nn.stablemax import stablemax_cross_entropy

__all__ = ["MODADD_GROKKING", "MODADD_GROKKING_STABLEMAX", "ModAddModel", "modadd_splits"]

P, TRAIN_FRACTION, BATCH_SIZE = 97, 0.5, 512


class ModAddModel(Transformer):
    """The transformer's logits at the last position (``=``), the only ones the task reads."""

    def __init__(self) -> None:
        super().__init__(P + 1, P, context=3, width=128, layers=1, heads=4, mlp_width=512, causal=True, init_std=0.2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens, last_only=True)


@lru_cache(maxsize=1)
def modadd_splits() -> tuple[Arrays, Arrays, Arrays]:
    """(train, val, test): int64 token sequences ``[a, b, P]`` of shape (n, 3) and labels ``(a + b) % P``."""
    a, b = torch.cartesian_prod(torch.arange(P), torch.arange(P)).unbind(1)
    x = torch.stack([a, b, torch.full_like(a, P)], dim=1)
    y = (a + b) % P
    order = torch.randperm(len(y), generator=generator("modadd", P, "split"))
    n_train = int(TRAIN_FRACTION * len(y))
    n_val = (len(y) - n_train) // 2
    parts = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    return tuple((x[idx], y[idx]) for idx in parts)  # type: ignore[return-value]


def _build(seed: int, loss=F.cross_entropy) -> ClassificationTask:
    train, val, test = modadd_splits()
    return ClassificationTask(seeded_init(ModAddModel, seed), train, val, test, BATCH_SIZE, seed, loss)


MODADD_GROKKING = Workload(
    name="modadd-grokking",
    description=f"1-layer transformer on (a + b) mod {P}, half the pairs for training, batch {BATCH_SIZE} (grokking)",
    metric="accuracy",
    higher_is_better=True,
    target=0.95,
    max_steps=2500,
    max_seconds=600.0,
    eval_every=100,
    build=_build,
    quick=False,
    threads=2,
)

# The same task trained with the StableMax cross-entropy (arXiv 2501.04697), the paper's remedy for softmax
# collapse; validation "loss" is then StableMax's too (accuracy, the target's metric, is the same).
MODADD_GROKKING_STABLEMAX = replace(
    MODADD_GROKKING,
    name="modadd-grokking-stablemax",
    description=MODADD_GROKKING.description + ", StableMax cross-entropy",
    build=partial(_build, loss=stablemax_cross_entropy),
    variant_of="modadd-grokking",
)
