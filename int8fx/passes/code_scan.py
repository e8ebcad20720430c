"""`may_call_site_ops(module)`: whether a module's own code, which torch.fx could not trace, might call a
conv or linear function on weights of its own.

Why: such calls stay in FP32 unseen, so convert warns about untraceable modules with parameters of 2-5
dims. But most of those parameters are no conv/linear weights: a vision transformer's root cannot be
traced (its code branches on input sizes) and owns a class token [1, 1, D] and position embeddings
[1, N, D], and every ViT-like model got a warning its code gave no reason for. Reading the code settles it
in the common case without running anything: the bytecode of `forward`, of the methods and module-level
functions it names (followed a few calls deep) and of the functions nested in them. The answer errs on the
side of "may": any name that looks like a conv or linear (`F.conv2d`, `self._conv_forward`, `linear`, a
`self.conv` child), a string that does (`getattr(F, "conv2d")`), a callable that cannot be read (a C
function not named so, a callable object) or code deeper than the scan goes all count as "may".
"""
from __future__ import annotations

import functools
import inspect
import re
import types

import torch
import torch.nn as nn

SITE_NAME = re.compile(r"conv|linear", re.IGNORECASE)
# strings that name a resampling mode where the code resamples (F.interpolate or F.grid_sample with
# mode="bilinear": position embeddings resized to the input): they name no conv/linear function
INTERPOLATION_MODES = {"linear", "bilinear", "trilinear"}
RESAMPLING = {"interpolate", "upsample", "grid_sample"}
MAX_DEPTH = 6  # calls followed from forward; code beyond them counts as "may call"
MAX_FUNCTIONS = 300  # functions read in all; beyond them, "may call"


class _Budget(Exception):
    """The scan reached code it will not read: the answer is "may call"."""


def may_call_site_ops(module: nn.Module) -> bool:
    """Whether the code `type(module).forward` runs might call F.conv*d / F.linear (module docstring)."""
    scan = _Scan(module)
    try:
        return scan.reads_site(type(module).forward, MAX_DEPTH)
    except _Budget:
        return True


def function_may_call(fn, pattern: re.Pattern) -> bool:
    """Whether the code of a function torch.fx did not enter (a `torch.fx.wrap`-ped one), and of what it
    calls, names something matching `pattern` (e.g. `conv_transpose`), judged as for a module's forward."""
    scan = _Scan(None, pattern)
    try:
        return scan.reads_site(fn, MAX_DEPTH)
    except _Budget:
        return True


class _Scan:
    """One scan (of a module's code, or of a function's): the code objects read so far, the names of the
    module's own attributes, and the pattern of the names it looks for."""

    def __init__(self, module: nn.Module | None, pattern: re.Pattern = SITE_NAME) -> None:
        self.module, self.pattern, self.seen, self.own = module, pattern, set(), set()
        if module is not None:
            # children, parameters, buffers and plain values: `self.conv_proj(x)` names a child (converted as a
            # module site) and `self.use_conv` a flag, not a function
            plain = {k for k, v in module.__dict__.items() if isinstance(v, (bool, int, float, str, type(None)))}
            self.own = set(module._modules) | set(module._parameters) | set(module._buffers) | plain

    def names_site(self, code: types.CodeType) -> bool:
        """A name (attribute, global, free variable) or a string without spaces (`getattr(F, "conv%dd" % n)`;
        docstrings and messages have spaces) that matches the pattern and is no attribute of the module's own.
        In code that resamples (`interpolate`, `grid_sample`) and looks up no function by name (`getattr`),
        "linear", "bilinear", "trilinear" are resampling modes."""
        names = set(code.co_names)
        modes = INTERPOLATION_MODES if RESAMPLING & names and "getattr" not in names else set()
        strings = (k for k in code.co_consts
                   if isinstance(k, str) and not any(ch.isspace() for ch in k) and k not in modes)
        return any(self.pattern.search(n) and n not in self.own for n in (*code.co_names, *code.co_freevars, *strings))

    def reads_site(self, fn, depth: int) -> bool:
        try:
            fn = inspect.unwrap(fn)
        except ValueError:  # a cycle of __wrapped__
            return True
        code = getattr(fn, "__code__", None)
        if code is None:  # a C function, a partial, a callable object: judged by what it is called
            return self.opaque_callable_may_call(fn, depth)
        if code in self.seen:
            return False
        if depth < 0 or len(self.seen) >= MAX_FUNCTIONS:
            raise _Budget
        self.seen.add(code)
        scope = getattr(fn, "__globals__", {})
        for c in _nested_codes(code):
            if self.names_site(c):
                return True
            callees = (f for name in c.co_names for f in _callees(name, self.module, scope))
            if any(self.reads_site(f, depth - 1) for f in callees):
                return True
        cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if _filled(c)]
        return any(callable(v) and not isinstance(v, (type, nn.Module)) and self.reads_site(v, depth - 1)
                   for v in cells)

    def opaque_callable_may_call(self, fn, depth: int) -> bool:
        if isinstance(fn, functools.partial):
            return self.reads_site(fn.func, depth)
        call = getattr(type(fn), "__call__", None)
        builtin = isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType))
        if not builtin and isinstance(call, types.FunctionType):  # a Python callable object: its __call__
            return self.reads_site(call, depth)
        return bool(self.pattern.search(getattr(fn, "__name__", "") or type(fn).__name__))


def _callees(name: str, module: nn.Module | None, scope: dict):
    """What `name` in the module's code may call: a method of its class (any class of its MRO that is not
    torch's own), a plain callable stored on the instance (not a child module: those are converted), a
    module-level function of the code's own module. Modules, classes and tensors are not followed. (For a
    function's code, module is None: module-level functions only.)"""
    for klass in (type(module).__mro__ if module is not None else ()):
        if klass is object or klass.__module__.startswith("torch."):
            continue
        attr = klass.__dict__.get(name)
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        elif isinstance(attr, property):
            attr = attr.fget
        if isinstance(attr, types.FunctionType):
            yield attr
    value = module.__dict__.get(name) if module is not None else None
    if callable(value) and not isinstance(value, (type, nn.Module, torch.Tensor)):
        yield value
    value = scope.get(name)
    if callable(value) and not isinstance(value, (type, types.ModuleType, nn.Module, torch.Tensor)):
        yield value


def _nested_codes(code: types.CodeType):
    """`code` and the code objects of the functions, lambdas and comprehensions defined in it."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _nested_codes(const)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True
