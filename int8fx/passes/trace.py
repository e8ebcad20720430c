"""torch.fx tracing, two ways.

`trace_own_code(module)`: the graph of one module's *own* forward code, every child module a leaf (a
`call_module` node). This is what conversion rewrites: conv/linear calls a module makes itself
(`F.conv2d(x, self.weight, ...)`, weight standardisation, `F.linear(x, self.qkv.weight, ...)`), each in
the smallest module that makes it. torch.fx freezes `self.training` into a graph, so the code is traced
in both modes; when the two graphs differ, both are kept and the twin picks one per call.

`analysis_graphs(model)`: whole-model graphs for `inspect`'s picture, INT8 sites as leaves; a model that
does not trace as a whole (data-dependent control flow, as in torchvision's detectors) gives one graph
per largest traceable part. Analysis only: the model is neither changed nor replaced by them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn


@dataclass
class OpaqueModule:
    """A module whose own code torch.fx could not trace, with the tracer's reason; `weights` are its own
    parameters of 2 to 5 dims, whose F.conv*d / F.linear calls (if its code makes any) int8fx cannot see."""

    name: str
    type: str
    reason: str
    weights: tuple = ()


class OwnCodeTracer(fx.Tracer):
    """Traces the root module's forward only: every submodule call becomes a leaf node. Buffers are read
    through proxies too, so code that updates them in place (`self.num_batches_tracked.add_(1)`) records a
    node instead of changing the model."""

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def failure_reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:200]


def trace_own_code(module: nn.Module) -> dict[str, fx.Graph] | str:
    """{"any": graph} when the module's own code is the same in both modes, else {"train": g, "eval": g};
    the tracer's reason (a str) when it cannot be traced. Training flags are restored afterwards."""
    # tracing runs the module's code: on a shallow copy, so that what it assigns to `self` stays there
    shadow = object.__new__(type(module))
    shadow.__dict__.update(module.__dict__)
    flags = [(m, m.training) for m in module.modules()]
    own = {k: v.clone() for k, v in module._buffers.items() if isinstance(v, torch.Tensor)}
    graphs = {}
    try:
        for key, mode in (("train", True), ("eval", False)):
            for m, _ in flags:
                m.training = mode
            shadow.training = mode
            graphs[key] = OwnCodeTracer().trace(shadow)
    except Exception as e:  # torch.fx raises many types (TraceError, TypeError, AssertionError, ...)
        return failure_reason(e)
    finally:
        for m, t in flags:
            m.training = t
        with torch.no_grad():  # tracing runs the code: whatever it did to the module's own state is undone
            for k, v in own.items():
                if not torch.equal(module._buffers[k], v):
                    module._buffers[k].copy_(v)
    for graph in graphs.values():
        _plain_meta(graph)
    if same_code(graphs["train"], graphs["eval"]):
        return {"any": graphs["train"]}
    return graphs


def _plain_meta(graph: fx.Graph) -> None:
    """Node metadata names module classes by string: the graph is kept on the model and pickled with it, and
    a class made at run time (an int8fx twin) cannot be pickled by reference."""
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k: tuple(v if isinstance(v, str) else getattr(v, "__qualname__", str(v))
                                                     for v in (vals if isinstance(vals, tuple) else (vals,)))
                                            for k, vals in stack.items()}


def same_code(a: fx.Graph, b: fx.Graph) -> bool:
    return a.python_code(root_module="self").src == b.python_code(root_module="self").src


class AnalysisTracer(fx.Tracer):
    """The standard tracer, with int8fx's sites and routed modules kept as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from ..nn.modules import Int8Layer
        from ..nn.twins import Routed

        return isinstance(m, (Int8Layer, Routed)) or super().is_leaf_module(m, qualname)


def analysis_graphs(model: nn.Module, name: str = "") -> tuple[list[tuple[str, fx.GraphModule]], list[OpaqueModule]]:
    """([(module path, GraphModule)], [untraceable modules on the way]): the model traced as a whole, or its
    largest traceable parts (see the module docstring). The model is not modified."""
    from ..nn.twins import Rewritten

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
