"""Lion (spec §4) against lion_pytorch.Lion (lucidrains) and pytorch_optimizer.Lion ("PO"): bit for bit.

Same arguments in all three. lion_pytorch needs ``decoupled_weight_decay=False`` (its True divides λ by the
initial lr, a different decay); PO's defaults ``weight_decouple=True, fixed_decay=False`` are the spec's decay.
The update is ±lr per coordinate and the momentum is the same two EMAs, so the trajectories must be identical,
not merely close; PO's lerp rounds the momentum differently from β·m + (1-β)·g, which never flips a sign here.
"""

import lion_pytorch
import pytest
import pytorch_optimizer as po

import optimlab

from .conftest import Problem, bitwise_equal, trajectory

LR, WD = 1e-3, 0.1
PEERS = {
    "lion_pytorch": lambda ps: lion_pytorch.Lion(ps, lr=LR, weight_decay=WD, decoupled_weight_decay=False),
    "po_foreach": lambda ps: po.Lion(ps, lr=LR, weight_decay=WD, foreach=None),
    "po_per_param": lambda ps: po.Lion(ps, lr=LR, weight_decay=WD, foreach=False),
    "lionk_sign": lambda ps: optimlab.LionK(ps, lr=LR, weight_decay=WD, kappa="sign"),
}
CASES = {
    "quadratic": (Problem(), 0),
    # every 4th gradient coordinate is exactly 0 (with m = 0 there: the sign(0) = 0 path)
    "zero_coords": (Problem(zero_every=4), 0),
    # Lion has no step counter, so a parameter with no grad on the first 5 steps must agree too
    "late_param": (Problem(), 5),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("peer", PEERS)
def test_bitwise_equal(peer, case):
    problem, late = CASES[case]
    ours, _ = trajectory(lambda ps: optimlab.Lion(ps, lr=LR, weight_decay=WD), problem, late=late)
    theirs, _ = trajectory(PEERS[peer], problem, late=late)
    assert bitwise_equal(ours, theirs)
