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
def bn_path(request, monkeypatch):
    """Run a functional-level test on both CPU roads: the ``cpu`` backend's checked methods behind the
    autograd layer ("regular"), and the one-call road, whose small kernels take inputs up to
    ``bnkit.kernels.cpu.plan.SMALL_NUMEL`` (every call up to ``ONE_CALL_NUMEL``)."""
    if request.param == "regular":
        from bnkit.kernels.cpu import plan

        monkeypatch.setattr(plan, "SMALL_NUMEL", 0)
        monkeypatch.setattr(plan, "ONE_CALL_NUMEL", 0)
    return request.param
