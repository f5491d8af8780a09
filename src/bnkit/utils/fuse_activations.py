"""``bnkit.convert(model, fuse_activations=True)``: batch norm + its activation as one ``BatchNormAct`` layer.

A batch norm followed by an activation keeps two full-size tensors for the backward (the BN's input
and the activation's input or output); bnkit's ``BatchNormAct*`` keeps one (the input, or with
``memory_saving`` the output alone) and writes the activated output in the normalization pass. This
pass finds the pairs with ``torch.fx`` and swaps them:

* the batch norm is one of bnkit's ``BatchNorm1d/2d/3d`` (``convert`` has just swapped torch's), called
  once in the graph, on one argument (no mask), with ``weight`` and ``bias`` both present or both absent;
* its output has exactly one user, the activation: ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.ELU``,
  ``nn.SiLU``, ``nn.GELU`` (exact, not tanh-approximated) as modules, or ``F.relu``, ``torch.relu``,
  ``F.leaky_relu``, ``F.elu``, ``F.silu``, ``F.gelu``, ``Tensor.relu`` as calls, in place or not, with
  constant arguments;
* the new layer shares the batch norm's parameter and buffer objects (an optimizer built before keeps
  working) and takes ``memory_saving=True`` where the activation can be inverted (leaky_relu and elu
  with a positive parameter).

Anything else is left as it is, with the reason in the report (``ReLU6``, for instance, is not one of
bnkit's fused activations). The result computes the same outputs and gradients as the unfused model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

import bnkit.nn as bnn
from bnkit.fused import INVERTIBLE_ACTIVATIONS
from bnkit.utils.report import Skipped, ToolReport

__all__ = ["FusedPair", "FuseReport", "fuse_activations"]

_BN_TO_ACT = {bnn.BatchNorm1d: bnn.BatchNormAct1d, bnn.BatchNorm2d: bnn.BatchNormAct2d,
              bnn.BatchNorm3d: bnn.BatchNormAct3d}


@dataclass(frozen=True)
class FusedPair:
    """A batch norm (now a ``BatchNormAct*`` at the same name) and the activation it absorbed."""

    bn: str
    activation: str
    memory_saving: bool


class FuseReport(ToolReport):
    """The :class:`FusedPair` list of the pass, plus ``skipped``: each batch norm followed by an activation
    that was not fused, with the reason."""


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_RELU_CALLS = {F.relu, torch.relu, torch.relu_, F.relu_}
_NAMED_CALLS = {F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu", F.elu: "elu", F.elu_: "elu",
                F.silu: "silu", F.gelu: "gelu"}
_OTHER_ACTIVATIONS = (nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish,
                      nn.PReLU, nn.SELU, nn.CELU, nn.Softplus)
_OTHER_CALLS = {F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, torch.sigmoid, torch.tanh, F.mish, F.selu,
                F.celu, F.softplus, F.prelu}


def _activation(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, float] | str | None:
    """``(name, param)`` of bnkit's activation that ``node`` computes on its first argument; a reason
    when it is an activation bnkit does not fuse; ``None`` when it is not an activation."""
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) is nn.ReLU:
            return "relu", 0.01
        if type(m) is nn.LeakyReLU:
            return "leaky_relu", float(m.negative_slope)
        if type(m) is nn.ELU:
            return "elu", float(m.alpha)
        if type(m) is nn.SiLU:
            return "silu", 0.01
        if type(m) is nn.GELU:
            return ("gelu", 0.01) if m.approximate == "none" else "GELU(approximate='tanh') is not fused"
        if isinstance(m, _OTHER_ACTIVATIONS):
            return f"{type(m).__name__} is not one of bnkit's fused activations"
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu", 0.01
    if node.op != "call_function":
        return None
    if node.target in _RELU_CALLS:
        return "relu", 0.01
    name = _NAMED_CALLS.get(node.target)
    if name is None:
        if node.target in _OTHER_CALLS:
            return f"{node.target.__name__} is not one of bnkit's fused activations"
        return None
    if name == "leaky_relu":
        param = _arg(node, 1, "negative_slope", 0.01)
    elif name == "elu":
        param = _arg(node, 1, "alpha", 1.0)
    elif name == "gelu":
        if _arg(node, 1, "approximate", "none") != "none":
            return "gelu(approximate='tanh') is not fused"
        param = 0.01
    else:
        param = 0.01
    if isinstance(param, fx.Node):
        return f"{name}'s parameter is computed in the graph, not a constant"
    return name, float(param)


def _fused_layer(bn: nn.Module, activation: str, param: float) -> nn.Module:
    memory_saving = activation in INVERTIBLE_ACTIVATIONS and activation != "identity" and param > 0
    layer = _BN_TO_ACT[type(bn)](
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, activation, param, memory_saving,
        channel_dim=bn.channel_dim, nonfinite=bn.nonfinite,
    )
    layer.training = bn.training
    # the very same tensors: an optimizer or EMA built on the unfused model keeps working
    for name in ("weight", "bias"):
        layer._parameters[name] = bn._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        layer._buffers[name] = bn._buffers.get(name)
    for attr in ("_bnkit_normalize_with", "_bnkit_update_running_stats"):
        if attr in bn.__dict__:
            layer.__dict__[attr] = bn.__dict__[attr]
    return layer


def _bn_problem(bn: nn.Module, node: fx.Node, calls: dict[str, int]) -> str | None:
    if calls[node.target] > 1:
        return "called at more than one place in the model (shared module)"
    if len(node.args) != 1 or node.kwargs:
        return "called with more than one argument (e.g. a mask)"
    if (bn.weight is None) != (bn.bias is None):
        return "has a weight without a bias (BatchNormAct takes both or neither)"
    return None


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _fuse_graph(gm: fx.GraphModule, prefix: str, report: FuseReport) -> None:
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) not in _BN_TO_ACT:
            continue
        users = list(node.users)
        act = _activation(users[0], modules) if len(users) == 1 and users[0].args[:1] == (node,) else None
        name = prefix + node.target
        if act is None:
            acts = [u for u in users if _activation(u, modules) is not None]
            if acts:  # an activation follows, but the BN output is needed elsewhere too
                others = sorted(u.name for u in users if u is not acts[0])
                report.skipped.append(Skipped(name, f"its output is also used by {', '.join(others)}"))
            continue
        bn = modules[node.target]
        problem = act if isinstance(act, str) else _bn_problem(bn, node, calls)
        if problem is not None:
            report.skipped.append(Skipped(name, problem))
            continue
        activation, param = act
        layer = _fused_layer(bn, activation, param)
        _set_submodule(gm, node.target, layer)
        act_node = users[0]
        act_node.replace_all_uses_with(node)
        gm.graph.erase_node(act_node)
        report.append(FusedPair(name, activation, layer.memory_saving))
    gm.graph.lint()
    gm.recompile()


def _fuse_module(module: nn.Module, prefix: str, report: FuseReport) -> nn.Module:
    if not any(type(m) in _BN_TO_ACT for m in module.modules()) or type(module) in _BN_TO_ACT:
        return module
    try:
        gm = fx.symbolic_trace(module)
    except Exception as exc:  # fx raises many types; fuse inside the children instead
        children = list(module.named_children())
        if not children:
            report.skipped.append(Skipped(prefix.rstrip(".") or type(module).__name__,
                                          f"untraceable by torch.fx: {type(exc).__name__}: {exc}"))
            return module
        for child_name, child in children:
            new_child = _fuse_module(child, f"{prefix}{child_name}.", report)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module
    gm.training = module.training
    _fuse_graph(gm, prefix, report)
    return gm


def fuse_activations(model: nn.Module) -> tuple[nn.Module, FuseReport]:
    """``(fused_model, report)``: ``model`` with each bnkit batch norm and the activation after it as one
    ``BatchNormAct*`` layer (see the module docstring). ``fused_model`` is a ``torch.fx.GraphModule`` (or,
    when ``model`` cannot be traced, ``model`` with its traceable children replaced) that shares every
    parameter and buffer with ``model``."""
    report = FuseReport()
    fused = _fuse_module(model, "", report)
    return fused, report
