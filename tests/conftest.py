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
    """Run a functional-level test on both CPU paths: the ``cpu`` backend's kernels behind the autograd
    layer ("regular"), and the one-call path that takes inputs up to ``bnkit.small.SMALL_NUMEL`` (eval
    calls without a graph: ``ONE_CALL_NUMEL``)."""
    if request.param == "regular":
        from bnkit import small

        monkeypatch.setattr(small, "SMALL_NUMEL", 0)
        monkeypatch.setattr(small, "ONE_CALL_NUMEL", 0)
    return request.param
