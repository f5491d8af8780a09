r"""``bnkit.fold``: fold eval-mode batch norm into the convolution or linear layer before it.

In eval mode a batch-norm layer is an affine map per channel ``c``::

    y = w[c] * (z - running_mean[c]) / sqrt(running_var[c] + eps) + b[c] = scale[c] * z + shift[c]
    scale = w / sqrt(running_var + eps)          shift = b - running_mean * scale

and when ``z = W * x + bias`` comes from a convolution or linear layer (linear in its
weight), the composition is that layer with ``W' = scale * W`` (scaled along the
*output-channel* axis of the weight) and ``bias' = scale * bias + shift``. The output-channel
axis is dim 0 of ``Conv*d`` and ``Linear`` weights, ``(out, in / groups, *k)``; for
``ConvTranspose*d`` the weight is ``(in, out / groups, *k)`` and output channel
``g * out / groups + j`` lives at column ``j`` of the rows of group ``g``. The folded
parameters are computed in float64 and rounded once to the layer's dtype.

Pairs are found by tracing the model with ``torch.fx`` (any module structure, not only
``nn.Sequential``); a pair is folded only when it is safe:

* the BN module normalizes with its running statistics (eval mode; a layer in training
  mode, without running statistics, with bnkit's "batch" override, or updating its
  statistics in eval mode is skipped);
* the conv output goes to the BN only (a conv whose output also feeds a residual branch
  is skipped), the BN is called on it with no other argument, and neither module is
  called at a second place in the graph (shared weights);
* the conv is one of ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, ``Linear`` with torch's
  own forward and no parametrization (a subclass that changes ``forward``, e.g. weight
  standardization, is skipped);
* the BN's channels are the layer's output channels: ``channel_dim`` 1 for convs; for
  ``Linear``, ``channel_dim=-1`` (bnkit) or ``channel_dim=1`` *assuming a 2D* ``(N, C)``
  *output* (a ``BatchNorm1d`` after a ``Linear`` on ``(N, L, C)`` input normalizes over
  ``L``; fold cannot see shapes, so do not fold such a model).

Batch-norm layers are found by duck typing: anything with ``running_mean``, ``running_var``
and ``eps`` (and ``weight``/``bias``, possibly ``None``) except instance norm. Only those whose
forward bnkit knows are folded (:func:`bnkit.nn.kinds.unknown_forward`): torch's and bnkit's
layers, bnkit's BN+activation and frozen layers, torchvision's frozen batch norm. A layer with
a forward of its own (timm's ``BatchNormAct2d``, which also applies ``drop`` and ``act``) is
skipped with that reason: folding it as batch norm would drop the rest.

The input model is never modified: ``fold`` works on a deep copy and returns a new
``torch.fx.GraphModule`` in which each folded BN is an ``nn.Identity`` submodule (so
``print(model)`` shows where it was) and is no longer called. A folded BN+activation layer
(bnkit's ``BatchNormAct*``, or a frozen one) leaves its activation in its place, as a torch
module (``nn.ReLU``, ``nn.SiLU``, ...), still called on the folded layer's output. When the whole model cannot
be traced, its children are traced and folded one by one (recursively), and the result
is a copy of the model with the traced children replaced.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from bnkit.nn.kinds import activation_module, unknown_forward
from bnkit.nn.modes import resolve_mode
from bnkit.utils.report import Skipped, ToolReport

__all__ = ["FoldReport", "FoldedPair", "Skipped", "fold"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE_TYPES = (*_CONV_TYPES, *_CONV_TRANSPOSE_TYPES, nn.Linear)


@dataclass(frozen=True)
class FoldedPair:
    """A folded pair: the layer that now carries the BN, and the BN.

    The BN's place holds ``nn.Identity``, or, for a BN+activation layer, the activation it
    applied (``activation``: its class name, e.g. ``"ReLU"``), which stays in the model.
    """

    layer: str
    bn: str
    activation: str | None = None


class FoldReport(ToolReport):
    """The list of :class:`FoldedPair` returned by :func:`fold`, plus ``skipped``: every batch-norm
    layer that was not folded (and untraceable parts of the model), each with the reason."""


def _is_bn_like(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return False
    return all(hasattr(module, a) for a in ("running_mean", "running_var", "eps"))


class _Tracer(fx.Tracer):
    """torch's leaves plus every batch-norm-like module (bnkit's live outside ``torch.nn``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # Subclasses of the foldable layers stay leaves too, so that fold can see (and skip) them.
        return _is_bn_like(m) or isinstance(m, _FOLDABLE_TYPES) or super().is_leaf_module(m, module_qualified_name)


def _bn_problem(bn: nn.Module) -> str | None:
    """Why ``bn`` does not act as a fixed affine map right now (and an activation), or ``None`` if it does."""
    unknown = unknown_forward(bn)
    if unknown is not None:
        return f"{unknown}: folding it as batch norm would drop that"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False): it always normalizes with batch statistics"
    if not hasattr(bn, "track_running_stats"):
        return None  # frozen batch norm: running statistics in every mode
    use_batch, update = resolve_mode(bn)  # torch's rule plus bnkit's overrides (bnkit.batch_stats)
    if use_batch:
        if getattr(bn, "_bnkit_normalize_with", None) == "batch":
            return "set to normalize with batch statistics (bnkit.batch_stats)"
        return "in training mode (call model.eval() first): it normalizes with batch statistics"
    if update:
        return "set to keep updating its running statistics (folding would freeze them)"
    return None


def _layer_problem(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded into ``layer``, or ``None``."""
    if not isinstance(layer, _FOLDABLE_TYPES):
        return f"preceded by {type(layer).__name__}, not a Conv/ConvTranspose/Linear layer"
    base = next(t for t in _FOLDABLE_TYPES if isinstance(layer, t))
    if type(layer).forward is not base.forward:
        return f"preceded by {type(layer).__name__}, which overrides {base.__name__}.forward"
    if parametrize.is_parametrized(layer):
        return f"preceded by a parametrized {type(layer).__name__} (its weight is computed, not stored)"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    channels = bn.running_mean.numel()
    if channels != out:
        return f"has {channels} channels but the preceding {type(layer).__name__} has {out} outputs"
    channel_dim = getattr(bn, "channel_dim", 1)
    if isinstance(layer, nn.Linear):
        if channel_dim not in (1, -1):
            return f"channel_dim={channel_dim} is not the feature axis of the Linear output"
    elif channel_dim != 1:
        return f"channel_dim={channel_dim} is not the channel axis of the {type(layer).__name__} output"
    return None


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Rewrite ``layer``'s weight and bias so that ``layer(x) == bn(old_layer(x))`` in eval mode."""
    w_dtype = layer.weight.dtype
    f64 = torch.float64
    rm = bn.running_mean.to(f64)
    rv = bn.running_var.to(f64)
    gamma = bn.weight.to(f64) if getattr(bn, "weight", None) is not None else torch.ones_like(rm)
    beta = bn.bias.to(f64) if getattr(bn, "bias", None) is not None else torch.zeros_like(rm)
    scale = gamma / torch.sqrt(rv + bn.eps)
    shift = beta - rm * scale

    weight = layer.weight.to(f64)
    if isinstance(layer, _CONV_TRANSPOSE_TYPES):
        # (in, out/groups, *k): output channel g*opg + j is column j of group g's rows.
        g = layer.groups
        in_ch, opg = weight.shape[0], weight.shape[1]
        k = weight.shape[2:]
        grouped = weight.reshape(g, in_ch // g, opg, *k) * scale.reshape(g, 1, opg, *([1] * len(k)))
        new_weight = grouped.reshape(weight.shape)
    else:
        new_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    old_bias = layer.bias.to(f64) if layer.bias is not None else torch.zeros_like(rm)
    new_bias = old_bias * scale + shift

    layer.weight.copy_(new_weight.to(w_dtype))
    if layer.bias is not None:
        layer.bias.copy_(new_bias.to(layer.bias.dtype))
    else:
        layer.bias = nn.Parameter(new_bias.to(dtype=w_dtype), requires_grad=layer.weight.requires_grad)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _fold_graph(gm: fx.GraphModule, prefix: str, report: FoldReport) -> None:
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(node.target)
        if not _is_bn_like(bn):
            continue
        name = prefix + node.target
        problem = _bn_problem(bn)
        if problem is None and calls[node.target] > 1:
            problem = "called at more than one place in the model (shared module)"
        if problem is None and (len(node.args) != 1 or node.kwargs):
            problem = "called with more than one argument (e.g. a mask)"
        src = node.args[0] if node.args else None
        if problem is None and not (isinstance(src, fx.Node) and src.op == "call_module"):
            what = src.op if isinstance(src, fx.Node) else type(src).__name__
            problem = f"its input does not come from a module call (it comes from {what})"
        if problem is None:
            layer = gm.get_submodule(src.target)
            problem = _layer_problem(layer, bn)
            if problem is None and calls[src.target] > 1:
                problem = f"the preceding layer {prefix + src.target} is called at more than one place (shared)"
            if problem is None and len(src.users) != 1:
                others = sorted(u.name for u in src.users if u is not node)
                problem = f"the output of {prefix + src.target} is also used by {', '.join(others)}"
        if problem is not None:
            report.skipped.append(Skipped(name, problem))
            continue
        _fold_into(layer, bn)
        activation = activation_module(bn)
        if activation is None:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            _set_submodule(gm, node.target, nn.Identity())
        else:  # the node now calls the activation alone, on the folded layer's output
            _set_submodule(gm, node.target, activation)
        report.append(FoldedPair(prefix + src.target, name, None if activation is None else type(activation).__name__))
    gm.graph.lint()
    gm.recompile()


def _fold_module(module: nn.Module, prefix: str, report: FoldReport) -> nn.Module:
    """Fold inside ``module`` (already a private copy); returns what replaces it."""
    if _is_bn_like(module):
        problem = _bn_problem(module) or "not preceded by a layer inside a traceable module"
        report.skipped.append(Skipped(prefix.rstrip(".") or type(module).__name__, problem))
        return module
    if not any(_is_bn_like(m) for m in module.modules()):
        return module
    tracer = _Tracer()
    try:
        graph = tracer.trace(module)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        children = list(module.named_children())
        if not children:
            report.skipped.append(Skipped(prefix.rstrip(".") or type(module).__name__,
                                          f"untraceable by torch.fx: {type(exc).__name__}: {exc}"))
            return module
        report.skipped.append(Skipped(prefix.rstrip(".") or type(module).__name__,
                                      f"untraceable by torch.fx ({type(exc).__name__}: {exc}); "
                                      "folded inside its children instead"))
        for child_name, child in children:
            new_child = _fold_module(child, f"{prefix}{child_name}.", report)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    gm.training = module.training
    _fold_graph(gm, prefix, report)
    return gm


def fold(model: nn.Module) -> tuple[nn.Module, FoldReport]:
    """Fold every eval-mode batch-norm layer into the Conv/ConvTranspose/Linear before it.

    Returns ``(folded_model, report)``: ``folded_model`` is a new module (usually a
    ``torch.fx.GraphModule``; ``model`` itself is not modified) that computes the same
    function as ``model`` in eval mode, with fewer layers; ``report`` is a list of
    :class:`FoldedPair` (qualified names in ``model``) with ``report.skipped`` listing
    every batch-norm layer left in place and why. Call ``model.eval()`` first: a layer in
    training mode normalizes with batch statistics and is not an affine map.

    Why a copy: folding rewrites conv weights; doing it in place would silently change a
    model that may still be trained, or whose BN layers are still referenced elsewhere.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects an nn.Module, got {type(model).__name__}")
    try:
        private = copy.deepcopy(model)
    except Exception as exc:
        raise TypeError(f"fold works on a copy of the model and could not deepcopy it: {type(exc).__name__}: {exc}"
                        ) from exc
    report = FoldReport()
    folded = _fold_module(private, "", report)
    seen = {p.bn for p in report} | {s.name for s in report.skipped}
    for name, module in model.named_modules():
        if _is_bn_like(module) and name not in seen and not any(name.startswith(s + ".") for s in seen):
            report.skipped.append(Skipped(name, "never called in the traced graph (unused, or inside a leaf module)"))
    return folded, report
