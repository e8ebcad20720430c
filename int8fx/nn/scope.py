"""`Int8Scope`: INT8 for conv/linear calls hidden inside code torch.fx does not trace into.

Some models call their conv/linear weights from code the tracer keeps opaque: a leaf module such as
`nn.MultiheadAttention` (it calls `F.linear` on `in_proj_weight` and `out_proj.weight`), or a function
wrapped with `torch.fx.wrap` such as torchvision's `shifted_window_attention` (Swin), which receives the
`qkv`/`proj` weights as arguments. A scope runs that code under a `TorchFunctionMode` that reroutes every
`F.linear` / `F.conv*d` call whose weight is one of the known parameters to that parameter's Int8Layer;
every other call runs untouched. The weights are matched by identity at call time, so moving the model
between devices (which keeps Parameter objects) needs nothing.

Why patch `torch.nn.functional` rather than use a TorchFunctionMode: composite functions such as
`F.multi_head_attention_forward` dispatch to a mode once and then run their body with the mode popped,
so the `linear` calls inside them would escape. The patch is installed only while a scope runs
(reference-counted), and the table it consults is thread-local, so other threads and code outside
scopes see the original functions.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import Int8Layer

_ROUTED_NAMES = ("linear", "conv1d", "conv2d", "conv3d")
_ORIGINAL = {name: getattr(F, name) for name in _ROUTED_NAMES}
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_local = threading.local()
_lock = threading.Lock()
_active = 0


def _routed(name: str):
    original = _ORIGINAL[name]

    def call(*args, **kwargs):
        tables = getattr(_local, "tables", None)
        if tables:
            bound = dict(zip(_ARGS, args), **kwargs)
            weight_id = id(bound.get("weight"))
            for table in reversed(tables):
                if weight_id in table:
                    return table[weight_id].call_functional(**bound)
        return original(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = original.__doc__
    return call


_PATCHED = {name: _routed(name) for name in _ROUTED_NAMES}


@contextlib.contextmanager
def _reroute(table: dict[int, Int8Layer]):
    global _active
    with _lock:
        if _active == 0:
            for name, fn in _PATCHED.items():
                setattr(F, name, fn)
        _active += 1
    tables = _local.__dict__.setdefault("tables", [])
    tables.append(table)
    try:
        yield
    finally:
        tables.pop()
        with _lock:
            _active -= 1
            if _active == 0:
                for name, fn in _ORIGINAL.items():
                    setattr(F, name, fn)


def _key(path: str) -> str:
    return path.replace(".", "__")


class Int8Scope(nn.Module):
    """Holds the Int8Layers of one opaque call site.

    Function form (`fn` given): the scope replaces the call; `arg_layers` maps argument positions that
    carry weights to layer names. Module form: `run_scoped(scope, module, ...)` calls the module;
    `attr_layers` maps parameter paths inside the module to layer names.
    """

    def __init__(self, layers: dict[str, Int8Layer], fn=None, arg_layers: dict[int, str] | None = None,
                 attr_layers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({_key(k): v for k, v in layers.items()})
        self.fn = fn
        self.arg_layers = {i: _key(n) for i, n in (arg_layers or {}).items()}
        self.attr_layers = {p: _key(n) for p, n in (attr_layers or {}).items()}

    def forward(self, *args, **kwargs):
        table = {id(args[i]): self.layers[k] for i, k in self.arg_layers.items() if i < len(args)}
        with _reroute(table):
            return self.fn(*args, **kwargs)

    def run_module(self, module: nn.Module, *args, **kwargs):
        table = {id(module.get_parameter(p)): self.layers[k] for p, k in self.attr_layers.items()}
        with _reroute(table), no_mha_fastpath():
            return module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', None)}" if self.fn is not None else "module form"


@contextlib.contextmanager
def no_mha_fastpath():
    """nn.MultiheadAttention's eval-mode fast path (`torch._native_multi_head_attention`) skips F.linear,
    and with it the INT8 layers a scope routes those calls to; turn it off while a scope runs so that eval
    mode computes what training computes."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


def run_scoped(scope: Int8Scope, module: nn.Module, *args, **kwargs):
    """Graph-level entry of the module form (a plain function, so generated code can import it)."""
    return scope.run_module(module, *args, **kwargs)
