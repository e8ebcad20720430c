"""A user's module and its INT8 twin: the same object, given a class derived from its own.

Conversion changes modules in place by swapping their class, e.g. `nn.Conv2d` -> `Int8Conv2d(ModuleSite,
nn.Conv2d)`. Why not replace the module by a new one: the object *is* the user's (hooks registered on
it, references to it held elsewhere, its attributes, `isinstance(m, nn.Conv2d)` and the class of every
module in the tree all stay), and the model's own forward code, which calls it, is untouched.
`torch.nn.utils.parametrize` changes classes the same way.

A twin class is made once per (original class, role) and has one of three roles:
  * `ModuleSite` (int8fx.nn.modules): a conv/linear module whose forward becomes the INT8 op;
  * `Rewritten`: a module whose own forward code calls `F.conv*d` / `F.linear`; torch.fx rewrote that
    code (the calls now go to `Int8Function` children) and the twin runs the rewritten graph, per
    training mode when the code depends on it;
  * `Routed`: a module whose code torch.fx cannot rewrite (library code, untraceable code); the twin runs
    the original forward with the calls on known weights routed to INT8 sites (`int8fx.nn.scope`).
Twins pickle and deep-copy as their original class plus int8fx's state (`__reduce_ex__`), so
`torch.save(model)`, `copy.deepcopy`, `AveragedModel` and EMA copies keep working; `revert` undoes a swap.
"""
from __future__ import annotations

import inspect
import itertools
import linecache
import types

import torch.fx as fx
import torch.nn as nn

from .scope import derived_key, no_fused_fastpath, routed

_TWINS: dict[tuple[type, type], type] = {}
_counter = itertools.count()


def twin_class(base: type, role: type) -> type:
    """The class `Int8<Base>(role, base)`, made once per pair."""
    cls = _TWINS.get((base, role))
    if cls is None:
        namespace = {"__module__": __name__, "__qualname__": f"Int8{base.__name__}",
                     "_int8fx_base": base, "_int8fx_role": role, "__reduce_ex__": _reduce_ex}
        if "forward" in role.__dict__:
            namespace["forward"] = _forward_with_the_signature_of(role.forward, base)
        cls = type(f"Int8{base.__name__}", (role, base), namespace)
        _TWINS[(base, role)] = cls
    return cls


def _forward_with_the_signature_of(forward, base: type):
    """The role's `forward(*args, **kwargs)`, copied for this twin class and showing the original forward's
    signature. What reads it: `inspect.signature(model.forward)` (users, tools), and torch.export, which
    names a root module's inputs by it; with `*args` torch 2.9's export writes input guards it cannot
    resolve (NameError: name 'L' is not defined) when exporting a converted model to ONNX."""
    own = types.FunctionType(forward.__code__, forward.__globals__, forward.__name__, forward.__defaults__,
                             forward.__closure__)
    own.__kwdefaults__ = forward.__kwdefaults__
    own.__qualname__, own.__doc__ = f"Int8{base.__name__}.forward", getattr(base.forward, "__doc__", None)
    try:
        own.__signature__ = inspect.signature(base.forward)
    except (TypeError, ValueError):  # a forward inspect cannot read (a C function): keep (*args, **kwargs)
        pass
    return own


def _reduce_ex(self, protocol):
    """Pickle/deep-copy as (original class, role) + state: the twin class itself is made at run time and
    cannot be found by name."""
    _, _, *rest = object.__reduce_ex__(self, max(2, protocol))
    return (_new_twin, (type(self)._int8fx_base, type(self)._int8fx_role), *rest)


def _new_twin(base: type, role: type):
    cls = twin_class(base, role)
    return cls.__new__(cls)


def is_twin(module: nn.Module) -> bool:
    return "_int8fx_base" in type(module).__dict__


def become(module: nn.Module, role: type) -> nn.Module:
    """Give `module` the class `twin_class(type(module), role)`, in place; returns it."""
    if is_twin(module):
        raise ValueError(f"{type(module).__name__} is already converted by int8fx")
    module.__class__ = twin_class(type(module), role)
    return module


def revert(module: nn.Module) -> nn.Module:
    """Undo `become`: remove what int8fx added and give back the original class."""
    if not is_twin(module):
        return module
    role = type(module)._int8fx_role
    role.remove_int8(module)
    module.__class__ = type(module)._int8fx_base
    return module


def refuse_torchscript(module: nn.Module):
    """`__prepare_scriptable__` of every converted module: torch.jit.script calls it on each module before
    compiling, so the refusal names the alternatives instead of TorchScript's type error on the tracing
    branch of a site's forward (the INT8 op itself is a Python autograd function TorchScript cannot hold)."""
    raise RuntimeError(f"int8fx: torch.jit.script cannot compile a converted model ({type(module).__name__} runs "
                       "int8fx's INT8 op in Python); use int8fx.export_onnx for ONNX, torch.export or torch.compile "
                       "for a compiled model")


class _AddsChildren:
    """Rewritten and Routed twins own the `Int8Function` children they call; `add_site` records them so
    `remove_int8` can take them away again."""

    __prepare_scriptable__ = refuse_torchscript

    def add_site(self, attr: str, site: nn.Module) -> None:
        self.add_module(attr, site)
        self.__dict__.setdefault("_int8fx_children", []).append(attr)

    def remove_int8(self) -> None:
        for attr in self.__dict__.pop("_int8fx_children", []):
            self._modules.pop(attr, None)
        for key in [k for k in self.__dict__ if k.startswith("_int8fx_")]:
            del self.__dict__[key]


def variant_key(mode: str, none: tuple[str, ...]) -> str:
    """The key of a rewritten forward's graph: its training mode ("train", "eval", or "any" when both trace
    to the same code) and the optional arguments it was traced with as None (in signature order)."""
    return f"{mode}[{','.join(none)}]" if none else mode


class Rewritten(_AddsChildren, nn.Module):
    """Runs the module's own forward as rewritten by `int8fx.passes.rewrite`.

    `_int8fx_graphs` holds one `torch.fx.Graph` ("any") or one per training mode ("train", "eval") when
    tracing in the two modes gave different code: the graph freezes `self.training` where the original
    code reads it, so a rewrite must never serve the other mode. Likewise it freezes `mask is not None`:
    with optional arguments (`_int8fx_optional`) there is a graph per set of them passed as None
    (`variant_key`), and each call runs the one of the arguments it got. The graphs are the state (they
    pickle); the Python functions compiled from them are a cache, filled when the graphs are set and when a
    copy is unpickled (`compile_forwards`), not at the first call: that call may be inside `torch.compile`,
    which cannot trace the code generation (`exec`) and would break the graph."""

    def current_graph(self) -> fx.Graph:
        """The graph this module runs in its current training mode with every optional argument given."""
        return self._int8fx_graphs[self._graph_key()]

    def _graph_key(self, args: tuple = (), kwargs: dict | None = None) -> str:
        mode = "any" if "any" in self._int8fx_graphs else ("train" if self.training else "eval")
        optional = self.__dict__.get("_int8fx_optional")
        if not optional or kwargs is None:
            return mode
        return variant_key(mode, tuple(name for name, pos in optional if (
            kwargs[name] if name in kwargs else args[pos] if pos is not None and pos < len(args) else None) is None))

    def forward(self, *args, **kwargs):
        self._check_traced_values()
        key = self._graph_key(args, kwargs)
        fn = self.__dict__.get("_int8fx_compiled", {}).get(key)
        if fn is None:
            fn = self.compile_forwards()[key]
        return fn(self, *args, **kwargs)

    def _check_traced_values(self) -> None:
        """The graphs hold the plain values the code read from `self` when it was traced (a temperature, a
        flag) as constants: one changed since would be ignored, so it is refused instead."""
        own = self.__dict__
        for name, value in own.get("_int8fx_traced_with", {}).items():
            now = own.get(name, value) if "." not in name else _child_value(self, name, value)
            if now is not value and now != value:
                raise RuntimeError(
                    f"int8fx: {type(self).__name__}.forward was converted with self.{name} = {value!r}, and it is "
                    f"now {now!r}: the converted forward (a torch.fx graph) still computes with {value!r}. Set it "
                    f"before int8fx.convert, or keep it in a tensor (a buffer), which is read at every call.")

    def compile_forwards(self) -> dict:
        """{mode key: forward function} for every graph, made from the graphs (the cache `forward` reads)."""
        compiled = self.__dict__.setdefault("_int8fx_compiled", {})
        for key, graph in self._int8fx_graphs.items():
            if key not in compiled:
                compiled[key] = compile_graph(graph, f"{type(self).__name__}.forward[{key}]")
        return compiled

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_int8fx_compiled", None)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if "_int8fx_graphs" in self.__dict__:
            self.compile_forwards()

    def rewritten_code(self) -> dict[str, str]:
        """The Python source of the rewritten forward, per mode."""
        return {k: g.python_code(root_module="self").src for k, g in self._int8fx_graphs.items()}

    def extra_repr(self) -> str:
        base = type(self)._int8fx_base.extra_repr(self)
        return f"{base + ', ' if base else ''}int8: rewritten forward ({'/'.join(self._int8fx_graphs)})"


class Routed(_AddsChildren, nn.Module):
    """Runs the module's original forward with `F.linear` / `F.conv*d` calls on known weights routed to INT8
    sites: `_int8fx_routes` maps a parameter path to the path of the site that computes with it. A conv
    subclass (`_int8fx_derived_op`: its op) may compute the weight it passes from its own (timm's
    `StdConv2dSame` standardises it): its calls with a weight of its weight's shape are routed too. While
    quantizing, fused eval fast paths that would skip the sites are off (`no_fused_fastpath`)."""

    def forward(self, *args, **kwargs):
        if any(isinstance(a, fx.Proxy) for a in args):
            return traced_call(self, args, kwargs)
        table = {}
        for p, s in self._int8fx_routes.items():
            weight, site = self.get_parameter(p), self.get_submodule(s)
            table[id(weight)] = site
            if self.__dict__.get("_int8fx_derived_op"):
                table[derived_key(self._int8fx_derived_op, weight.shape)] = site
        with routed(table), no_fused_fastpath(self._int8fx_quantize):
            return type(self)._int8fx_base.forward(self, *args, **kwargs)

    def extra_repr(self) -> str:
        base = type(self)._int8fx_base.extra_repr(self)
        routes = ", ".join(f"{p}->{s}" for p, s in self._int8fx_routes.items()) or "none"
        return f"{base + ', ' if base else ''}int8: routed calls ({routes})"


def _child_value(module: nn.Module, dotted: str, traced):
    """The current value of a plain attribute of a submodule ("head.temperature"); `traced` where the
    submodule or its attribute is gone (a conversion replaced it)."""
    path, name = dotted.rsplit(".", 1)
    child = module
    for part in path.split("."):
        child = child._modules.get(part) if isinstance(child, nn.Module) else None
        if child is None:
            return traced
    return child.__dict__.get(name, traced)


def traced_call(module: nn.Module, args: tuple, kwargs: dict | None = None):
    """A converted module met by `torch.fx.symbolic_trace` of the converted model (torchvision's
    create_feature_extractor, a user's own fx pass) is one `call_module` node, as torch's own conv modules
    are: a site's forward branches on values fx cannot trace (a routed module's too), and the GraphModule
    then calls the module itself, INT8 state and all."""
    tracer = next(a for a in args if isinstance(a, fx.Proxy)).tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), tuple(args), dict(kwargs or {}))


def compile_graph(graph: fx.Graph, label: str):
    """A Python function `forward(self, ...)` from an fx graph, as `GraphModule` makes its own; the source
    is registered with linecache so that tracebacks show the generated lines."""
    code = graph.python_code(root_module="self")
    filename = f"<int8fx {label} #{next(_counter)}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - code generated by torch.fx
    return namespace["forward"]
