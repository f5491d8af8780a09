"""Model utilities: recursive module transforms and read-only reports."""

from bnkit.utils.convert import convert

__all__ = ["convert"]
