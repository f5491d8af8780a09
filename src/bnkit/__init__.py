"""bnkit: batch normalization for PyTorch from first principles.

Public API: :mod:`bnkit.nn` (drop-in modules), :mod:`bnkit.functional`, :func:`convert`,
and the backend switches of :mod:`bnkit.kernels`.
"""

from bnkit import functional, nn
from bnkit.kernels import available_backends, last_backend, set_backend, use_backend
from bnkit.nonfinite import get_nonfinite_policy, name_layers, nonfinite_policy, set_nonfinite_policy
from bnkit.utils import batch_stats, convert, diagnose, fold, freeze, inspect, recalibrate, unfreeze

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_backends",
    "batch_stats",
    "convert",
    "diagnose",
    "fold",
    "freeze",
    "functional",
    "get_nonfinite_policy",
    "inspect",
    "last_backend",
    "name_layers",
    "nn",
    "nonfinite_policy",
    "recalibrate",
    "set_backend",
    "set_nonfinite_policy",
    "unfreeze",
    "use_backend",
]
