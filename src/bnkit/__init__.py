"""bnkit: batch normalization for PyTorch from first principles.

Public API: :mod:`bnkit.nn` (drop-in modules), :mod:`bnkit.functional`, :func:`convert`,
and the backend switches of :mod:`bnkit.kernels`.
"""

from bnkit import functional, nn
from bnkit.kernels import available_backends, last_backend, set_backend, use_backend
from bnkit.nonfinite import nonfinite_policy, set_nonfinite_policy
from bnkit.utils import batch_stats, convert
from bnkit.utils.freeze import freeze, unfreeze

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_backends",
    "batch_stats",
    "convert",
    "freeze",
    "functional",
    "last_backend",
    "nn",
    "nonfinite_policy",
    "set_backend",
    "set_nonfinite_policy",
    "unfreeze",
    "use_backend",
]
