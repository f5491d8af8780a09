"""What happens to running statistics when a training batch has non-finite statistics.

torch folds a NaN/inf batch statistic into the running statistics, which then stay
non-finite forever. bnkit modules take ``nonfinite=`` (``"propagate"``: torch's
behaviour, the default; ``"skip"``: leave running statistics and ``num_batches_tracked``
untouched and warn once naming the layer; ``"raise"``: raise naming the layer). A
module whose option is ``None`` follows the process-wide default set by
:func:`set_nonfinite_policy` / :func:`nonfinite_policy`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["NONFINITE_POLICIES", "check_policy", "get_nonfinite_policy", "nonfinite_policy", "set_nonfinite_policy"]

NONFINITE_POLICIES = ("propagate", "skip", "raise")
_default = "propagate"


def check_policy(policy: str | None) -> str | None:
    if policy is not None and policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE_POLICIES)} or None, got {policy!r}")
    return policy


def get_nonfinite_policy() -> str:
    """The process-wide default policy for modules created with ``nonfinite=None``."""
    return _default


def set_nonfinite_policy(policy: str) -> None:
    global _default
    check_policy(policy)
    _default = policy


@contextlib.contextmanager
def nonfinite_policy(policy: str) -> Iterator[None]:
    """Use ``policy`` as the default inside a block (modules with an explicit option keep it)."""
    global _default
    previous = _default
    set_nonfinite_policy(policy)
    try:
        yield
    finally:
        _default = previous
