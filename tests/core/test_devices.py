"""Nothing assumes CPU: every optimizer gives the CPU's float64 result on a CUDA device."""

from __future__ import annotations

import pytest
import torch

import optimlab

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("name", optimlab.available("optimizer"))
def test_cuda_matches_cpu(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(10)]
    results = []
    for device in ("cpu", "cuda"):
        p = torch.nn.Parameter(start.to(device))
        opt = optimlab.create(name, [p], lr=1e-2)
        for g in grads:
            p.grad = g.to(device)
            opt.step()
        results.append(p.detach().cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)
