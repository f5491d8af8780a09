"""bnkit.functional.batch_norm against torch.nn.functional.batch_norm (the oracle)."""

import inspect
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from bn_tolerances import assert_close

import bnkit.functional as BF

DTYPES_MIXED = [
    # (input dtype, parameter/running-stat dtype)
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]


def _outcome(fn, *args, **kwargs):
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the error itself is what is compared
        return type(exc), str(exc)


def test_signature_matches_torch():
    ours = inspect.signature(BF.batch_norm).parameters
    theirs = inspect.signature(F.batch_norm).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default
        assert ours[name].kind == p.kind
    # bnkit's extensions (mask=, channel_dim=) come after torch's parameters, keyword-only and with a
    # default, so every call written for torch means the same; nothing else is added
    extra = list(ours)[len(theirs):]
    assert extra == ["mask", "channel_dim"]
    for name in extra:
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert ours[name].default is not inspect.Parameter.empty, name
    assert ours["mask"].default is None and ours["channel_dim"].default == 1


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (2, 3, 4, 5), (2, 3, 2, 3, 4)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype,pdtype", DTYPES_MIXED)
def test_values_and_inplace_update(shape, training, affine, dtype, pdtype):
    c = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype)
    w = torch.randn(c, dtype=pdtype) if affine else None
    b = torch.randn(c, dtype=pdtype) if affine else None
    rm_t, rv_t = torch.randn(c, dtype=pdtype), torch.rand(c, dtype=pdtype) + 0.5
    rm_b, rv_b = rm_t.clone(), rv_t.clone()
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training, 0.3, 1e-4)
    y_b = BF.batch_norm(x, rm_b, rv_b, w, b, training, 0.3, 1e-4)
    assert y_b.dtype == y_t.dtype and y_b.shape == y_t.shape
    assert_close(y_b, y_t)
    assert_close(rm_b, rm_t)
    assert_close(rv_b, rv_t)


def test_training_without_running_stats():
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(BF.batch_norm(x, None, None, training=True), F.batch_norm(x, None, None, training=True))


def test_momentum_tensor_and_pure_does_not_mutate():
    x = torch.randn(6, 3, 2, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 1
    rm0, rv0 = rm.clone(), rv.clone()
    y, nm, nv = BF.batch_norm_pure(x, rm, rv, None, None, True, torch.tensor(0.25, dtype=torch.float64), 1e-5)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    y_t = F.batch_norm(x, rm0, rv0, None, None, True, 0.25, 1e-5)
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(nm, rm0)
    torch.testing.assert_close(nv, rv0)
    # eval: the running statistics come back as given
    _, em, ev = BF.batch_norm_pure(x, rm, rv, training=False)
    assert em is rm and ev is rv


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0)])
def test_empty_batch_as_torch(training, shape):
    w_t = torch.rand(3, requires_grad=True)
    b_t = torch.rand(3, requires_grad=True)
    w_b, b_b = w_t.detach().clone().requires_grad_(), b_t.detach().clone().requires_grad_()
    x_t = torch.randn(shape, requires_grad=True)
    x_b = x_t.detach().clone().requires_grad_()
    rm_t, rv_t = torch.randn(3), torch.rand(3)
    rm_b, rv_b = rm_t.clone(), rv_t.clone()
    y_t = F.batch_norm(x_t, rm_t, rv_t, w_t, b_t, training)
    y_b = BF.batch_norm(x_b, rm_b, rv_b, w_b, b_b, training)
    assert y_b.shape == y_t.shape and y_b.dtype == y_t.dtype
    assert torch.equal(rm_b, rm_t) and torch.equal(rv_b, rv_t)
    (y_t.sum() + 1).backward()
    (y_b.sum() + 1).backward()
    for a, e in ((x_b, x_t), (w_b, w_t), (b_b, b_t)):
        assert (a.grad is None) == (e.grad is None)
        if e.grad is not None:
            torch.testing.assert_close(a.grad, e.grad)


@pytest.mark.parametrize("training", [True, False])
def test_non_contiguous_input(training):
    base = torch.randn(4, 6, 5, 3, dtype=torch.float64)
    x = base.transpose(1, 3)[:, ::1, :, ::2]  # (4, 3, 5, 3) with odd strides
    assert not x.is_contiguous()
    rm_t, rv_t = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 1
    rm_b, rv_b = rm_t.clone(), rv_t.clone()
    torch.testing.assert_close(BF.batch_norm(x, rm_b, rv_b, training=training),
                               F.batch_norm(x, rm_t, rv_t, training=training))
    torch.testing.assert_close(rv_b, rv_t)


@pytest.mark.parametrize("training", [True, False])
def test_momentum_none_rejected_as_torch(training):
    x = torch.randn(4, 3)
    expected = _outcome(F.batch_norm, x, torch.zeros(3), torch.ones(3), training=training, momentum=None)
    assert _outcome(BF.batch_norm, x, torch.zeros(3), torch.ones(3), training=training, momentum=None) == expected
    with pytest.raises(TypeError, match="momentum"):
        BF.batch_norm_pure(x, torch.zeros(3), torch.ones(3), training=True, momentum=None)


# --- errors: same exception type and same message as torch, for many argument mixes ---

def _error_cases(n: int = 250):
    rng = random.Random(0)
    shapes = [(), (3,), (1,), (1, 3), (2, 3), (4, 3, 1), (1, 3, 1), (0, 3), (2, 3, 2, 2), (2, 0)]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.complex64]
    pdtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    sizes = [None, "c", 0, 4]
    combos = list(itertools.product(shapes, dtypes, [True, False]))
    for _ in range(n):
        shape, dtype, training = rng.choice(combos)
        args = []
        for _k in range(4):
            size = rng.choice(sizes)
            numel = (shape[1] if len(shape) > 1 else 3) if size == "c" else size
            args.append(None if size is None else (numel, rng.choice(pdtypes)))
        eps = rng.choice([1e-5, 1e-5, 1e-5, 0.0, -1.0])
        yield shape, dtype, training, args, eps


def _materialize(shape, dtype, args):
    x = torch.ones(shape, dtype=dtype) if dtype in (torch.int64, torch.bool) else torch.randn(shape).to(dtype)
    ts = [None if a is None else torch.rand(a[0]).to(a[1]) + 0.5 for a in args]
    return x, ts


@pytest.mark.parametrize("case", list(_error_cases()), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_errors_match_torch(case):
    shape, dtype, training, args, eps = case
    x, (rm, rv, w, b) = _materialize(shape, dtype, args)
    expected = _outcome(F.batch_norm, x, *(None if t is None else t.clone() for t in (rm, rv)), w, b, training,
                        0.1, eps)
    actual = _outcome(BF.batch_norm, x, *(None if t is None else t.clone() for t in (rm, rv)), w, b, training,
                      0.1, eps)
    if expected[0] == "ok":
        assert actual[0] == "ok", actual
        assert actual[1].dtype == expected[1].dtype and actual[1].shape == expected[1].shape
    else:
        assert actual == expected
