"""The memory layout of bnkit's outputs against torch's (the oracle).

torch's batch norm allocates its output in the input's suggested memory format: channels-last for a
channels-last 4-d/5-d input, contiguous for everything else, including an ``(N, C, L)`` view of
``(N, L, C)`` memory and a transposed ``(N, C)`` input, whose output code written for torch may then
``.view()``. bnkit's kernels work in the input's own layout; the public functions and modules hand the
output over in torch's. Strides of size-1 dims are not compared (no op reads them; ``is_contiguous``
ignores them).
"""

import pytest
import torch
import torch.nn.functional as F
from bn_tolerances import assert_close

import bnkit
from bnkit.kernels import forced_road, get_backend, last_plan

# the paths these tests name -> the road forced for them (None: the one the plan picks)
ROADS = {"small": None, "small kernels": None, "one-call driver": "planned", "regular": "checked"}


def _layouts(shape: tuple[int, ...]):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)), dtype=torch.float64) * 2 + 3
    yield "contiguous", x
    if len(shape) == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
        yield "W outermost", x.movedim(-1, 0).contiguous().movedim(0, -1)
        yield "channels_last, sliced", torch.cat([x, x], 2).contiguous(memory_format=torch.channels_last)[:, :, ::2]
    if len(shape) == 5:
        yield "channels_last_3d", x.contiguous(memory_format=torch.channels_last_3d)
    if len(shape) == 3:
        yield "(N, C, L) view of (N, L, C)", x.transpose(1, 2).contiguous().transpose(1, 2)
        yield "sliced (N, C, L) view", torch.cat([x, x], 2).transpose(1, 2).contiguous().transpose(1, 2)[:, :, ::2]
    if len(shape) == 2:
        yield "transposed (N, C)", x.t().contiguous().t()
    yield "sliced batch", torch.cat([x, x], 0)[::2]


CASES = [
    (shape, name, x)
    for shape in [(6, 3), (5, 4, 7), (4, 3, 5, 6), (3, 2, 3, 4, 5), (16, 32, 300)]
    for name, x in _layouts(shape)
]


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert a.is_contiguous() == b.is_contiguous()
    for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if a.dim() == dims:
            assert a.is_contiguous(memory_format=fmt) == b.is_contiguous(memory_format=fmt)
    big = [i for i, n in enumerate(a.shape) if n > 1]
    assert [a.stride(i) for i in big] == [b.stride(i) for i in big], (a.stride(), b.stride())


@pytest.mark.parametrize("dtype, path", [(torch.float32, "small"), (torch.float64, "small"), (torch.bfloat16, "small"),
                                         (torch.float32, "regular"), (torch.bfloat16, "regular")])  # fmt: skip
@pytest.mark.parametrize("mode", ["train", "eval", "train, graph", "eval, graph"])
@pytest.mark.parametrize("shape, name, x0", CASES, ids=[f"{s}-{n}" for s, n, _ in CASES])
def test_functional_output_has_torchs_layout(shape, name, x0, mode, dtype, path):
    c = shape[1]
    training, graph = mode.startswith("train"), mode.endswith("graph")
    out = {}
    for impl, bn in (("torch", F.batch_norm), ("bnkit", bnkit.functional.batch_norm)):
        x = x0.to(dtype).detach().requires_grad_(graph)
        pd = torch.float64 if dtype == torch.float64 else torch.float32  # 16-bit data: float32 parameters
        w = torch.linspace(0.5, 1.5, c, dtype=pd).requires_grad_(graph)
        b = torch.linspace(-1, 1, c, dtype=pd).requires_grad_(graph)
        rm, rv = torch.zeros(c, dtype=pd), torch.ones(c, dtype=pd)
        with forced_road(ROADS[path]):
            y = bn(x, rm, rv, w, b, training=training)
            grads = None
            if graph:
                (y * torch.arange(y.numel(), dtype=y.dtype).view(y.shape).sin()).sum().backward()
                grads = (x.grad, w.grad, b.grad)
        out[impl] = y, rm, rv, grads
    (yt, rmt, rvt, gt), (yb, rmb, rvb, gb) = out["torch"], out["bnkit"]
    _same_layout(yb, yt)
    assert_close(yb, yt, dtype)
    assert_close(rmb, rmt, rmt.dtype)
    assert_close(rvb, rvt, rvt.dtype)
    if graph:
        for got, want in zip(gb, gt, strict=True):
            assert_close(got, want, dtype)
    if yt.is_contiguous():
        yb.view(shape[0], -1)  # what code written for torch may do with the output


@pytest.mark.parametrize("shape, name, x0", CASES, ids=[f"{s}-{n}" for s, n, _ in CASES])
def test_pure_and_module_outputs_have_torchs_layout(shape, name, x0):
    c = shape[1]
    x = x0.float()
    want = F.batch_norm(x, torch.zeros(c), torch.ones(c), training=True)
    y, _, _ = bnkit.functional.batch_norm_pure(x, torch.zeros(c), torch.ones(c), training=True)
    _same_layout(y, want)
    cls = {2: bnkit.nn.BatchNorm1d, 3: bnkit.nn.BatchNorm1d, 4: bnkit.nn.BatchNorm2d, 5: bnkit.nn.BatchNorm3d}
    torch_cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
    _same_layout(cls[len(shape)](c)(x), torch_cls[len(shape)](c)(x))


@pytest.mark.parametrize("path", ["small kernels", "one-call driver", "regular"])
def test_ncl_view_gradient_is_read_in_the_inputs_layout(path):
    # the output of an (N, C, L) view is contiguous, so its gradient usually is: each backward copies
    # it into x's layout for its kernels (not the reference's formulas); the numbers are torch's
    x0 = torch.randn(8, 40, 6).transpose(1, 2)
    out = {}
    for impl, bn in (("torch", F.batch_norm), ("bnkit", bnkit.functional.batch_norm)):
        x = x0.clone().requires_grad_()
        w, b = torch.linspace(0.5, 1.5, 6).requires_grad_(), torch.linspace(-1, 1, 6).requires_grad_()
        with forced_road(ROADS[path]):
            y = bn(x, None, None, w, b, training=True)
            assert y.is_contiguous()
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
        out[impl] = (x.grad, w.grad, b.grad)
        if impl == "bnkit":  # the backward ran on the kernels, in x's channels-innermost layout
            assert last_plan() == ("backward/small" if path == "small kernels" else "backward/nsc")
    for got, want in zip(out["bnkit"], out["torch"], strict=True):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("shape", [(5, 3, 7), (16, 32, 300), (2, 70, 129)])  # serial; parallel; a one-row last tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ncl_view_eval_kernel_writes_torchs_layout_itself(shape, dtype):
    # the eval kernel reads the (N, L, C) memory and writes the contiguous (N, C, L) output in one pass
    # (tiles of rows, the last one short), so no copy follows; its numbers are torch's
    n, c, length = shape
    x = (torch.randn(n, length, c, dtype=dtype) * 2 + 3).transpose(1, 2)
    rm, rv = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    w, b = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    cpu = get_backend("cpu")
    dims = cpu.check(x, rm, rv, w, b)
    assert dims == (n * length, c, 1)
    y = cpu.one_call_eval(cpu.one_call_eval_plan(x, dims, False), x, rm, rv, w, b, 1e-5)
    assert y.is_contiguous() and y.shape == x.shape
    assert_close(y, F.batch_norm(x, rm, rv, w, b, training=False), dtype)


@pytest.mark.parametrize("path", ["small kernels", "one-call driver", "regular"])
@pytest.mark.parametrize("shape", [(5, 3, 7), (16, 32, 300), (2, 70, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ncl_view_training_kernels_write_torchs_layout_themselves(path, shape, dtype, monkeypatch):
    # training forwards of an (N, C, L) view on the small path write the contiguous output in their
    # normalize pass: the small kernels and the one-call driver (drivers.train_nsc with
    # cpu.nsc_train_to_ncs); the regular path (the backend keeps x's layout) copies it after
    n, c, length = shape
    x = (torch.randn(n, length, c, dtype=dtype) * 2 + 3).transpose(1, 2)
    w, b = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    rm, rv = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    if path != "regular":
        monkeypatch.setattr(torch.Tensor, "contiguous", lambda *a, **k: pytest.fail("copied after the kernel"))
    with forced_road(ROADS[path]):
        y = bnkit.functional.batch_norm(x, rm, rv, w, b, training=True)
    monkeypatch.undo()
    assert y.is_contiguous() and y.shape == x.shape
    assert_close(y, F.batch_norm(x, None, None, w, b, training=True), dtype)


@pytest.mark.parametrize("shape", [(8, 50, 16), (16, 300, 32)])  # small path; regular (mask=None, channel_dim)
@pytest.mark.parametrize("training", [True, False])
def test_channel_dim_last_keeps_the_inputs_layout(shape, training):
    # channel_dim=-1 takes (N, L, C) as it is: the output is (N, L, C) contiguous too (torch has no such
    # option; its twin, BN of the transposed view transposed back, has the same numbers)
    c = shape[2]
    x = torch.randn(shape) * 2 + 3
    bn = bnkit.nn.BatchNorm1d(c, channel_dim=-1).train(training)
    twin = torch.nn.BatchNorm1d(c).train(training)
    y = bn(x)
    assert y.is_contiguous() and y.shape == x.shape
    assert_close(y, twin(x.transpose(1, 2)).transpose(1, 2), torch.float32)
