"""Public functional API: ``batch_norm`` (torch's signature), its pure twin, and the variants.

* :func:`batch_norm` has exactly the signature, semantics and errors of torch's
  ``F.batch_norm``; :func:`batch_norm_pure` returns the new running statistics instead of
  writing them (:mod:`bnkit.functional.standard`).
* The variants, each pure and torch-style: :func:`batch_norm_act`, :func:`batch_renorm`,
  :func:`ghost_batch_norm`, :func:`frozen_batch_norm` (:mod:`bnkit.functional.variants`).

The modules of this package, each with one job: ``args`` (argument checks, torch's errors),
``layout`` (``channel_dim`` and the output's memory format), ``running`` (the running
statistics' update and the one place they are written), ``masked`` (the ``mask=`` argument),
``standard`` and ``variants``. This file only re-exports.
"""

from bnkit.functional.args import check_batch_norm_args, check_pure_args
from bnkit.functional.layout import as_torch_layout, from_channels_first, to_channels_first
from bnkit.functional.running import updated_running_stats, write_running_stats
from bnkit.functional.standard import batch_norm, batch_norm_pure
from bnkit.functional.variants import (
    GHOST_RUNNING_STATS_UPDATES,
    batch_norm_act,
    batch_norm_act_pure,
    batch_renorm,
    batch_renorm_pure,
    check_renorm_limits,
    frozen_batch_norm,
    ghost_batch_norm,
    ghost_batch_norm_pure,
    renorm_limits,
)

__all__ = [
    "GHOST_RUNNING_STATS_UPDATES",
    "as_torch_layout",
    "batch_norm",
    "batch_norm_act",
    "batch_norm_act_pure",
    "batch_norm_pure",
    "batch_renorm",
    "batch_renorm_pure",
    "check_batch_norm_args",
    "check_pure_args",
    "check_renorm_limits",
    "frozen_batch_norm",
    "from_channels_first",
    "ghost_batch_norm",
    "ghost_batch_norm_pure",
    "renorm_limits",
    "to_channels_first",
    "updated_running_stats",
    "write_running_stats",
]
