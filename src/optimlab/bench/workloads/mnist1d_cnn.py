"""``mnist1d-cnn``: a small 1-D CNN on MNIST-1D (Greydanus, 2020), generated locally by the ``mnist1d`` package.

Data: ``mnist1d.data.make_dataset(get_dataset_args())``, the package's procedural generator with its default
arguments (5,000 length-40 signals, 10 classes, generated from the arguments' own ``seed=42``), so every trial
shares one data set; ``get_dataset`` (which downloads) is never called. The generator's train part (4,000) is
split into train (3,500) and validation (the last 500; the generator already shuffled them), and its test part
(1,000) is the test split. The trial seed drives only the initialization and the minibatch order (batch 100).

Generating takes ~1 s, plus ~0.6 s to import ``mnist1d`` (it imports matplotlib), so the arrays are cached as
``cache_dir()/mnist1d-<key>.pt`` (``torch.save``, written atomically, read with ``weights_only=True``). The key
hashes the installed ``mnist1d`` version and ``ARG_OVERRIDES`` (the changes we make to ``get_dataset_args()``:
none), which together fix the generator arguments, their ``seed`` included, without importing ``mnist1d``; the
arguments themselves are stored in the file. A missing or unreadable file is regenerated.

Model: the MNIST-1D paper's CNN shape, three stride-2 convolutions of 25 channels and a linear read-out (5.2k
parameters). Measured with torch AdamW (weight decay 0.01), 1 thread, on this project's 2-core CPU: a step takes
~2 ms (convolution backward dominates), a trial (600 steps) ~1.2 s. Validation accuracy ends at ~0.85-0.9
(untrained: ~0.1). The target 0.80 is reached at step 175-275 with a constant lr 0.02 (seeds 0-7); under the
bench runner's protocol (2% warm-up, cosine decay to 0 at ``max_steps``) at step 250-350 with lr 1e-2 (seeds
0-2) and on 2 seeds of 3 with lr 0.1, while lr 1e-3 ends at ~0.45.

``mnist1d-cnn-tract`` is the same task with the first convolution wrapped in TrAct (arXiv 2410.23970, λ 0.1, the
paper's default): the same initial weights, so it pairs seed by seed with ``mnist1d-cnn``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import random
import warnings
from dataclasses import replace
from functools import lru_cache, partial
from pathlib import Path

import torch
from torch import nn

from optimlab.bench._files import write_atomic
from optimlab.bench.workloads._common import cache_dir, seeded_init
from optimlab.bench.workloads.base import Workload
from optimlab.bench.workloads.classification import Arrays, ClassificationTask
from optimlab.nn.tract import TrAct

__all__ = ["MNIST1D_CNN", "MNIST1D_CNN_TRACT", "mnist1d_arrays", "mnist1d_cache_path", "mnist1d_splits"]

BATCH_SIZE = 100
N_VAL = 500
ARG_OVERRIDES: dict[str, object] = {}  # changes to get_dataset_args() (none); part of the cache key
KEYS = {"x", "y", "x_test", "y_test", "args"}  # of the cached dict


def mnist1d_cache_path() -> Path:
    """The cache file for the installed ``mnist1d`` version and ``ARG_OVERRIDES``."""
    key = json.dumps({"mnist1d": importlib.metadata.version("mnist1d"), "overrides": ARG_OVERRIDES}, sort_keys=True)
    return cache_dir() / f"mnist1d-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _generate() -> dict[str, object]:
    import numpy as np  # mnist1d's dependency
    from mnist1d.data import get_dataset_args, make_dataset  # ~0.6 s: only on a cache miss
    from mnist1d.utils import ObjectView

    args = get_dataset_args(as_dict=True) | ARG_OVERRIDES
    # make_dataset reseeds the global `random` and `numpy.random` generators: keep the caller's streams intact
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    args.pop("url")  # where get_dataset would download from: not ours to keep
    return {
        "x": torch.as_tensor(data["x"], dtype=torch.float32),
        "y": torch.as_tensor(data["y"], dtype=torch.long),
        "x_test": torch.as_tensor(data["x_test"], dtype=torch.float32),
        "y_test": torch.as_tensor(data["y_test"], dtype=torch.long),
        "args": json.dumps(args, sort_keys=True),
    }


def mnist1d_arrays() -> dict[str, object]:
    """``x``, ``y``, ``x_test``, ``y_test`` (tensors) and ``args`` (the generator arguments, as JSON), from the
    cache, else generated and cached."""
    path = mnist1d_cache_path()
    if path.exists():
        try:
            cached = torch.load(path, weights_only=True)
            if isinstance(cached, dict) and cached.keys() == KEYS:
                return cached
            problem = f"unexpected content {type(cached).__name__}"
        except Exception as err:  # noqa: BLE001 (a damaged file raises EOFError, RuntimeError, KeyError, ...)
            problem = f"{type(err).__name__}: {err}"
        warnings.warn(f"regenerating MNIST-1D: could not use {path} ({problem})", stacklevel=2)
    arrays = _generate()
    write_atomic(path, lambda f: torch.save(arrays, f), binary=True)
    return arrays


@lru_cache(maxsize=1)
def mnist1d_splits() -> tuple[Arrays, Arrays, Arrays]:
    """(train, val, test): float32 signals of shape (n, 1, 40) and int64 labels; the same for every trial."""
    a = mnist1d_arrays()
    x, y, test = a["x"].unsqueeze(1), a["y"], (a["x_test"].unsqueeze(1), a["y_test"])
    return (x[:-N_VAL], y[:-N_VAL]), (x[-N_VAL:], y[-N_VAL:]), test


def _cnn() -> nn.Module:
    channels = 25
    return nn.Sequential(
        nn.Conv1d(1, channels, 5, stride=2, padding=1),  # 40 -> 19
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),  # 19 -> 10
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),  # 10 -> 5
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 5, 10),
    )


def _build(seed: int, tract: bool = False) -> ClassificationTask:
    train, val, test = mnist1d_splits()
    model = seeded_init(_cnn, seed)
    if tract:
        TrAct.wrap(model, "0")
    return ClassificationTask(model, train, val, test, BATCH_SIZE, seed)


MNIST1D_CNN = Workload(
    name="mnist1d-cnn",
    description="3-layer 1-D CNN (5.2k parameters) on MNIST-1D generated by the mnist1d package, batch 100",
    metric="accuracy",
    higher_is_better=True,
    target=0.80,
    max_steps=600,
    max_seconds=30.0,
    eval_every=25,
    build=_build,
)

MNIST1D_CNN_TRACT = replace(
    MNIST1D_CNN,
    name="mnist1d-cnn-tract",
    description=MNIST1D_CNN.description + ", TrAct first layer (λ 0.1)",
    build=partial(_build, tract=True),
    quick=False,
    variant_of="mnist1d-cnn",
)
