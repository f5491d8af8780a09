"""bnkit models inside the tools that trace, export or rewrite models: torch.fx (and what is built on it),
torch.jit.trace, ONNX export. Every check runs the same model with torch's batch norm as the oracle."""

import copy
import io
import warnings

import pytest
import torch
from bn_tolerances import NETWORK, assert_close
from models import mobilenet_style, randomize_bn, resnet_style
from torch import fx, nn

import bnkit
from bnkit.autograd import needs_plain_ops, plain_eager


def _twins(make, training: bool):
    torch.manual_seed(0)
    torch_model = randomize_bn(make()).train(training)
    return torch_model, bnkit.convert(copy.deepcopy(torch_model))


def _bn_targets(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)]


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("make", [resnet_style, mobilenet_style], ids=["resnet", "mobilenet"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_symbolic_trace_keeps_each_layer_one_node(make, training):
    torch_model, bnkit_model = _twins(make, training)
    traced_torch, traced_bnkit = fx.symbolic_trace(torch_model), fx.symbolic_trace(bnkit_model)
    # the same graph: one call_module node per batch-norm layer, where torch's are
    assert _bn_targets(traced_bnkit) == _bn_targets(traced_torch)
    assert [n.op for n in traced_bnkit.graph.nodes] == [n.op for n in traced_torch.graph.nodes]
    assert all(type(traced_bnkit.get_submodule(t)).__module__.startswith("bnkit.") for t in _bn_targets(traced_bnkit))
    x = torch.randn(4, 3, 16, 16)
    assert_close(traced_bnkit(x), traced_torch(x), table=NETWORK)
    for (name, a), b in zip(_buffers(traced_bnkit).items(), _buffers(traced_torch).values(), strict=True):
        assert_close(a, b, table=NETWORK, msg=name)  # training updated both alike


def test_every_bnkit_layer_traces_as_one_node():
    layers = [bnkit.nn.BatchNorm2d(4), bnkit.nn.BatchNormAct2d(4, activation="silu"), bnkit.nn.BatchRenorm2d(4),
              bnkit.nn.GhostBatchNorm2d(4, virtual_batch_size=2), bnkit.nn.FrozenBatchNorm2d(4),
              bnkit.nn.SyncBatchNorm(4), bnkit.nn.LazyBatchNorm2d()]
    x = torch.randn(4, 4, 5, 5)
    for layer in layers:
        model = nn.Sequential(nn.Conv2d(4, 4, 1), layer, nn.ReLU()).eval()
        model(x)  # initializes the lazy layer
        gm = fx.symbolic_trace(model)
        assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "call_module",
                                                 "output"], type(layer).__name__
        torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


def test_a_layer_traced_on_its_own_says_why_it_cannot_be():
    with pytest.raises(TypeError, match="leaves of fx graphs"):
        fx.symbolic_trace(bnkit.nn.BatchNorm2d(3))


def test_a_mask_is_recorded_as_a_keyword():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bnkit.nn.BatchNorm1d(3)

        def forward(self, x, mask):
            return self.bn(x, mask=mask)

    model = Masked()
    twin = copy.deepcopy(model)
    gm = fx.symbolic_trace(model)
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert node.target == "bn" and list(node.kwargs) == ["mask"]
    x, mask = torch.randn(6, 3, 4), torch.rand(6, 4) > 0.3
    torch.testing.assert_close(gm(x, mask), twin(x, mask), atol=0, rtol=0)
    torch.testing.assert_close(gm.bn.running_var, twin.bn.running_var, atol=0, rtol=0)


def test_fx_fuse_matches_torch():
    from torch.fx.experimental.optimization import fuse

    torch_model, bnkit_model = _twins(resnet_style, False)
    x = torch.randn(4, 3, 16, 16)
    assert_close(fuse(copy.deepcopy(bnkit_model))(x), fuse(copy.deepcopy(torch_model))(x), table=NETWORK)


def test_feature_extraction_by_node_name():
    """What torchvision's create_feature_extractor does: trace, then return chosen nodes' outputs."""
    torch_model, bnkit_model = _twins(mobilenet_style, False)

    def extractor(model):
        gm = fx.symbolic_trace(model)
        wanted = {n.name: n for n in gm.graph.nodes if n.op == "call_module" and n.target in ("1.0", "3.bn2.0")}
        out = next(n for n in gm.graph.nodes if n.op == "output")
        out.args = ({k: wanted[k] for k in sorted(wanted)},)
        gm.graph.lint()
        gm.recompile()
        return gm

    x = torch.randn(2, 3, 16, 16)
    got, expected = extractor(bnkit_model)(x), extractor(torch_model)(x)
    assert list(got) == list(expected) and len(got) == 2
    for k in got:
        assert_close(got[k], expected[k], table=NETWORK)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_jit_trace_matches_torch(training):
    torch_model, bnkit_model = _twins(resnet_style, training)
    x = torch.randn(4, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced_torch = torch.jit.trace(copy.deepcopy(torch_model), x, check_trace=False)
        traced = torch.jit.trace(copy.deepcopy(bnkit_model), x, check_trace=False)
    x2 = torch.randn(4, 3, 16, 16)  # a new batch: the traced graph computes, it did not record constants
    assert_close(traced(x2), traced_torch(x2), table=NETWORK)
    for (name, a), b in zip(_buffers(traced).items(), _buffers(traced_torch).values(), strict=True):
        assert_close(a, b, table=NETWORK, msg=name)
    # a TorchScript graph of standard ops: no bnkit op, so it runs where bnkit's Python cannot
    assert "bnkit::" not in str(traced.inlined_graph)


def _onnx_run(model: nn.Module, x: torch.Tensor, dynamo: bool):
    import onnx
    from onnx.reference import ReferenceEvaluator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
        else:  # the TorchScript-based exporter
            buffer = io.BytesIO()
            torch.onnx.export(model, (x,), buffer, dynamo=False)
            proto = onnx.load_from_string(buffer.getvalue())
    out = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    return proto, torch.from_numpy(out)


@pytest.mark.parametrize(("training", "dynamo"), [(False, True), (True, True), (False, False)],
                         ids=["eval", "train", "eval-torchscript-exporter"])
def test_onnx_export_gives_standard_ops_and_torchs_numbers(training, dynamo):
    torch_model, bnkit_model = _twins(resnet_style, training)
    x = torch.randn(4, 3, 16, 16)
    proto, out = _onnx_run(copy.deepcopy(bnkit_model), x, dynamo)
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}, "non-standard ONNX domain"
    assert not any("bnkit" in node.op_type for node in proto.graph.node)
    with torch.no_grad():
        expected = copy.deepcopy(torch_model)(x)  # train mode: normalized with this batch's statistics
    assert_close(out, expected, table=NETWORK)


def test_plain_calls_keep_the_kernels_and_tracers_get_plain_ops():
    assert plain_eager() and not needs_plain_ops()
    bn = bnkit.nn.BatchNorm2d(3)
    with bnkit.use_backend("auto"):
        bn(torch.randn(4, 3, 5, 5))
        assert bnkit.last_backend() == "cpu"
    seen = {}

    def probe(x):
        seen["plain"], seen["needs"] = plain_eager(), needs_plain_ops()
        return x * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.trace(probe, torch.randn(2), check_trace=False)
    assert seen == {"plain": False, "needs": True}
    torch.func.vmap(probe)(torch.randn(3, 2))
    assert seen == {"plain": False, "needs": True}
