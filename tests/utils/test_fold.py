"""bnkit.fold: the folded model computes the same function in eval mode, and skips what it must."""

import copy

import pytest
import torch
from torch import nn

import bnkit
import bnkit.nn as bnn
from bnkit.utils.fold import FoldedPair

# (dtype, rtol, atol relative to the largest output magnitude): derived, not table entries. A folded
# network rounds its folded weights once and sums in another order, so the absolute error scales with
# the outputs' size rather than with each value.
TOLERANCES = [(torch.float64, 0.0, 1e-10), (torch.float32, 1e-5, 1e-5)]


def randomize_bn(model: nn.Module) -> None:
    """Running statistics and affine parameters far from their initial 0/1."""
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.3, 3)
            if isinstance(m, nn.modules.batchnorm._NormBase):
                if m.weight is not None:
                    m.weight.uniform_(-2, 2)
                if m.bias is not None:
                    m.bias.uniform_(-1, 1)


class Block(nn.Module):
    """A residual block: dilated conv without bias, grouped conv, and a side conv used twice."""

    def __init__(self, c: int, bn: type) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=False)
        self.bn1 = bn(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=2)
        self.bn2 = bn(c, affine=False)
        self.side = nn.Conv2d(c, c, 1)
        self.bn3 = bn(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        z = self.side(y)  # goes to bn3 AND to the sum: bn3 must not be folded
        return torch.relu(y + x) + self.bn3(z) + z


class ResNetish(nn.Module):
    def __init__(self, bn2d: type = nn.BatchNorm2d, bn1d: type = nn.BatchNorm1d) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.bn = bn2d(4)
        self.layer1 = nn.Sequential(Block(4, bn2d), Block(4, bn2d))
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, output_padding=1, bias=False)
        self.bn_up = bn2d(6)
        self.fc = nn.Linear(6, 5)
        self.bn_fc = bn1d(5)

    def forward(self, x):
        x = self.layer1(torch.relu(self.bn(self.stem(x))))
        x = self.bn_up(self.up(x))
        return self.bn_fc(self.fc(x.mean((2, 3))))


def assert_same_function(a: nn.Module, b: nn.Module, x: torch.Tensor, rtol: float, atol_rel: float) -> None:
    with torch.no_grad():
        expected = a(x)
        got = b(x)
    atol = atol_rel * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize(("dtype", "rtol", "atol_rel"), TOLERANCES)
@pytest.mark.parametrize("flavour", ["torch", "bnkit"])
def test_resnet_style_model_folds_exactly(dtype, rtol, atol_rel, flavour):
    bn2d, bn1d = (nn.BatchNorm2d, nn.BatchNorm1d) if flavour == "torch" else (bnn.BatchNorm2d, bnn.BatchNorm1d)
    model = ResNetish(bn2d, bn1d).to(dtype)
    randomize_bn(model)
    model.eval()
    before = copy.deepcopy(model.state_dict())

    folded, report = bnkit.fold(model)

    x = torch.randn(3, 3, 11, 11, dtype=dtype)
    assert_same_function(model, folded, x, rtol, atol_rel)
    assert set(report) == {
        FoldedPair("stem", "bn"),
        FoldedPair("layer1.0.conv1", "layer1.0.bn1"), FoldedPair("layer1.0.conv2", "layer1.0.bn2"),
        FoldedPair("layer1.1.conv1", "layer1.1.bn1"), FoldedPair("layer1.1.conv2", "layer1.1.bn2"),
        FoldedPair("up", "bn_up"), FoldedPair("fc", "bn_fc"),
    }
    skipped = {s.name: s.reason for s in report.skipped}
    assert set(skipped) == {"layer1.0.bn3", "layer1.1.bn3"}
    assert "also used" in skipped["layer1.0.bn3"]
    # folded BN layers are identities, the skipped one stays a BN layer
    assert isinstance(folded.get_submodule("layer1.0.bn1"), nn.Identity)
    assert isinstance(folded.get_submodule("layer1.0.bn3"), bn2d)
    assert folded.get_submodule("up").bias is not None  # bias=False conv got the BN shift as bias
    # the input model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dim", [1, 3])
@pytest.mark.parametrize(("dtype", "rtol", "atol_rel"), TOLERANCES)
def test_conv_and_transposed_conv_in_1d_and_3d(dim, dtype, rtol, atol_rel):
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dim]
    convt = {1: nn.ConvTranspose1d, 3: nn.ConvTranspose3d}[dim]
    bn = {1: nn.BatchNorm1d, 3: bnn.BatchNorm3d}[dim]
    model = nn.Sequential(
        conv(4, 6, 3, groups=2, dilation=2, padding=2, bias=False), bn(6), nn.ReLU(),
        convt(6, 9, 3, groups=3, stride=2, dilation=1), bn(9),
        convt(9, 4, 2, bias=True), bn(4),
    ).to(dtype)
    randomize_bn(model)
    model.eval()
    folded, report = bnkit.fold(model)
    assert len(report) == 3 and not report.skipped
    x = torch.randn(2, 4, *([6] * dim), dtype=dtype)
    assert_same_function(model, folded, x, rtol, atol_rel)


def test_linear_then_bn_with_channel_dim_last():
    # bnkit's channel_dim=-1 normalizes the features of a (N, L, C) Linear output: foldable.
    model = nn.Sequential(nn.Linear(5, 7), bnn.BatchNorm1d(7, channel_dim=-1)).double()
    randomize_bn(model)
    model.eval()
    folded, report = bnkit.fold(model)
    assert report == [FoldedPair("0", "1")]
    assert_same_function(model, folded, torch.randn(3, 4, 5, dtype=torch.double), 0.0, 1e-10)


class FrozenBN(nn.Module):
    """torchvision-style frozen batch norm: buffers only, running statistics in every mode."""

    def __init__(self, c):
        super().__init__()
        self.eps = 1e-5
        for name, init in (("weight", torch.rand(c) + 0.5), ("bias", torch.randn(c)),
                           ("running_mean", torch.randn(c)), ("running_var", torch.rand(c) + 0.5)):
            self.register_buffer(name, init)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


def test_torchvisions_frozen_bn_folds_even_in_training_mode_and_unknown_ones_are_skipped():
    class FrozenBatchNorm2d(FrozenBN):  # as torchvision.ops.misc names its frozen batch norm
        __module__, __qualname__ = "torchvision.ops.misc", "FrozenBatchNorm2d"

    model = nn.Sequential(nn.Conv2d(2, 3, 3), FrozenBatchNorm2d(3)).double()
    model.train()
    folded, report = bnkit.fold(model)
    assert report == [FoldedPair("0", "1")]
    assert_same_function(model, folded, torch.randn(2, 2, 5, 5, dtype=torch.double), 0.0, 1e-10)

    # the same layer under a name bnkit does not know: its forward could do anything (timm's frozen
    # BatchNormAct2d applies an activation), so it is left in place with the reason
    model = nn.Sequential(nn.Conv2d(2, 3, 3), FrozenBN(3)).double()
    folded, report = bnkit.fold(model)
    assert report == [] and [s.name for s in report.skipped] == ["1"]
    assert "forward of its own" in report.skipped[0].reason
    assert_same_function(model, folded, torch.randn(2, 2, 5, 5, dtype=torch.double), 0.0, 1e-10)


def test_bnkit_mode_overrides_decide_not_the_training_flag():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).double()
    randomize_bn(model)
    model.train()
    with bnkit.batch_stats(model, normalize_with="running", update_running_stats=False):
        folded, report = bnkit.fold(model)
        assert report == [FoldedPair("0", "1"), FoldedPair("2", "3")]
        x = torch.randn(2, 2, 5, 5, dtype=torch.double)
        assert_same_function(model, folded, x, 0.0, 1e-10)
    model.eval()
    with bnkit.batch_stats(model, normalize_with="batch", update_running_stats=False):
        _, report = bnkit.fold(model)
    assert report == [] and all("batch statistics" in s.reason for s in report.skipped)


def test_training_mode_and_no_running_stats_are_skipped_with_reasons():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3),
        nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3, track_running_stats=False),
        nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3),
    )
    model.eval()
    model[1].train()
    folded, report = bnkit.fold(model)
    assert report == [FoldedPair("4", "5")]
    reasons = {s.name: s.reason for s in report.skipped}
    assert "training mode" in reasons["1"]
    assert "no running statistics" in reasons["3"]
    x = torch.randn(2, 2, 9, 9)
    model[1].eval()  # compare the parts that are deterministic: put the same layer in eval in both
    folded.get_submodule("1").eval()
    assert_same_function(model, folded, x, 1e-5, 1e-5)


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn_a = nn.BatchNorm2d(2)
        self.bn_b = nn.BatchNorm2d(2)
        self.bn_shared = nn.BatchNorm2d(2)
        self.conv2 = nn.Conv2d(2, 2, 1)
        self.conv3 = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        a = self.bn_a(self.conv(x))
        b = self.bn_b(self.conv(a))  # the same conv module called twice
        return self.bn_shared(self.conv2(b)) + self.bn_shared(self.conv3(b))  # one BN used twice


def test_shared_modules_are_skipped():
    model = SharedConv().double()
    randomize_bn(model)
    model.eval()
    folded, report = bnkit.fold(model)
    assert list(report) == []
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"bn_a", "bn_b", "bn_shared"}
    assert "shared" in reasons["bn_a"] and "shared" in reasons["bn_shared"]
    assert_same_function(model, folded, torch.randn(2, 2, 3, 3, dtype=torch.double), 0.0, 1e-12)


class WSConv(nn.Conv2d):
    """Weight-standardized conv: its own forward, so folding into its weight would be wrong."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True))
        return self._conv_forward(x, w, self.bias)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
        self.b = nn.Sequential(WSConv(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this module
            x = x + 1
        return self.b(x)


def test_untraceable_model_is_folded_inside_its_children():
    model = Untraceable().double()
    randomize_bn(model)
    model.eval()
    folded, report = bnkit.fold(model)
    assert report == [FoldedPair("a.0", "a.1")]
    reasons = {s.name: s.reason for s in report.skipped}
    assert "untraceable" in reasons["Untraceable"]
    assert "overrides Conv2d.forward" in reasons["b.1"]
    assert isinstance(folded.get_submodule("a.1"), nn.Identity)
    for x in (torch.randn(2, 2, 5, 5, dtype=torch.double), -torch.ones(2, 2, 5, 5, dtype=torch.double) * 9):
        assert_same_function(model, folded, x, 0.0, 1e-10)


def test_fold_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        bnkit.fold({"weight": torch.ones(1)})


# --- layers that do more than batch norm ------------------------------------------------------------


@pytest.mark.parametrize(("activation", "torch_act"), [
    ("relu", nn.ReLU), ("leaky_relu", nn.LeakyReLU), ("elu", nn.ELU), ("silu", nn.SiLU), ("gelu", nn.GELU),
])
@pytest.mark.parametrize("frozen", [False, True], ids=["bn_act", "frozen_bn_act"])
def test_bn_act_layers_fold_and_keep_their_activation(activation, torch_act, frozen):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bnn.BatchNormAct2d(8, activation=activation, activation_param=0.2),
                          nn.Conv2d(8, 4, 1)).double()
    randomize_bn(model)
    model.eval()
    if frozen:
        bnkit.freeze(model)
    folded, report = bnkit.fold(model)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    assert_same_function(model, folded, x, 0.0, 1e-10)
    assert report == [FoldedPair("0", "1", torch_act.__name__)] and not report.skipped
    kept = folded.get_submodule("1")
    assert type(kept) is torch_act
    if activation in ("leaky_relu", "elu"):
        assert (kept.negative_slope if activation == "leaky_relu" else kept.alpha) == pytest.approx(0.2)
    # the activation is still called: negative inputs of the ReLU family come out changed
    assert sum(n.op == "call_module" and n.target == "1" for n in folded.graph.nodes) == 1


def test_the_issue_example_keeps_relu():
    model = nn.Sequential(nn.Conv2d(8, 8, 3), bnn.BatchNormAct2d(8, activation="relu")).eval()
    randomize_bn(model)
    folded, _ = bnkit.fold(model)
    x = torch.randn(2, 8, 7, 7)
    assert_same_function(model, folded, x, 1e-5, 1e-5)
    assert folded(x).min() >= 0


def test_a_layer_with_its_own_forward_is_skipped_with_the_reason():
    from models import TimmStyleBatchNormAct2d, mobilenet_style, timm_norm_act

    model = nn.Sequential(nn.Conv2d(3, 8, 3), TimmStyleBatchNormAct2d(8, act_layer=nn.ReLU), nn.Conv2d(8, 4, 1),
                          nn.BatchNorm2d(4)).double()
    randomize_bn(model)
    model.eval()
    folded, report = bnkit.fold(model)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    assert_same_function(model, folded, x, 0.0, 1e-10)
    assert report == [FoldedPair("2", "3")]
    assert [s.name for s in report.skipped] == ["1"]
    assert "forward of its own" in report.skipped[0].reason and "TimmStyleBatchNormAct2d" in report.skipped[0].reason

    # a whole EfficientNet-like model of such layers: nothing folded, nothing changed, every layer named
    torch.manual_seed(0)
    net = mobilenet_style(timm_norm_act).eval()
    randomize_bn(net)
    folded, report = bnkit.fold(net)
    x = torch.randn(2, 3, 16, 16)
    assert_same_function(net, folded, x, 1e-5, 1e-5)
    layers = [n for n, m in net.named_modules() if isinstance(m, TimmStyleBatchNormAct2d)]
    assert not report and sorted(s.name for s in report.skipped) == sorted(layers)


def test_torchs_bn_then_module_activation_folds_into_the_conv():
    from models import mobilenet_style

    torch.manual_seed(0)
    net = mobilenet_style().eval()
    randomize_bn(net)
    folded, report = bnkit.fold(bnkit.convert(copy.deepcopy(net)))
    x = torch.randn(2, 3, 16, 16)
    assert_same_function(net, folded, x, 1e-5, 1e-5)
    assert len(report) == 10 and not report.skipped
