"""batch_norm_pure and the modules under torch.func: functional_call, vmap over models, jacrev.

Under an active torch.func transform bnkit routes to bnkit.reference.batch_norm (plain,
differentiable torch ops): torch does not run ``register_autograd`` formulas of custom ops
under ``grad``/``jacrev``. These tests pin that the results are still exact.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacfwd, jacrev, stack_module_state, vmap

import bnkit
from bnkit.functional import batch_norm_pure

B, C = 3, 4


def _stacked(training: bool):
    x = torch.randn(B, 5, C, 2, dtype=torch.float64) * 2 + 1
    w = torch.rand(B, C, dtype=torch.float64) + 0.5
    b = torch.randn(B, C, dtype=torch.float64)
    rm = torch.randn(B, C, dtype=torch.float64)
    rv = torch.rand(B, C, dtype=torch.float64) + 0.5
    return x, rm, rv, w, b


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, torch.tensor(0.5, dtype=torch.float64)])
def test_vmap_over_models_pure(training, momentum):
    x, rm, rv, w, b = _stacked(training)
    y, new_mean, new_var = vmap(lambda *a: batch_norm_pure(*a, training, momentum, 1e-5))(x, rm, rv, w, b)
    for i in range(B):
        rmi, rvi = rm[i].clone(), rv[i].clone()
        yi = F.batch_norm(x[i], rmi, rvi, w[i], b[i], training, float(momentum), 1e-5)
        torch.testing.assert_close(y[i], yi)
        torch.testing.assert_close(new_mean[i], rmi)
        torch.testing.assert_close(new_var[i], rvi)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_functional_call_vmap_over_stacked_modules(training, momentum):
    torch.manual_seed(3)
    torch_models = [torch.nn.BatchNorm1d(C, momentum=momentum).double() for _ in range(B)]
    for m in torch_models:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.running_mean.normal_()
        m.train(training)
    bnkit_models = [bnkit.nn.BatchNorm1d(C, momentum=momentum).double() for _ in range(B)]
    for mb, mt in zip(bnkit_models, torch_models, strict=True):
        mb.load_state_dict(mt.state_dict())
        mb.train(training)
    params, buffers = stack_module_state(bnkit_models)
    base = bnkit.nn.BatchNorm1d(C, momentum=momentum).double().to("meta")
    base.train(training)
    x = torch.randn(B, 6, C, dtype=torch.float64)

    def call(p, bu, xx):
        return functional_call(base, (p, bu), (xx,))

    y = vmap(call)(params, buffers, x)
    for i, mt in enumerate(torch_models):
        torch.testing.assert_close(y[i], mt(x[i]))
        # the module's running-stat update lands in the stacked buffers
        torch.testing.assert_close(buffers["running_mean"][i], mt.running_mean)
        torch.testing.assert_close(buffers["running_var"][i], mt.running_var)
        assert buffers["num_batches_tracked"][i].item() == mt.num_batches_tracked.item()


def test_jacrev_training_matches_torch():
    x, rm, rv, w, b = (t[0] for t in _stacked(True))

    def ours(xx, ww, bb):
        return batch_norm_pure(xx, rm, rv, ww, bb, True, 0.1, 1e-5)[0]

    def oracle(xx, ww, bb):  # torch's functional without running stats (in-place updates break jacrev)
        return F.batch_norm(xx, None, None, ww, bb, True, 0.1, 1e-5)

    for a, e in zip(jacrev(ours, argnums=(0, 1, 2))(x, w, b), jacrev(oracle, argnums=(0, 1, 2))(x, w, b),
                    strict=True):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(jacfwd(ours)(x, w, b), jacrev(oracle)(x, w, b))


def test_jacrev_with_running_stats_returns_them_too():
    """The pure form also differentiates with running stats given (torch's in-place form cannot)."""
    x, rm, rv, w, b = (t[0] for t in _stacked(True))
    jac = jacrev(lambda xx: batch_norm_pure(xx, rm, rv, w, b, True, 0.1, 1e-5)[0])(x)
    expected = torch.autograd.functional.jacobian(lambda xx: F.batch_norm(xx, None, None, w, b, True), x)
    torch.testing.assert_close(jac, expected)


def test_vmap_of_grad_per_model():
    """Per-model parameter gradients: vmap(grad(loss)) over stacked weights."""
    x, rm, rv, w, b = _stacked(True)

    def loss(ww, bb, xx, m, v):
        return batch_norm_pure(xx, m, v, ww, bb, True, 0.1, 1e-5)[0].square().mul(torch.arange(C).view(C, 1)).sum()

    gw, gb = vmap(torch.func.grad(loss, argnums=(0, 1)))(w, b, x, rm, rv)
    for i in range(B):
        wi, bi = w[i].clone().requires_grad_(), b[i].clone().requires_grad_()
        F.batch_norm(x[i], None, None, wi, bi, True).square().mul(torch.arange(C).view(C, 1)).sum().backward()
        torch.testing.assert_close(gw[i], wi.grad)
        torch.testing.assert_close(gb[i], bi.grad)
