"""Per-dtype tolerances for comparing bnkit with torch (data, not code paths).

``OUTPUT`` compares outputs/gradients of one call; ``TRAINING`` compares whole training
runs (the issue's end-to-end bar). Half-precision outputs may differ by one rounding of
the result (one ulp at the output's magnitude), hence the loose entries.
"""

import torch

# dtype -> (atol, rtol)
OUTPUT: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3.2e-2, 1.6e-2),
}

# dtype -> (atol, rtol) for 20 SGD steps of a small network
TRAINING: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-9),
    torch.float32: (1e-5, 1e-4),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, table=None) -> None:
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: ``expected``'s)."""
    table = OUTPUT if table is None else table
    atol, rtol = table[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
