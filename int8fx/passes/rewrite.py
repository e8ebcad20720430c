"""Rewrite every conv/linear call site into an `Int8Layer`.

Rules (one place to add an op):
  * call_module of nn.Linear / nn.Conv{1,2,3}d (or a subclass that keeps their forward): the module is
    swapped for an Int8Layer that holds the same Parameter objects under the same names;
  * call_function of F.linear / F.conv{1,2,3}d: the node becomes a call of a new Int8Layer (registered
    next to the module that made the call) that takes the weight and bias as arguments;
  * conv/linear children of modules that could not be traced are swapped the same way.
Every conv/linear site ends up in the returned `Site` list, converted or with the reason it was not.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..config import Int8Config
from ..nn.modules import Int8Layer

CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
LINEAR_FUNCTIONS = {F.linear}
_FUNC_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


@dataclass
class Site:
    """One conv/linear call site of the model, converted or not."""

    name: str
    op: str  # "conv1d" | "conv2d" | "conv3d" | "linear" | other type names for unsupported sites
    source: str  # "module" | "function" | "module (untraceable parent)"
    converted: bool
    reason: str = ""
    layer: Int8Layer | None = field(default=None, repr=False)


def _forward_is_standard(mod: nn.Module) -> bool:
    base = nn.Linear if isinstance(mod, nn.Linear) else next(t for t in CONV_MODULES if isinstance(mod, t))
    return type(mod).forward is base.forward


def _module_op(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.Linear):
        return "linear"
    for t, d in CONV_MODULES.items():
        if isinstance(mod, t):
            return f"conv{d}d"
    return None


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


class Rewriter:
    """Holds the running layer index (seeds stochastic rounding) and the sites found so far."""

    def __init__(self, config: Int8Config) -> None:
        self.config = config
        self.sites: list[Site] = []
        self.index = 0
        self._swapped: dict[int, Int8Layer] = {}
        self._seen: set[int] = set()  # conv/linear modules already reported, converted or not

    # ------------------------------------------------------------------ modules
    def swap_module(self, root: nn.Module, path: str, full_name: str, source: str) -> None:
        mod = root.get_submodule(path)
        if isinstance(mod, Int8Layer):
            return
        if id(mod) in self._swapped:  # the same module called from two places: one layer, shared
            _set_submodule(root, path, self._swapped[id(mod)])
            return
        op = _module_op(mod)
        reason = self._why_not_module(mod, full_name)
        self._seen.add(id(mod))
        if reason:
            self.sites.append(Site(full_name, op, source, False, reason))
            return
        layer = Int8Layer.from_module(mod, full_name, self.config.for_layer(full_name), self.index)
        layer.train(mod.training)
        self.index += 1
        self._swapped[id(mod)] = layer
        _set_submodule(root, path, layer)
        self.sites.append(Site(full_name, op, source, True, "", layer))

    def _why_not_module(self, mod: nn.Module, name: str) -> str:
        if self.config.excludes(name, mod):
            return "excluded by Int8Config.exclude"
        if not _forward_is_standard(mod):
            return f"{type(mod).__name__} overrides forward(); its computation is not a plain {_module_op(mod)}"
        if isinstance(mod.weight, nn.parameter.UninitializedParameter):
            return "lazy module not initialised yet: run one forward before convert()"
        return ""

    # ------------------------------------------------------------------ graphs
    def rewrite_graph(self, gm: fx.GraphModule, prefix: str) -> None:
        for node in list(gm.graph.nodes):
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                if _module_op(mod) is not None:
                    self.swap_module(gm, node.target, _join(prefix, node.target), "module")
            elif node.op == "call_function" and (node.target in CONV_FUNCTIONS or node.target in LINEAR_FUNCTIONS):
                self._rewrite_function(gm, node, prefix)
        gm.graph.lint()
        gm.recompile()

    def _rewrite_function(self, gm: fx.GraphModule, node: fx.Node, prefix: str) -> None:
        dims = CONV_FUNCTIONS.get(node.target, 0)
        op = f"conv{dims}d" if dims else "linear"
        names = _FUNC_ARG_NAMES if dims else _FUNC_ARG_NAMES[:3]
        args = dict(zip(names, node.args))
        args.update(node.kwargs)
        owner = _owner_path(node)
        name = _join(prefix, _join(owner, node.name))
        bad = [k for k in ("stride", "padding", "dilation", "groups") if isinstance(args.get(k), fx.Node)]
        weight = _static_value(gm, args.get("weight"))
        reason = ""
        if self.config.excludes(name, None):
            reason = "excluded by Int8Config.exclude"
        elif bad:
            reason = f"{', '.join(bad)} computed at run time; int8fx needs them constant"
        elif weight is None:
            reason = "weight depends on the model input; its shape is unknown at conversion time"
        if reason:
            self.sites.append(Site(name, op, "function", False, reason))
            return
        layer = Int8Layer(dims, weight.shape[0], config=self.config.for_layer(name), name=name, index=self.index,
                          stride=args.get("stride", 1), padding=args.get("padding", 0),
                          dilation=args.get("dilation", 1), groups=args.get("groups", 1), source="function")
        self.index += 1
        path = _join(owner, f"int8_{node.name}")
        gm.add_submodule(path, layer)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (args["input"], args["weight"], args.get("bias")))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        self.sites.append(Site(name, op, "function", True, "", layer))


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else a or b


def _owner_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.keys())[-1] if isinstance(stack, dict) else ""
        return path if isinstance(path, str) else ""
    return ""


def _static_value(gm: fx.GraphModule, arg):
    """Evaluate a weight argument that depends only on parameters/buffers (get_attr and pure ops on them);
    None when it depends on the model input."""
    if isinstance(arg, torch.Tensor):
        return arg
    if not isinstance(arg, fx.Node):
        return None
    if arg.op == "get_attr":
        obj = gm
        for part in arg.target.split("."):
            obj = getattr(obj, part)
        return obj.detach() if isinstance(obj, torch.Tensor) else None
    if arg.op in ("call_function", "call_method"):
        vals = []
        for a in arg.args:
            if isinstance(a, fx.Node):
                v = _static_value(gm, a)
                if v is None:
                    return None
                vals.append(v)
            else:
                vals.append(a)
        if any(isinstance(v, fx.Node) for v in arg.kwargs.values()):
            return None
        with torch.no_grad():
            fn = arg.target if arg.op == "call_function" else getattr(vals[0].__class__, arg.target)
            out = fn(*vals, **arg.kwargs)
        return out if isinstance(out, torch.Tensor) else None
    return None


def rewrite(root: nn.Module, config: Int8Config) -> tuple[nn.Module, list[Site]]:
    """Rewrite every GraphModule in `root`'s tree, then swap conv/linear modules left in opaque parents."""
    rw = Rewriter(config)
    graph_modules = [(n, m) for n, m in root.named_modules() if isinstance(m, fx.GraphModule)]
    for name, gm in graph_modules:
        rw.rewrite_graph(gm, name)
    inside_graph = {id(m) for _, gm in graph_modules for m in gm.modules() if m is not gm}
    for name, mod in list(root.named_modules()):
        if _module_op(mod) is not None and not isinstance(mod, Int8Layer) and name and id(mod) not in rw._seen:
            if id(mod) in inside_graph:
                rw.sites.append(Site(name, _module_op(mod), "module", False,
                                     "never called as a module in the traced graph (unused, or its weight is used by "
                                     "other code)"))
            else:
                rw.swap_module(root, name, name, "module (untraceable parent)")
    return root, rw.sites
