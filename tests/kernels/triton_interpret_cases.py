"""The Triton kernels run by the Triton interpreter on CPU tensors (no GPU needed).

Not collected on its own (the name does not start with ``test_``):
``tests/kernels/test_triton.py`` runs this file in a fresh pytest process with
``TRITON_INTERPRET=1`` and ``BNKIT_BACKEND=triton``, because the interpreter is chosen when
the kernels are decorated, i.e. at their first import, which another test module of the
same process may already have done. To run it by hand::

    TRITON_INTERPRET=1 BNKIT_BACKEND=triton PYTHONPATH=src python -m pytest -q tests/kernels/triton_interpret_cases.py

Checks, against the reference backend (the spec) and torch (the oracle): the four
primitives in every layout the kernels take, through both launch plans (the fused
one-launch path and the split reduction), then ``bnkit.functional.batch_norm`` and the
modules end to end (outputs, running statistics, gradients, ``last_backend()``).
"""

import functools
import os
import sys

_TRITON_BEFORE_BNKIT = "triton" in sys.modules
import bnkit  # noqa: E402  (must come before anything that imports triton, see the first test)

_TRITON_AFTER_BNKIT = "triton" in sys.modules

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bn_tolerances import ELEMENTWISE, KERNEL, OUTPUT, assert_close  # noqa: E402

from bnkit.kernels import get_backend, last_backend  # noqa: E402
from bnkit.kernels.reference import ReferenceBackend  # noqa: E402
from bnkit.kernels.triton import load_backend  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("BNKIT_BACKEND") != "triton":
    raise RuntimeError("run with TRITON_INTERPRET=1 BNKIT_BACKEND=triton (tests/kernels/test_triton.py does)")

REF = ReferenceBackend()

def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """KERNEL's entry for ``dtype`` (float16/bfloat16 outputs may differ by one ulp: both round a float32
    that differs in the last bits), times ``scale`` where the test derives a larger one from its data."""
    atol, rtol = KERNEL[dtype]
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol * scale)


# name -> builder of an (N, C, *) tensor in that memory layout; each hits a different kernel view
LAYOUTS = {
    "nchw": lambda dt: torch.randn(3, 5, 4, 6, dtype=dt),
    "channels_last": lambda dt: torch.randn(3, 5, 4, 6, dtype=dt).to(memory_format=torch.channels_last),
    "nc": lambda dt: torch.randn(9, 5, dtype=dt),
    "ncl": lambda dt: torch.randn(3, 5, 7, dtype=dt),
    "ncl_view_of_nlc": lambda dt: torch.randn(3, 7, 5, dtype=dt).movedim(2, 1),
    "channels_last_3d": lambda dt: torch.randn(2, 3, 2, 3, 4, dtype=dt).to(memory_format=torch.channels_last_3d),
    "nc11_many_channels": lambda dt: torch.randn(4, 70, 1, 1, dtype=dt),
}

# The fused path (default options, small tensors) and the split reduction with tiny tiles, so
# that several channel blocks, several tiles per program and several splits are exercised.
PLANS = {
    "fused": {},
    "split": {"fused_max_bytes": 0, "tile": 16, "max_block_c": 4, "programs_per_sm": 2},
}



@functools.cache
def _backend(plan: str):
    return load_backend(**PLANS[plan])


@pytest.fixture(params=list(PLANS))
def backend(request):
    return _backend(request.param)


def test_bnkit_import_does_not_import_triton():
    # vacuous only if something before bnkit (torch, a plugin) had already imported triton
    assert _TRITON_AFTER_BNKIT == _TRITON_BEFORE_BNKIT


def test_backend_is_interpreted_and_selected_for_cpu_tensors():
    be = get_backend("triton")
    assert be is not None and be.name == "triton" and be.interpreted
    x = torch.randn(2, 3, 4, 4)
    assert be.supports(x)
    assert be.supports(x.to(memory_format=torch.channels_last))
    assert not be.supports(x.transpose(2, 3))  # neither contiguous nor channels-inner -> reference
    assert not be.supports(x.to(torch.int32))
    assert not be.supports(torch.randn(0, 3, 4))


def _case(layout: str, dtype: torch.dtype):
    x = LAYOUTS[layout](torch.float32).to(dtype) * 3 + 2  # mean far from 0 on purpose
    c = x.shape[1]
    sd = _stats_dtype(dtype)
    w = torch.randn(c, dtype=sd)
    b = torch.randn(c, dtype=sd)
    dy = torch.randn_like(x)
    return x, w, b, dy, sd


# Every layout through the fused plan in float64; the split plan's kernels see the same two
# views (positions innermost, channels innermost), so a few layouts cover it (with 70 channels in
# blocks of 4 it needs no split at all: one program per channel block). The accumulation dtype
# does not depend on the layout, so float32 runs on three layouts per plan.
SPLIT_LAYOUTS = ("nchw", "channels_last", "ncl", "nc11_many_channels")
FLOAT32_LAYOUTS = ("nchw", "channels_last", "nc")
PRIMITIVE_CASES = (
    [("fused", layout, torch.float64) for layout in LAYOUTS]
    + [("split", layout, torch.float64) for layout in SPLIT_LAYOUTS]
    + [(plan, layout, torch.float32) for plan in PLANS for layout in FLOAT32_LAYOUTS]
)


@pytest.mark.parametrize("plan, layout, dtype", PRIMITIVE_CASES, ids=str)
def test_primitives_match_reference(plan, layout, dtype):
    backend = _backend(plan)
    x, w, b, dy, sd = _case(layout, dtype)
    assert backend.supports(x)
    y, mean, var = backend.forward_train(x, w, b, 1e-5)
    y0, mean0, var0 = REF.forward_train(x, w, b, 1e-5)
    assert y.dtype == x.dtype and y.stride() == x.stride() and mean.dtype == sd and var.dtype == sd
    _close(mean, mean0, dtype)
    _close(var, var0, dtype)
    _close(y, y0, dtype)

    scale, shift = torch.rand_like(w) + 0.5, torch.randn_like(b)
    ye = backend.forward_eval(x, mean0, scale, shift)
    assert ye.stride() == x.stride()
    _close(ye, REF.forward_eval(x, mean0, scale, shift), dtype)

    sum_dy, sum_dy_xmu = backend.backward_reduce(dy, x, mean0)
    sum_dy0, sum_dy_xmu0 = REF.backward_reduce(dy, x, mean0)
    m = x.numel() // x.shape[1]
    _close(sum_dy, sum_dy0, dtype, scale=m)  # sums of m terms: tolerance scales with m
    _close(sum_dy_xmu, sum_dy_xmu0, dtype, scale=m)

    a, k, cc = torch.randn(3, x.shape[1], dtype=sd)
    dx = backend.backward_input(dy, x, mean0, a, k, cc)
    assert dx.stride() == x.stride()
    _close(dx, REF.backward_input(dy, x, mean0, a, k, cc), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("plan, layout", [("fused", "nchw"), ("split", "channels_last")])
def test_half_precision_primitives(plan, layout, dtype):
    backend = _backend(plan)
    x, w, b, dy, sd = _case(layout, dtype)
    y, mean, var = backend.forward_train(x, w, b, 1e-5)
    y0, mean0, var0 = REF.forward_train(x, w, b, 1e-5)
    assert y.dtype == dtype and mean.dtype == torch.float32
    _close(mean, mean0, torch.float32)  # statistics accumulate in float32 from the same inputs
    _close(var, var0, torch.float32)
    _close(y, y0, dtype)
    sum_dy, sum_dy_xmu = backend.backward_reduce(dy, x, mean0)
    m = x.numel() // x.shape[1]
    _close(sum_dy, REF.backward_reduce(dy, x, mean0)[0], torch.float32, scale=m)
    _close(sum_dy_xmu, REF.backward_reduce(dy, x, mean0)[1], torch.float32, scale=m)


def test_statistics_stay_accurate_when_mean_dominates(backend):
    # |mean| / std = 1e4: E[x^2] - E[x]^2 in float32 would lose every digit of the variance.
    x = torch.randn(6, 3, 40) + 1e4
    y, mean, var = backend.forward_train(x, None, None, 1e-5)  # also: no affine parameters
    xd = x.double()
    # relative only, at float32's resolution: a float32 statistic of values near 1e4 against float64
    torch.testing.assert_close(mean.double(), xd.mean((0, 2)), atol=0, rtol=1e-7)
    torch.testing.assert_close(var.double(), xd.var((0, 2), unbiased=False), atol=0, rtol=1e-5)
    # x near 1e4 is known to float32's ulp there (about 1e-3), which y = (x - mean) / std carries: 100x
    # KERNEL's 2e-5
    _close(y, REF.forward_train(x, None, None, 1e-5)[0], torch.float32, scale=100)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
def test_nonfinite_inputs_give_nonfinite_statistics_only_where_they_are(backend):
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    x[2, 0, 3] = float("nan")
    x[0, 1, 0] = float("inf")  # the element the shift K is read from
    _, mean, var = backend.forward_train(x, None, None, 1e-5)
    finite = torch.tensor([False, False, True])
    assert torch.isfinite(mean).eq(finite).all() and torch.isfinite(var).eq(finite).all()
    _, mean0, var0 = REF.forward_train(x, None, None, 1e-5)
    _close(mean[2:], mean0[2:], torch.float64)
    _close(var[2:], var0[2:], torch.float64)


# --- end to end: functional and modules against torch, the oracle -----------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nc"])
def test_functional_train_and_eval_match_torch(layout, dtype):
    x0 = LAYOUTS[layout](dtype) * 2 + 1
    c = x0.shape[1]
    w0 = torch.rand(c, dtype=dtype) + 0.5
    b0 = torch.randn(c, dtype=dtype)
    dy = torch.randn_like(x0)
    rm0, rv0 = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    for training in (True, False):
        results = []
        for fn in (bnkit.functional.batch_norm, F.batch_norm):
            x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
            rm, rv = rm0.clone(), rv0.clone()
            y = fn(x, rm, rv, w, b, training=training, momentum=0.2, eps=1e-4)
            if fn is bnkit.functional.batch_norm:
                assert last_backend() == "triton"
            (y * dy).sum().backward()
            if fn is bnkit.functional.batch_norm:
                assert last_backend() == "triton"
            results.append((y, rm, rv, x.grad, w.grad, b.grad))
        for got, want in zip(*results, strict=True):
            assert_close(got, want, table=OUTPUT)
        assert results[0][0].stride() == x0.stride()


def test_batchnorm2d_module_matches_torch():
    ours = bnkit.nn.BatchNorm2d(4).double()
    theirs = torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    for step in range(2):
        x0 = torch.randn(3, 4, 5, 3, dtype=torch.float64) * 2 + step
        if step:
            x0 = x0.to(memory_format=torch.channels_last)
        xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert last_backend() == "triton"
        dy = torch.randn_like(ya)
        (ya * dy).sum().backward()
        (yb * dy).sum().backward()
        assert_close(ya, yb)
        assert_close(xa.grad, xb.grad)
    assert_close(ours.weight.grad, theirs.weight.grad)
    assert_close(ours.bias.grad, theirs.bias.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(ours, name), getattr(theirs, name), table=ELEMENTWISE)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert_close(ours(x), theirs(x))
    assert last_backend() == "triton"


@pytest.mark.parametrize(
    "module, shape",
    [("BatchNorm1d", (8, 6)), ("BatchNorm1d", (4, 6, 5)), ("BatchNorm3d", (2, 6, 2, 3, 2))],
)
def test_other_modules_match_torch_in_float32(module, shape):
    ours = getattr(bnkit.nn, module)(6)
    theirs = getattr(torch.nn, module)(6)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape) * 3 - 1
    y = ours(x)
    assert last_backend() == "triton"
    assert_close(y, theirs(x))
    assert_close(ours.running_var, theirs.running_var, table=ELEMENTWISE)
    assert_close(ours.running_mean, theirs.running_mean, table=ELEMENTWISE)
