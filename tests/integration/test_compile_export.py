"""torch.compile(fullgraph=True) and torch.export of bnkit layers, compared with eager torch.

Compilation is slow on 2 cores: few cases, tiny shapes, and the ``aot_eager`` backend
(which runs every piece the custom ops register: fake kernels, autograd formulas,
functionalization) except for one inductor case.
"""

import copy

import pytest
import torch
from bn_tolerances import NETWORK
from torch import nn

import bnkit


def _twins(momentum, training):
    t = nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
        t.running_mean.normal_()
        t.running_var.uniform_(0.5, 2)
    b = bnkit.nn.BatchNorm2d(3, momentum=momentum)
    b.load_state_dict(t.state_dict())
    t.train(training)
    b.train(training)
    return t, b


@pytest.mark.parametrize("momentum,training,backend", [
    (0.1, True, "aot_eager"),
    (None, True, "aot_eager"),  # torch's own module graph-breaks here; bnkit's must not
    (0.1, False, "aot_eager"),
    (None, True, "inductor"),
])
def test_compile_fullgraph_matches_eager_torch(momentum, training, backend):
    torch._dynamo.reset()
    t, b = _twins(momentum, training)
    compiled = torch.compile(b, fullgraph=True, backend=backend)
    for _ in range(3):
        x = torch.randn(4, 3, 2, 2) * 2 + 1
        xt, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        yt, yb = t(xt), compiled(xb)
        torch.testing.assert_close(yb, yt)
        g = torch.randn_like(yt)
        yt.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xb.grad, xt.grad)
        torch.testing.assert_close(b.weight.grad, t.weight.grad)
        torch.testing.assert_close(b.bias.grad, t.bias.grad)
    torch.testing.assert_close(b.running_mean, t.running_mean)
    torch.testing.assert_close(b.running_var, t.running_var)
    assert torch.equal(b.num_batches_tracked, t.num_batches_tracked)


def _aten_graphs(model, x):
    """The ATen forward and backward graphs (as printed code) that torch.compile records for a training
    step of ``model`` on ``x``."""
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[str] = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    compiled(x).sum().backward()
    return graphs


@pytest.mark.parametrize("training,track", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_step_matches_bnkit_eager_in_every_mode(training, track, dtype):
    # what torch.compile runs (inductor_train in training and batch-statistics modes, the reference's
    # formulas in eval) against bnkit's eager kernels: outputs, every gradient, running statistics
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=track), nn.ReLU(),
                        nn.Flatten(), nn.Linear(64, 6), nn.BatchNorm1d(6, track_running_stats=track))
    if track:
        with torch.no_grad():
            net[1].running_mean.normal_()
            net[1].running_var.uniform_(0.5, 2)
    eager = bnkit.convert(net).to(dtype).train(training)
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, fullgraph=True, backend="inductor")
    atol, rtol = NETWORK[dtype]
    tol = {"atol": atol, "rtol": rtol}
    for _ in range(2):
        x = (torch.randn(8, 3, 4, 4) * 3 + 2).to(dtype)
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, **tol)
        g = torch.randn_like(ye)
        ye.backward(g)
        yc.backward(g)
        for (name, pe), pc in zip(eager.named_parameters(), compiled_net.parameters(), strict=True):
            torch.testing.assert_close(pc.grad, pe.grad, **tol, msg=name)
    for (name, be), bc in zip(eager.named_buffers(), compiled_net.buffers(), strict=True):
        torch.testing.assert_close(bc, be, **tol, msg=name)


@pytest.mark.parametrize("layer", [
    lambda: bnkit.nn.BatchRenorm2d(3, r_max=1.5, d_max=0.5),
    lambda: bnkit.nn.GhostBatchNorm2d(3, virtual_batch_size=2),
])
def test_compiled_variants_match_their_eager_step(layer):
    # batch renorm and ghost BN take inductor_train too under torch.compile
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = layer().double()
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        eager.bias.normal_()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    atol, rtol = NETWORK[torch.float64]
    for _ in range(2):
        x = torch.randn(4, 3, 3, 3, dtype=torch.float64) * 2 + 1
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, atol=atol, rtol=rtol)
        g = torch.randn_like(ye)
        ye.backward(g)
        yc.backward(g)
        for pe, pc in zip(eager.parameters(), compiled_layer.parameters(), strict=True):
            torch.testing.assert_close(pc.grad, pe.grad, atol=atol, rtol=rtol)
    for be, bc in zip(eager.buffers(), compiled_layer.buffers(), strict=True):
        torch.testing.assert_close(bc, be, atol=atol, rtol=rtol)


def test_compiled_training_records_the_fusable_statistics():
    # a training call under torch.compile records var_mean and the hand-derived backward in float32 ops
    # (inductor_train): no custom op, no float64 accumulation of float32 data, one pass of var_mean
    forward, backward = _aten_graphs(bnkit.nn.BatchNorm2d(3), torch.randn(4, 3, 2, 2, requires_grad=True))
    assert forward.count("aten.var_mean") == 1, forward
    for code in (forward, backward):
        assert "bnkit" not in code and "float64" not in code, code
    assert backward.count("aten.sum") == 2, backward  # sum(dy) and sum(dy * (x - mean))


def _model(training):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5),
                      nn.BatchNorm1d(5))
    m.train(training)
    return m


@pytest.mark.parametrize("training", [False, True])
def test_export(training):
    t = _model(training)
    b = bnkit.convert(copy.deepcopy(t))
    x = torch.randn(4, 3, 5, 5)
    ep = torch.export.export(b, (x,))
    # the functional (ATen) IR lists running-stat updates as buffer mutations (a separate
    # export: programs of one export share their state tensors)
    functional = torch.export.export(copy.deepcopy(b), (x,)).run_decompositions()
    for program in (ep, functional):
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any("bnkit." in s for s in targets), targets
        assert not any("batch_norm" in s or "instance_norm" in s for s in targets), targets
    if training:
        mutated = set(functional.graph_signature.buffers_to_mutate.values())
        assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= mutated
    t_functional = copy.deepcopy(t)
    for program, twin in ((ep, t), (functional, t_functional)):
        exported = program.module()
        for _ in range(2):
            x = torch.randn(4, 3, 5, 5)
            torch.testing.assert_close(exported(x), twin(x))
        state = exported.state_dict()
        for k, v in twin.state_dict().items():
            torch.testing.assert_close(state[k], v)
