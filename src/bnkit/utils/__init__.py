"""Model utilities: recursive module transforms and read-only reports."""

from bnkit.utils.batch_stats import batch_stats
from bnkit.utils.convert import convert

__all__ = ["batch_stats", "convert"]
