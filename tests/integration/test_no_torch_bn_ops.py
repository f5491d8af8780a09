"""The rule "no torch normalization op inside bnkit", proved by recording dispatched aten ops."""

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import bnkit

FORBIDDEN = ("batch_norm", "instance_norm", "layer_norm", "group_norm", "cudnn_", "miopen_")


class RecordOps(TorchDispatchMode):
    """Records every aten op dispatched, including those *inside* bnkit's custom ops.

    A dispatch mode is switched off while it handles an op, so a custom op's body would be
    invisible; for ``bnkit::*`` ops the body (whatever backend it picks) runs again under
    the mode, so a forbidden op hidden in a kernel launcher is caught too.
    """

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops.add(name)
        if name.startswith("bnkit."):
            body = OPDEFS[func._schema.name]._init_fn
            with self:
                return body(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _torch_ops(layer, x):
    rec = RecordOps()
    with rec:
        layer(x).square().sum().backward()
    return rec.ops


CASES = [
    (bnkit.nn.BatchNorm1d, (4, 3)),
    (bnkit.nn.BatchNorm1d, (4, 3, 5)),
    (bnkit.nn.BatchNorm2d, (2, 3, 4, 4)),
    (bnkit.nn.BatchNorm3d, (2, 3, 2, 2, 2)),
    (bnkit.nn.LazyBatchNorm1d, (4, 3, 5)),
    (bnkit.nn.LazyBatchNorm2d, (2, 3, 4, 4)),
    (bnkit.nn.LazyBatchNorm3d, (2, 3, 2, 2, 2)),
]


@pytest.mark.parametrize("cls,shape", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_no_torch_normalization_op_dispatched(cls, shape, training, track):
    layer = cls(track_running_stats=track) if "Lazy" in cls.__name__ else cls(3, track_running_stats=track)
    layer(torch.randn(shape))  # materialize lazy modules outside the recording
    layer.train(training)
    x = torch.randn(shape, requires_grad=True)
    ops = _torch_ops(layer, x)
    assert any(op.startswith("bnkit.") for op in ops), ops  # the recorder does see bnkit's ops
    assert any(op.startswith("aten.") and ("sum" in op or "mean" in op) for op in ops), ops  # ... and their bodies
    bad = sorted(op for op in ops if any(f in op for f in FORBIDDEN))
    assert not bad, bad


def test_the_recorder_catches_torch_batch_norm():
    """Guard against a recorder that sees nothing: torch's own layer is flagged."""
    ops = _torch_ops(torch.nn.BatchNorm2d(3), torch.randn(2, 3, 2, 2, requires_grad=True))
    assert any("batch_norm" in op for op in ops), ops


def test_functional_and_pure_use_no_torch_normalization_op():
    x = torch.randn(4, 3, 2, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    rec = RecordOps()
    with rec:
        bnkit.functional.batch_norm(x, torch.zeros(3), torch.ones(3), w, None, training=True).sum().backward()
        bnkit.functional.batch_norm_pure(x, torch.zeros(3), torch.ones(3), w, None, training=False)[0].sum().backward()
    assert not [op for op in rec.ops if any(f in op for f in FORBIDDEN)]
