"""Model utilities: recursive module transforms and read-only reports."""

from bnkit.utils.convert import convert
from bnkit.utils.freeze import freeze, unfreeze

__all__ = ["convert", "freeze", "unfreeze"]
