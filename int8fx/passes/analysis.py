"""Whole-model graphs for `inspect`'s picture, INT8 sites as leaves; a model that does not trace as a whole
(data-dependent control flow, as in torchvision's detectors) gives one graph per largest traceable part.
Analysis only: the model is neither changed nor replaced by them."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..nn.modules import Int8Layer
from ..nn.twins import Rewritten, Routed
from .trace import OpaqueModule, failure_reason


class AnalysisTracer(fx.Tracer):
    """The standard tracer, with int8fx's sites and routed modules kept as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Int8Layer, Routed)) or super().is_leaf_module(m, qualname)


def analysis_graphs(model: nn.Module, name: str = "") -> tuple[list[tuple[str, fx.GraphModule]], list[OpaqueModule]]:
    """([(module path, GraphModule)], [untraceable modules on the way]): the model traced as a whole, or its
    largest traceable parts (see the module docstring). The model is not modified."""
    try:
        tracer = AnalysisTracer()
        root = model
        if isinstance(model, Rewritten):  # its forward takes (*args, **kwargs): trace its own graph's module
            root = fx.GraphModule(model, model.current_graph(), type(model).__name__)
        graph = tracer.trace(root)
        return [(name, fx.GraphModule(tracer.root, graph, type(model).__name__))], []
    except Exception as e:
        parts, opaque = [], [OpaqueModule(name or "(root)", type(model).__name__, failure_reason(e))]
    for child_name, child in model.named_children():
        if AnalysisTracer().is_leaf_module(child, ""):
            continue
        p, o = analysis_graphs(child, f"{name}.{child_name}" if name else child_name)
        parts += p
        opaque += o
    return parts, opaque
