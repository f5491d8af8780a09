"""Tolerances of the whole suite, in one place: data, not code paths.

One table per kind of comparison, each ``dtype -> (atol, rtol)``; a test picks the table by what it
compares and the entry by dtype (``assert_close(actual, expected, table=GRAD)``). A test keeps a literal
tolerance only where it derives it from its data (and says how) or checks exactness (``atol=0, rtol=0``).
Half-precision outputs may differ by one rounding of the result (one ulp at the output's magnitude),
hence their loose entries.
"""

import torch

Table = dict[torch.dtype, tuple[float, float]]

# One call's output (or running statistics after one update) against torch, the oracle, in the same dtype.
OUTPUT: Table = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3.2e-2, 1.6e-2),
}

# Gradients: the backward sums dy and dy * xhat over the batch and combines them, one reduction more than
# the forward, so one digit more of slack. float32 gradients are checked against float64 math: one digit
# more than FLOAT64_REFERENCE.
GRAD: Table = {
    torch.float64: (1e-11, 1e-9),
    torch.float32: (1e-5, 1e-4),
}

# The hand-derived backward (the custom ops, reference.backward_*) against autograd through the same
# forward and against torch's backward, float64, tiny inputs (at most 15 values per channel): the same
# short sums in another order, so OUTPUT's bound without GRAD's extra digit.
BACKWARD_FORMULA: Table = {
    torch.float64: (1e-12, 1e-10),
}

# Results a few roundings away from the expected value with no sum over the batch in between: eval-mode
# outputs, running statistics copied or updated (each step adds momentum times a batch statistic, whose
# own rounding shrinks by that factor), values printed at full precision.
ELEMENTWISE: Table = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
}

# A float32 result against the same math done in float64 (explain's textbook, a float64 oracle): only one
# side rounds.
FLOAT64_REFERENCE: Table = {
    torch.float32: (1e-6, 1e-5),
}

# float32 outputs over a few dozen values per channel (explain's examples, the demo's losses): short sums
# leave fewer roundings than OUTPUT allows for large batches.
SHORT: Table = {
    torch.float32: (1e-5, 1e-5),
}

# Variants (ghost, renorm, batch norm + activation) against their defining equations written in the test,
# or against torch's batch norm they reduce to: the variant composes its output from more ops (per-slice
# statistics, r and d, the activation's slope). float32 results are checked against the equations in
# float64, as FLOAT64_REFERENCE.
VARIANT: Table = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-6, 1e-5),
}

# Statistics merged across processes (Chan's formula over gathered partial sums) against one pass of
# torch over the concatenated batch.
MERGED: Table = {
    torch.float64: (1e-12, 1e-9),
    torch.float32: (1e-6, 1e-5),
}

# Chan's merge of partial (count, mean, M2) against the statistics of the whole computed directly, float64,
# on data far from zero (relative only: an absolute floor would mean nothing at 1e4): a few roundings per
# merge.
CHAN: Table = {
    torch.float64: (0.0, 1e-12),
}

# Several training steps: 20 SGD steps of a small network, or running statistics after several momentum
# updates; each step adds its roundings.
TRAINING: Table = {
    torch.float64: (1e-12, 1e-9),
    torch.float32: (1e-5, 1e-4),
}

# A network of several layers (conv, BN, activation) against its torch twin or an unconverted/unfused copy,
# one forward (and backward): each layer's rounding compounds.
NETWORK: Table = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
}

# A Triton kernel against the reference backend (same math, other summation order and fused multiply-adds).
KERNEL: Table = {
    torch.float64: (1e-11, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}

# The numba cpu backend (either road) against the reference backend, torch's CPU batch norm or float64 math,
# with arbitrary coefficients and offset data: the same math, float32 blocks summed in float64, a few ulps
# of the output dtype. Tighter than KERNEL's float64 and bfloat16 entries, which allow for the Triton
# kernels' reduction order and fused multiply-adds.
CPU_KERNEL: Table = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# Per-channel reductions of the cpu kernels (mean, variance, sum(dy) / M, sum(dy * (x - mean)) / M), keyed
# by the data's dtype, against the reference backend's float64 sums: float64 accumulation on both sides,
# then one rounding to the statistics dtype (float32 for 16-bit data).
CPU_STATS: Table = {
    torch.float64: (1e-11, 1e-11),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-4, 1e-4),
    torch.bfloat16: (1e-4, 1e-4),
}

# Two roads to the same numbers on data of unit scale (offsets and spreads of order one), same dtype:
# bnkit's cpu kernels against its reference backend, its composed torch ops or torch's CPU batch norm,
# through the public functions and modules (outputs, running statistics, gradients). Tighter than
# OUTPUT, whose float32 entry also covers offset data.
UNIT_SCALE: Table = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
}

# The Triton backend against torch's CUDA batch norm (large GPU shapes; cuDNN reduces in its own order).
CUDA: Table = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

# A whole step through the functional on the GPU (output, running statistics and the gradients of a
# forward and backward) against torch's: ten times CUDA, for the backward's reductions over large
# batches on top of the forward's and the 16-bit gradients' rounding.
CUDA_STEP: Table = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-3, 1e-3),
    torch.float16: (4e-2, 4e-2),
    torch.bfloat16: (3e-1, 3e-1),
}


def tolerance(dtype: torch.dtype, table: Table | None = None) -> dict[str, float]:
    """``{"atol": ..., "rtol": ...}`` of ``dtype`` in ``table`` (default ``OUTPUT``); exact for integer dtypes."""
    if not dtype.is_floating_point:
        return {"atol": 0.0, "rtol": 0.0}
    atol, rtol = (OUTPUT if table is None else table)[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual, expected, dtype: torch.dtype | None = None, table: Table | None = None, **kwargs) -> None:
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: ``expected``'s, or its first
    tensor's for a sequence) in ``table`` (default ``OUTPUT``); other keywords (``msg``, ...) pass through."""
    if dtype is None:
        first = expected
        while isinstance(first, (tuple, list)):
            first = first[0]
        dtype = first.dtype
    torch.testing.assert_close(actual, expected, **tolerance(dtype, table), **kwargs)
