"""optimlab: optimization methods from recent machine-learning research, faithful, fast and tested.

Every method is a registry entry (:mod:`optimlab.registry`); :func:`create` builds one by name and
:func:`available` lists them.
"""

from optimlab.optim.adan import Adan
from optimlab.optim.diffgrad import DiffGrad
from optimlab.optim.exadam import EXAdam
from optimlab.optim.lion import Lion, LionK
from optimlab.registry import REGISTRY, MethodInfo, available, create, get
from optimlab.transforms.orthograd import OrthoGrad

__version__ = "0.1.0"

__all__ = [
    "Adan",
    "DiffGrad",
    "EXAdam",
    "Lion",
    "LionK",
    "OrthoGrad",
    "REGISTRY",
    "MethodInfo",
    "available",
    "create",
    "get",
    "__version__",
]
