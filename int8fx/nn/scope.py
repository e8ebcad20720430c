"""Run-time routing: INT8 for conv/linear calls inside code torch.fx cannot trace.

Some code that calls `F.linear` / `F.conv*d` on known weights cannot be rewritten as a graph: library
code such as `nn.MultiheadAttention` (it calls `F.linear` on `in_proj_weight` and `out_proj.weight`),
a `torch.fx.wrap`-ped function such as torchvision's `shifted_window_attention` (Swin), or a conv subclass
whose forward torch.fx cannot trace (timm's `Conv2dSame` computes its padding with `math.ceil` on the
input's size). `routed(table)` runs such code with those calls rerouted, by weight identity, to INT8 sites
(`Int8Layer.int8_functional`); every other call runs untouched. Weights are matched at call time, so
moving a model between devices (which keeps Parameter objects) needs nothing.

Why patch `torch.nn.functional` rather than use a TorchFunctionMode: composite functions such as
`F.multi_head_attention_forward` dispatch to a mode once and then run their body with the mode popped,
so the `linear` calls inside them would escape. The patch is installed only while routed code runs
(reference-counted), and the table it consults is thread-local, so other threads and code outside
see the original functions. Sites call `ORIGINAL` themselves, so a routed call is never routed twice.
"""
from __future__ import annotations

import contextlib
import threading
import warnings

import torch
import torch.nn.functional as F

ROUTED_NAMES = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
ORIGINAL = {name: getattr(F, name) for name in ROUTED_NAMES}
# the positional parameters of torch's functions, for binding a call's arguments by name (rewrite does too)
CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
TRANSPOSED_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_local = threading.local()
_lock = threading.Lock()
_active = 0


def _router(name: str):
    original = ORIGINAL[name]

    names = TRANSPOSED_ARGS if name.startswith("conv_transpose") else CONV_ARGS

    def call(*args, **kwargs):
        tables = getattr(_local, "tables", None)
        if tables:
            bound = dict(zip(names, args), **kwargs)
            weight = bound.get("weight")
            for table in reversed(tables):
                site = table.get(id(weight))
                if site is not None and site.site_op != name:  # a tied weight in another kind of call: its own site
                    site = table.get((id(weight), name)) or _unrouted(site, name)
                if site is None and isinstance(weight, torch.Tensor):
                    site = table.get(derived_key(name, weight.shape))
                if site is not None:  # what the site computes with is never routed again (an export's stand-ins
                    _local.tables = []  # call F.conv*d on a weight of the same shape)
                    try:
                        return site.int8_functional(**bound)
                    finally:
                        _local.tables = tables
        return original(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = original.__doc__
    return call


_PATCHED = {name: _router(name) for name in ROUTED_NAMES}
_WARNED: set = set()


def _unrouted(site, name: str) -> None:
    """A routed weight used in another kind of call than its site's, for which convert made no site (the
    function's code did not name that op): it runs in FP32, which is said once per site and op."""
    if (site.site_name, name) not in _WARNED:
        _WARNED.add((site.site_name, name))
        warnings.warn(f"int8fx: an F.{name} call on the weight of {site.site_name} (a {site.site_op} site) inside "
                      "a function torch.fx does not trace runs in FP32; call it in the module's own code, or name "
                      f"F.{name} in that function, to make it an INT8 site")
    return None


def derived_key(op: str, shape) -> tuple:
    """The table key under which a site takes `op` calls whose weight is not the parameter itself but has
    its shape (a weight the routed code computed from it). Sizes as ints: under torch.jit.trace (the
    TorchScript exporter) `weight.shape` holds 0-d tensors, which hash by identity and matched no key."""
    return ("derived", op, tuple(int(s) for s in shape))


@contextlib.contextmanager
def routed(table: dict):
    """Within the block, on this thread, `F.linear/conv*d(x, w, ...)` with `id(w)` in `table` calls
    `table[id(w)].int8_functional(x, w, ...)` instead (or the site under `derived_key(name, w.shape)`)."""
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
                for name, fn in ORIGINAL.items():
                    setattr(F, name, fn)


def call_routed(fn, routes: dict, *args, **kwargs):
    """Call an opaque function with the weights among its arguments routed to their sites. `routes` maps an
    argument position (int) or keyword (str) to the site of the weight passed there, and (argument, op) to
    the site for that weight's calls of another op; the rewrite pass puts this call in a graph in place of
    `fn(*args, **kwargs)`."""
    table = {}
    for key, site in routes.items():
        arg, op = key if isinstance(key, tuple) else (key, None)  # (argument, op): the site for that other op
        value = kwargs.get(arg) if isinstance(arg, str) else (args[arg] if arg < len(args) else None)
        if value is not None:
            table[id(value) if op is None else (id(value), op)] = site
    with routed(table):
        return fn(*args, **kwargs)


@contextlib.contextmanager
def no_fused_fastpath(enabled: bool = True):
    """nn.MultiheadAttention's and nn.TransformerEncoderLayer's eval-mode fast paths
    (`torch._native_multi_head_attention`, `torch._transformer_encoder_layer_fwd`) skip F.linear and the
    Linear modules, and with them the INT8 sites; turn them off while INT8 code runs so that eval mode
    computes what training computes."""
    mha = getattr(torch.backends, "mha", None)
    if not enabled or mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)

