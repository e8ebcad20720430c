"""Trace a model into GraphModules, as much of it as torch.fx can see.

If the whole model traces, the result is one GraphModule. If not (data-dependent control flow, as in
torchvision's detection models), each child is tried in turn, recursively: the largest traceable
submodules become GraphModules and the modules that could not be traced stay as they are ("opaque"),
each recorded with the tracer's reason. The rewrite pass then converts conv/linear call sites inside
the graphs and swaps conv/linear children of opaque modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from ..nn.modules import Int8Layer


@dataclass
class OpaqueModule:
    name: str
    type: str
    reason: str


class Int8Tracer(fx.Tracer):
    """The standard tracer, with int8fx's own modules kept as leaves (a model may be converted twice)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Int8Layer) or super().is_leaf_module(m, qualname)


def symbolic_trace(module: nn.Module) -> fx.GraphModule:
    tracer = Int8Tracer()
    graph = tracer.trace(module)
    gm = fx.GraphModule(tracer.root, graph, module.__class__.__name__)
    _restore_unreferenced(gm, module)
    return gm


def _restore_unreferenced(gm: fx.GraphModule, original: nn.Module) -> None:
    """GraphModule keeps only what the graph references; put back unused parameters, buffers and modules so
    that state_dict names stay identical to the original model's."""
    have = set(gm.state_dict().keys())
    for name, mod in original.named_modules():
        if not name:
            continue
        try:
            gm.get_submodule(name)
        except AttributeError:
            parent, _, leaf = name.rpartition(".")
            try:
                gm.get_submodule(parent).add_module(leaf, mod) if parent else gm.add_module(leaf, mod)
            except AttributeError:
                pass
    for key, value in original.state_dict(keep_vars=True).items():
        if key in have:
            continue
        owner_name, _, attr = key.rpartition(".")
        try:
            owner = gm.get_submodule(owner_name) if owner_name else gm
        except AttributeError:
            continue
        if hasattr(owner, attr):
            continue
        src = original.get_submodule(owner_name) if owner_name else original
        if attr in src._parameters:
            owner.register_parameter(attr, src._parameters[attr])
        elif attr in src._buffers:
            owner.register_buffer(attr, src._buffers[attr], persistent=attr not in src._non_persistent_buffers_set)


def _is_plain_leaf(m: nn.Module) -> bool:
    return Int8Tracer().is_leaf_module(m, "")


def trace_partitioned(module: nn.Module, name: str = "", opaque: list | None = None) -> tuple[nn.Module, list[OpaqueModule]]:
    """(module or GraphModule, opaque modules) -- see the module docstring. Modifies `module`'s children
    in place, so call it on a copy."""
    opaque = [] if opaque is None else opaque
    if isinstance(module, fx.GraphModule) or (name and _is_plain_leaf(module)):
        return module, opaque  # a leaf inside a model: the rewrite pass swaps it if it is a conv/linear
    try:
        return symbolic_trace(module), opaque
    except Exception as e:  # torch.fx raises many types (TraceError, TypeError, AssertionError, ...)
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]
        opaque.append(OpaqueModule(name or "(root)", type(module).__name__, reason))
    for child_name, child in list(module.named_children()):
        new_child, _ = trace_partitioned(child, f"{name}.{child_name}" if name else child_name, opaque)
        if new_child is not child:
            setattr(module, child_name, new_child)
    return module, opaque
