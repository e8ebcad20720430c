"""The INT8 training op: one `torch.autograd.Function` for every conv dimensionality and for linear.

Forward:  X per tensor, W per output channel -> exact integer GEMM -> x s_X s_W[o] (+ bias in fp32).
          The INT8 activation (not the FP32 one) is saved for backward.
Backward: dW = (dY quantized with one clip per output channel)^T . Xcol_int8      (INT8 GEMM)
          dX = col2im((dY s_W[o] quantized per tensor) . W_int8)                (INT8 GEMM)
Folding the per-channel weight scale into dY before its per-tensor quantization keeps the forward's
per-output-channel INT8 weights usable in the dX GEMM, where o is the reduction index and a
per-o scale could not be factored out (ALGORITHMS.md, granularity table). It is the exact gradient of
the quantized forward (straight-through for the quantizers).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from ..kernels import resolve_backend
from ..kernels import layouts
from ..kernels.im2col import GemmSpec, output_to_rows
from ..quant.core import (absmax, cosine_distance, dequantize, nonfinite_poison, quantize, quantize_per_channel,
                          scale_from_clip)


def _quantize(backend, x: Tensor, scale: Tensor, rounding: str = "nearest", generator=None,
              out_dtype: torch.dtype = torch.int8) -> Tensor:
    """`quantize` through the backend's fused kernel when it has one (optional `backend.quantize` hook,
    same arguments and semantics; it returns None for cases it does not cover). The reference backend
    has no hook, so its path is exactly `quantize`."""
    hook = getattr(backend, "quantize", None)
    q = hook(x, scale, rounding, generator, out_dtype) if hook is not None else None
    return quantize(x, scale, rounding, generator, out_dtype) if q is None else q


def quantized_forward(x: Tensor, weight: Tensor, spec: GemmSpec, backend, act_clip: Tensor | None = None):
    """(y_float_without_bias, x_q int8, s_x, w_q operand, s_w) -- shared by the op and by tests/export.
    `act_clip`: a static activation clip (values beyond it saturate at +-127); None, or a clip of 0 (never
    set), takes x's absmax."""
    clip = absmax(x)
    if act_clip is not None:
        clip = torch.where(act_clip > 0, act_clip.to(clip.device, clip.dtype), clip)
    s_x = scale_from_clip(clip)
    x_op = _quantize(backend, x, s_x, out_dtype=backend.operand_dtype)  # the GEMM operand
    x_q = x_op if x_op.dtype == torch.int8 else x_op.to(torch.int8)  # what backward keeps
    w2 = weight.reshape(weight.shape[0], -1)
    w_q, s_w = quantize_per_channel(w2, 0, out_dtype=backend.operand_dtype)
    layout = layouts.layout_for(spec, tuple(x.shape), w2.shape[0])
    acc, out = layouts.forward(backend, x_op, w_q, spec, layout)
    y = acc.float() * (s_x * s_w).view(-1, *([1] * len(out)))
    return y.reshape(*x.shape[:-1], w2.shape[0]) if spec.is_linear else y, x_q, s_x, w_q, s_w


def _autocast_off(fn):
    """Run an op method with autocast disabled on its first tensor's device.

    The reference GEMM computes exact integer products with fp32 matmuls; under `torch.autocast` those
    matmuls would run in bf16/fp16 and round the int32 accumulators (measured: outputs off by 3e-3,
    weight gradients by 4e-2 on a small CNN under CPU bf16 autocast). The op's own precision is INT8
    with fp32 scales whatever autocast says, so it shields its inside and keeps its input dtype."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        try:
            off = torch.autocast(args[0].device.type, enabled=False)
        except RuntimeError:  # a device type without autocast support
            off = contextlib.nullcontext()
        with off:
            return fn(ctx, *args)

    return wrapper


class Int8GemmFunction(torch.autograd.Function):
    """apply(x, weight, bias, spec, layer) -> y. `layer` is the Int8 module owning quantizer state."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, spec: GemmSpec, layer) -> Tensor:
        backend = resolve_backend(layer.backend_choice, x.device)
        y, x_q, s_x, w_q, s_w = quantized_forward(x, weight, spec, backend, layer.static_act_clip())
        if bias is not None:
            y = y + (bias.view(-1, *([1] * spec.dims)) if not spec.is_linear else bias)
        if x.numel():  # an empty batch carries no statistics
            layer.observe_forward(s_x)
        ctx.save_for_backward(x_q, s_x, w_q, s_w)
        ctx.spec, ctx.layer, ctx.has_bias = spec, layer, bias is not None
        ctx.x_shape, ctx.x_dtype, ctx.w_shape = x.shape, x.dtype, weight.shape
        return y.to(x.dtype) if x.dtype != y.dtype and x.dtype.is_floating_point else y

    @staticmethod
    @_autocast_off
    def backward(ctx, dy: Tensor):
        x_q, s_x, w_q, s_w = ctx.saved_tensors
        spec, layer = ctx.spec, ctx.layer
        backend = resolve_backend(layer.backend_choice, dy.device)
        g = spec.groups
        dyf = dy.float()
        rows = output_to_rows(dyf, spec)  # [M, O], channels last: the layout the gradient quantizers see
        O = rows.shape[1]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if rows.shape[0] == 0:  # empty batch: zero gradients as in FP32; no statistics, so no state update
            return (dy.new_zeros(ctx.x_shape, dtype=ctx.x_dtype) if need_x else None,
                    dy.new_zeros(ctx.w_shape) if need_w else None,
                    dy.new_zeros(O) if need_b and ctx.has_bias else None, None, None)
        poison = nonfinite_poison(rows)
        rounding, gen = layer.grad_rounding()
        layout = layouts.layout_for(spec, tuple(ctx.x_shape), O)
        per_o = (lambda v: v) if spec.is_linear else (lambda v: v.view(1, O, *([1] * spec.dims)))  # noqa: E731
        scaled = dyf * per_o(s_w)  # dY s_W[o]: the dX operand (see module docstring), in output order
        clip_w, clip_x = layer.quantizer_for(O).clips(rows, scaled)
        dx = dw = db = None
        if need_x:
            s_gx = scale_from_clip(clip_x + poison)
            gq = _quantize(backend, scaled, s_gx, rounding, gen, backend.operand_dtype)
            dx_int = layouts.grad_input(backend, gq, w_q, spec, ctx.x_shape, layout)
            dx = (dx_int.float() * s_gx).to(ctx.x_dtype)
        if need_w or layer.tracks_deviation:
            s_gw = scale_from_clip(clip_w + poison)
            dq = _quantize(backend, rows, s_gw, rounding, gen, backend.operand_dtype)  # [M, O]
            if layer.tracks_deviation:
                layer.observe_deviation(cosine_distance(rows, dequantize(dq, s_gw)))
        if need_w:
            acc = layouts.grad_weight(backend, dq, x_q.to(backend.operand_dtype), spec, layout)  # [g, O/g, K]
            # one scale at a time: s_gw * s_x alone underflows for tiny dY and X (1e-20 each) while dW is
            # still representable
            dw = (acc.float() * s_gw.view(g, -1, 1) * s_x).reshape(ctx.w_shape)
        if need_b and ctx.has_bias:
            db = rows.sum(0)
        layer.observe_backward(poison)
        return dx, dw, db, None, None
