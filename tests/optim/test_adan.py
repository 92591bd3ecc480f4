"""Adan's global clipping: one norm over all groups, so it is set once, in the constructor."""

from __future__ import annotations

import pytest
import torch

from optimlab import Adan


def test_clipping_uses_one_norm_over_all_groups() -> None:
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    clipped = Adan([{"params": [a]}, {"params": [b], "lr": 0.05}], lr=0.1, max_grad_norm=1.0)
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    clipped.step()
    total = (9 * 3 + 16 * 4) ** 0.5
    assert clipped.state[a]["prev_grad"][0].item() == pytest.approx(3.0 / (total + 1e-8))
    assert clipped.state[b]["prev_grad"][0].item() == pytest.approx(4.0 / (total + 1e-8))


def test_a_per_group_max_grad_norm_is_refused() -> None:
    with pytest.raises(ValueError, match="Invalid max_grad_norm.*set it in the constructor"):
        Adan([{"params": [torch.nn.Parameter(torch.ones(2))], "max_grad_norm": 1e-3}])
    opt = Adan([torch.nn.Parameter(torch.ones(2))], max_grad_norm=2.0)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "max_grad_norm": 2.0})  # the same: fine
