"""The cpu backend's one-call road (bnkit.autograd.one_call, CpuBackend.check and its one-call plans, the
kernels of bnkit.kernels.cpu.drivers) against torch, float64 and the reference.

Every test asks which plans the cpu backend ran (:func:`bnkit.kernels.recorded_plans`): the small
kernels, or, for the cases that must not take them, other plans.
"""

from __future__ import annotations

import collections
import types

import pytest
import torch
import torch.nn.functional as F
from bn_tolerances import CPU_KERNEL, ELEMENTWISE, FLOAT64_REFERENCE, UNIT_SCALE, assert_close

import bnkit
from bnkit import reference as ref
from bnkit.kernels import forced_road, get_backend, last_backend, last_plan, recorded_plans, use_backend
from bnkit.kernels.cpu import backend
from bnkit.kernels.cpu import plan as road

SHAPES = [(16, 16, 8, 8), (4, 8, 4, 4, 4), (64, 128), (2, 3), (5, 7, 1), (3, 1, 4, 4), (7, 13, 11), (2, 5, 5, 5)]
# above SERIAL_NUMEL: the parallel twins, with many rows, rows of channels (S = 1), and fewer rows than tasks
PARALLEL_SHAPES = [(64, 16, 40), (1100, 40), (2, 2, 9001), (8, 33, 13, 11)]
DTYPES = [torch.float32, torch.float64]


# the paths of the small kernels (serial and parallel twins) and of the 16-bit eval kernel; every other
# path is one of the cpu backend's planned paths (groups, rows, long, nsc, fused, ncs)
_SMALL_PATHS = {"small": "small", "small_parallel": "small", "half": "half"}


class _Plans:
    """The plans the cpu backend ran during a test (:func:`bnkit.kernels.recorded_plans`), counted as
    ``"<pass>/small"`` (either twin of a small kernel), ``"<pass>/half"`` or ``"<pass>/plan"`` (a planned
    path of the backend, whichever road ran it); ``parallel`` counts the parallel twins."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def counts(self) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        for name in self.log:
            pass_, path = name.split("/")
            out[f"{pass_}/{_SMALL_PATHS.get(path, 'plan')}"] += 1
        return out

    def small(self) -> collections.Counter:
        """:meth:`counts` of the small and 16-bit eval kernels only."""
        return collections.Counter({k: v for k, v in self.counts().items() if not k.endswith("/plan")})

    def __eq__(self, other) -> bool:
        return self.counts() == other

    def __getitem__(self, name: str) -> int:
        return self.counts()[name]

    def __repr__(self) -> str:
        return repr(dict(self.counts()))

    def clear(self) -> None:
        self.log.clear()

    @property
    def parallel(self) -> int:
        return sum(name.endswith("_parallel") for name in self.log)


@pytest.fixture
def plans():
    """The plans the cpu backend runs in the test, asked through :func:`bnkit.kernels.recorded_plans`."""
    with recorded_plans() as log:
        yield _Plans(log)


def _inputs(shape, dtype, affine=True, seed=0, offset=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if affine else None
    rm = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, w, b, rm, rv


def _close(actual, expected, dtype):
    assert_close(actual, expected, dtype, table=CPU_KERNEL)


@pytest.mark.parametrize("shape", SHAPES + PARALLEL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_training_forward_matches_torch_and_float64(plans, shape, dtype, affine):
    x, w, b, rm, rv = _inputs(shape, dtype, affine)
    rm_t, rv_t = rm.clone(), rv.clone()
    y = bnkit.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3)
    assert plans == {"train/small": 1} and last_backend() == "cpu"
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training=True, momentum=0.3)
    _close(y, y_t, dtype)
    _close(rm, rm_t, dtype)
    _close(rv, rv_t, dtype)
    # float64 twin of the same call (the reference's math)
    x64 = x.double()
    exact = ref.batch_norm(x64, None, None, *(None if t is None else t.double() for t in (w, b)), True, 0.1, 1e-5)[0]
    _close(y.double(), exact, dtype)


@pytest.mark.parametrize("shape", SHAPES + PARALLEL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_eval_forward_matches_torch_and_the_cpu_backend(plans, shape, dtype, affine):
    x, w, b, rm, rv = _inputs(shape, dtype, affine, seed=1)
    y = bnkit.functional.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3)
    assert plans == {"eval/small": 1}
    _close(y, F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3), dtype)
    from bnkit.kernels import get_backend

    regular = get_backend("cpu").forward_eval_running(x, rm, rv, w, b, 1e-3)
    _close(y, regular, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, 1 / 3, 0.0, 1.0])
def test_running_statistics_are_the_reference_update_bit_for_bit(dtype, momentum):
    # the kernel's update from its own mean/var == reference.update_running_stats on them
    x, w, b, rm, rv = _inputs((6, 9, 7), dtype, seed=2)
    k = backend._small_kernels()
    n, c, s = 6, 9, 7
    y = torch.empty_like(x)
    mean, var, new_mean, new_var = (torch.empty(c, dtype=dtype) for _ in range(4))
    count = n * s
    sc = backend._NP[dtype]
    k.train_forward(
        backend._ZERO[dtype], x.data_ptr(), y.data_ptr(), n, c, s, w.data_ptr(), b.data_ptr(), 1e-5,
        mean.data_ptr(), var.data_ptr(), rm.data_ptr(), rv.data_ptr(), new_mean.data_ptr(), new_var.data_ptr(),
        sc(count / (count - 1)), sc(1 - momentum), sc(momentum), 0,
    )  # fmt: skip
    exp_mean, exp_var = ref.update_running_stats(rm, rv, mean, var, count, momentum)
    assert torch.equal(new_mean, exp_mean) and torch.equal(new_var, exp_var)
    x64 = x.double()
    _close(mean.double(), x64.mean((0, 2)), dtype)
    _close(var.double(), x64.var((0, 2), unbiased=False), dtype)


def test_pure_returns_new_statistics_and_mutates_nothing(plans):
    x, w, b, rm, rv = _inputs((8, 4, 3, 3), torch.float32)
    rm0, rv0 = rm.clone(), rv.clone()
    y, new_mean, new_var = bnkit.functional.batch_norm_pure(x, rm, rv, w, b, training=True)
    assert plans == {"train/small": 1}
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert new_mean is not rm and new_var is not rv
    rm_t, rv_t = rm.clone(), rv.clone()
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training=True)
    _close(y, y_t, torch.float32)
    _close(new_mean, rm_t, torch.float32)
    _close(new_var, rv_t, torch.float32)
    # without running statistics
    y2, m2, v2 = bnkit.functional.batch_norm_pure(x, None, None, w, b, training=True)
    assert m2 is None and v2 is None
    _close(y2, y_t, torch.float32)


@pytest.mark.parametrize("shape", [(16, 16, 8, 8), (64, 128), (5, 7, 1), (7, 13, 11), *PARALLEL_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("needs", ["all", "input", "params", "weight"])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_torch(plans, shape, dtype, needs, training):
    x0, w0, b0, rm, rv = _inputs(shape, dtype, seed=3 if training else 9, offset=1.0, scale=2.0)
    dy = torch.randn(shape, dtype=dtype)
    eps = 1e-5 if training else 1e-3
    grads = {}
    for name, fn in (("bnkit", bnkit.functional.batch_norm), ("torch", F.batch_norm)):
        x, w, b = x0.clone(), w0.clone(), b0.clone()
        x.requires_grad_(needs in ("all", "input"))
        w.requires_grad_(needs in ("all", "params", "weight"))
        b.requires_grad_(needs in ("all", "params"))
        y = fn(x, rm.clone(), rv.clone(), w, b, training=training, eps=eps)
        y.backward(dy)
        grads[name] = [t.grad for t in (x, w, b)]
    mode = "train" if training else "eval"
    assert plans == {f"{mode}/small": 1, f"{'backward' if training else 'eval_backward'}/small": 1}
    for got, want in zip(grads["bnkit"], grads["torch"], strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            _close(got, want, dtype)


def test_eval_input_gradient_does_not_read_the_input(plans):
    # eval dx = scale * dy: an inf in x makes dweight inf/NaN, never dx (torch's and the checked road's rule)
    x, w, b, rm, rv = _inputs((4, 3, 5), torch.float32, seed=12)
    x[0, 0, 0] = float("inf")
    dy = torch.randn(4, 3, 5)
    grads = []
    for fn in (bnkit.functional.batch_norm, F.batch_norm):
        xx = x.clone().requires_grad_()
        fn(xx, rm, rv, w, b, training=False).backward(dy)
        grads.append(xx.grad)
    assert plans == {"eval/small": 1, "eval_backward/small": 1}
    assert grads[0].isfinite().all()
    _close(grads[0], grads[1], torch.float32)


def test_gradients_match_float64_reference(plans):
    x0, w0, b0, _, _ = _inputs((6, 5, 4, 3), torch.float32, seed=4)
    dy = torch.randn(6, 5, 4, 3)
    x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
    bnkit.functional.batch_norm(x, None, None, w, b, training=True).backward(dy)
    assert plans["backward/small"] == 1
    x64, w64, b64 = (t.double().requires_grad_() for t in (x0, w0, b0))
    ref.batch_norm(x64, None, None, w64, b64, True, 0.1, 1e-5)[0].backward(dy.double())
    for got, want in zip((x.grad, w.grad, b.grad), (x64.grad, w64.grad, b64.grad), strict=True):
        assert_close(got.double(), want, torch.float32, table=FLOAT64_REFERENCE)


@pytest.mark.parametrize("shape", [(16, 16, 8, 8), (32, 16, 12, 12), (64, 32, 7, 7)])  # serial, parallel twice
@pytest.mark.parametrize("dy_offset", [0.0, 3.0])
def test_short_row_gradients_as_accurate_as_torchs(plans, shape, dy_offset):
    # max error of the small training backward against float64 on the same float32 inputs, short rows,
    # with and without an offset in the gradient: within 4x torch's (float32 lanes in the reduction read
    # 0.4-2.4x, see drivers._grad_sums); a wrong channel or a lost partial sum would be far off
    x, w, b, _, _ = _inputs(shape, torch.float32, seed=11, offset=1.0, scale=2.0)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(12)) + dy_offset
    grads = {}
    for name, fn, dt in (("bnkit", bnkit.functional.batch_norm, torch.float32), ("torch", F.batch_norm, torch.float32),
                         ("exact", F.batch_norm, torch.float64)):  # fmt: skip
        xs, ws, bs = (t.to(dt).clone().requires_grad_() for t in (x, w, b))
        fn(xs, None, None, ws, bs, training=True).backward(dy.to(dt))
        grads[name] = [t.grad.double() for t in (xs, ws, bs)]
    assert plans == {"train/small": 1, "backward/small": 1}
    for ours, theirs, exact in zip(grads["bnkit"], grads["torch"], grads["exact"], strict=True):
        err_ours, err_torch = (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()
        assert err_ours <= 4 * err_torch, (err_ours, err_torch)


def test_gradient_laid_out_unlike_the_input_is_copied_into_its_layout(plans):
    # a channels_last gradient of a contiguous input: the small backward reads a copy in x's layout
    x, w, b, _, _ = _inputs((4, 3, 5, 5), torch.float32, seed=5)
    x.requires_grad_()
    dy = torch.randn(4, 5, 5, 3).permute(0, 3, 1, 2)  # channels_last gradient
    bnkit.functional.batch_norm(x, None, None, w, b, training=True).backward(dy)
    assert plans == {"train/small": 1, "backward/small": 1}
    xt = x.detach().clone().requires_grad_()
    F.batch_norm(xt, None, None, w, b, training=True).backward(dy)
    _close(x.grad, xt.grad, torch.float32)


@pytest.mark.parametrize("shape", [(8, 16, 12, 12), (16, 16, 24, 24)])  # serial, parallel
@pytest.mark.parametrize("kind", ["normal", "hard", "outlier-first"])
def test_max_error_no_worse_than_torch(plans, kind, shape):
    offset, scale = (1e4, 1e-2) if kind == "hard" else (0.0, 1.0)
    x, w, b, _, _ = _inputs(shape, torch.float32, seed=6, offset=offset, scale=scale)
    if kind == "outlier-first":
        x[0, :, 0, 0] = 1e3
    exact = F.batch_norm(x.double(), None, None, w.double(), b.double(), training=True)
    ours = bnkit.functional.batch_norm(x, None, None, w, b, training=True).double()
    assert plans == {"train/small": 1}
    theirs = F.batch_norm(x, None, None, w, b, training=True).double()
    err_ours = (ours - exact).abs().max().item()
    err_torch = (theirs - exact).abs().max().item()
    assert err_ours <= err_torch * 1.05, (err_ours, err_torch)


def test_module_takes_the_small_path_and_matches_torch(plans):
    torch.manual_seed(0)
    m_t = torch.nn.BatchNorm2d(5)
    m_b = bnkit.nn.BatchNorm2d(5)
    m_b.load_state_dict(m_t.state_dict())
    for _ in range(3):
        x = torch.randn(4, 5, 6, 6)
        _close(m_b(x), m_t(x), torch.float32)
    assert plans == {"train/small": 3}
    for key, value in m_t.state_dict().items():
        assert_close(m_b.state_dict()[key], value, table=ELEMENTWISE)
    m_b.eval(), m_t.eval()
    x = torch.randn(4, 5, 6, 6)
    with torch.no_grad():
        _close(m_b(x), m_t(x), torch.float32)
    assert plans["eval/small"] == 1
    y_b, y_t = m_b(x), m_t(x)  # grad on: the parameters need a graph (the one-call plan through autograd._EvalFn)
    _close(y_b, y_t, torch.float32)
    dy = torch.randn_like(x)  # (y.sum() would hand the backward an expanded, non-contiguous dy)
    (y_b * dy).sum().backward()
    (y_t * dy).sum().backward()
    assert plans["eval/small"] == 2 and plans["eval_backward/small"] == 1
    for p_b, p_t in zip(m_b.parameters(), m_t.parameters(), strict=True):
        _close(p_b.grad, p_t.grad, torch.float32)


@pytest.mark.parametrize(
    "case",
    ["reference-backend", "strided", "transposed-2d", "bfloat16", "stats-need-grad", "mixed-dtype",
     "subclass", "channel_dim", "mask", "momentum-tensor"],
)  # fmt: skip
def test_cases_that_must_not_take_the_small_path(plans, case):
    x, w, b, rm, rv = _inputs((4, 3, 5, 5), torch.float32, seed=7)
    kwargs: dict = {}
    training, momentum = True, 0.1
    backend = "auto"
    if case == "reference-backend":
        backend = "reference"
    elif case == "strided":  # not dense
        x = torch.randn(4, 3, 5, 10)[..., ::2]
    elif case == "transposed-2d":  # (N, C) with channels outermost
        x = torch.randn(3, 8).t()
        x, w, b, rm, rv = x, None, None, torch.zeros(3), torch.ones(3)
    elif case == "bfloat16":  # 16-bit data takes float32 vectors only
        x, w, b, rm, rv = (t.bfloat16() for t in (x, w, b, rm, rv))
    elif case == "stats-need-grad":
        rm.requires_grad_()
    elif case == "mixed-dtype":
        w = w.double()
    elif case == "subclass":
        x = torch.nn.Parameter(x)
    elif case == "channel_dim":
        x = x.movedim(1, -1).contiguous()
        kwargs["channel_dim"] = -1
    elif case == "mask":
        kwargs["mask"] = torch.ones(4, 5, 5, dtype=torch.bool)
    elif case == "momentum-tensor":
        momentum = torch.tensor(0.1, dtype=torch.float64)
    with use_backend(backend):
        if case == "mixed-dtype":  # torch's error, from the regular checks
            with pytest.raises(RuntimeError, match="mixed dtype"):
                bnkit.functional.batch_norm_pure(x, rm, rv, w, b, training=training, momentum=momentum)
        else:
            bnkit.functional.batch_norm_pure(x, rm, rv, w, b, training=training, momentum=momentum, **kwargs)
    assert plans.small() == {}  # the regular road: the plans of its checked launcher
    if case == "reference-backend":
        assert last_backend() == "reference" and plans == {}


@pytest.mark.parametrize(
    "call, error",
    [
        (dict(training=True, eps=0.0), ValueError),
        (dict(training=False, eps=-1.0), ValueError),
        (dict(training=True, shape=(1, 3)), ValueError),
        (dict(training=True, weight_size=4), RuntimeError),
        (dict(training=False, stats=False), RuntimeError),
    ],
)
def test_bad_arguments_raise_torchs_error(plans, call, error):
    shape = call.get("shape", (4, 3, 2))
    x = torch.randn(shape)
    w = torch.ones(call.get("weight_size", 3))
    stats = (torch.zeros(3), torch.ones(3)) if call.get("stats", True) else (None, None)
    kwargs = dict(training=call["training"], eps=call.get("eps", 1e-5))
    with pytest.raises(error) as ours:
        bnkit.functional.batch_norm(x, *stats, w, None, **kwargs)
    with pytest.raises(error) as theirs:
        F.batch_norm(x, *stats, w, None, **kwargs)
    assert str(ours.value) == str(theirs.value)
    assert plans == {}


def test_leaked_functorch_wrapper_takes_the_regular_path(plans):
    leaked = []

    def f(x):
        leaked.append(x * 1)
        return x.sum()

    torch.func.grad(f)(torch.randn(4, 3, 2))
    x = leaked[0]  # a dead wrapper: its data_ptr() raises
    y = bnkit.functional.batch_norm(x, None, None, training=True)
    assert plans.small() == {}
    _close(y, F.batch_norm(torch._C._functorch.get_unwrapped(x), None, None, training=True), torch.float32)


def test_in_place_update_bumps_the_version_counters(plans):
    # autograd must see the write, as it sees copy_: a graph that saved the buffers refuses to run
    x, w, b, rm, rv = _inputs((4, 3, 5), torch.float32, seed=8)
    w.requires_grad_()
    y_eval = bnkit.functional.batch_norm(x, rm, rv, w, b, training=False)  # saves rm and rv
    versions = rm._version, rv._version
    with torch.no_grad():
        bnkit.functional.batch_norm(x, rm, rv, w, b, training=True)
    assert plans == {"eval/small": 1, "train/small": 1}
    assert rm._version > versions[0] and rv._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y_eval.sum().backward()


def test_parallel_shapes_reach_the_parallel_kernels(plans):
    # (CI has 2 cores; torch's thread count decides, as for the cpu backend)
    if torch.get_num_threads() < 2:
        pytest.fail("this test needs torch to allow 2 threads (CI has 2 cores)")
    for shape in PARALLEL_SHAPES:
        assert road.SMALL_SERIAL_NUMEL < torch.Size(shape).numel() <= road.SMALL_GRAD_NUMEL
        x, w, b, rm, rv = _inputs(shape, torch.float32)
        bnkit.functional.batch_norm(x, rm, rv, w, b, training=True)
        bnkit.functional.batch_norm(x, rm, rv, w, b, training=False)
    assert plans.parallel == 2 * len(PARALLEL_SHAPES)


def test_calls_that_record_a_graph_stop_at_the_grad_limit(plans):
    # above SMALL_GRAD_NUMEL a graph takes the cpu backend's kernels in one call each way: training
    # (train_regular, backward_regular) and eval's backward (eval_backward_regular, when dx and a
    # parameter's gradient are needed); without a graph the small kernels
    n = road.SMALL_GRAD_NUMEL // 4 + 1  # (n, 4): above SMALL_GRAD_NUMEL, at most SMALL_NUMEL
    assert road.SMALL_GRAD_NUMEL < 4 * n <= road.SMALL_NUMEL
    x = torch.randn(n, 4)
    w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    bnkit.functional.batch_norm(x, torch.zeros(4), torch.ones(4), w, b, training=False).sum().backward()
    assert plans == {"eval/small": 1, "reduce/plan": 1}  # no input gradient: the regular backward
    bnkit.functional.batch_norm(x.clone().requires_grad_(), torch.zeros(4), torch.ones(4), w, b,
                                training=False).backward(torch.randn_like(x))  # fmt: skip
    assert plans == {"eval/small": 2, "reduce/plan": 1, "eval_backward/plan": 1}
    plans.clear()
    bnkit.functional.batch_norm(x, torch.zeros(4), torch.ones(4), w, b, training=True).sum().backward()
    assert plans == {"train/plan": 1, "reduce/plan": 1}  # no input gradient: the regular backward
    xg = x.clone().requires_grad_()
    bnkit.functional.batch_norm(xg, torch.zeros(4), torch.ones(4), w, b, training=True).backward(torch.randn_like(x))
    assert plans == {"train/plan": 2, "reduce/plan": 1, "backward/plan": 1}
    plans.clear()
    with torch.no_grad():
        for training in (True, False):
            bnkit.functional.batch_norm(x, torch.zeros(4), torch.ones(4), w, b, training=training)
    assert plans == {"train/small": 1, "eval/small": 1}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval_without_a_graph_takes_the_path_at_every_size(plans, layout):
    # above SMALL_NUMEL: eval stays on the small kernel, with a graph too; training (here with a
    # graph) takes the cpu backend's kernels in one call
    x, w, b, rm, rv = _inputs((8, 64, 48, 48), torch.float32, seed=3)
    x = x if layout == "contiguous" else x.contiguous(memory_format=torch.channels_last)
    assert x.numel() > road.SMALL_NUMEL
    y = bnkit.functional.batch_norm(x, rm, rv, w, b, training=False)
    assert plans == {"eval/small": 1} and plans.parallel == 1
    assert y.stride() == x.stride()
    _close(y, F.batch_norm(x, rm, rv, w, b, training=False), torch.float32)
    from bnkit.kernels import get_backend

    _close(y, get_backend("cpu").forward_eval_running(x, rm, rv, w, b, 1e-5), torch.float32)
    plans.clear()  # (the checked method's plan)
    bnkit.functional.batch_norm(x, rm, rv, w.requires_grad_(), b, training=False)
    assert plans == {"eval/small": 1}
    bnkit.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True)
    assert plans == {"eval/small": 1, "train/plan": 1}


# channels-innermost memory: channels_last 2d/3d, an (N, C, L) view of (N, L, C) memory, and one above
# SERIAL_NUMEL (the parallel twins)
LAST_CASES = [((4, 5, 6, 6), "channels_last"), ((2, 3, 4, 4, 4), "channels_last"), ((6, 7, 11), "ncl"),
              ((16, 32, 12, 12), "channels_last")]


def _channels_last(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "ncl":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.contiguous(memory_format=fmt)


def _case(shape, layout, dtype, seed):
    """``x, w, b, rm, rv, dy`` for the comparisons with the checked road: ``x`` and ``dy`` of ``dtype`` in
    ``layout`` ("contiguous", "channels_last" or "ncl"), the vectors of its statistics dtype."""
    x, w, b, rm, rv = _inputs(shape, torch.float64 if dtype == torch.float64 else torch.float32, seed=seed,
                              offset=1.0, scale=2.0)  # fmt: skip
    x, dy = x.to(dtype), torch.randn(shape).to(dtype)
    if layout != "contiguous":
        x, dy = _channels_last(x, layout), _channels_last(dy, layout)
    return x, w, b, rm, rv, dy


def _torch_stride(x: torch.Tensor) -> tuple[int, ...]:
    """The strides torch's batch norm gives its output for ``x`` (the oracle of bnkit's output layout)."""
    c = x.shape[1]
    return F.batch_norm(x.detach().float(), torch.zeros(c), torch.ones(c), training=False).stride()


def _assert_same_bits(got, expected):
    """Each tensor of ``got`` has the bits of its twin in ``expected`` (``None`` where it is ``None``)."""
    for a, e in zip(got, expected, strict=True):
        assert (a is None) == (e is None)
        if a is not None:
            assert a.dtype == e.dtype and torch.equal(a.view(torch.int16) if a.element_size() == 2 else a,
                                                      e.view(torch.int16) if e.element_size() == 2 else e)  # fmt: skip


@pytest.mark.parametrize("shape, layout", LAST_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_innermost_memory(plans, shape, layout, dtype):
    x0, w0, b0, rm, rv = _inputs(shape, dtype, seed=10, offset=1.0, scale=2.0)
    x0 = _channels_last(x0, layout)
    assert not x0.is_contiguous()
    dy = _channels_last(torch.randn(shape, dtype=dtype), layout)
    out = {}
    for name, fn in (("bnkit", bnkit.functional.batch_norm), ("torch", F.batch_norm)):
        x, w, b = x0.clone(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
        x.requires_grad_()
        run_m, run_v = rm.clone(), rv.clone()
        y = fn(x, run_m, run_v, w, b, training=True, momentum=0.2)
        y.backward(dy)
        with torch.no_grad():
            y_eval = fn(x, run_m, run_v, w, b, training=False)
        out[name] = (y, y_eval, run_m, run_v, x.grad, w.grad, b.grad)
    assert plans == {"train/small": 1, "backward/small": 1, "eval/small": 1}
    # the output in torch's layout (contiguous for an (N, C, L) view), the leaf's gradient in its own
    assert out["bnkit"][0].stride() == out["torch"][0].stride() and out["bnkit"][4].stride() == x0.stride()
    for got, want in zip(out["bnkit"], out["torch"], strict=True):
        _close(got, want, dtype)


# 16-bit eval: contiguous (N, C, *) with short and long rows (the normalize's constant tables and row
# ranges), (N, C) and (N, C, 1, 1), channels-innermost memory, and sizes above SERIAL_NUMEL
SIXTEEN_CASES = [((3, 5, 7, 11), "contiguous"), ((7, 5), "contiguous"), ((5, 3, 1, 1), "contiguous"),
                 ((3, 200, 3, 3), "contiguous"), ((4, 5, 6, 6), "channels_last"), ((2, 3, 4, 4, 4), "channels_last"),
                 ((6, 7, 11), "ncl"), ((16, 32, 12, 12), "channels_last"), ((2, 2, 9001), "contiguous"),
                 ((1100, 40), "contiguous"), ((4, 64, 20, 20), "contiguous")]  # fmt: skip


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, layout", SIXTEEN_CASES)
def test_16bit_eval_is_the_cpu_backends_bit_for_bit(plans, shape, layout, dtype, affine):
    # bfloat16/float16 data with float32 running statistics and parameters, eval without a graph:
    # one call (eval_forward16), the bits of the cpu backend's forward_eval_running, close to torch
    from bnkit.kernels import get_backend

    x, w, b, rm, rv = _inputs(shape, torch.float32, affine, seed=11, offset=1.0, scale=2.0)
    x = x.to(dtype)
    if layout != "contiguous":
        x = _channels_last(x, layout)
    y = bnkit.functional.batch_norm(x, rm, rv, w, b, training=False)
    assert plans == {"eval/half": 1} and last_backend() == "cpu"
    assert y.dtype == dtype and y.stride() == _torch_stride(x)
    _assert_same_bits([y], [get_backend("cpu").forward_eval_running(x, rm, rv, w, b, 1e-5)])
    assert_close(y.float(), F.batch_norm(x, rm, rv, w, b, training=False).float(), dtype, table=CPU_KERNEL)


def test_16bit_takes_the_path_only_with_float32_vectors(plans):
    x, w, b, rm, rv = _inputs((4, 3, 5, 5), torch.float32, seed=7)
    xb = x.bfloat16()
    cpu = get_backend("cpu")
    vectors16 = (rm.bfloat16(), rv.bfloat16(), w.bfloat16(), b.bfloat16())
    assert cpu.check(xb, *vectors16) is None and cpu.check(xb, rm, rv, w, b) is not None
    # the checked road converts the vectors and runs the same eval kernel
    y = bnkit.functional.batch_norm(xb, *vectors16, training=False)
    assert plans == {"eval/half": 1}
    assert_close(y.float(), F.batch_norm(xb, *vectors16, training=False).float(), xb.dtype, table=CPU_KERNEL)
    with pytest.raises(RuntimeError, match="mixed dtype"):  # torch's error, from the regular checks
        bnkit.functional.batch_norm(xb, rm, rv.double(), w, b, training=False)
    plans.clear()
    bnkit.functional.batch_norm(xb, rm, rv, w, b, training=False)
    bnkit.functional.batch_norm(xb.clone().requires_grad_(), rm, rv, w, b, training=False)
    assert plans == {"eval/half": 2}


# training without a graph above SMALL_NUMEL and for 16-bit data: the cpu backend's plan, one per path
# (groups of channels, short rows, long rows fused and cut in parts, channels innermost)
REGULAR_CASES = [((64, 67, 12, 12), "contiguous"), ((3, 2000, 3, 3), "contiguous"), ((4, 64, 300), "contiguous"),
                 ((1, 2, 20000), "contiguous"), ((16, 3, 31, 29), "channels_last"), ((8, 13, 401), "ncl"),
                 ((11003, 3), "contiguous"), ((3, 5, 7, 11), "contiguous")]  # fmt: skip


@pytest.mark.parametrize("inplace", [True, False], ids=["batch_norm", "batch_norm_pure"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, layout", REGULAR_CASES)
def test_training_without_a_graph_is_the_regular_paths_bit_for_bit(plans, shape, layout, dtype, inplace):
    # one compiled call (train_regular) with the cpu backend's kernels and plan: the checked road's
    # output and running statistics, bit for bit (forced "planned": float32/float64 take it at any size)
    x, w, b, rm, rv, _ = _case(shape, layout, dtype, seed=12)

    def run():
        run_m, run_v = rm.clone(), rv.clone()
        if inplace:
            y = bnkit.functional.batch_norm(x, run_m, run_v, w, b, training=True, momentum=0.3)
            return y, run_m, run_v
        y, new_m, new_v = bnkit.functional.batch_norm_pure(x, run_m, run_v, w, b, training=True, momentum=0.3)
        assert torch.equal(run_m, rm) and torch.equal(run_v, rv)
        return y, new_m, new_v

    with forced_road("planned"):
        got = run()
    assert plans == {"train/plan": 1} and last_backend() == "cpu"
    assert got[0].dtype == dtype and got[0].stride() == _torch_stride(x)
    with forced_road("checked"):
        expected = run()
    assert plans == {"train/plan": 2}  # the same plan, by the regular road
    _assert_same_bits(got, expected)
    rm_t, rv_t = rm.clone(), rv.clone()
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training=True, momentum=0.3)
    # 16-bit outputs: one rounding of the result; float32/float64 on this unit-scale data: UNIT_SCALE
    table = CPU_KERNEL if dtype in (torch.bfloat16, torch.float16) else UNIT_SCALE
    assert_close(got[0].double(), y_t.double(), dtype, table=table)
    assert_close(got[1].double(), rm_t.double(), rm_t.dtype, table=UNIT_SCALE)
    assert_close(got[2].double(), rv_t.double(), rv_t.dtype, table=UNIT_SCALE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, layout", REGULAR_CASES)
def test_training_with_a_graph_is_the_regular_paths_bit_for_bit(plans, shape, layout, dtype):
    # forward and backward in one compiled call each (train_regular, backward_regular) above
    # SMALL_GRAD_NUMEL (here forced "planned") and in 16-bit: the checked road's y, running statistics and
    # gradients
    x0, w0, b0, rm, rv, dy = _case(shape, layout, dtype, seed=15)

    def run():
        x, w, b = x0.clone().requires_grad_(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
        run_m, run_v = rm.clone(), rv.clone()
        y = bnkit.functional.batch_norm(x, run_m, run_v, w, b, training=True, momentum=0.3)
        y.backward(dy)
        return y, run_m, run_v, x.grad, w.grad, b.grad

    with forced_road("planned"):
        got = run()
    assert plans == {"train/plan": 1, "backward/plan": 1}
    assert got[0].stride() == _torch_stride(x0) and got[3].stride() == x0.stride()
    with forced_road("checked"):
        expected = run()
    assert plans == {"train/plan": 2, "backward/plan": 2}  # the same plans, by the regular road
    _assert_same_bits(got, expected)


@pytest.mark.parametrize("needs", ["all", "input", "weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, layout", [((3, 2000, 3, 3), "contiguous"), ((4, 64, 300), "contiguous"),
                                           ((16, 3, 31, 29), "channels_last"), ((8, 13, 401), "ncl"),
                                           ((11003, 3), "contiguous")])  # fmt: skip
def test_eval_with_a_graph_is_the_regular_paths_bit_for_bit(plans, shape, layout, dtype, needs):
    # above SMALL_GRAD_NUMEL (here forced "planned") and in 16-bit: the eval forward on the one-call kernels, its
    # backward the cpu backend's in one call when both dx and a parameter's gradient are needed (else
    # the regular backward), with the checked road's bits
    x0, w0, b0, rm, rv, dy = _case(shape, layout, dtype, seed=17)

    def run():
        x = x0.clone().requires_grad_(needs != "weight")
        w, b = w0.clone().requires_grad_(needs != "input"), b0.clone().requires_grad_(needs != "input")
        y = bnkit.functional.batch_norm(x, rm, rv, w, b, training=False)
        y.backward(dy)
        return y, x.grad, w.grad, b.grad

    with forced_road("planned"):
        got = run()
    fwd = "eval/half" if dtype in (torch.bfloat16, torch.float16) else "eval/small"
    # (without dx and a parameter's gradient both, the checked methods' affine or reduction kernel)
    backward = {"all": "eval_backward/plan", "input": "affine/plan", "weight": "reduce/plan"}[needs]
    assert plans == {fwd: 1, backward: 1}
    with forced_road("checked"):
        expected = run()
    _assert_same_bits(got, expected)


@forced_road("planned")
def test_graph_backwards_the_one_call_kernel_does_not_take_go_the_regular_way(plans):
    # a gradient laid out unlike x: copied into x's layout for the one-call backward; no input gradient
    # and a double backward: the regular formulas; all checked against torch
    x0, w0, b0, rm, rv = _inputs((6, 5, 4, 3), torch.float64, seed=16)
    dy = torch.randn(6, 5, 3, 4, dtype=torch.float64).transpose(2, 3)  # not x's strides
    for case in ("strides", "no-input-grad", "double"):
        out = {}
        for name, fn in (("bnkit", bnkit.functional.batch_norm), ("torch", F.batch_norm)):
            x = x0.clone().requires_grad_(case != "no-input-grad")
            w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
            y = fn(x, rm.clone(), rv.clone(), w, b, training=True)
            if case == "double":
                (gx,) = torch.autograd.grad((y * dy).sum(), x, create_graph=True)
                gx.pow(2).sum().backward()
                out[name] = (gx, w.grad, b.grad, x.grad)
            else:
                y.backward(dy)
                out[name] = (x.grad, w.grad, b.grad)
        for a, e in zip(out["bnkit"], out["torch"], strict=True):
            assert (a is None) == (e is None)
            if a is not None:
                _close(a, e, torch.float64)
    assert plans == {"train/plan": 3, "backward/plan": 1, "reduce/plan": 1}


def test_training_without_a_graph_and_without_running_statistics(plans):
    x, w, b, _, _ = _inputs((4, 3, 5, 5), torch.float32, seed=13)
    xb = x.bfloat16()
    y, m, v = bnkit.functional.batch_norm_pure(xb, None, None, w, b, training=True)
    assert plans == {"train/plan": 1} and m is None and v is None
    assert_close(y.float(), F.batch_norm(xb, None, None, w, b, training=True).float(), xb.dtype, table=CPU_KERNEL)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bnkit.functional.batch_norm(torch.randn(1, 3).bfloat16(), None, None, training=True)



# --- bnkit.kernels.forced_road: one road, whatever the plan would pick -------------------------------------

# road -> the plans of a (4, 3, 5, 5) float32 training call with a graph (forward, backward) and an eval call
# without one: the plan's small kernels; the one-call road's planned paths (the eval forward has one kernel);
# the checked methods (the same planned paths for training, the same eval kernel)
# (counted as _Plans), and last_plan() after the eval call
FORCED = {
    None: ({"train/small": 1, "backward/small": 1, "eval/small": 1}, "eval/small"),
    "planned": ({"train/plan": 1, "backward/plan": 1, "eval/small": 1}, "eval/small"),
    "checked": ({"train/plan": 1, "backward/plan": 1, "eval/small": 1}, "eval/small"),
}


def _roads_taken() -> tuple[_Plans, str | None, bool]:
    """The plans of one training call without a graph and one eval call (counted as :class:`_Plans`),
    :func:`bnkit.kernels.last_plan` after the eval call, and whether the one-call road takes these tensors
    (the checked road runs the same eval kernel); both outputs checked against torch."""
    x, w, b, rm, rv = _inputs((4, 3, 5, 5), torch.float32, seed=21)
    one_call = get_backend("cpu").check(x, rm, rv, w, b) is not None
    with recorded_plans() as log:
        y = bnkit.functional.batch_norm(x, None, None, w, b, training=True)
        _close(y, F.batch_norm(x, None, None, w, b, training=True), torch.float32)
        y = bnkit.functional.batch_norm(x, rm, rv, w, b, training=False)
        _close(y, F.batch_norm(x, rm, rv, w, b, training=False), torch.float32)
    return _Plans(log), last_plan(), one_call


@pytest.mark.parametrize("forced", list(FORCED), ids=str)
def test_forced_road_runs_the_road_it_names(plans, forced):
    x0, w0, b0, rm, rv, dy = _case((4, 3, 5, 5), "contiguous", torch.float32, seed=22)
    out = {}
    for name, bn in (("bnkit", bnkit.functional.batch_norm), ("torch", F.batch_norm)):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        run_m, run_v = rm.clone(), rv.clone()
        with forced_road(forced):
            y = bn(x, run_m, run_v, w, b, training=True, momentum=0.3)
            y.backward(dy)
            y_eval = bn(x0, rm, rv, w0, b0, training=False)
        out[name] = (y, run_m, run_v, x.grad, w.grad, b.grad, y_eval)
        if name == "bnkit":
            assert last_plan() == FORCED[forced][1]
            with forced_road(forced):
                assert (get_backend("cpu").check(x0, rm, rv, w0, b0) is None) == (forced == "checked")
    assert plans == FORCED[forced][0]
    for got, want in zip(out["bnkit"], out["torch"], strict=True):
        _close(got, want, torch.float32)


def test_forced_road_rejects_another_road_and_restores_the_road_after_an_error():
    with forced_road("checked"):
        with pytest.raises(ValueError, match="road must be one of checked, planned or None, got 'small'"):
            with forced_road("small"):
                pass
        assert _roads_taken() == ({"train/plan": 1, "eval/small": 1}, "eval/small", False)  # the outer road holds
    with pytest.raises(RuntimeError, match="raised inside"):
        with forced_road("planned"):
            raise RuntimeError("raised inside")
    assert _roads_taken() == ({"train/small": 1, "eval/small": 1}, "eval/small", True)  # the plan picks again


def test_forced_roads_nest():
    with forced_road("checked"):
        assert _roads_taken() == ({"train/plan": 1, "eval/small": 1}, "eval/small", False)
        with forced_road("planned"):
            assert _roads_taken() == ({"train/plan": 1, "eval/small": 1}, "eval/small", True)
            with forced_road(None):  # the road around the block
                assert _roads_taken() == ({"train/plan": 1, "eval/small": 1}, "eval/small", True)
        assert _roads_taken() == ({"train/plan": 1, "eval/small": 1}, "eval/small", False)
    assert _roads_taken() == ({"train/small": 1, "eval/small": 1}, "eval/small", True)

def test_drivers_that_fail_to_compile_warn_once_and_take_the_regular_path(monkeypatch, recwarn):
    kernels = backend._small_kernels()

    def broken(name):
        def driver(*args):
            raise RuntimeError("no LLVM today")

        driver.__name__ = name
        return driver

    drivers = [*kernels.TRAIN_DRIVERS.values(), *kernels.BACKWARD_DRIVERS.values(), "eval_forward16"]
    ns = types.SimpleNamespace(**{n: broken(n) if n in drivers else getattr(kernels, n) for n in kernels.__all__})
    monkeypatch.setattr(backend, "_K", ns)
    monkeypatch.setattr(backend, "_BROKEN", set())
    x, w, b, rm, rv = _inputs((4, 3, 5, 5), torch.float32, seed=14)
    xb = x.bfloat16()
    outs = [bnkit.functional.batch_norm_pure(xb, rm, rv, w, b, training=t)[0] for t in (True, True, False, False)]
    assert len([w for w in recwarn if "one-call kernel" in str(w.message)]) == 2
    with forced_road("checked"):
        for t, y in zip((True, True, False, False), outs, strict=True):
            expected = bnkit.functional.batch_norm_pure(xb, rm, rv, w, b, training=t)[0]
            _assert_same_bits([y], [expected])


def test_kernels_that_fail_to_load_turn_the_path_off_with_one_warning(monkeypatch):
    from bnkit.kernels.cpu import drivers as cpu_small

    def broken():
        raise RuntimeError("no LLVM today")

    monkeypatch.setattr(backend, "_K", None)
    monkeypatch.setattr(cpu_small, "probe", broken)
    x, w, b, rm, rv = _inputs((4, 3, 5), torch.float32, seed=11)
    with pytest.warns(RuntimeWarning, match="small-input kernels are unavailable.*no LLVM today") as record:
        y1 = bnkit.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True)
        y2 = bnkit.functional.batch_norm(x, rm, rv, w, b, training=False)
    assert len([r for r in record if "small-input" in str(r.message)]) == 1
    assert backend._K is False and last_backend() == "cpu"  # the regular cpu path ran
    _close(y1, F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True), torch.float32)
    _close(y2, F.batch_norm(x, rm, rv, w, b, training=False), torch.float32)
