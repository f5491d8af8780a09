"""Model utilities: recursive module transforms and read-only reports."""

from bnkit.utils.batch_stats import batch_stats
from bnkit.utils.convert import convert
from bnkit.utils.freeze import freeze, unfreeze

__all__ = ["batch_stats", "convert", "freeze", "unfreeze"]
