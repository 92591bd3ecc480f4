"""``charlm``: a small character-level transformer language model on Python's own documentation text.

Data: ``pydoc_data.topics.topics`` (ships with CPython; the text behind ``help("topic")``), its values joined in
sorted key order: ~465k characters, ~100 distinct. The text is the installed Python's, so it can differ slightly
between Python versions (records carry the Python version). The vocabulary is the sorted set of all its
characters. Contiguous split: the first 90% trains, the next 5% validates, the last 5% tests.

Training: minibatch ``step`` is ``BATCH`` windows of ``CONTEXT + 1`` characters at offsets drawn from
``(seed, "batches", step)``; the loss is the mean next-character cross-entropy (nats). Evaluation: a fixed set
of ``EVAL_WINDOWS`` evenly spaced, non-overlapping windows of the split (the same for every trial and step),
one forward pass; ``"loss"`` is the mean cross-entropy per character, the workload's metric.

Model: ``Transformer`` with 4 causal blocks of width 64, 4 heads, MLP width 256 (0.22M parameters).

Measured with torch AdamW (weight decay 0.01) on this project's 2-core CPU: a step takes ~60 ms at 1 thread and
~40-50 ms at 2 (the workload's thread count), an evaluation ~45 / ~32 ms; a trial (800 steps) ~40 s at 2 threads:
too slow for the quick suite. Validation loss falls from 4.6 (uniform over the vocabulary) to ~2.0 by step 300-400.
The target 1.7 nats is reached at step 600 with a constant lr 2e-3 (seeds 0-2), 700 with 1e-3 or 3e-3 (seed 0);
under the bench runner's protocol (2% warm-up, cosine decay to 0 at ``max_steps`` = 800, seed 0) lr 2e-3 reaches it
at step 600 and ends at 1.64, lr 3.16e-3 at step 500, ending at 1.57. (The test split's loss runs ~0.15 nats below
validation's: its stretch of text is more repetitive.)
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache, partial

import torch
import torch.nn.functional as F

from optimlab.bench.workloads._common import derive_seed, evaluating, generator, seeded_init
from optimlab.bench.workloads.base import Workload
from optimlab.bench.workloads.transformer import Transformer
from optimlab.nn.wtacrs import replace_linear_layers

__all__ = ["CHARLM", "CHARLM_WTACRS", "CharLMTask", "charlm_splits", "charlm_text"]

CONTEXT, BATCH, EVAL_WINDOWS = 64, 32, 64
WIDTH, LAYERS, HEADS = 64, 4, 4
WTACRS_LAYERS = (".proj", ".mlp.0", ".mlp.2")  # attention output and both MLP layers; not qkv, not the head
WTACRS_BUDGET = 0.3


def charlm_text() -> str:
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


@lru_cache(maxsize=1)
def charlm_splits() -> tuple[int, dict[str, torch.Tensor]]:
    """(vocabulary size, {"train", "val", "test"}: int64 character ids), the same for every trial."""
    text = charlm_text()
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([vocab[c] for c in text], dtype=torch.long)
    a, b = int(0.90 * len(ids)), int(0.95 * len(ids))
    return len(vocab), {"train": ids[:a], "val": ids[a:b], "test": ids[b:]}


def windows(ids: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """Rows ``ids[s : s + length]`` for every ``s`` in ``starts``."""
    return ids[starts[:, None] + torch.arange(length)]


class CharLMTask:
    def __init__(self, seed: int, wtacrs: bool = False) -> None:
        vocab, self.ids = charlm_splits()
        self.seed = seed
        factory = partial(Transformer, vocab, vocab, CONTEXT, WIDTH, LAYERS, HEADS, 4 * WIDTH, True)
        self.model = seeded_init(factory, seed)
        if wtacrs:
            replace_linear_layers(
                self.model,
                predicate=lambda name, _: name.endswith(WTACRS_LAYERS),
                budget=WTACRS_BUDGET,
                seed=derive_seed(seed, "wtacrs") % 2**62,
            )
        self.eval_sets = {}
        for split in ("val", "test"):
            n = len(self.ids[split])
            starts = torch.linspace(0, n - CONTEXT - 1, EVAL_WINDOWS).long()
            self.eval_sets[split] = windows(self.ids[split], starts, CONTEXT + 1)

    def _loss(self, rows: torch.Tensor) -> torch.Tensor:
        logits = self.model(rows[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())

    def _batch(self, step: int) -> torch.Tensor:
        train = self.ids["train"]
        starts = torch.randint(len(train) - CONTEXT, (BATCH,), generator=generator(self.seed, "batches", step))
        return windows(train, starts, CONTEXT + 1)

    def train_loss(self, step: int) -> torch.Tensor:
        return self._loss(self._batch(step))

    def worker_loss(self, step: int, n: int, i: int) -> torch.Tensor:
        """Share ``i`` of minibatch ``step``'s windows cut into ``n`` contiguous shares."""
        return self._loss(self._batch(step).tensor_split(n)[i])

    def evaluate(self, split: str) -> dict[str, float]:
        if split not in self.eval_sets:
            raise KeyError(f"unknown split {split!r}; expected one of val, test")
        with evaluating(self.model):
            return {"loss": self._loss(self.eval_sets[split]).item()}


CHARLM = Workload(
    name="charlm",
    description=f"character-level transformer LM ({LAYERS}x{WIDTH}, 0.22M parameters) on pydoc_data.topics, "
    f"batch {BATCH}x{CONTEXT}",
    metric="loss",
    higher_is_better=False,
    target=1.7,
    max_steps=800,
    max_seconds=900.0,
    eval_every=100,
    build=CharLMTask,
    quick=False,
    threads=2,
)

CHARLM_WTACRS = replace(
    CHARLM,
    name="charlm-wtacrs",
    description=CHARLM.description + f", WTA-CRS (budget {WTACRS_BUDGET}) in the attention-output and MLP layers",
    build=partial(CharLMTask, wtacrs=True),
    variant_of="charlm",
)

# the minibatch spread over 4 simulated workers (8 windows each): the transformer, GeLU and LayerNorm model 1-bit
# Adam was made for (BERT), in the distributed suite
CHARLM_4WORKERS = replace(
    CHARLM,
    name="charlm-4workers",
    description=CHARLM.description + ", spread over 4 simulated workers",
    variant_of="charlm",
    workers=4,
)
