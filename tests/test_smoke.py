import torch
from torch import nn

import bnkit


def test_batchnorm2d_matches_torch_train_and_eval():
    t = nn.BatchNorm2d(3).double()
    b = bnkit.nn.BatchNorm2d(3).double()
    b.load_state_dict(t.state_dict())
    x = torch.randn(4, 3, 5, 5, dtype=torch.double) * 3 + 1
    torch.testing.assert_close(b(x), t(x), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.running_var, t.running_var, rtol=1e-9, atol=1e-12)
    t.eval()
    b.eval()
    torch.testing.assert_close(b(x), t(x), rtol=1e-9, atol=1e-12)
