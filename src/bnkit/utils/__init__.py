"""Model utilities: recursive module transforms and read-only reports."""

from bnkit.utils.convert import convert
from bnkit.utils.fold import fold
from bnkit.utils.inspect import inspect
from bnkit.utils.recalibrate import recalibrate

__all__ = ["convert", "fold", "inspect", "recalibrate"]
