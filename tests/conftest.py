import os
import sys
from pathlib import Path

import pytest
import torch

# tests/ mirrors src/bnkit/ in packages (tests.kernels.test_cpu, ...); the shared helpers beside this file
# (bn_tolerances, models, cli_calls) are imported by their bare names from every folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tests run with the backend the environment asks for (default auto); helpers below
# compare bnkit against torch.nn, the oracle.
torch.set_num_threads(int(os.environ.get("BNKIT_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["regular", "small"])
def bn_path(request):
    """Run a functional-level test on both CPU roads: the ``cpu`` backend's checked methods behind the
    autograd layer ("regular", ``bnkit.kernels.forced_road("checked")``), and the road the plan picks,
    the one-call road for the usual tensors (the small kernels on a test's sizes)."""
    # (imported here, not at the top: tests/kernels/triton_interpret_cases.py checks what importing bnkit imports)
    from bnkit.kernels import forced_road

    with forced_road("checked" if request.param == "regular" else None):
        yield request.param
