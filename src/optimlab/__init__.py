"""optimlab: optimization methods from recent machine-learning research, faithful, fast and tested.

Every method is a registry entry (:mod:`optimlab.registry`); :func:`create` builds one by name and
:func:`available` lists them. Schedules and learning-rate rules live in :mod:`optimlab.schedules`, losses and
layers in :mod:`optimlab.nn`, solvers in :mod:`optimlab.solvers`, per-sample gradients in
:mod:`optimlab.per_sample`, training across workers in :mod:`optimlab.distributed`, differentially private
training in :mod:`optimlab.privacy`.
"""

from optimlab.distributed import EF14, EF21, EControl, Flag, OneBitAdam
from optimlab.nn.stablemax import StableMaxCrossEntropyLoss
from optimlab.nn.tract import TrAct
from optimlab.nn.wtacrs import WTACRSLinear
from optimlab.optim.adadagrad import AdaGradNorm
from optimlab.optim.adahessian import AdaHessian
from optimlab.optim.adan import Adan
from optimlab.optim.coord_clipped import CoordClippedAdam, CoordClippedLion, CoordClippedSGD, CoordClippedSignSGD
from optimlab.optim.diffgrad import DiffGrad
from optimlab.optim.exadam import EXAdam
from optimlab.optim.frugal import FRUGAL, frugal_param_groups
from optimlab.optim.lion import Lion, LionK
from optimlab.optim.mfac import MFAC, MFACInverse, mfac_ihvp
from optimlab.optim.sso import SSO
from optimlab.privacy import DPSGD, DiceSGD
from optimlab.registry import REGISTRY, MethodInfo, available, create, get
from optimlab.solvers.normalized_lrgd import NormalizedLRGD
from optimlab.transforms.coord_clip import CoordClip
from optimlab.transforms.orthograd import OrthoGrad

__version__ = "0.1.0"

__all__ = [
    "AdaGradNorm",
    "AdaHessian",
    "Adan",
    "CoordClip",
    "CoordClippedAdam",
    "CoordClippedLion",
    "CoordClippedSGD",
    "CoordClippedSignSGD",
    "DiceSGD",
    "DiffGrad",
    "DPSGD",
    "EControl",
    "EF14",
    "EF21",
    "EXAdam",
    "Flag",
    "FRUGAL",
    "frugal_param_groups",
    "Lion",
    "LionK",
    "MFAC",
    "MFACInverse",
    "mfac_ihvp",
    "NormalizedLRGD",
    "OneBitAdam",
    "OrthoGrad",
    "SSO",
    "StableMaxCrossEntropyLoss",
    "TrAct",
    "WTACRSLinear",
    "REGISTRY",
    "MethodInfo",
    "available",
    "create",
    "get",
    "__version__",
]
