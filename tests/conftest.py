import os

import pytest
import torch

# Tests run with the backend the environment asks for (default auto); helpers below
# compare bnkit against torch.nn, the oracle.
torch.set_num_threads(int(os.environ.get("BNKIT_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
