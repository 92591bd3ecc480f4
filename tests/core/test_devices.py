"""Nothing assumes CPU: every optimizer gives the CPU's float64 result on a CUDA device, and its compiled
kernels agree with its eager path there."""

from __future__ import annotations

import pytest
import torch

import optimlab

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


# the optimizers and wrappers a plain step(), without a special closure, drives
STEPPABLE = [
    n
    for n in optimlab.available()
    if optimlab.get(n).kind in ("optimizer", "wrapper")
    and not optimlab.get(n).capabilities.needs_closure
    and not optimlab.get(n).capabilities.needs_create_graph  # its gradients need a graph: tests/optim
]


@pytest.mark.parametrize("name", [n for n in STEPPABLE if optimlab.get(n).kind == "optimizer"])
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


@pytest.mark.parametrize("name", STEPPABLE)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)], ids=["float64", "float32"])
def test_cuda_compiled_kernels_match_the_eager_path(name: str, dtype: torch.dtype, tol: float) -> None:
    """The fast path on CUDA (Triton kernels) against the eager reference on the same device."""
    from optimlab._core.kernels import kernel_mode

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(64, 33, generator=gen, dtype=torch.float64).to(dtype)
    grads = [torch.randn(64, 33, generator=gen, dtype=torch.float64).to(dtype) for _ in range(8)]
    results = []
    for mode in ("eager", "compiled"):
        p = torch.nn.Parameter(start.to("cuda"))
        with kernel_mode(mode, min_numel=2):
            opt = optimlab.create(name, [p], lr=1e-2)
            for g in grads:
                p.grad = g.to("cuda")
                opt.step()
        results.append(p.detach().cpu())
    torch.testing.assert_close(results[1], results[0], rtol=tol, atol=tol)
