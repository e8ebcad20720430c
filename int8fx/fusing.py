"""Fused passes: small tensor functions compiled into single loops where the machine can, eager elsewhere.

Why: on a CPU, a chain of elementwise torch ops costs a pass over memory and a fresh temporary per op
(and large temporaries cost page faults), while the same chain compiled by `torch.compile` (inductor's CPU
code generation needs only the system C compiler) is one loop. The quantizers, the dequantizing epilogues,
the gradient statistics of the policies and the depthwise convolutions are written as plain tensor
functions and wrapped with `fused`: compiled on first use for dynamic shapes (one compilation serves every
layer), and for the exact shapes of big tensors once those shapes repeat (`STATIC`, `STATIC_AFTER`: the
loops are faster without symbolic bounds); eager where compiling is not possible (no compiler,
`INT8FX_COMPILE=0`), for tensors too small to be worth a compiled call (`SMALL`, or a function's own
threshold), inside code that is itself being traced or transformed, and under a dispatch or function mode
(which a compiled function would bypass). A function
whose compilation fails falls back to eager alone, with one warning. Elementwise functions give the same
bits either way; reductions that sum floats may round differently (their docstrings say so).

How a pass is compiled: for CPU tensors, where torch has inductor's standalone compile, it is traced and
compiled once per signature and called without dynamo (`int8fx.precompiled`: a call costs ~20 us less, so
smaller tensors are worth it: SMALL_TRACED, EXACT_TRACED); elsewhere through `torch.compile`, with the
options that make GPU code compute eager torch's bits (`EAGER_NUMERICS`; before torch 2.10, which has none,
passes on GPU tensors run eagerly).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import numbers
import os
import types
import warnings

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import precompiled

COMPILE = os.environ.get("INT8FX_COMPILE", "1") != "0"
SMALL = 1 << 14  # below this many elements in the largest tensor argument, eager ops are cheaper than a call
SMALL_TRACED = 1 << 12  # the same for a call without dynamo (int8fx.precompiled: CPU tensors, torch >= 2.8).
# Compiled wins at any size there (one thread: the forward's operands 23 us against 39 eager at 32 elements,
# gvq-mcs's gradient operands 66 us against 353 at 4 x 8), but below this a call saves at most ~0.3 ms, which
# takes thousands of calls to pay back a signature's compile (1-2 s): tiny tensors of short runs (tests, a
# one-off forward) stay eager. A squeeze-excite conv's [16, C, 1, 1] from C = 256 compiles.
STATIC = 1 << 18  # from this many elements in the largest tensor argument, a pass is compiled for its exact shapes
EXACT_TRACED = 1 << 15  # from this many, a `dynamic=False` pass compiles its exact shapes on the traced path
STATIC_SHAPES = 32  # exact-shape variants a function gets; then shapes are dynamic (a detector's many input sizes)
STATIC_AFTER = 3  # calls with the same shapes before their exact-shape variant is compiled (training repeats them)
RESTARTS = 3  # fresh compiled copies a signature gets after hitting torch.compile's recompile limit
# Integer sums along a dim in int32 (vectorised, 1.4-1.8x faster than int64 on the depthwise dW) where inductor
# compiles them: 2.10, 2.11 and 2.14 do; 2.5 and 2.8 emit `convert<int32_t,1,int64_t,2>` for such a reduction,
# a C++ error that sent gvq-mcs's gradient operands and the depthwise dW eager. Before 2.10 (2.9 unchecked)
# those sums are int64: exact either way.
SUM_DTYPE = torch.int32 if torch.torch_version.TorchVersion(torch.__version__) >= (2, 10) else torch.int64


def _eager_numerics_options() -> dict | None:
    """torch.compile options under which inductor's GPU (Triton) code computes the bits eager torch computes,
    or None where this torch has no such options (before 2.10). The first two differences were measured on an
    H200 with torch 2.11 (tests/test_fused.py, the compiled passes on CUDA against their eager form):
    - division: Triton lowers an fp32 `x / y` to PTX `div.full.f32`, up to 2 ulp off, unless told to round
      (`eager_numerics.division_rounding`, torch 2.11; `emulate_divison_rounding` in 2.10). A quantizer's
      round(x / s) then differs wherever x / s lies within 2 ulp of a half step, and the scale clip / 127
      in its last bit;
    - fused multiply-add: Triton and ptxas contract `a * b + c` into one rounding unless fp fusion is off
      (`emulate_precision_casts`, which also keeps explicit bf16 casts; it turns fp fusion off since 2.10).
      The forward's epilogue `acc * (s_x * s_w) + bias` differed in the last bit (and gvq-mcs's
      E[g^2] - mean^2 has the same form);
    - and, where this torch offers it, libdevice's functions not flushing denormals to zero (as eager's do
      not): a per-channel variance below 1.2e-38 keeps its square root (not run on a GPU yet).
    CPU code is not affected: inductor's C++ divides exactly and is built without contraction."""
    import torch._inductor.config as config

    numerics = getattr(config, "eager_numerics", None)
    if numerics is not None and hasattr(numerics, "division_rounding"):
        division = "eager_numerics.division_rounding"
    elif hasattr(config, "emulate_divison_rounding"):
        division = "emulate_divison_rounding"
    else:
        return None
    options = {division: True, "emulate_precision_casts": True}
    if numerics is not None and hasattr(numerics, "disable_ftz"):  # (where this torch has it: 2.14)
        options["eager_numerics.disable_ftz"] = True
    return options


try:
    EAGER_NUMERICS = _eager_numerics_options()  # None: GPU tensors' passes run eagerly (same bits, slower)
except Exception:  # a torch built without inductor: nothing compiles anyway
    EAGER_NUMERICS = None
_FAILED: dict[str, str] = {}  # function name -> why it runs eagerly
_UNTRACED: dict[str, str] = {}  # function name -> why it is compiled through torch.compile, not traced (CPU)
_NEW = object()  # a signature not compiled yet


def compile_status() -> tuple[bool, dict[str, str]]:
    """(whether fused passes are compiled at all, {function: reason} for those that fell back to eager)."""
    return COMPILE, dict(_FAILED)


@contextlib.contextmanager
def eager_passes(enabled: bool = True):
    """Run every fused pass eagerly inside the block when `enabled` (benchmarks time both forms); the
    setting before it comes back after it, also on an exception."""
    global COMPILE
    previous = COMPILE
    COMPILE = previous and not enabled
    try:
        yield
    finally:
        COMPILE = previous


def fused(fn=None, *, dynamic: bool = True, min_elements: int | None = None):
    """`fn` compiled on first use; eager where that cannot or should not be (module docstring).

    One compiled copy per argument signature (`_signature`): torch.compile keeps one cache per code object
    and gives up after a few recompilations, and a function called with int32 and fp64 accumulators, 2-d
    and 5-d tensors, several policy constants, would hit that limit; a copy of the code object per
    signature keeps every variant compiled (sizes are dynamic within a signature). A signature that still
    hits the limit (new shape relations in a long process) gets up to RESTARTS fresh copies, then runs
    eagerly.

    Big tensors (from STATIC elements) get a variant compiled for their exact shapes at a shape's
    STATIC_AFTER-th call, at most STATIC_SHAPES of them; until then, and past that, the dynamic variant.

    `dynamic=False` compiles exact-shape variants only and runs eagerly otherwise. It is for gathers whose
    compiled loops are only fast for known shapes (measured: an im2col compiled for dynamic shapes ran 4-20x
    slower than ATen's copy, for exact shapes 1.2-4x faster), and for passes of two or three ops, whose eager
    form beats a dynamo call's fixed cost up to ~100k elements, a call without dynamo's up to ~32k
    (measured, one thread).
    `min_elements` overrides the threshold below which a call runs eagerly (default SMALL, or STATIC with
    `dynamic=False`): a function of dozens of ops (a policy's statistics) is worth a dynamo call for far
    smaller tensors. Where the call goes without dynamo (`int8fx.precompiled`) a dynamic pass compiles from
    SMALL_TRACED elements whatever its threshold, an exact-shape-only one from EXACT_TRACED by default."""
    if fn is None:
        return functools.partial(fused, dynamic=dynamic, min_elements=min_elements)
    compiled: dict = {}
    restarts: dict = {}  # signature -> fresh copies it got after hitting the recompile limit
    seen: dict = {}  # exact-shape key -> calls so far, until its variant is compiled (STATIC_AFTER)
    own_code_free = True  # fn's own code object (and its dynamo cache) is still unused by any variant
    name = _name(fn)

    def compiles(largest: Tensor | None) -> bool:
        """Whether a call whose largest tensor argument is `largest` takes the compiled path (its size and
        device alone): a call without dynamo (CPU) is worth it for smaller tensors than a dynamo call."""
        if largest is None or (largest.device.type != "cpu" and EAGER_NUMERICS is None):
            return False
        traced = precompiled.AVAILABLE and largest.device.type == "cpu"
        if dynamic:
            floor = SMALL if min_elements is None else min_elements
            return largest.numel() >= (min(floor, SMALL_TRACED) if traced else floor)
        return largest.numel() >= (min_elements if min_elements is not None else EXACT_TRACED if traced else STATIC)

    @functools.wraps(fn)
    def call(*args):
        nonlocal own_code_free
        # (is_compiling first: inside another fused pass being traced, reading a size would add a guard on it)
        if torch.compiler.is_compiling() or not COMPILE:
            return fn(*args)
        largest = _largest(args)
        if not compiles(largest) or name in _FAILED or not seen_by_everything(args):
            return fn(*args)
        # a Parameter's sizes are static to torch.compile (force_parameter_static_shapes): a bias would make
        # every channel count a recompile. The passes run inside int8fx's ops, where no autograd is recorded.
        # A view is passed as a plain alias of its storage: dynamo guards on a view's base (its sizes, which of
        # them are 1, their relations to the strides), which `_signature` does not see, and a long process
        # (several models, a detector's sizes) then recompiled one variant up to torch's limit.
        args = tuple(map(_plain, args))
        static = not dynamic or largest.numel() >= STATIC
        key = _exact_key(args) if static else _signature(args)
        variant = compiled.get(key, _NEW)
        if variant is _NEW and static:
            # an exact-shape variant is a compile per shape: only for shapes that repeat (a training loop's, not a
            # one-off forward's or a detector's every new input size), and at most STATIC_SHAPES of them
            if len(seen) > 4096:  # (a detector's stream of sizes: forget the counts, keep memory bounded)
                seen.clear()
            seen[key] = seen.get(key, 0) + 1
            if seen[key] < STATIC_AFTER or len(compiled) >= STATIC_SHAPES:
                if not dynamic:
                    return fn(*args)
                static, key = False, _signature(args)
                variant = compiled.get(key, _NEW)
        if variant is None:  # this signature hit torch.compile's recompile limit: eager from now on
            return fn(*args)
        first_call = variant is _NEW
        if first_call:
            if precompiled.AVAILABLE and name not in _UNTRACED and _on_cpu(args):  # called without dynamo
                variant = compiled[key] = precompiled.Traced(fn, static, _compile_settings)
            else:
                own = own_code_free and not isinstance(fn, functools.partial)  # (a partial has no code of its own)
                variant = compiled[key] = torch.compile(fn if own else _fresh_copy(fn), dynamic=not static,
                                                        fullgraph=True, options=EAGER_NUMERICS)
                own_code_free = False
        try:
            # the hot path is a bare call: each context manager here cost microseconds, on hundreds of calls a
            # step (what a call must set is set on the first one, or on a retry below)
            if first_call or _FLUSHES_DENORMALS:
                return _keeping_denormals(variant, args, first_call)
            if torch.autograd._profiler_enabled():
                with torch.profiler.record_function(f"int8fx.{name}"):
                    return variant(*args)
            return variant(*args)
        except Exception as e:  # no C compiler, an inductor limitation, ...: the eager form computes the same
            if isinstance(variant, precompiled.Traced) and not isinstance(e, precompiled.OutOfVariants):
                # tracing without dynamo failed (an op make_fx cannot trace, another torch's API): this function
                # goes through torch.compile from now on, which fails in its turn where nothing can compile it
                _UNTRACED[name] = f"{type(e).__name__}: {str(e).strip()[:160]}"
                logging.getLogger(__name__).info("int8fx: %s compiled through torch.compile: %s", name, _UNTRACED[name])
                del compiled[key]
                return call(*args)
            # the recompile limit: FailOnRecompileLimitHit (torch 2.11, 2.14), CacheLimitExceeded (torch 2.5)
            recompile = any(k in type(e).__name__ for k in ("Recompile", "CacheLimit"))
            if recompile and torch._dynamo.config.error_on_recompile:
                # the user's setting means their model, not int8fx's passes (which compile a new variant when a
                # new shape relation shows up): this call's recompilation happens without it
                with _compile_settings():
                    return variant(*args)
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
            if recompile:
                # a long process meets new shape relations (detection inputs of many sizes, a test suite):
                # a fresh copy of the code starts an empty cache, a few times, and then this call's signature
                # stays eager. This call runs eagerly either way.
                restarts[key] = restarts.get(key, 0) + 1
                if restarts[key] <= RESTARTS:
                    del compiled[key]  # the next call compiles a fresh copy
                    return fn(*args)
            if recompile or isinstance(e, precompiled.OutOfVariants):
                compiled[key] = None
                _FAILED.setdefault(f"{name} (one signature)", why)
            else:
                _FAILED[name] = why
            warnings.warn(f"int8fx: {name} runs eagerly (slower): {why}")
            return fn(*args)

    call.eager = fn
    call.compiles = lambda *args: compiles(_largest(args))
    call.variants = compiled  # signature key -> compiled function (None: eager), for tests and tools
    return call


_FLUSHES_DENORMALS = False  # a compiled pass turned flush-to-zero on as it loaded (seen in this process)


def _keeping_denormals(variant, args, first_call: bool):
    """`variant(*args)`, and the thread's denormal mode as it was before it. Why: inductor on torch 2.5
    builds its CPU kernels with -ffast-math, and g++ then links crtfastmath.o into them, whose loading turns
    flush-to-zero and denormals-are-zero on for the loading thread: from the first compiled pass on, every
    float op of the process (the user's FP32 model too) would flush values below 1.2e-38 to zero, and an
    INT8 site's tiny weight gradients became exact zeros (measured: torch 2.5.1; 2.11 and 2.14 build
    without it). A call that compiles (the first of a signature) is checked; once a load has done it, every
    compiled call is (a recompilation loads a new kernel), on such a torch only, and a call that flipped the
    mode runs again without it. A mode the user chose (`torch.set_flush_denormal(True)`) is left as it is."""
    global _FLUSHES_DENORMALS
    keeps = _keeps_denormals()
    with _compile_settings() if first_call else contextlib.nullcontext():
        out = variant(*args)
    if keeps and not _keeps_denormals():
        _FLUSHES_DENORMALS = True
        torch.set_flush_denormal(False)
        out = variant(*args)  # again: the call that loaded the kernel ran with denormals flushed (the passes
        # are pure functions, or write their `out` argument whole, so a second run gives the same bits)
    return out


def _keeps_denormals() -> bool:
    """Whether this thread's float arithmetic keeps denormal numbers (no flush-to-zero). Asked in Python
    floats, which the same SSE control word governs: no tensor op, so no host read of one."""
    return _TINY * 2.0 != 0.0


_TINY = 1e-310  # a float64 denormal (a name, not a literal: the bytecode compiler would fold the product)


def computed_once(t: Tensor) -> Tensor:
    """`t` (a small float tensor, e.g. one threshold per column) as a buffer of its own where this runs
    inside a compiled pass, not an expression that a loop over a large tensor recomputes for each element.
    Inductor inlines pointwise expressions into their consumers; a per-column threshold built from sums
    (two divisions and a square root) was recomputed per element of dY, the divisions kept in the loop by
    its tail branch: 78 us against 34 us for one count over a [256, 384] gradient (one thread). A real
    reduction is always stored, so `t` goes through one: the max over copies of itself, more of them
    than inductor unrolls as pointwise code. Exact: the max of equal values is the value (NaN stays NaN)."""
    copies = getattr(getattr(torch, "_inductor").config, "unroll_reductions_threshold", 8) + 1 \
        if torch.compiler.is_compiling() else 1
    return t.unsqueeze(0).expand(copies, *t.shape).amax(0)


def _name(fn) -> str:
    """A fused function's name in warnings and in `_FAILED`. A partial's names what it binds: each policy's
    `operands` is a partial of one function, and one policy's failure to compile must not send the others'
    calls to the eager path."""
    if isinstance(fn, functools.partial):
        bound = ", ".join(getattr(a, "__name__", None) or repr(a)[:40] for a in fn.args)
        return f"{_name(fn.func)}[{bound}]"
    return getattr(fn, "__name__", None) or repr(fn)


def _largest(args) -> Tensor | None:
    """The largest tensor among a call's arguments: its size decides whether and how it compiles (the first
    tensor alone missed a small dX beside a large dW: resnet18's 512x512 3x3 weight gradients, 2.4M
    elements, ran as four eager passes because dX had 32k, 10 of the site's 25 ms)."""
    return max((a for a in args if isinstance(a, Tensor)), key=Tensor.numel, default=None)


def _walker(of_tensor):
    """A key function over a call's arguments: `of_tensor(t)` for a tensor, the value of a Python scalar, the
    same for the items of a tuple, list or dict. (Written for speed: it runs on every call, hundreds of times
    a training step.)"""

    def walk(a):
        if isinstance(a, Tensor):
            return of_tensor(a)
        if a is None or type(a) in _VALUES:
            return a
        if isinstance(a, (tuple, list)):
            return type(a), tuple(map(walk, a))
        if isinstance(a, dict):
            return dict, tuple((k, walk(v)) for k, v in a.items())
        if isinstance(a, (bool, int, float, str, torch.dtype, numbers.Number)):
            return a  # (by value: a numpy integer is a constant of the trace as much as an int is)
        return type(a)

    return walk


def _tensor_signature(t: Tensor) -> tuple:
    """What torch.compile specialises on for a tensor: its dtype, rank, which dims have size 0 and which size
    1 (both always specialised, each to its own value: a variant traced where a dim was 1 indexes out of
    bounds on an empty tensor), its stride order, whether it requires grad and whether it is a view (dynamo
    also guards on requires_grad and, for a view, on its base's sizes and strides)."""
    order = () if t.is_contiguous() else tuple(sorted(range(t.dim()), key=t.stride().__getitem__))
    return t.dtype, t.device.type, tuple(map(_SIZE_CLASS, t.shape)), order, t.requires_grad, t._is_view()


def _tensor_exact(t: Tensor) -> tuple:
    """A tensor in an exact-shape variant's key: `_tensor_signature` with its sizes and strides in place of
    their pattern (a variant compiled for exact shapes is compiled for exact strides too)."""
    return t.dtype, t.device.type, t.shape, t.stride(), t.requires_grad, t._is_view()


_SIZE_CLASS = functools.partial(min, 2)  # a size as 0, 1 or 2 (any size from 2 up)
_VALUES = frozenset((bool, int, float, str, torch.dtype))
_signature = _walker(_tensor_signature)  # a dynamic variant's key
_exact_key = _walker(_tensor_exact)  # an exact-shape variant's key


def _plain(a):
    """An argument as a pass takes it: a Parameter detached, a view as `_plain_alias` (see `fused`), anything
    else as it is (checked in this order for speed: Parameter's own isinstance check is slow)."""
    if type(a) is Tensor:
        return _plain_alias(a) if a._is_view() else a
    return a.detach() if isinstance(a, Tensor) and isinstance(a, torch.nn.Parameter) else a


def _plain_alias(t: Tensor) -> Tensor:
    """`t` as a tensor that is not a view: the same storage, offset, sizes and strides (so writes into an
    `out` argument land where they would have), without autograd history (the passes run inside int8fx's
    ops, on tensors autograd does not record)."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _on_cpu(args) -> bool:
    """Whether every tensor among the arguments is a CPU tensor."""
    tensors = []
    precompiled._tensors(args, tensors)
    return all(t.device.type == "cpu" for t in tensors)


def _fresh_copy(fn):
    """`fn` with a code object of its own (so a compiled cache of its own). A partial becomes a plain
    function calling a copy of its function: torch.compile runs every partial through one shared wrapper
    (`external_utils.inner`), whose single cache all of them would fill."""
    if isinstance(fn, functools.partial):
        func, bound, keywords = _fresh_copy(fn.func), fn.args, fn.keywords

        def partial_call(*args):
            return func(*bound, *args, **keywords)

        return _fresh_copy(partial_call)
    code = getattr(fn, "__code__", None)
    if code is None:
        return fn
    copy = types.FunctionType(code.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return copy


@contextlib.contextmanager
def _compile_settings():
    """int8fx's own settings for compiling its passes, whatever the user set for theirs:
    - `error_on_recompile` off: a user who sets it means their model, not int8fx's passes (which compile a
      new variant when a new shape relation shows up);
    - no duck shaping: two dims that happen to be equal at the first call (batch 16 and 16 channels) would
      otherwise be assumed equal and the next layer recompile;
    - quiet `torch.utils.cpp_extension`, which warns "No CUDA runtime is found" on a machine with a CUDA
      toolkit and no GPU."""
    from torch.fx.experimental import _config as fx_config

    with contextlib.ExitStack() as stack:
        if torch._dynamo.config.error_on_recompile:
            stack.enter_context(torch._dynamo.config.patch(error_on_recompile=False))
        if hasattr(fx_config, "use_duck_shape"):
            stack.enter_context(fx_config.patch(use_duck_shape=False))
        logger = logging.getLogger("torch.utils.cpp_extension")
        level = logger.level
        logger.setLevel(logging.ERROR)  # (setLevel clears every logger's cache: not on the hot path)
        stack.callback(logger.setLevel, level)
        yield


def outside_traces(fn):
    """`fn` run on real tensors whatever its caller is inside: for a machine probe, measured once per process
    (whether this CPU's int8 GEMM is exact, which GEMM is faster). Asked first from inside a trace (the INT8
    op's fake implementation under `torch.export` or `torch.compile`, a fresh process's first call), the probe
    ran on fake tensors, whose values cannot be read: torch.export failed with "Pending unbacked symbols".
    And with oneDNN on, which torch.export turns off while it traces: there `torch._int_mm` ran 0.05x the fp32
    GEMM instead of 5.6x (Intel Xeon, AMX), and `backend="auto"` took the reference for the process. (A probe
    asked outside a trace sees the user's own oneDNN setting, as the training steps will.)"""
    from torch.utils._python_dispatch import _disable_current_modes

    @functools.wraps(fn)
    def run(*args, **kwargs):
        traced = _get_current_dispatch_mode() is not None
        with contextlib.ExitStack() as stack:
            stack.enter_context(_disable_current_modes())
            stack.enter_context(torch._C.DisableTorchFunction())
            stack.enter_context(torch._C._DisablePythonDispatcher())
            if traced and not torch._C._get_mkldnn_enabled():
                torch._C._set_mkldnn_enabled(True)
                stack.callback(torch._C._set_mkldnn_enabled, False)
            return fn(*args, **kwargs)
    return run


def seen_by_everything(args) -> bool:
    """Whether a call on `args` may take a path that torch's ops do not see one by one (a compiled pass,
    oneDNN's direct conv): not when a torch.func transform wraps one of the tensors, and not under a
    TorchDispatchMode or TorchFunctionMode (a profiler, a FLOP counter, inspect's recorder), which would
    otherwise miss the ops; there the eager ops run, where they do see them."""
    if _get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled():
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not any(isinstance(a, Tensor) and wrapped(a) for a in args)
