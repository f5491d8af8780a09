"""bnkit under every autograd mode, with torch's batch norm as the oracle.

Ports of torch's own checks (the BatchNorm cases of ``test_nn.py``/``test_modules.py`` and the OpInfo
samples of ``nn.functional.batch_norm``): float64 ``gradcheck``/``gradgradcheck`` with batched gradients
and forward-mode AD, ``torch.func`` transforms against torch on the same inputs, torch's error for
running statistics that carry a forward-mode tangent, and gradients on offset data no less accurate than
torch's against float64. Tensors are tiny so the checks run fast.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from bn_tolerances import GRAD, assert_close
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import bnkit.functional as BF
import bnkit.nn as bnn
from bnkit import autograd as bn_autograd
from bnkit import reference as ref
from bnkit.kernels import last_backend, use_backend

SHAPES = [(4, 3), (3, 2, 4), (2, 3, 2, 2), (2, 2, 2, 1, 2)]
MODULES = {2: (bnn.BatchNorm1d, torch.nn.BatchNorm1d), 3: (bnn.BatchNorm1d, torch.nn.BatchNorm1d),
           4: (bnn.BatchNorm2d, torch.nn.BatchNorm2d), 5: (bnn.BatchNorm3d, torch.nn.BatchNorm3d)}
# (training, track_running_stats): torch's four module modes
MODES = [(True, True), (True, False), (False, True), (False, False)]
# every gradient mode gradcheck knows; gradgradcheck adds forward-over-reverse
CHECKS = dict(check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True)
GGCHECKS = dict(check_batched_grad=True, check_fwd_over_rev=True)


def _x(shape, offset=0.5, scale=1.5):
    return (torch.randn(shape, dtype=torch.float64) * scale + offset).requires_grad_()


def _params(c, affine=True):
    if not affine:
        return None, None
    w = torch.rand(c, dtype=torch.float64) + 0.5
    return w.requires_grad_(), torch.randn(c, dtype=torch.float64).requires_grad_()


def _running(c):
    return torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5


def _pair(shape, training, track, affine=True, momentum=0.1):
    """A bnkit module and torch's twin with the same state (running statistics not the defaults)."""
    ours_cls, torch_cls = MODULES[len(shape)]
    mods = []
    rm, rv = _running(shape[1])
    for cls in (ours_cls, torch_cls):
        m = cls(shape[1], affine=affine, track_running_stats=track, momentum=momentum).double()
        if track:
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
        if affine:
            with torch.no_grad():
                m.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
                m.bias.copy_(torch.linspace(-1, 1, shape[1]))
        mods.append(m.train(training))
    return mods


def _functional_args(fn, x, w, b, rm, rv, training):
    """``fn(x, w, b)`` with fresh copies of the running statistics on every call (gradcheck calls it often)."""
    def call(xx, ww=None, bb=None):
        rm_, rv_ = (None if t is None else t.clone() for t in (rm, rv))
        return fn(xx, rm_, rv_, ww, bb, training, 0.1, 1e-3)

    return call, ((x,) if w is None else (x, w, b))


# --- gradcheck / gradgradcheck in every mode ------------------------------------------------------


# functional: training with and without running statistics, eval with them
FUNCTIONAL_MODES = [(True, True), (True, False), (False, True)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training,with_running", FUNCTIONAL_MODES)
@pytest.mark.parametrize("affine", [True, False])
def test_functional_gradcheck_every_mode(shape, training, with_running, affine):
    x = _x(shape)
    w, b = _params(shape[1], affine)
    rm, rv = _running(shape[1]) if with_running else (None, None)
    fn, inputs = _functional_args(BF.batch_norm, x, w, b, rm, rv, training)
    assert gradcheck(fn, inputs, **CHECKS)
    assert gradgradcheck(fn, inputs, **GGCHECKS)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training,track", MODES)
@pytest.mark.parametrize("affine", [True, False])
def test_module_gradcheck_every_mode(shape, training, track, affine):
    ours, _ = _pair(shape, training, track, affine)
    x = _x(shape)
    assert gradcheck(ours, (x,), **CHECKS)
    assert gradgradcheck(ours, (x,), **GGCHECKS)


@pytest.mark.parametrize("cls", [bnn.BatchNorm2d, bnn.LazyBatchNorm2d, bnn.SyncBatchNorm])
@pytest.mark.parametrize("training,track", MODES)
def test_module_kinds_gradcheck_momentum_none(cls, training, track):
    shape = (2, 3, 2, 2)
    m = (cls(3, momentum=None, track_running_stats=track) if cls is not bnn.LazyBatchNorm2d
         else cls(momentum=None, track_running_stats=track))
    m = m.double()
    m(_x(shape).detach())  # materializes the lazy module; a batch for momentum=None's average
    m.train(training)
    assert gradcheck(m, (_x(shape),), **CHECKS)
    assert gradgradcheck(m, (_x(shape),), **GGCHECKS)


# --- forward-mode AD and batched gradients against torch --------------------------------------------


def _tangents(*tensors):
    return tuple(None if t is None else torch.randn_like(t) for t in tensors)


def _dual_output(fn, primals, tangents):
    with fwAD.dual_level():
        duals = [p if t is None else fwAD.make_dual(p.detach(), t) for p, t in zip(primals, tangents, strict=True)]
        out = fn(*duals)
        return fwAD.unpack_dual(out).primal.clone(), fwAD.unpack_dual(out).tangent.clone()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training,track", MODES)
def test_module_forward_ad_matches_torch(shape, training, track):
    ours, theirs = _pair(shape, training, track)
    x = _x(shape).detach()
    tx = torch.randn_like(x)
    got = _dual_output(ours, (x,), (tx,))
    expected = _dual_output(theirs, (x,), (tx,))
    for a, e in zip(got, expected, strict=True):
        assert_close(a, e)
    if track:
        assert_close(ours.running_mean, theirs.running_mean)
        assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("ours_cls,theirs_cls", [(bnn.LazyBatchNorm2d, torch.nn.LazyBatchNorm2d),
                                                  (bnn.SyncBatchNorm, torch.nn.BatchNorm2d)])
@pytest.mark.parametrize("training,track", MODES)
def test_lazy_and_sync_forward_ad_and_batched_grads_match_torch(ours_cls, theirs_cls, training, track):
    """The lazy modules and SyncBatchNorm on one process (no process group: local statistics), momentum=None."""
    shape = (2, 3, 2, 2)
    x = _x(shape).detach()
    mods = []
    for cls in (ours_cls, theirs_cls):
        m = cls(momentum=None, track_running_stats=track) if "Lazy" in cls.__name__ else cls(
            3, momentum=None, track_running_stats=track)
        m = m.double()
        m(x * 0.5 + 1)  # one batch: materializes the lazy modules, moves the running statistics
        mods.append(m.train(training))
    tx = torch.randn_like(x)
    for a, e in zip(_dual_output(mods[0], (x,), (tx,)), _dual_output(mods[1], (x,), (tx,)), strict=True):
        assert_close(a, e)
    gys = torch.randn(3, *shape, dtype=torch.float64)
    grads = [torch.autograd.grad(m(xx), (xx, m.weight), gys, is_grads_batched=True)
             for m, xx in ((mods[0], x.clone().requires_grad_()), (mods[1], x.clone().requires_grad_()))]
    for a, e in zip(*grads, strict=True):
        assert_close(a, e)
    if track:
        assert_close(mods[0].running_mean, mods[1].running_mean)
        assert_close(mods[0].running_var, mods[1].running_var)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_functional_forward_ad_and_batched_grads_match_torch(shape, training, dtype):
    x = _x(shape).detach().to(dtype)
    w, b = (t.detach().to(dtype) for t in _params(shape[1]))
    rm, rv = (t.to(dtype) for t in _running(shape[1]))
    tangents = _tangents(x, w, b)

    def call(fn):
        return lambda xx, ww, bb: fn(xx, rm.clone(), rv.clone(), ww, bb, training, 0.1, 1e-5)

    for a, e in zip(_dual_output(call(BF.batch_norm), (x, w, b), tangents),
                    _dual_output(call(F.batch_norm), (x, w, b), tangents), strict=True):
        assert_close(a, e)
    # vmap over the backward (batched gradients: tensors without storage reach the backward)
    gys = torch.randn(3, *shape, dtype=dtype)
    grads = []
    for fn in (call(BF.batch_norm), call(F.batch_norm)):
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        grads.append(torch.autograd.grad(fn(xx, ww, bb), (xx, ww, bb), gys, is_grads_batched=True))
    for a, e in zip(*grads, strict=True):
        assert_close(a, e)


@pytest.mark.parametrize("training", [True, False])
def test_func_transforms_match_torch(training):
    """jvp, jacfwd, jacrev, hessian and vmap(grad) through the functional, against torch's batch norm."""
    shape = (3, 2, 4)
    x = _x(shape).detach()
    w, b = (t.detach() for t in _params(2))
    rm, rv = _running(2)

    def loss_of(fn):
        def f(xx, ww, bb):
            y = fn(xx, None if training else rm, None if training else rv, ww, bb, training, 0.1, 1e-5)
            return (y.sin() * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum()
        return f

    def out_of(fn):
        return lambda xx: fn(xx, None if training else rm, None if training else rv, w, b, training, 0.1, 1e-5)

    tx = torch.randn_like(x)
    for a, e in zip(jvp(out_of(BF.batch_norm), (x,), (tx,)), jvp(out_of(F.batch_norm), (x,), (tx,)), strict=True):
        assert_close(a, e)
    assert_close(jacfwd(out_of(BF.batch_norm))(x), jacfwd(out_of(F.batch_norm))(x))
    assert_close(jacrev(out_of(BF.batch_norm))(x), jacrev(out_of(F.batch_norm))(x))
    ours = hessian(loss_of(BF.batch_norm), argnums=(0, 1, 2))(x, w, b)
    # torch's batch norm through torch's double backward (plain autograd): under torch.func (2.13), torch's own
    # training-mode block d(dL/dw)/dx comes out wrong, while this one and a composite of plain ops agree with bnkit
    theirs = torch.autograd.functional.hessian(loss_of(F.batch_norm), (x, w, b))
    for a, e in zip(torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(theirs), strict=True):
        assert_close(a, e)
    xs = torch.randn(4, *shape, dtype=torch.float64)
    assert_close(vmap(grad(loss_of(BF.batch_norm)), in_dims=(0, None, None))(xs, w, b),
                 vmap(grad(loss_of(F.batch_norm)), in_dims=(0, None, None))(xs, w, b))


@pytest.mark.parametrize("training,track", [(True, False), (False, True), (False, False)])
def test_module_func_transforms_match_torch(training, track):
    """The modules under jvp/jacrev/hessian/vmap(grad) via functional_call. (Training with running
    statistics mutates captured buffers, which torch's own module may not do under these transforms.)"""
    shape = (2, 3, 2, 2)
    ours, theirs = _pair(shape, training, track)
    x = _x(shape).detach()
    tx = torch.randn_like(x)
    xs = torch.randn(3, *shape, dtype=torch.float64)
    results = []
    for m in (ours, theirs):
        params = {k: v.detach() for k, v in m.named_parameters()}

        def out(xx, p, m=m):
            return functional_call(m, p, (xx,))

        def loss(xx, p, out=out):
            return out(xx, p).tanh().square().sum()

        results.append((
            jvp(lambda xx, out=out, params=params: out(xx, params), (x,), (tx,)),
            jacrev(out, argnums=(0, 1))(x, params),
            hessian(loss)(x, params),
            vmap(grad(loss, argnums=1), in_dims=(0, None))(xs, params),
        ))
    leaves = [torch.utils._pytree.tree_leaves(r) for r in results]
    assert len(leaves[0]) == len(leaves[1])
    for a, e in zip(*leaves, strict=True):
        assert_close(a, e)


# --- the variants ---------------------------------------------------------------------------------


ACTS = [("relu", 0.0), ("leaky_relu", 0.1), ("elu", 1.0), ("silu", 0.0), ("gelu", 0.0), ("identity", 0.0)]


def _torch_act(y, activation, param):
    return {"relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, param), "elu": lambda t: F.elu(t, param),
            "silu": F.silu, "gelu": F.gelu, "identity": lambda t: t}[activation](y)


@pytest.mark.parametrize("activation,param", ACTS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_act_every_mode_matches_torch(activation, param, training):
    shape = (3, 2, 4)
    x = _x(shape)
    w, b = _params(2)
    rm, rv = _running(2)

    def ours(xx, ww, bb):
        return BF.batch_norm_act(xx, rm.clone(), rv.clone(), ww, bb, training, 0.1, 1e-3,
                                 activation=activation, activation_param=param or 0.01)

    def theirs(xx, ww, bb):
        return _torch_act(F.batch_norm(xx, rm.clone(), rv.clone(), ww, bb, training, 0.1, 1e-3), activation,
                          param or 0.01)

    if activation not in ("relu", "leaky_relu"):  # kinks make finite differences unreliable at 0
        assert gradcheck(ours, (x, w, b), **CHECKS)
        assert gradgradcheck(ours, (x, w, b), **GGCHECKS)
    tangents = _tangents(x, w, b)
    for a, e in zip(_dual_output(ours, (x, w, b), tangents), _dual_output(theirs, (x, w, b), tangents), strict=True):
        assert_close(a, e)
    gys = torch.randn(3, *shape, dtype=torch.float64)
    grads = []
    for fn in (ours, theirs):
        xx, ww, bb = (t.detach().clone().requires_grad_() for t in (x, w, b))
        grads.append(torch.autograd.grad(fn(xx, ww, bb), (xx, ww, bb), gys, is_grads_batched=True))
    for a, e in zip(*grads, strict=True):
        assert_close(a, e)
    out = lambda fn: (lambda xx: fn(xx, w.detach(), b.detach()))  # noqa: E731
    assert_close(jacfwd(out(ours))(x.detach()), jacfwd(out(theirs))(x.detach()))
    assert_close(jacrev(out(ours))(x.detach()), jacrev(out(theirs))(x.detach()))


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_act_memory_saving_batched_grads(training):
    """Memory-saving mode has no double backward (documented) but takes batched gradients."""
    shape = (4, 3, 3)
    x = _x(shape).detach()
    w, b = (t.detach() for t in _params(3))
    w[1] = 0.0  # a lost channel: its xhat is kept aside
    rm, rv = _running(3)
    gys = torch.randn(3, *shape, dtype=torch.float64)
    grads = []
    for fn in (
        lambda xx, ww, bb: BF.batch_norm_act(xx, rm.clone(), rv.clone(), ww, bb, training, 0.1, 1e-3,
                                             activation="leaky_relu", activation_param=0.1, memory_saving=True),
        lambda xx, ww, bb: F.leaky_relu(F.batch_norm(xx, rm.clone(), rv.clone(), ww, bb, training, 0.1, 1e-3), 0.1),
    ):
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        grads.append(torch.autograd.grad(fn(xx, ww, bb), (xx, ww, bb), gys, is_grads_batched=True))
    # memory-saving mode rebuilds xhat = (y - b) / w from the output: weights of order one here, so that
    # division adds no more than the backward's own rounding
    for a, e in zip(*grads, strict=True):
        assert_close(a, e, table=GRAD)


@pytest.mark.parametrize("dual", ["input", "weight"])
def test_batch_norm_act_inplace_forward_ad_raises(dual):
    """inplace=True overwrites the input that the tangent needs: a clear error, whichever input has a tangent."""
    x, w, b = torch.randn(3, 2, 4), torch.rand(2) + 0.5, torch.randn(2)
    with fwAD.dual_level():
        if dual == "input":
            x = fwAD.make_dual(x, torch.randn_like(x))
        else:
            w = fwAD.make_dual(w, torch.randn_like(w))
        with pytest.raises(RuntimeError, match="inplace=True has no forward-mode AD"):
            BF.batch_norm_act(x.clone(), None, None, w, b, True, activation="leaky_relu", memory_saving=True,
                              inplace=True)


@pytest.mark.parametrize("training", [True, False])
def test_module_variants_forward_ad_and_batched_grads(training):
    """BatchNormAct (standard), renorm at r_max=1/d_max=0, ghost with one virtual batch, frozen: torch's
    batch norm (and activation) gives the same tangents and batched gradients."""
    shape = (4, 3, 2)
    ours_list = [bnn.BatchNormAct1d(3, activation="silu"), bnn.BatchRenorm1d(3, r_max=1.0, d_max=0.0),
                 bnn.GhostBatchNorm1d(3, virtual_batch_size=4), bnn.FrozenBatchNorm1d(3)]
    rm, rv = _running(3)
    for ours in ours_list:
        ours = ours.double()
        theirs = torch.nn.BatchNorm1d(3).double()
        for m in (ours, theirs):
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            if isinstance(m, bnn.FrozenBatchNorm1d):
                m.weight.copy_(torch.linspace(0.5, 1.5, 3))
                m.bias.copy_(torch.linspace(-1, 1, 3))
            else:
                with torch.no_grad():
                    m.weight.copy_(torch.linspace(0.5, 1.5, 3))
                    m.bias.copy_(torch.linspace(-1, 1, 3))
        frozen = isinstance(ours, bnn.FrozenBatchNorm1d)
        ours.train(training)
        theirs.train(training and not frozen)
        act = torch.nn.SiLU() if isinstance(ours, bnn.BatchNormAct1d) else torch.nn.Identity()
        composite = torch.nn.Sequential(theirs, act)
        x = _x(shape).detach()
        tx = torch.randn_like(x)
        for a, e in zip(_dual_output(ours, (x,), (tx,)), _dual_output(composite, (x,), (tx,)), strict=True):
            assert_close(a, e)
        gys = torch.randn(3, *shape, dtype=torch.float64)
        got = torch.autograd.grad(ours(x.requires_grad_()), x, gys, is_grads_batched=True)
        expected = torch.autograd.grad(composite(x), x, gys, is_grads_batched=True)
        x.requires_grad_(False)
        assert_close(got[0], expected[0])


@pytest.mark.parametrize("training", [True, False])
def test_functional_variants_gradcheck(training):
    shape = (4, 2, 3)
    x = _x(shape)
    w, b = _params(2)
    rm, rv = _running(2)
    cases = [
        # r and d are stop-gradient constants (by design): at r_max=1, d_max=0 they are constant indeed
        lambda xx, ww, bb: BF.batch_renorm_pure(xx, rm, rv, ww, bb, training, 0.1, 1e-3, r_max=1.0, d_max=0.0)[0],
        lambda xx, ww, bb: BF.ghost_batch_norm_pure(xx, rm, rv, ww, bb, training, 0.1, 1e-3,
                                                    virtual_batch_size=2)[0],
        lambda xx, ww, bb: BF.frozen_batch_norm(xx, rm, rv, ww, bb, 1e-3),
    ]
    for fn in cases:
        assert gradcheck(fn, (x, w, b), **CHECKS)
        assert gradgradcheck(fn, (x, w, b), **GGCHECKS)


# --- running statistics with forward-mode tangents ------------------------------------------------


def _outcome(fn, args, dual_indices):
    tangents = [torch.rand_like(a) for a in args]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a.clone(), t) if i in dual_indices else a.clone()
                 for i, (a, t) in enumerate(zip(args, tangents, strict=True))]
        try:
            y = fn(*duals)
        except RuntimeError as exc:
            return "raised", str(exc)
        return "ok", [fwAD.unpack_dual(t) for t in (y, duals[1], duals[2])]


def _assert_same_outcome(ours, theirs) -> None:
    """bnkit's and torch's outcome of one call with running-statistics tangents: the same error, or the
    same primals and tangents."""
    (kind, got), (expected_kind, expected) = ours, theirs
    assert kind == expected_kind
    if kind == "raised":
        assert got == expected == bn_autograd.RUNNING_TANGENT_ERROR
        return
    for a, e in zip(got, expected, strict=True):
        assert_close(a.primal, e.primal)
        assert (a.tangent is None) == (e.tangent is None)
        if e.tangent is not None:
            assert_close(a.tangent, e.tangent)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dual_indices", [(0,), (1,), (2,), (1, 2), (0, 1), (0, 2), (0, 1, 2), (3, 1), (4, 2), (3,)])
def test_running_stats_with_forward_grad(training, dual_indices):
    """torch's test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad, both modes:
    the outcome (error and wording, or output, tangents and running statistics) is torch's."""
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.rand(2) + 0.5, torch.randn(2), torch.randn(2))
    outcomes = []
    for fn in (BF.batch_norm, F.batch_norm):
        torch.manual_seed(1)
        outcomes.append(_outcome(lambda *a, fn=fn: fn(*a, training=training, momentum=0.3), args, dual_indices))
    _assert_same_outcome(*outcomes)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dual_indices", [(1,), (1, 2), (0, 1), (0, 2), (3, 1)])
def test_running_stats_with_forward_grad_batch_norm_act(training, dual_indices):
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.rand(2) + 0.5, torch.randn(2), torch.randn(2))

    def theirs(x, rm, rv, w, b):
        return F.silu(F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.3))

    def ours(x, rm, rv, w, b):
        return BF.batch_norm_act(x, rm, rv, w, b, training=training, momentum=0.3, activation="silu")

    outcomes = []
    for fn in (ours, theirs):
        torch.manual_seed(1)
        outcomes.append(_outcome(fn, args, dual_indices))
    _assert_same_outcome(*outcomes)


# --- the fast kernels stay on the plain eager path ------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_plain_calls_and_forward_ad_run_the_kernels(training, bn_path):
    """Forward AD and gradients of plain eager calls run the cpu backend's kernels (the jvp and a
    batched backward alone take plain ops); the reference backend is asked once first so that a stale
    answer would show."""
    x = torch.randn(4, 3, 5, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    with use_backend("reference"):
        BF.batch_norm(x.detach(), rm.clone(), rv.clone(), training=training)
    assert last_backend() == "reference"
    y = BF.batch_norm(x, rm.clone(), rv.clone(), training=training)
    assert last_backend() == "cpu"
    y.sum().backward()
    with use_backend("reference"):
        BF.batch_norm(x.detach(), rm.clone(), rv.clone(), training=training)
    with fwAD.dual_level():
        BF.batch_norm(fwAD.make_dual(x.detach(), torch.randn_like(x)), rm.clone(), rv.clone(), training=training)
    assert last_backend() == "cpu"


# --- gradients on offset data: no less accurate than torch's --------------------------------------


OFFSETS = [(1000.0, 1.0), (3.0, 0.01)]
# (N, C, *) shapes: the small path's kernels up to SMALL_GRAD_NUMEL, the regular backend beyond (bn_path)
ACCURACY_SHAPES = [(4, 3), (8, 4, 5), (2, 3, 4, 4), (16, 8, 3, 3)]


def _grads(fn, x, w, b, dy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    return torch.autograd.grad(fn(x, w, b), (x, w, b), dy)


def _bound(fn, rm, rv, training, **kwargs):
    """``fn(x, w, b)`` with copies of the running statistics in ``x``'s dtype (momentum 0: they stay put)."""
    def call(xx, ww, bb):
        return fn(xx, rm.to(xx.dtype, copy=True), rv.to(xx.dtype, copy=True), ww, bb, training, 0.0, 1e-5, **kwargs)
    return call


def _errors(ours, x, w, b, dy, training, rm, rv):
    """``[(ours, torch's, size)]`` per gradient (dx, dw, db): max abs errors against float64 of the gradients
    ``ours`` (a function of (x, w, b), or the gradients themselves) and of torch's float32 batch norm."""
    torch_fn = _bound(F.batch_norm, rm, rv, training)
    exact = _grads(torch_fn, x.double(), w.double(), b.double(), dy.double())
    theirs = _grads(torch_fn, x, w, b, dy)
    got = _grads(ours, x, w, b, dy) if callable(ours) else ours
    return [((o.double() - e).abs().max().item(), (t.double() - e).abs().max().item(), e.abs().max().item())
            for o, t, e in zip(got, theirs, exact, strict=True)]


def _accuracy_cases(seed_offset=0):
    for (offset, scale), shape, trial in ((o, s, t) for o in OFFSETS for s in ACCURACY_SHAPES for t in range(3)):
        g = torch.Generator().manual_seed(hash((offset, shape, trial, seed_offset)) % (1 << 31))
        c = shape[1]
        x = (offset + scale * torch.randn(shape, dtype=torch.float64, generator=g)).float()
        w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
        dy = torch.randn(shape, generator=g)
        rm = (offset + scale * torch.randn(c, dtype=torch.float64, generator=g)).float()
        rv = (scale**2 * (torch.rand(c, dtype=torch.float64, generator=g) + 0.5)).float()
        yield x, w, b, dy, rm, rv


def _assert_no_less_accurate(errors):
    # ours within a quarter more than torch's error, or below a floor of float32 rounding of the result
    for ours, theirs, size in errors:
        assert ours <= 1.25 * theirs + 4 * torch.finfo(torch.float32).eps * size, (ours, theirs, size)


@pytest.mark.parametrize("training", [True, False])
def test_offset_data_gradients_functional(training, bn_path):
    for x, w, b, dy, rm, rv in _accuracy_cases():
        _assert_no_less_accurate(_errors(_bound(BF.batch_norm, rm, rv, training), x, w, b, dy, training, rm, rv))


@pytest.mark.parametrize("training", [True, False])
def test_offset_data_gradients_fused_act(training):
    for x, w, b, dy, rm, rv in _accuracy_cases(1):
        fn = _bound(BF.batch_norm_act, rm, rv, training, activation="identity")
        _assert_no_less_accurate(_errors(fn, x, w, b, dy, training, rm, rv))


@pytest.mark.parametrize("training", [True, False])
def test_offset_data_gradients_reference(training):
    """The reference backward (batched gradients, double backward, the reference backend), and the
    reference backend behind the autograd layer."""
    for x, w, b, dy, rm, rv in _accuracy_cases(2):
        if training:
            mean, var = ref.batch_stats(x)
            got = ref.backward_train(dy, x, mean, ref.invstd(var, 1e-5), w)
        else:
            got = ref.backward_eval(dy, x, rm, ref.invstd(rv, 1e-5), w)
        _assert_no_less_accurate(_errors(got, x, w, b, dy, training, rm, rv))
        with use_backend("reference"):
            fn = _bound(BF.batch_norm, rm, rv, training)
            _assert_no_less_accurate(_errors(fn, x, w, b, dy, training, rm, rv))


def test_renorm_stop_gradient_in_every_mode():
    """Batch renorm's r and d are constants for every derivative: eager forward AD, torch.func's jvp and
    jacfwd, and reverse mode give one Jacobian (no_grad alone does not stop forward-mode tangents)."""
    x = _x((4, 2, 3)).detach() * 2
    w, b = (t.detach() for t in _params(2))
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.2

    def f(xx):
        return BF.batch_renorm_pure(xx, rm, rv, w, b, True, 0.1, 1e-3, r_max=3.0, d_max=2.0)[0]

    reverse = jacrev(f)(x)
    assert_close(jacfwd(f)(x), reverse)
    tx = torch.randn_like(x)
    expected = (reverse.reshape(x.numel(), x.numel()) @ tx.reshape(-1)).reshape(x.shape)
    assert_close(jvp(f, (x,), (tx,))[1], expected)
    assert_close(_dual_output(f, (x,), (tx,))[1], expected)
    assert_close(torch.autograd.functional.jacobian(f, x), reverse)
