"""A tensor function traced once and compiled by inductor, then called without dynamo: how `fusing.fused`
compiles a pass for CPU tensors where torch has inductor's standalone compile (torch >= 2.8).

Why: a `torch.compile`d function pays on every call for dynamo's frame hook and guard check and
AOTAutograd's runtime wrappers before inductor's kernel runs; measured on one thread, a small pass's call
cost 42-125 us compiled that way against 23-81 us compiled here, and an INT8 step makes ~150 such calls
(mobilenet_v2, batch 16 at 64x64: 10 ms of a 220 ms step). Here the function is traced by `make_fx` into
an aten graph, compiled by `torch._inductor.standalone_compile`, and called directly.

Being sound without dynamo: `fusing` keys a `Traced` by the argument signature (dtypes, ranks, sizes 0/1,
stride order, Python values; exact sizes and strides for an exact-shape variant), and a dynamic variant
carries the shape guards its trace recorded (`ShapeEnv.produce_guards_expression`: equal dims, a branch on a
size, stride relations), checked on each call; a call that meets none of a signature's variants traces
another, up to VARIANTS, then runs eagerly (`OutOfVariants`). A value read on the host (`.item()`, a branch on a tensor's
value) cannot be traced: the compile fails, and `fusing` runs that function eagerly with one warning.
CUDA tensors keep `torch.compile` (this path has not run on a GPU).
"""
from __future__ import annotations

import contextlib
import re

import torch
from torch import Tensor

VARIANTS = 8  # traced variants one signature gets (new shape relations); then eager, as dynamo's limit


def _available() -> bool:
    """Whether this torch has what the path needs: inductor's standalone compile (torch >= 2.8) and the flag
    behind `torch.compiler.is_compiling()`."""
    try:
        import torch._inductor  # noqa: F401  (not imported by `import torch` on every version)
    except Exception:  # a torch built without inductor
        return False
    return hasattr(torch._inductor, "standalone_compile") and hasattr(torch.compiler, "_is_compiling_flag")


AVAILABLE = _available()


class OutOfVariants(RuntimeError):
    """A signature met more shape relations than VARIANTS: `fusing` runs it eagerly from then on."""


class Traced:
    """`fn` compiled for one argument signature: variants tried in order, each with its shape guards."""

    def __init__(self, fn, static: bool, settings=contextlib.nullcontext):
        self.fn, self.static, self.settings = fn, static, settings
        self.variants: list[tuple] = []  # (guard code or None, compiled callable, output template)

    def __call__(self, *args):
        tensors = []
        _tensors(args, tensors)
        for variant in self.variants:
            if variant[0] is None or _holds(variant[0], tensors):
                break
        else:
            if len(self.variants) >= VARIANTS:
                raise OutOfVariants(f"{VARIANTS} traced variants, none of whose shape guards hold")
            with self.settings():
                variant = _compile(self.fn, args, tensors, self.static)
            self.variants.append(variant)
        _, run, template = variant
        return _rebuild(template, iter(run(*tensors)))


def _compile(fn, args, tensors: list[Tensor], static: bool) -> tuple:
    """(guard, compiled callable on the tensors, output template) of fn traced on these arguments."""
    from torch.fx.experimental.proxy_tensor import make_fx

    template = []

    def on_tensors(*ts):
        out = fn(*_substitute(args, iter(ts)))
        flat = []
        template.append(_template(out, flat))
        return tuple(flat)

    with tracing():
        gm = make_fx(on_tensors, tracing_mode="fake" if static else "symbolic")(*tensors)
    guard = None
    if not static:
        values = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
        shape_env = torch._guards.detect_fake_mode(values).shape_env
        guard = _guard_code(shape_env.produce_guards_expression(values))
    run = torch._inductor.standalone_compile(
        gm, tensors, dynamic_shapes="from_example_inputs" if static else "from_graph")
    return guard, run, template[-1]


@contextlib.contextmanager
def tracing():
    """`torch.compiler.is_compiling()` true while a pass is traced, as it is under dynamo: the passes ask it
    (a fused pass called from one being traced runs inline; `fusing.computed_once` takes its compiled form)."""
    previous = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True
    try:
        yield
    finally:
        torch.compiler._is_compiling_flag = previous


# ------------------------------------------------------------------------------------------- guards
_ACCESS = re.compile(r"L\['t(\d+)'\]\.(size|stride)\(\)\[(\d+)\]|L\['t(\d+)'\]\.storage_offset\(\)")


def _guard_code(expression: str | None):
    """The guard expression compiled once, reading sizes and strides from lists built per call (the
    expression as produced calls `.size()` on a tensor for every term: several microseconds a call)."""
    if expression is None:
        return None

    def access(m):
        if m.group(4) is not None:
            return f"O[{m.group(4)}]"
        return f"{'S' if m.group(2) == 'size' else 'T'}[{m.group(1)}][{m.group(3)}]"

    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    code = _ACCESS.sub(access, expression)
    return compile(code, "<int8fx guard>", "eval"), SYMPY_INTERP, "L[" in code  # (L: any other tensor access)


def _holds(guard, tensors: list[Tensor]) -> bool:
    code, names, by_name = guard
    local = {"S": [t.shape for t in tensors], "T": [t.stride() for t in tensors],
             "O": [t.storage_offset() for t in tensors]}
    if by_name:
        local["L"] = {f"t{i}": t for i, t in enumerate(tensors)}
    return eval(code, names, local)


# ------------------------------------------------------------------------------------------- arguments
# Arguments are walked as `fusing._signature` reads them (tensors inside tuples, lists and dict values);
# written out rather than with torch.utils._pytree, which costs ~1 us per node on every call.
def _tensors(a, out: list) -> None:
    if isinstance(a, Tensor):
        out.append(a)
    elif isinstance(a, (tuple, list)):
        for x in a:
            _tensors(x, out)
    elif isinstance(a, dict):
        for x in a.values():
            _tensors(x, out)


def _substitute(a, tensors):
    """`a` with its tensors replaced, in `_tensors` order, by the next ones from the iterator."""
    if isinstance(a, Tensor):
        return next(tensors)
    if isinstance(a, (tuple, list)):
        items = [_substitute(x, tensors) for x in a]
        return type(a)(*items) if hasattr(a, "_fields") else type(a)(items)  # (a NamedTuple takes fields)
    if isinstance(a, dict):
        return {k: _substitute(v, tensors) for k, v in a.items()}
    return a


def _template(out, flat: list):
    """An output's structure with its tensors moved to `flat` (marked by `_TENSOR`): what `_rebuild` fills."""
    if isinstance(out, Tensor):
        flat.append(out)
        return _TENSOR
    if isinstance(out, (tuple, list)):
        return type(out), [_template(x, flat) for x in out]
    if isinstance(out, dict):
        return dict, {k: _template(v, flat) for k, v in out.items()}
    if out is None or isinstance(out, (bool, int, float, str)):
        return _Constant(out)
    raise TypeError(f"a fused pass returned a {type(out).__name__}, which a compiled pass cannot hand back")


class _Constant:
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


_TENSOR = object()


def _rebuild(template, tensors):
    if template is _TENSOR:
        return next(tensors)
    if isinstance(template, _Constant):
        return template.value
    kind, items = template
    if kind is dict:
        return {k: _rebuild(v, tensors) for k, v in items.items()}
    built = [_rebuild(x, tensors) for x in items]
    return kind(*built) if hasattr(kind, "_fields") else kind(built)
