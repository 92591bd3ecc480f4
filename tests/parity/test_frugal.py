"""FRUGAL with the SVD projector against galore-torch's GaLoreAdamW, where the two coincide.

GaLore (arXiv 2403.03507) is FRUGAL's SVD projection with the state-free rule "no", the statistics kept across
refreshes (``reset_statistics=False``) and its ``scale`` in the role of ``proj_lr_scale``. What still differs is
written in the peer's Adam step: ε is added to ``sqrt(v)`` before the bias correction (``lr·sqrt(1-β2^t)/(1-β1^t)
· m/(sqrt(v)+ε)``), and its weight decay is applied after the update. With ε = 0 and no weight decay the two
compute the same update, so they must agree to float32 rounding over several refreshes.
"""

from __future__ import annotations

import pytest
import torch
from galore_torch import GaLoreAdamW

from optimlab import FRUGAL

from .conftest import Problem, run_pair

SHAPES = ((12, 8), (6, 10), (7,))  # the projected matrices: one reduced on the right, one on the left


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_svd_rule_no_without_reset_matches_galore_adamw(scale: float) -> None:
    density, gap, lr = 0.5, 4, 1e-2
    problem = Problem(shapes=SHAPES, seed=3)

    def ours(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return FRUGAL(
            params,
            lr=lr,
            eps=0.0,
            weight_decay=0.0,
            density=density,
            update_gap=gap,
            proj_type="svd",
            inactive_update_rule="no",
            reset_statistics=False,
            proj_lr_scale=scale,
        )

    def peer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        galore = dict(update_proj_gap=gap, scale=scale, proj_type="std")
        groups = [  # GaLore's rank is the reduced dimension: 12×8 is reduced on the right, 6×10 on the left
            {"params": [params[0]], "rank": round(8 * density), **galore},
            {"params": [params[1]], "rank": round(6 * density), **galore},
            {"params": [params[2]]},
        ]
        return GaLoreAdamW(groups, lr=lr, eps=0.0, weight_decay=0.0, no_deprecation_warning=True)

    # float32, as GaLore computes its SVD in float32: the projectors agree to float32 rounding
    float_problem = _Float32(problem)
    assert run_pair(ours, peer, steps=3 * gap + 1, problem=float_problem) < 1e-5


class _Float32(Problem):
    """``problem`` with float32 parameters and gradients."""

    def __init__(self, problem: Problem) -> None:
        self.__dict__.update(problem.__dict__)

    def init(self) -> list[torch.Tensor]:
        return [p.detach().float().requires_grad_(True) for p in super().init()]

    def grads(self, params, t: int) -> list[torch.Tensor]:
        return [g.float() for g in super().grads([p.double() for p in params], t)]


def test_with_reset_the_statistics_differ_from_galore_after_a_refresh() -> None:
    """FRUGAL's default resets the moments at a refresh, GaLore keeps them: identical up to the first refresh,
    different after it."""
    density, gap, lr = 0.5, 3, 1e-2
    problem = _Float32(Problem(shapes=((12, 8),), seed=4))

    def ours(params):
        return FRUGAL(params, lr=lr, eps=0.0, weight_decay=0.0, density=density, update_gap=gap, proj_type="svd",
                      inactive_update_rule="no")  # fmt: skip

    def peer(params):
        groups = [{"params": params, "rank": 4, "update_proj_gap": gap, "scale": 1.0, "proj_type": "std"}]
        return GaLoreAdamW(groups, lr=lr, eps=0.0, weight_decay=0.0, no_deprecation_warning=True)

    assert run_pair(ours, peer, steps=gap, problem=problem) < 2e-6
    assert run_pair(ours, peer, steps=gap + 2, problem=problem) > 1e-4


def test_svd_rank_beyond_the_smaller_dimension_is_the_thin_svd_as_galore_adamw() -> None:
    """With ``proj_side="reverse_std"`` the larger dimension is reduced, so ρ can ask for more singular vectors
    than a 12×8 matrix has: the official code and GaLore both take the thin SVD's ``U[:, :k]`` (8 columns, here
    for k = round(12·0.75) = 9). Extra null-space columns would change the projected moments from the first step.
    """
    density, gap, lr = 0.75, 4, 1e-2
    problem = _Float32(Problem(shapes=((12, 8), (7,)), seed=5))

    def ours(params):
        return FRUGAL(params, lr=lr, eps=0.0, weight_decay=0.0, density=density, update_gap=gap, proj_type="svd",
                      proj_side="reverse_std", inactive_update_rule="no", reset_statistics=False)  # fmt: skip

    def peer(params):
        # galore_torch's reverse_std maps a wide matrix's update back with the wrong side: tall matrices only
        groups = [
            {"params": [params[0]], "rank": round(12 * density), "update_proj_gap": gap, "scale": 1.0,
             "proj_type": "reverse_std"},
            {"params": [params[1]]},
        ]  # fmt: skip
        return GaLoreAdamW(groups, lr=lr, eps=0.0, weight_decay=0.0, no_deprecation_warning=True)

    assert run_pair(ours, peer, steps=3 * gap + 1, problem=problem) < 1e-5
