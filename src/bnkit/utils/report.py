"""What a model tool did: a list of what it changed, and ``skipped``, what it left as it was and why."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Skipped", "ToolReport"]


@dataclass(frozen=True)
class Skipped:
    """A batch-norm layer (or a part of the model) that a model tool left as it was, and why."""

    name: str
    reason: str


class ToolReport(list):
    """A list of what the tool changed, plus ``skipped``: every layer it left alone, with the reason,
    so that nothing is dropped silently."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: list[Skipped] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(changed={list(self)!r}, skipped={self.skipped!r})"
