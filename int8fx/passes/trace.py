"""`trace_own_code(module)`: the graphs of one module's *own* forward code, every child module a leaf (a
`call_module` node). This is what conversion rewrites: conv/linear calls a module makes itself
(`F.conv2d(x, self.weight, ...)`, weight standardisation, `F.linear(x, self.qkv.weight, ...)`), each in
the smallest module that makes it.

A graph replays what the code did while it was traced, and the rewritten module runs the graph instead of
the code, so the tracing here is about faithfulness: torch.fx freezes `self.training` and `mask is not
None` into a graph, so the code is traced per training mode and per set of optional arguments passed as
None, and the twin picks the graph per call; the plain values read from `self` are recorded so that the
twin can refuse to run with changed ones; code no graph would reproduce (random draws, changes to
`self`, reads of `**kwargs`) is flagged, and what tracing did to the module is undone.
(Whole-model graphs for `inspect`'s picture are `int8fx.passes.analysis`.)
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import os
import random
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..nn.twins import variant_key


@dataclass
class OpaqueModule:
    """A module whose own code torch.fx could not trace, with the tracer's reason; `weights` are its own
    parameters of 2 to 5 dims, whose F.conv*d / F.linear calls (if its code makes any) int8fx cannot see;
    `may_call` whether its code might make such calls at all (int8fx.passes.code_scan)."""

    name: str
    type: str
    reason: str
    weights: tuple = ()
    may_call: bool = True


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


@dataclass
class OwnCode:
    """A module's own forward as torch.fx graphs by variant (see `trace_own_code`). `constants`: tensors the code made
    from constants (`torch.tensor(2.0)`), which the graphs read as attributes of the module; `traced_with`:
    the plain values (numbers, flags, strings) the code read from `self`, which the graphs hold as constants."""

    graphs: dict[str, fx.Graph]
    constants: dict[str, torch.Tensor]
    traced_with: dict[str, object]
    optional: tuple = ()  # (name, position) of the arguments whose None-ness picks the graph
    unfaithful: str = ""  # why running the graphs instead of the code would not be the same, if it would not


_PLAIN = (bool, int, float, str, type(None))


def trace_own_code(module: nn.Module) -> OwnCode | str:
    """The module's own code as graphs, one per variant (`variant_key`): per training mode ("any" when both
    give the same code) and per set of its optional arguments passed as None; or the reason (a str) it cannot
    be traced faithfully. Tracing runs the code; the training flags, the module's buffers, lists and dicts and
    the random generators are as they were afterwards.

    A graph replays what the code did while traced. `if mask is not None:` on a traced argument is always
    true, so the code is traced once more with each set of its optional arguments fixed to None, and each
    call runs the graph of the arguments it got. Where no graph would reproduce the code, `unfaithful` says
    why: code that draws random numbers independent of its input (`torch.rand(1) < p`: the graph would
    replay one draw forever), and code that changes `self` (a counter, a cache, a stored attention map, a
    list it appends to: the graph would not change it), and code that reads `**kwargs` (a graph cannot
    tell which keywords a call passes)."""
    params, optional = _arguments(type(module).forward)
    nones = [tuple(c) for r in range(len(optional) + 1) for c in itertools.combinations(optional, r)]
    failed = []  # why a graph with some optional arguments None is missing
    if len(optional) > MAX_OPTIONAL:
        nones = [()]
        failed.append(f"it has {len(optional)} optional arguments ({', '.join(optional)}); int8fx traces one graph "
                      f"per set of them given as None, for at most {MAX_OPTIONAL}")
    graphs, constants, traced_with, assigned = {}, {}, {}, set()
    with _Undone(module) as undone:
        try:
            for mode in ("train", "eval"):
                undone.set_training(mode == "train")
                for none in nones:
                    key = variant_key(mode, none)
                    try:
                        graphs[key], constants[key], changed = _trace(module, mode == "train", none, params,
                                                                      traced_with)
                    except Exception as e:
                        if not none:
                            raise
                        # (`mask is not None or flag` reads a traced flag only when mask is None)
                        failed.append(f"it cannot be traced with {', '.join(none)} None ({failure_reason(e)})")
                        continue
                    assigned |= changed
        except Exception as e:  # torch.fx raises many types (TraceError, TypeError, AssertionError, ...)
            return failure_reason(e)
    unfaithful = _unfaithful(undone.drew, assigned | undone.changed, _kwargs_read(params, graphs), failed)
    for graph in graphs.values():
        _plain_meta(graph)
    traced = [n for n in nones if variant_key("train", n) in graphs and variant_key("eval", n) in graphs]
    if all(_same(graphs, constants, variant_key("train", n), variant_key("eval", n)) for n in traced):
        graphs = {variant_key("any", n): graphs[variant_key("train", n)] for n in traced}
        constants = {variant_key("any", n): constants[variant_key("train", n)] for n in traced}
    traced_with.pop("training", None)
    return OwnCode(graphs, _renamed_constants(graphs, constants), traced_with, _optional_positions(params, optional),
                   unfaithful)


MAX_OPTIONAL = 4  # optional arguments of one forward: 2**4 graphs per mode at most


def _trace(module: nn.Module, training: bool, none: tuple[str, ...], params: list, reads: dict):
    """(graph, the tensor constants it reads, the attributes the code assigned to `self`) of the module's
    code in one training mode with the optional arguments `none` fixed to None."""
    # on a shallow copy, one per graph: what the code assigns to `self` stays there, and a proxy of one graph
    # (a cache filled at the first call) does not reach another
    shadow = object.__new__(_reading_class(type(module), reads))
    shadow.__dict__.update(module.__dict__)
    shadow.training = training
    # quiet: what the code warns about while traced is about the proxies it gets (diffusers warned "Passing
    # `scale` to `cross_attention_kwargs` is deprecated" at convert, where `kwargs.get("scale") is not None`
    # read a proxy); a warning that concerns the user's real call is raised when the model runs
    with _reading_children(module, reads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = OwnCodeTracer().trace(shadow, concrete_args=dict.fromkeys(none) or None)
    _keep_argument_names(graph, params)
    made = _constants(graph, shadow, module)
    assigned = {k for k, v in shadow.__dict__.items() if k not in made and k != "training"
                and (k not in module.__dict__ or module.__dict__[k] is not v)}
    return graph, made, assigned


def _arguments(forward) -> tuple[list[inspect.Parameter], tuple[str, ...]]:
    """The forward's parameters after `self`, and the names of those that may be None (a None default or an
    `Optional` annotation)."""
    params = list(inspect.signature(forward).parameters.values())[1:]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    optional = tuple(p.name for p in params if p.kind in named and (
        p.default is None or (p.default is inspect.Parameter.empty and _may_be_none(p.annotation))))
    return params, optional


def _may_be_none(annotation) -> bool:
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return annotation is not inspect.Parameter.empty and ("Optional" in text or "None" in text)


def _optional_positions(params: list[inspect.Parameter], optional: tuple[str, ...]) -> tuple:
    """(name, position among the positional arguments or None) of each optional argument."""
    positional = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                       inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return tuple((name, positional.index(name) if name in positional else None) for name in optional)


def _keep_argument_names(graph: fx.Graph, params: list[inspect.Parameter]) -> None:
    """torch.fx renames an argument it specialises to None (`mask` becomes `mask_1`): the forward must still
    take it by its own name."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]  # in the signature's order
    for node, p in zip(placeholders, params):
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            node.target = p.name


def _same(graphs: dict, constants: dict, a: str, b: str) -> bool:
    return same_code(graphs[a], graphs[b]) and constants[a].keys() == constants[b].keys() and all(
        torch.equal(v, constants[b][k]) for k, v in constants[a].items())


def _unfaithful(drew: bool, changed: set[str], kwargs_read: str, failed: list[str]) -> str:
    """Why running the traced graphs would not be running the module's code ("" when it would)."""
    if drew:
        return ("its forward draws random numbers that do not depend on its input (e.g. torch.rand(1) < p): a "
                "traced graph would replay one draw forever")
    if changed:
        return f"its forward changes self ({', '.join(sorted(changed))}): a traced graph would not"
    if kwargs_read:
        return (f"its forward reads **{kwargs_read}: a traced graph holds whichever keywords it was traced with "
                f"(`{kwargs_read}.get('mask') is not None` is always true)")
    return f"{failed[0]}: a call with them None has no graph" if failed else ""


def _kwargs_read(params: list[inspect.Parameter], graphs: dict[str, fx.Graph]) -> str:
    """The name of the forward's `**kwargs` when its code reads them."""
    names = [p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    read = names and any(n.op == "placeholder" and n.target == f"**{names[0]}" and n.users
                         for g in graphs.values() for n in g.nodes)
    return names[0] if read else ""


class _Undone:
    """Tracing runs the module's code: on leaving, whatever it did to the module is undone (training flags of
    the module tree, its buffers' values, its lists, dicts and sets changed in place: the shallow copies
    share them) and the random generators are put back. `drew` and `changed` say what there was to undo."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.flags = [(m, m.training) for m in module.modules()]
        self.buffers = {k: v.clone() for k, v in module._buffers.items() if isinstance(v, torch.Tensor)}
        self.containers = {k: copy.copy(v) for k, v in module.__dict__.items() if type(v) in (list, dict, set)}
        self.generators = _RandomState()
        self.drew, self.changed = False, set()

    def set_training(self, mode: bool) -> None:
        for m, _ in self.flags:
            m.training = mode

    def __enter__(self) -> _Undone:
        return self

    def __exit__(self, *exc) -> None:
        for m, t in self.flags:
            m.training = t
        with torch.no_grad():
            for k, v in self.buffers.items():
                if not torch.equal(self.module._buffers[k], v):
                    self.module._buffers[k].copy_(v)
        self.drew = self.generators.restore()
        self.changed = _restore_containers(self.module, self.containers) | _purge_proxies(self.module)


def _reading_class(cls: type, reads: dict, prefix: str = "") -> type:
    """`cls`, with every plain value the code reads from the instance's own attributes recorded in `reads`
    (what a graph freezes) as `prefix + name`. `cls` itself when a subclass could have side effects
    (`__init_subclass__`, a metaclass): then nothing is recorded. With a prefix (a child module of the traced
    one) only reads made by code outside torch count: torch.fx and nn.Module read flags of the modules they
    call (hook flags, `training`), which the graph does not freeze."""
    if type(cls) is not type or any("__init_subclass__" in c.__dict__ for c in cls.__mro__[:-1]):
        return cls

    def __getattribute__(self, name):
        value = cls.__getattribute__(self, name)
        if isinstance(value, _PLAIN) and name in object.__getattribute__(self, "__dict__") and (
                not prefix or (name != "training" and not _called_from_torch())):
            reads.setdefault(prefix + name, value)
        return value

    return type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _called_from_torch() -> bool:
    return sys._getframe(2).f_code.co_filename.startswith(_TORCH_DIR)


@contextlib.contextmanager
def _reading_children(module: nn.Module, reads: dict):
    """While tracing `module`'s code: its submodules record the plain values that code reads from them
    (`self.head.temperature`), as "head.temperature", since the graph freezes those too. Each submodule gets
    a recording subclass of its own class for the duration, and its class back afterwards."""
    swapped = []
    try:
        for path, child in module.named_modules(remove_duplicate=True):
            cls = type(child)
            if not path or cls.__getattribute__ is not nn.Module.__getattribute__:
                continue  # the traced module itself, or a class with its own attribute access: left alone
            reading = _reading_class(cls, reads, path + ".")
            if reading is not cls:
                try:
                    object.__setattr__(child, "__class__", reading)
                except TypeError:  # (an object layout Python will not swap: its reads go unrecorded)
                    continue
                swapped.append((child, cls))
        yield
    finally:
        for child, cls in swapped:
            object.__setattr__(child, "__class__", cls)


def _constants(graph: fx.Graph, shadow: nn.Module, module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors torch.fx stored on the traced copy (`_tensor_constant0`: a tensor the code made from
    constants) and that the graph reads, by name."""
    return {n.target: shadow.__dict__[n.target] for n in graph.nodes
            if n.op == "get_attr" and n.target not in module.__dict__ and not hasattr(module, n.target)
            and isinstance(shadow.__dict__.get(n.target), torch.Tensor)}


def _renamed_constants(graphs: dict[str, fx.Graph], constants: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Each graph's constants under a name of int8fx's, one per graph and constant (each trace numbers its
    own from 0)."""
    out = {}
    for key, graph in graphs.items():
        for node in graph.nodes:
            if node.op == "get_attr" and node.target in constants[key]:
                name = f"_int8fx_constant{len(out)}"
                out[name] = constants[key][node.target]
                node.target = name
    return out


def _restore_containers(module: nn.Module, before: dict) -> set[str]:
    """The lists, dicts and sets of the module that the traced code changed in place (`self.feats.append(y)`:
    the shallow copy shares them), put back as they were; their names."""
    changed = set()
    for name, old in before.items():
        now = module.__dict__.get(name)
        if type(now) is not type(old):
            continue
        same = (len(now) == len(old) and all(a is b for a, b in zip(now, old))) if isinstance(old, list) else (
            now.keys() == old.keys() and all(now[k] is old[k] for k in old)) if isinstance(old, dict) else now == old
        if not same:
            changed.add(name)
            now.clear()
            if isinstance(old, list):
                now.extend(old)
            else:
                now.update(old)
    return changed


def _purge_proxies(module: nn.Module) -> set[str]:
    """The module's plain attributes (objects and containers, however nested; not submodules, parameters or
    buffers) where the traced code left torch.fx proxies, which are taken out again; their names. Code that
    stores a value outside `self`'s own lists and dicts (timm's FeatureHookNet keeps its outputs in a helper
    object, keyed by `x.device`) changes what `_Undone` does not copy, and a proxy left in a model stops
    copy.deepcopy, pickle and torch.save."""
    skip = {"_modules", "_parameters", "_buffers"}
    return {name for name, value in module.__dict__.items()
            if name not in skip and _take_out_proxies(value, set(), depth=0)}


def _take_out_proxies(value, seen: set[int], depth: int) -> bool:
    """Remove proxies from `value`'s dicts (entries whose key or value is one), lists and sets, and from the
    plain objects it holds; whether there were any (a tuple's are found, not removed)."""
    if isinstance(value, fx.Proxy):
        return True
    if depth > 6 or id(value) in seen or isinstance(value, (nn.Module, torch.Tensor, type, str, bytes, int, float)):
        return False
    seen.add(id(value))
    found = False
    if isinstance(value, dict):
        for k in list(value):
            if isinstance(k, fx.Proxy) or isinstance(value[k], fx.Proxy):
                del value[k]
                found = True
            else:
                found |= _take_out_proxies(value[k], seen, depth + 1)
    elif isinstance(value, (list, set)):
        kept = [v for v in value if not isinstance(v, fx.Proxy)]
        found = len(kept) < len(value)
        if found:  # (rebuilt, not `remove`d: that compares with ==, which a proxy records as a node)
            value.clear()
            if isinstance(value, set):
                value.update(kept)
            else:
                value.extend(kept)
        found |= any([_take_out_proxies(v, seen, depth + 1) for v in kept])
    elif isinstance(value, tuple):
        found = any([_take_out_proxies(v, seen, depth + 1) for v in value])
    elif not callable(value) and (getattr(type(value), "__module__", None) or "torch").split(".")[0] != "torch":
        try:
            held = list(vars(value).values())
        except Exception:  # (no __dict__, or one that will not be read)
            return found
        found = any([_take_out_proxies(v, seen, depth + 1) for v in held])
    return found


class _RandomState:
    """The state of torch's CPU generator and Python's and NumPy's global ones; `restore()` puts it back and
    says whether anything drew from them in between."""

    def __init__(self) -> None:
        self.torch, self.python = torch.random.get_rng_state(), random.getstate()
        try:
            import numpy
            self.numpy = numpy.random.get_state()
        except ImportError:
            self.numpy = None

    def restore(self) -> bool:
        drew = not torch.equal(torch.random.get_rng_state(), self.torch) or random.getstate() != self.python
        torch.random.set_rng_state(self.torch)
        random.setstate(self.python)
        if self.numpy is not None:
            import numpy
            now = numpy.random.get_state()
            drew |= not (now[2:] == self.numpy[2:] and (now[1] == self.numpy[1]).all())
            numpy.random.set_state(self.numpy)
        return drew


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
