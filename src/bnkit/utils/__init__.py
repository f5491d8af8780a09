"""Model utilities: recursive module transforms and read-only reports."""

from bnkit.utils.batch_stats import batch_stats
from bnkit.utils.convert import convert
from bnkit.utils.diagnose import diagnose
from bnkit.utils.fold import fold
from bnkit.utils.freeze import freeze, unfreeze
from bnkit.utils.inspect import inspect
from bnkit.utils.quantization import fuser_method_mapping, quantization_backend_config
from bnkit.utils.recalibrate import recalibrate

__all__ = [
    "batch_stats",
    "convert",
    "diagnose",
    "fold",
    "freeze",
    "fuser_method_mapping",
    "inspect",
    "quantization_backend_config",
    "recalibrate",
    "unfreeze",
]
