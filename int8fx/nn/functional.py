"""The INT8 training op for every conv dimensionality and for linear, registered with `torch.library`.

Forward:  X per tensor, W per output channel -> exact integer GEMM -> x s_X s_W[o] (+ bias in fp32).
          The INT8 activation and weight (not the FP32 ones) are saved for backward.
Backward: dW = (dY quantized with one clip per output channel)^T . Xcol_int8      (INT8 GEMM)
          dX = col2im((dY s_W[o] quantized per tensor) . W_int8)                (INT8 GEMM)
Folding the per-channel weight scale into dY before its per-tensor quantization keeps the forward's
per-output-channel INT8 weights usable in the dX GEMM, where o is the reduction index and a per-o scale
could not be factored out (ALGORITHMS.md, granularity table). It is the exact gradient of the quantized
forward (straight-through for the quantizers).

Why `torch.library` ops: `int8fx::gemm` and `int8fx::gemm_backward` take only tensors and plain values
(the site's geometry as ints, its policy as a name and floats, its state as tensor lists), and have fake
implementations that give shapes without computing, so dynamo, AOTAutograd and `torch.export` see one
opaque, correctly-shaped node per site and per direction. Both are functional: the backward returns the
quantizer state it computed, and the autograd formula writes it into the site's *pending* state tensors
(`Int8Layer.commit` makes it current when an optimizer steps, so a step a loss scaler skips leaves no
trace). Nothing in either op reads a value on the host: finiteness, clips and the DSGC period are
device-side `where`s, and stochastic rounding draws from a counter-based stream keyed on the site and
its backward count (int8fx.quant.core.uniform_bits15), separately for the dX and dW operands.

Where nothing traces the model (eager mode, and `torch.func` transforms, which custom ops' autograd does
not compose with yet), the same forward/backward run through an `autograd.Function` without torch.library's
dispatch layers: `_DirectGemm` (with `setup_context`, as torch.func needs) or `_EagerGemm` (the same, cheaper
to call).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
from torch import Tensor

from ..kernels import layouts, nhwc, resolve_backend, windows
from ..kernels.im2col import GemmSpec, output_to_rows
from ..quant.core import (absmax, cosine_distance, dequantize, quantize, quantize_per_channel,
                          scale_from_clip)
from ..quant.fused import gradient_rows, scale_gradients
from ..quant.grad import PolicyParams, grad_quantizer_class
from . import transposed

SAVED_OUTPUTS = 4  # x_q, s_x, w_q, s_w: what the forward op returns besides y, for the backward


# --------------------------------------------------------------------------------------------- geometry
def spec_to_ints(spec: GemmSpec) -> list[int]:
    """[dims, groups, *kernel, *stride, *pad_before, *pad_after, *dilation (, *output_padding of a transposed
    conv)]: a GemmSpec as a torch.library `int[]` argument."""
    return [spec.dims, spec.groups, *spec.kernel, *spec.stride, *(lo for lo, _ in spec.padding),
            *(hi for _, hi in spec.padding), *spec.dilation, *(spec.output_padding if spec.transposed else ())]


def spec_from_ints(ints) -> GemmSpec:
    dims, groups, rest = ints[0], ints[1], list(ints[2:])
    if dims == 0:
        return GemmSpec(0)
    k, s, lo, hi, d, op = (tuple(rest[i * dims:(i + 1) * dims]) for i in range(6))
    return GemmSpec(dims, k, s, tuple(zip(lo, hi)), d, groups, transposed=bool(op), output_padding=op)


# --------------------------------------------------------------------------------------------- forward
def quantized_forward(x: Tensor, weight: Tensor, spec: GemmSpec, backend, act_clip: Tensor | None = None):
    """The reference pipeline's forward (int8fx.kernels.layouts): (y_float_without_bias, x_q int8, s_x,
    w_q operand, s_w) -- shared by the op and by tests/export.
    `act_clip`: a static activation clip (values beyond it saturate at +-127); None, or a clip of 0 (never
    set), takes x's absmax."""
    clip = absmax(x)
    if act_clip is not None:
        clip = torch.where(act_clip > 0, act_clip.to(clip.device, clip.dtype), clip)
    s_x = scale_from_clip(clip)
    x_op = quantize(x, s_x, out_dtype=backend.operand_dtype)  # the GEMM operand
    x_q = x_op if x_op.dtype == torch.int8 else x_op.to(torch.int8)  # what backward keeps
    if spec.transposed:
        w_q, s_w = transposed.weight_operand(weight, spec.groups, backend.operand_dtype)
        acc = transposed.forward(backend, x_op, w_q, spec)
        return acc.float() * (s_x * s_w).view(-1, *([1] * spec.dims)), x_q, s_x, w_q, s_w
    w2 = weight.reshape(weight.shape[0], -1)
    w_q, s_w = quantize_per_channel(w2, 0, out_dtype=backend.operand_dtype)
    layout = layouts.layout_for(spec, tuple(x.shape), w2.shape[0])
    acc, out = layouts.forward(backend, x_op, w_q, spec, layout)
    y = acc.float() * (s_x * s_w).view(-1, *([1] * len(out)))
    return y.reshape(*x.shape[:-1], w2.shape[0]) if spec.is_linear else y, x_q, s_x, w_q, s_w


def _no_autocast(device: torch.device):
    """The op's own precision is INT8 with fp32 scales whatever autocast says: under `torch.autocast` the
    reference GEMM's fp32 matmuls would run in bf16/fp16 and round the int32 accumulators. (Nothing to do
    where autocast is off: entering a disabled autocast costs microseconds, twice a site and step.)"""
    try:
        if not torch.is_autocast_enabled(device.type):
            return contextlib.nullcontext()
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


def pipeline(backend: str, device: torch.device, spec: GemmSpec, x_shape, out_channels: int):
    """("nhwc" | "reference", backend object) for one site's call: int8-operand backends run the
    channels-last pipeline (int8fx.kernels.nhwc) except for depthwise convs, which take the reference's
    direct path. The fake implementations ask the same question, so they promise the same strides."""
    be = resolve_backend(backend, device)
    if spec.transposed and device.type != "cpu":  # (int8fx.nn.transposed: the layouts' fp32 products on CUDA)
        return "reference", (be if be.operand_dtype == torch.float32 else resolve_backend("reference", device))
    if nhwc.applies(be, device, spec, tuple(x_shape), out_channels):
        return "nhwc", be
    return "reference", (be if be.operand_dtype == torch.float32 else resolve_backend("reference", device))


def gemm_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], act_clip: Tensor, spec: list[int],
                 static_clip: bool, backend: str, out_dtype: torch.dtype):
    """The forward computation: (y in out_dtype, x_q int8, s_x, w_q int8 [O, K], s_w [O])."""
    spec_ = spec_from_ints(spec)
    kind, be = pipeline(backend, x.device, spec_, x.shape, out_channels(weight.shape, spec_))
    clip = act_clip if static_clip else None
    with _no_autocast(x.device):
        if kind == "nhwc":  # y and x_q channels-last for convs, as `_forward_fake` promises
            forward = transposed.forward_channels_last if spec_.transposed else nhwc.forward
            y, x_q, s_x, w_q, s_w = forward(be, x, weight, bias, spec_, clip)
            return y.to(out_dtype), x_q, s_x, w_q, s_w
        y, x_q, s_x, w_q, s_w = quantized_forward(x, weight, spec_, be, clip)
        if bias is not None:
            y = y + (bias.float().view(-1, *([1] * spec_.dims)) if not spec_.is_linear else bias.float())
    return (y.to(out_dtype).contiguous(), x_q.contiguous(), s_x, w_q.to(torch.int8).contiguous(), s_w)


def _channels_last_like(shape, dtype, like: Tensor) -> Tensor:
    """An empty tensor of `shape` [N, C, *S] stored [N, *S, C]: what the nhwc pipeline returns."""
    return nhwc.empty_channels_last(shape, dtype, like.device)


def _grad_input_like(dy: Tensor, x_shape, dtype, kind: str, spec: GemmSpec) -> Tensor:
    """An empty dX as the backward returns it: channels-last where the nhwc pipeline ran a conv and dY is
    channels-last, else contiguous."""
    if kind == "nhwc" and not spec.is_linear and nhwc.stored_channels_last(dy):
        return _channels_last_like(x_shape, dtype, dy)
    return dy.new_empty(x_shape, dtype=dtype)


def _output_shape(x_shape, w_shape, spec: GemmSpec) -> tuple:
    if spec.is_linear:
        return (*x_shape[:-1], w_shape[0])
    return (x_shape[0], out_channels(w_shape, spec), *spec.out_size(tuple(x_shape[2:])))


def out_channels(w_shape, spec: GemmSpec) -> int:
    """A site's output channels: W's dim 0, or for a transposed conv W's dim 1 in each group."""
    return w_shape[1] * spec.groups if spec.transposed else w_shape[0]


# --------------------------------------------------------------------------------------------- backward
def gemm_backward(dy: Tensor, x_q: Tensor, s_x: Tensor, w_q: Tensor, s_w: Tensor, state: list[Tensor],
                  calls: Tensor, spec: list[int], x_shape: list[int], w_shape: list[int], policy: str,
                  state_names: str, params: list[float], stochastic: bool, key_base: int,
                  needs: list[bool], track_deviation: bool, backend: str, x_dtype: torch.dtype,
                  w_dtype: torch.dtype):
    """The backward computation: (dx, dw, db, new state). A gradient that is not needed comes back empty.

    `state` holds the site's committed state in the order of `state_names` (comma-separated: a string is
    what a torch.library op takes): "step", "deviation", then the gradient quantizer's buffers as
    "grad_quantizer.<name>"; the new state comes back in that order.
    `calls` is the site's call counter as the forward read it: with `key_base` it keys the rounding streams,
    so every call (a site may be called several times per step) draws its own noise."""
    spec_ = spec_from_ints(spec)
    need_x, need_w, need_b = needs
    state_names = state_names.split(",")
    named = dict(zip(state_names, state))
    with _no_autocast(dy.device):
        rows = _gradient_rows(dy, spec_)  # [M, O], channels last: the layout the gradient quantizers see
        O, g = rows.shape[1], spec_.groups
        kind, be_ = pipeline(backend, dy.device, spec_, x_shape, O)
        if rows.shape[0] == 0:  # empty batch: zero gradients as in FP32; no statistics, so no state update
            dx = _grad_input_like(dy, x_shape, x_dtype, kind, spec_).zero_() if need_x else dy.new_zeros(0, dtype=x_dtype)
            return (dx, dy.new_zeros(w_shape if need_w else 0, dtype=w_dtype),
                    dy.new_zeros(O if need_b else 0), [t.clone() for t in state])
        # the dX operand is dY s_W[o] (module docstring), as rows [M, O] like dY
        q_state = {n[len("grad_quantizer."):]: t for n, t in named.items() if n.startswith("grad_quantizer.")}
        need_dq = need_w or track_deviation
        # a depthwise conv's dX is an fp32 conv of the integer codes (int8fx.kernels.nhwc): quantized to fp32
        depthwise = kind == "nhwc" and not spec_.transposed and nhwc.is_depthwise(spec_, tuple(x_shape), O)
        # on a GPU the dW GEMM reads dY K-major (reduced along M): the quantizer writes it so
        dq_columns = kind == "nhwc" and not spec_.transposed and not depthwise and windows.gpu_layouts(rows)
        clip_w, clip_x, q_new, s_gx, s_gw, gq, dq = grad_quantizer_class(policy).operands(
            rows, s_w, q_state, PolicyParams.from_floats(params), stochastic, calls,
            torch.full((), key_base, dtype=torch.int64, device=rows.device), need_x, need_dq,  # a fill, not a host copy
            torch.float32 if depthwise else torch.int8, dq_columns)
        deviation = named["deviation"]
        if track_deviation:
            d = cosine_distance(rows, dequantize(dq, s_gw))
            deviation = torch.where(torch.isfinite(d), d, deviation)
        dx, dw, db = dy.new_empty(0, dtype=x_dtype), dy.new_empty(0, dtype=w_dtype), dy.new_empty(0)
        if kind == "nhwc":
            products = transposed.CHANNELS_LAST if spec_.transposed else (nhwc.grad_input, nhwc.grad_weight)
            dx_acc = products[0](be_, gq, w_q, spec_, tuple(x_shape)) if need_x else None
            dw_acc = products[1](be_, dq, x_q, spec_, w_shape) if need_w else None
            s_gw_ = s_gw.view(-1, *([1] * (len(w_shape) - 1)))  # dW's output channels: its dim 0, a transposed conv's dim 1
            if need_w and spec_.transposed:
                dw_acc, s_gw_ = transposed.per_output_channel(dw_acc, s_gw, g)
            to_nchw = not spec_.is_linear and not nhwc.stored_channels_last(dy)  # dX in dY's layout, as torch's
            dx_, dw_ = scale_gradients(dx_acc, dw_acc, s_gx, s_gw_, s_x, x_dtype, w_dtype, to_nchw)
            if need_x:
                dx = dx_ if spec_.is_linear or to_nchw else _from_storage(dx_, spec_)
            if need_w:
                dw = dw_.view(w_shape)
        elif spec_.transposed:
            if need_x:
                dx_int = transposed.grad_input(be_, _as_output(gq, spec_, dy).to(be_.operand_dtype),
                                               w_q.to(be_.operand_dtype), spec_)
                dx = (dx_int.float() * s_gx).to(x_dtype).contiguous()
            if need_w:
                acc = transposed.grad_weight(be_, _as_output(dq, spec_, dy).to(be_.operand_dtype),
                                             x_q.to(be_.operand_dtype), spec_)  # [C_in, C_out/g, window]
                acc, s_gw_ = transposed.per_output_channel(acc, s_gw, g)
                dw = (acc.float() * s_gw_ * s_x).reshape(w_shape).to(w_dtype).contiguous()  # as `scale_gradients`
        else:
            layout = layouts.layout_for(spec_, tuple(x_shape), O)
            if need_x:
                g_out = gq if spec_.is_linear else gq.view(x_shape[0], *spec_.out_size(tuple(x_shape[2:])), O).movedim(-1, 1)
                dx_int = layouts.grad_input(be_, g_out.to(be_.operand_dtype), w_q.to(be_.operand_dtype), spec_,
                                            tuple(x_shape), layout)
                dx = (dx_int.float() * s_gx).to(x_dtype).contiguous()
            if need_w:
                acc = layouts.grad_weight(be_, dq.to(be_.operand_dtype), x_q.to(be_.operand_dtype), spec_, layout)
                # one scale at a time, as `scale_gradients`
                dw = (acc.float() * s_gw.view(g, -1, 1) * s_x).reshape(w_shape).to(w_dtype).contiguous()
        if need_b:  # eagerly, so that every path (compiled or not, torch.func or not) sums in one order
            db = rows.sum(0)
        # a non-finite dY poisons both scales (GradQuantizer.operands): such a step is not counted
        new = {"step": named["step"] + torch.isfinite(s_gx), "deviation": deviation,
               **{f"grad_quantizer.{k}": v for k, v in q_new.items()}}
        new_state = [new.get(n, named[n]) for n in state_names]
    return dx, dw, db, new_state


def _gradient_rows(dy: Tensor, spec: GemmSpec) -> Tensor:
    """dY as fp32 rows [M, O], channels last: a view where dY is stored that way (a linear's, a
    channels-last model's), else one compiled transposing pass (`quant.fused.gradient_rows`)."""
    if spec.is_linear or dy.movedim(1, -1).is_contiguous():
        return output_to_rows(dy.float(), spec)
    return gradient_rows(dy)


def _as_output(rows: Tensor, spec: GemmSpec, dy: Tensor) -> Tensor:
    """Rows [M, O] of a conv gradient operand as a tensor shaped like dY [N, O, *out] (a view)."""
    return rows.view(dy.shape[0], *dy.shape[2:], rows.shape[1]).movedim(-1, 1)


def _from_storage(t: Tensor, spec: GemmSpec) -> Tensor:
    """A conv tensor stored [N, *S, C] as its [N, C, *S] view (channels-last strides)."""
    return t if spec.is_linear else t.movedim(-1, 1)


# --------------------------------------------------------------------------------------------- torch.library
# (The op signatures spell lists `typing.List[...]`: torch 2.5 infers a schema from those only, and refused
# `list[Tensor]` when the package was imported.)
@torch.library.custom_op("int8fx::gemm", mutates_args=())
def gemm_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], act_clip: Tensor, state: List[Tensor],
            pending: List[Tensor], calls: Tensor, spec: List[int], static_clip: bool, backend: str,
            out_dtype: torch.dtype, policy: str, state_names: str, params: List[float], stochastic: bool,
            key_base: int, track_deviation: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One INT8 conv/linear site, forward: (y, x_q, s_x, w_q, s_w). The arguments after `out_dtype` are
    the site's backward configuration and state, taken here so that the autograd formula has them."""
    return gemm_forward(x, weight, bias, act_clip, spec, static_clip, backend, out_dtype)


@gemm_op.register_fake
def _(x, weight, bias, act_clip, state, pending, calls, spec, static_clip, backend, out_dtype, policy, state_names,
      params, stochastic, key_base, track_deviation):
    spec_ = spec_from_ints(spec)
    y_shape = _output_shape(x.shape, weight.shape, spec_)
    kind, _ = pipeline(backend, x.device, spec_, x.shape, out_channels(weight.shape, spec_))
    if kind == "nhwc" and not spec_.is_linear:
        x_q = _channels_last_like(x.shape, torch.int8, x)
        y = (_channels_last_like(y_shape, out_dtype, x) if nhwc.output_channels_last(x, weight)
             else x.new_empty(y_shape, dtype=out_dtype))
    else:
        y, x_q = x.new_empty(y_shape, dtype=out_dtype), x.new_empty(x.shape, dtype=torch.int8)
    return (y, x_q, x.new_empty((), dtype=torch.float32),
            x.new_empty((weight.shape[0], weight[0].numel()), dtype=torch.int8),
            x.new_empty(out_channels(weight.shape, spec_), dtype=torch.float32))


@torch.library.custom_op("int8fx::gemm_backward", mutates_args=())
def gemm_backward_op(dy: Tensor, x_q: Tensor, s_x: Tensor, w_q: Tensor, s_w: Tensor, state: List[Tensor],
                     calls: Tensor, spec: List[int], x_shape: List[int], w_shape: List[int], policy: str,
                     state_names: str, params: List[float], stochastic: bool, key_base: int,
                     needs: List[bool], track_deviation: bool, backend: str, x_dtype: torch.dtype,
                     w_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    """One INT8 conv/linear site, backward: (dx, dw, db, new state); see `gemm_backward`."""
    dx, dw, db, new_state = gemm_backward(dy, x_q, s_x, w_q, s_w, state, calls, spec, x_shape, w_shape, policy,
                                          state_names, params, stochastic, key_base, needs, track_deviation, backend,
                                          x_dtype, w_dtype)
    # an op's outputs may not alias its inputs, and a policy may hand a state tensor back unchanged
    return dx, dw, db, [t.clone() if any(t is u for u in state) else t for t in new_state]


@gemm_backward_op.register_fake
def _(dy, x_q, s_x, w_q, s_w, state, calls, spec, x_shape, w_shape, policy, state_names, params, stochastic,
      key_base, needs, track_deviation, backend, x_dtype, w_dtype):
    spec_ = spec_from_ints(spec)
    kind, _ = pipeline(backend, dy.device, spec_, x_shape, out_channels(w_shape, spec_))
    dx = _grad_input_like(dy, x_shape, x_dtype, kind, spec_) if needs[0] else dy.new_empty(0, dtype=x_dtype)
    return (dx, dy.new_empty(w_shape if needs[1] else 0, dtype=w_dtype),
            dy.new_empty(out_channels(w_shape, spec_) if needs[2] else 0, dtype=torch.float32),
            [torch.empty_like(t) for t in state])


# --------------------------------------------------------------------------------------------- autograd
_INPUTS = ("x", "weight", "bias", "act_clip", "state", "pending", "calls", "spec", "static_clip", "backend",
           "out_dtype", "policy", "state_names", "params", "stochastic", "key_base", "track_deviation")


def _setup_context(ctx, inputs, output):
    a = dict(zip(_INPUTS, inputs))
    _, x_q, s_x, w_q, s_w = output
    ctx.save_for_backward(x_q, s_x, w_q, s_w, a["calls"], *a["state"])
    # pending is written by backward, so it is not a saved tensor: a site called twice in one forward would
    # otherwise find it modified (by the other call's backward) when its own backward unpacks it
    ctx.pending = a["pending"]
    ctx.n_state = len(a["state"])
    ctx.mark_non_differentiable(x_q, s_x, w_q, s_w)
    # the backward reads dY alone: no zero tensors for the other outputs' gradients (four allocations and fills
    # per site and step otherwise, ~90 GPU launches of resnet18's step). dY itself is always defined: autograd
    # calls this backward for y's gradient, the other outputs being non-differentiable
    ctx.set_materialize_grads(False)
    ctx.meta = {k: a[k] for k in ("spec", "policy", "state_names", "params", "stochastic", "key_base",
                                  "track_deviation", "backend")}
    ctx.x_shape, ctx.w_shape = list(a["x"].shape), list(a["weight"].shape)
    ctx.x_dtype, ctx.w_dtype = a["x"].dtype, a["weight"].dtype
    ctx.has_bias = a["bias"] is not None
    ctx.bias_dtype = a["bias"].dtype if a["bias"] is not None else None


def _backward(ctx, dy, *unused, through_op: bool = True):
    """The autograd formula. Differentiable once: the gradients come from INT8 operands (straight-through
    quantizers, integer GEMMs), so a graph of this backward would carry none of the second-order terms and
    a gradient penalty would be silently wrong; under create_graph its results raise when differentiated."""
    if not (torch.is_grad_enabled() and dy.requires_grad) or _functorch_level(dy):
        return _gradients(ctx, dy, through_op)
    with torch.no_grad():
        grads = _gradients(ctx, dy, through_op)
    tensors = [g for g in grads if isinstance(g, Tensor)]
    err = torch._C._functions.DelayedError(
        b"int8fx: the INT8 conv/linear backward is not differentiable (a gradient penalty, higher-order "
        b"gradients); keep the sites involved in FP32 (Int8Config.exclude or convert's filter_fn)", len(tensors))
    guarded = iter(err(*[g.detach().requires_grad_() for g in tensors]))
    return tuple(next(guarded) if isinstance(g, Tensor) else g for g in grads)


def _gradients(ctx, dy, through_op: bool):
    x_q, s_x, w_q, s_w, calls, *state = ctx.saved_tensors
    pending = ctx.pending
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    needs = [need_x, need_w, need_b and ctx.has_bias]
    m = ctx.meta
    args = (dy, x_q, s_x, w_q, s_w, list(state), calls, m["spec"], ctx.x_shape, ctx.w_shape, m["policy"],
            m["state_names"], m["params"], m["stochastic"], m["key_base"], needs, m["track_deviation"], m["backend"],
            ctx.x_dtype, ctx.w_dtype)
    dx, dw, db, new_state = (gemm_backward_op if through_op else gemm_backward)(*args)
    with torch.no_grad():
        torch._foreach_copy_(list(pending), list(new_state))
    grads = (dx if need_x else None, dw if need_w else None, db.to(ctx.bias_dtype) if needs[2] else None, None)
    # the op's autograd wants the inputs' structure (a None per tensor of each list); a Function one per input
    lists = ([None] * ctx.n_state, [None] * ctx.n_state) if through_op else (None, None)
    return grads + lists + (None,) * (len(_INPUTS) - 6)


def _functorch_level(t: Tensor) -> bool:
    """Whether `t` is a torch.func transform's tensor: `torch.func.grad` differentiates with create_graph on
    (to allow nesting), which is no request for a second derivative."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or torch._C._functorch.peek_interpreter_stack() is not None


gemm_op.register_autograd(_backward, setup_context=_setup_context)


class _DirectGemm(torch.autograd.Function):
    """The same op as an autograd.Function calling the computations directly: what runs under `torch.func`
    transforms (see `int8_gemm`), which need `setup_context`."""

    @staticmethod
    def forward(*inputs):
        a = dict(zip(_INPUTS, inputs))
        return gemm_forward(a["x"], a["weight"], a["bias"], a["act_clip"], a["spec"], a["static_clip"], a["backend"],
                            a["out_dtype"])

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, dy, *unused):
        return _backward(ctx, dy, through_op=False)

    @staticmethod
    def vmap(info, in_dims, *inputs):
        # per-sample quantization is not what the batched op computes (one activation clip per call), and a
        # batching rule for the integer GEMMs and the policies' statistics is not written
        raise RuntimeError("int8fx: torch.func.vmap over an INT8 conv/linear site (e.g. per-sample gradients) is "
                           "not supported; keep those sites in FP32 (Int8Config.exclude or convert's filter_fn)")


class _EagerGemm(torch.autograd.Function):
    """`_DirectGemm` in the form whose forward takes `ctx`: what plain eager mode runs. torch binds the
    arguments of a Function with `setup_context` through `inspect.signature` on every call (2% of
    mobilenet_v2's step at batch 2, 32x32, sampled by py-spy); this form skips that. Same forward, same
    context, same backward."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _DirectGemm.forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_DirectGemm.backward)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def int8_gemm(*inputs) -> tuple[Tensor, Tensor]:
    """(y, s_x) of one INT8 site (arguments as `gemm_op`'s).

    Traced (torch.compile, torch.export, make_fx: the input is not a plain tensor, or dynamo is compiling)
    it is the `int8fx::gemm` op, one opaque node. In eager mode it is `_EagerGemm`, the same computation
    without torch.library's dispatch layers (~0.2 ms per call, which a small layer would notice), and under
    `torch.func` transforms `_DirectGemm`, because custom ops' autograd does not compose with them yet."""
    x = inputs[0]
    traced = torch.compiler.is_compiling() or type(x) not in _PLAIN
    functorch = not traced and torch._C._functorch.peek_interpreter_stack() is not None
    y, _, s_x, _, _ = (gemm_op(*inputs) if traced and not functorch else _DirectGemm.apply(*inputs) if functorch
                       else _EagerGemm.apply(*inputs))
    return y, s_x
