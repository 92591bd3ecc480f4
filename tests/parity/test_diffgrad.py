"""diffGrad (spec §3, v0 = official diffGrad_v2) against torch_optimizer.DiffGrad ("TO") and
pytorch_optimizer.DiffGrad ("PO").

TO is the official algorithm line by line (L2 decay, old-Adam eps form, per-parameter step): same arguments.
PO equals it with two caveats: its default ``weight_decouple=True`` is AdamW-style decay, so L2 needs
``weight_decouple=False``; and its denominator is sqrt(v + 1e-15) + eps (base optimizer ``apply_ams_bound``).
"""

import pytest
import pytorch_optimizer as po
import torch_optimizer as to

import optimlab

from .conftest import Problem, run_pair

LR = 1e-2
TOL = 1e-12  # vs TO: measured 0.0; an eps-placement or friction error shows at >= 1e-8 here

# PO's 1e-15 inside the sqrt perturbs a step by a relative ~5e-16/v, so the residue depends on the smallest
# second moment: at gradient scale 1, a coordinate with |g1| = 3e-4 in this problem leaves 2.9e-8. At scale 10
# (still a varied friction: steps change g by ~1) the residue is <= 6e-13; 1e-11 keeps a 1000x margin below
# the 2e-8 that doubling eps produces (checked below).
PO_PROBLEM = Problem(scale=10.0)
PO_TOL = 1e-11


def ours(**kw):
    return lambda ps: optimlab.DiffGrad(ps, lr=LR, **kw)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_matches_torch_optimizer(weight_decay):
    assert run_pair(ours(weight_decay=weight_decay), lambda ps: to.DiffGrad(ps, lr=LR, weight_decay=weight_decay)) < TOL


def test_late_parameter_matches_torch_optimizer():
    # TO keeps a per-parameter step like ours (spec §1 pitfall), so a param with no grad on 5 steps still agrees.
    assert run_pair(ours(), lambda ps: to.DiffGrad(ps, lr=LR), late=5) < TOL


@pytest.mark.parametrize("foreach", [None, False])  # PO's two code paths
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_matches_pytorch_optimizer(weight_decay, foreach):
    peer = lambda ps: po.DiffGrad(ps, lr=LR, weight_decay=weight_decay, weight_decouple=False, foreach=foreach)
    assert run_pair(ours(weight_decay=weight_decay), peer, problem=PO_PROBLEM) < PO_TOL


def test_pytorch_optimizer_tolerance_sees_eps():
    # PO_TOL is loose only by the 1e-15 term: a wrong eps (here doubled) is still caught.
    assert run_pair(ours(eps=2e-8), lambda ps: po.DiffGrad(ps, lr=LR), problem=PO_PROBLEM) > 100 * PO_TOL
