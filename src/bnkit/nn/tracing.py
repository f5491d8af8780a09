"""bnkit's layers as single nodes in ``torch.fx`` graphs, as torch's own batch norm is.

``torch.fx``'s tracers keep the modules of ``torch.nn`` as leaves (one ``call_module`` node each)
and trace into every other module's forward. bnkit's forward checks shapes and picks a kernel
with Python control flow, which a symbolic trace cannot follow. So when a forward receives an
``fx.Proxy``, it records itself as one ``call_module`` node, exactly what the tracer does for a
leaf: ``symbolic_trace``, ``torch.fx.experimental.optimization.fuse``, feature extractors built on
fx and FX-mode quantization then see a bnkit layer where they would see torch's, and the traced
graph calls the real module when it runs.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

__all__ = ["fx_leaf"]


def fx_leaf(module: nn.Module, input: Any, mask: Any = None) -> fx.Proxy | None:
    """The ``call_module`` node for ``module(input[, mask=mask])`` when ``input`` is an fx proxy, else ``None``."""
    if not isinstance(input, fx.Proxy):
        return None
    tracer = input.tracer
    kwargs = {} if mask is None else {"mask": mask}
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), kwargs)
