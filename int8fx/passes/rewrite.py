"""Rewrite every conv/linear call site into an `Int8Layer`.

Rules (one place to add an op):
  * call_module of nn.Linear / nn.Conv{1,2,3}d (or a subclass that keeps their forward): the module is
    swapped for an Int8Layer that holds the same Parameter objects under the same names;
  * call_function of F.linear / F.conv{1,2,3}d: the node becomes a call of a new Int8Layer (registered
    next to the module that made the call) that takes the weight and bias as arguments;
  * conv/linear children of modules that could not be traced are swapped the same way;
  * opaque code that calls F.linear / F.conv*d on known weights (a leaf module such as
    nn.MultiheadAttention, or a torch.fx.wrap-ped function such as Swin's attention) runs inside an
    `Int8Scope` that reroutes those calls to Int8Layers.
Every conv/linear module of the original model (the census, taken before tracing) and every functional
site ends up in the returned `Site` list, converted or with the reason it was not: nothing is dropped
silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..config import Int8Config
from ..nn.modules import Int8Layer
from ..nn.scope import Int8Scope, run_scoped

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

    def __init__(self, config: Int8Config, census: dict | None = None) -> None:
        self.config = config
        self.census = census or {}  # id(weight) -> (path, op) of every conv/linear module before tracing
        self.handled: set[int] = set()  # ids of census weights that some site accounts for
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
        self.handled.add(id(mod.weight))
        if reason:
            self.sites.append(Site(full_name, op, source, False, reason))
            return
        layer = Int8Layer.from_module(mod, full_name, self.config.for_layer(full_name, mod), self.index)
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
                elif not isinstance(mod, (Int8Layer, Int8Scope)):
                    self._scope_leaf_module(gm, node, prefix)
            elif node.op == "call_function" and (node.target in CONV_FUNCTIONS or node.target in LINEAR_FUNCTIONS):
                self._rewrite_function(gm, node, prefix)
            elif node.op == "call_function" and _is_opaque_function(node.target):
                self._scope_function(gm, node, prefix)
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
        self.handled.update(id(_attr(gm, a.target)) for a in _ancestors(args.get("weight")) if a.op == "get_attr")
        path = _join(owner, f"int8_{node.name}")
        gm.add_submodule(path, layer)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (args["input"], args["weight"], args.get("bias")))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        self.sites.append(Site(name, op, "function", True, "", layer))


    # ------------------------------------------------------------------ opaque code
    def _new_scope_layer(self, name: str, op: str, weight: torch.Tensor) -> Int8Layer | None:
        reason = "excluded by Int8Config.exclude" if self.config.excludes(name, None) else ""
        if reason:
            self.sites.append(Site(name, op, "opaque code", False, reason))
            return None
        dims = 0 if op == "linear" else int(op[4])
        layer = Int8Layer(dims, weight.shape[0], config=self.config.for_layer(name), name=name, index=self.index,
                          source="opaque code")
        self.index += 1
        self.sites.append(Site(name, op, "opaque code", True, "", layer))
        return layer

    def _scope_leaf_module(self, gm: fx.GraphModule, node: fx.Node, prefix: str) -> None:
        """A leaf module (not traced into) whose code uses conv/linear weights: run it in a scope."""
        mod = gm.get_submodule(node.target)
        found = {}  # parameter path inside mod -> (site name, op, weight)
        for sub_name, sub in mod.named_modules():
            if _module_op(sub) is not None and not isinstance(sub, Int8Layer):
                found[_join(sub_name, "weight")] = (_join(node.target, sub_name), _module_op(sub), sub.weight)
        for pname, p in mod.named_parameters(recurse=False):
            if pname.endswith("proj_weight") and p.dim() == 2:  # nn.MultiheadAttention's packed projections
                found[pname] = (_join(node.target, pname[: -len("_weight")]), "linear", p)
        if not found:
            return
        layers, attrs = {}, {}
        for ppath, (site, op, w) in found.items():
            self.handled.add(id(w))
            self._seen.update(id(m) for m in mod.modules())
            layer = self._new_scope_layer(_join(prefix, site), op, w)
            if layer is not None:
                layers[site], attrs[ppath] = layer, site
        if not layers:
            return
        parent, _, leaf = node.target.rpartition(".")
        path = _join(parent, f"int8scope_{leaf}")
        gm.add_submodule(path, Int8Scope(layers, attr_layers=attrs))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(run_scoped, (gm.graph.get_attr(path), gm.graph.get_attr(node.target))
                                         + tuple(node.args), dict(node.kwargs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)

    def _scope_function(self, gm: fx.GraphModule, node: fx.Node, prefix: str) -> None:
        """A wrapped (untraced) function that receives conv/linear weights as arguments: run it in a scope."""
        found = {}
        for i, a in enumerate(node.args):
            if isinstance(a, fx.Node) and a.op == "get_attr":
                w = _attr(gm, a.target)
                if id(w) in self.census:
                    found[i] = (self.census[id(w)], w)
        if not found:
            return
        layers, args = {}, {}
        for i, ((site, op), w) in found.items():
            self.handled.add(id(w))
            layer = self._new_scope_layer(_join(prefix, site), op, w)
            if layer is not None:
                layers[site], args[i] = layer, site
        if not layers:
            return
        path = _join(_owner_path(node), f"int8scope_{node.name}")
        gm.add_submodule(path, Int8Scope(layers, fn=node.target, arg_layers=args))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, tuple(node.args), dict(node.kwargs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _is_opaque_function(target) -> bool:
    """A function the tracer did not enter and that is not a torch/python builtin (e.g. torch.fx.wrap-ped)."""
    mod = (getattr(target, "__module__", None) or "").split(".")[0]
    return callable(target) and mod not in ("torch", "_operator", "operator", "builtins", "math", "int8fx")


def _ancestors(node) -> list[fx.Node]:
    """`node` and every node it is computed from."""
    seen, todo = [], [node] if isinstance(node, fx.Node) else []
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.append(n)
            todo.extend(n.all_input_nodes)
    return seen


def _attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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


def census(model: nn.Module) -> dict[int, tuple[str, str]]:
    """id(weight) -> (module path, op) for every conv/linear module; taken before tracing, which may keep
    only the weights of modules the graph never calls."""
    return {id(m.weight): (n, _module_op(m)) for n, m in model.named_modules() if _module_op(m) is not None
            and isinstance(getattr(m, "weight", None), torch.Tensor)}


def rewrite(root: nn.Module, config: Int8Config, weight_census: dict | None = None) -> tuple[nn.Module, list[Site]]:
    """Rewrite every GraphModule in `root`'s tree, then swap conv/linear modules left in opaque parents."""
    rw = Rewriter(config, weight_census)
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
    reported = {s.name for s in rw.sites}
    for wid, (name, op) in rw.census.items():
        if wid not in rw.handled and name not in reported:
            rw.sites.append(Site(name, op, "module", False, "its weight is used by code int8fx cannot see into "
                                 "(not called as a module, nor by a function the graph shows)"))
    return root, rw.sites
