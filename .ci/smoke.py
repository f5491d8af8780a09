"""Smoke test of an installed bnkit wheel (run by .ci/wheel-smoke as an unprivileged user).

Checks that the package imports from site-packages (not a source tree), that a BatchNorm2d training
step on the numba ``cpu`` backend matches torch's, and that numba's kernel cache works although the
package directory is not writable: the first run (``first``) compiles and saves the kernels in the
per-user cache directory, the second (``second``) loads every kernel it runs from there.
"""

import os
import sys
from pathlib import Path

import numba
import torch

import bnkit

stage = sys.argv[1]
package = Path(bnkit.__file__).resolve().parent
assert "site-packages" in package.parts, f"bnkit imported from {package}, not from an installed wheel"
assert not os.access(package / "kernels", os.W_OK), "the package directory is writable: this test needs it not to be"

torch.manual_seed(0)
x = torch.randn(16, 16, 8, 8, requires_grad=True)
ours, theirs = bnkit.nn.BatchNorm2d(16), torch.nn.BatchNorm2d(16)
with bnkit.use_backend("cpu"):
    y = ours(x)
    assert bnkit.last_backend() == "cpu", bnkit.last_backend()
    (gx,) = torch.autograd.grad(y.square().sum(), x)
expected = theirs(x)
(gx_expected,) = torch.autograd.grad(expected.square().sum(), x)
torch.testing.assert_close(y, expected)
torch.testing.assert_close(gx, gx_expected)
torch.testing.assert_close(ours.running_var, theirs.running_var)

hits = misses = 0
paths = set()
for name, module in list(sys.modules.items()):
    if not name.startswith("bnkit.kernels"):
        continue
    for obj in vars(module).values():
        if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.stats.cache_path:
            stats = obj.stats
            hits += sum(stats.cache_hits.values())
            misses += sum(stats.cache_misses.values())
            paths.add(Path(stats.cache_path))
assert paths and not any(package in p.parents or p == package for p in paths), paths
if stage == "first":
    assert misses > 0, "a first run on an empty cache compiled nothing?"
else:
    assert misses == 0 and hits > 0, f"second run: {hits} kernels from the cache, {misses} compiled again"
print(f"smoke {stage}: ok ({hits} kernels loaded from and {misses} compiled into {sorted(map(str, paths))})")
