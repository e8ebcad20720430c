"""The INT8 op's elementwise passes, each one pass over memory where the machine can compile them.

An INT8 training step on a CPU spends as much time in elementwise passes (quantize, dequantize, the
layout change to channels-last, the random draws of stochastic rounding) as in its GEMMs; written as
separate torch ops each costs a pass over memory and a temporary. These are the fused forms, compiled
where the machine can (int8fx.fusing); eagerly they compute the same, bit for bit (tests/test_fused.py).

Numerics (shared with int8fx.quant.core): q = clamp(round(x / s), -127, 127) with round half to even, or
floor(x / s + u) with u from `uniform_bits15`, element index = row-major position in the tensor as given.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..fusing import fused
from .core import QMAX, divide, uniform_bits15


def _divisor(scale: Tensor) -> Tensor:
    # dividing by +inf where the scale is 0 or NaN gives q = 0 (quant.core.quantize does the same)
    return torch.where(scale > 0, scale, torch.full_like(scale, float("inf")))


@fused
def quantize_activation(x: Tensor, act_clip: Tensor | None, form: str):
    """(s_x, x_q[, x_f]): the forward's activation operand in one call, its scale included: absmax / 127,
    or `act_clip` / 127 where a static clip is given and set (> 0). `form`:
      "rows": int8 in x's own layout (a linear's input);
      "channels_last": x [N, C, *S] (any memory format) as int8 [N, *S, C] contiguous, the conv GEMM's
        operand (quantize and transpose in one pass);
      "channels_last_pair": that, and the same integers in fp32 (a depthwise conv run in fp32)."""
    # (`math.prod(x.shape)`, not `x.numel()`: dynamo 2.5 specialised numel() to its value, so every activation
    # size recompiled this pass until it ran eagerly)
    clip = x.detach().float().abs().amax() if math.prod(x.shape) > 0 else x.new_zeros((), dtype=torch.float32)
    if act_clip is not None:
        clip = torch.where(act_clip > 0, act_clip.to(clip.device, clip.dtype), clip)
    s = divide(clip, QMAX)
    v = (x.float() / _divisor(s)).round().clamp(-QMAX, QMAX)
    if form == "rows":
        return s, v.to(torch.int8)
    v = v.movedim(1, -1)
    if form == "channels_last":
        return s, v.to(torch.int8).contiguous()
    return s, v.to(torch.int8).contiguous(), v.contiguous()


@fused(dynamic=False)  # a few ops: eager is faster below STATIC elements
def scale_accumulators(acc: Tensor, s_x: Tensor, s_w: Tensor, out: Tensor) -> Tensor:
    """out[m, o] = float(acc[m, o]) * (s_x * s_w[o]): the forward's dequantization of int32 accumulators,
    written into `out` (the caller's output tensor, whatever its strides)."""
    return out.copy_(acc.float() * (s_x * s_w))


@fused(dynamic=False)  # a few ops: eager is faster below STATIC elements
def scale_accumulators_bias(acc: Tensor, s_x: Tensor, s_w: Tensor, bias: Tensor, out: Tensor) -> Tensor:
    """`scale_accumulators` plus a float bias, in the same pass."""
    return out.copy_(acc.float() * (s_x * s_w) + bias.float())


@fused
def _quantize_gradient_nearest(rows: Tensor, premul: Tensor, scale: Tensor) -> Tensor:
    return ((rows.float() * premul) / _divisor(scale)).round().clamp(-QMAX, QMAX).to(torch.int8)


@fused
def _quantize_gradient_stochastic(rows: Tensor, premul: Tensor, scale: Tensor, key: Tensor) -> Tensor:
    v = (rows.float() * premul) / _divisor(scale)
    u = uniform_bits15(rows.shape, key, rows.device).float() * 2.0 ** -15 + 2.0 ** -16
    return (v + u).floor().clamp(-QMAX, QMAX).to(torch.int8)


def quantize_gradient(rows: Tensor, premul: Tensor, scale: Tensor, stochastic: bool, key: Tensor | None) -> Tensor:
    """int8 quantize(rows * premul, scale) of a gradient matrix [M, O] (premul and scale broadcast against
    it; premul 1 for none), rounded to nearest or stochastically from the stream `key`."""
    if stochastic:
        return _quantize_gradient_stochastic(rows, premul, scale, key)
    return _quantize_gradient_nearest(rows, premul, scale)


@fused
def _quantize_gradients_nearest(rows: Tensor, s_w: Tensor, s_gx: Tensor, s_gw: Tensor) -> tuple[Tensor, Tensor]:
    r = rows.float()
    gq = ((r * s_w) / _divisor(s_gx)).round().clamp(-QMAX, QMAX).to(torch.int8)
    dq = (r / _divisor(s_gw)).round().clamp(-QMAX, QMAX).to(torch.int8)
    return gq, dq


@fused
def _quantize_gradients_stochastic(rows: Tensor, s_w: Tensor, s_gx: Tensor, s_gw: Tensor, key_x: Tensor,
                                   key_w: Tensor) -> tuple[Tensor, Tensor]:
    r = rows.float()
    u_x = uniform_bits15(rows.shape, key_x, rows.device).float() * 2.0 ** -15 + 2.0 ** -16
    u_w = uniform_bits15(rows.shape, key_w, rows.device).float() * 2.0 ** -15 + 2.0 ** -16
    gq = ((r * s_w) / _divisor(s_gx) + u_x).floor().clamp(-QMAX, QMAX).to(torch.int8)
    dq = (r / _divisor(s_gw) + u_w).floor().clamp(-QMAX, QMAX).to(torch.int8)
    return gq, dq


def quantize_gradients(rows: Tensor, s_w: Tensor, s_gx: Tensor, s_gw: Tensor, stochastic: bool, key_x, key_w):
    """Both backward operands from one read of dY [M, O]: (quantize(dY s_W, s_gx), quantize(dY, s_gw)),
    exactly what two `quantize_gradient` calls give."""
    if stochastic:
        return _quantize_gradients_stochastic(rows, s_w, s_gx, s_gw, key_x, key_w)
    return _quantize_gradients_nearest(rows, s_w, s_gx, s_gw)


@fused(dynamic=False)  # a few ops: eager is faster below STATIC elements
def gradient_rows(dy: Tensor) -> Tensor:
    """dY [N, C, *S] stored contiguous as fp32 rows [M, C], channels last (what the gradient quantizers
    read), in one pass. Why compiled: ATen's transposing copy is slow on a CPU, and slowest where the
    channel stride is a multiple of 4 KiB (cache-set aliasing): one thread, 16x96x32x32, 4.5 ms against 0.68
    ms for the compiled loop (0.2 ms for a plain copy of the same bytes)."""
    return dy.float().movedim(1, -1).reshape(-1, dy.shape[1])


@fused(dynamic=False)  # a few ops: eager is faster below STATIC elements
def scale_gradients(dx_acc: Tensor | None, dw_acc: Tensor | None, s_gx: Tensor, s_gw: Tensor, s_x: Tensor,
                    x_dtype: torch.dtype, w_dtype: torch.dtype, to_nchw: bool):
    """(dX, dW) from the backward GEMMs' accumulators in one call (None for a gradient not needed):
    - dX = float(dx_acc) * s_gx in x_dtype, from the channels-last pipeline's [N, *S, C] (or a linear's):
      stored as dx_acc is, or [N, C, *S] contiguous when `to_nchw` (a model kept in torch's default layout
      gets dX in it without a transposing copy; see `gradient_rows` for why);
    - dW = float(dw_acc) * s_gw * s_x in w_dtype, s_gw the per-output-channel scales shaped to broadcast
      against dw_acc (this order: each product alone stays representable where s_gw * s_x would underflow),
      written contiguous whatever dw_acc's strides (the conv weight's layout from the GEMM's (kernel,
      channel) order)."""
    dx = dw = None
    if dx_acc is not None:
        dx = (dx_acc.float() * s_gx).to(x_dtype)
        dx = dx.movedim(-1, 1).contiguous() if to_nchw else dx
    if dw_acc is not None:
        dw = (dw_acc.float() * s_gw * s_x).to(w_dtype).contiguous()
    return dx, dw


@fused
def quantize_weight_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 q [O, K], scale [O]) of a weight [O, ...] flattened per output channel, one scale per row
    (absmax / 127), as `quantize_per_channel(w.flatten(1), 0)`. Pass w in its own memory order: over a
    strided view the compiled pass loses its vectorised loads (int8fx.kernels.nhwc reorders the int8)."""
    wf = w.float().flatten(1)
    s = divide(wf.abs().amax(dim=1), QMAX)
    return (wf / _divisor(s)[:, None]).round().clamp(-QMAX, QMAX).to(torch.int8), s


@fused
def quantize_operands(x: Tensor, act_clip: Tensor | None, form: str, w: Tensor) -> tuple:
    """`quantize_activation(x, act_clip, form)` and `quantize_weight_rows(w)` in one call: (s_x, x_q[, x_f],
    w_q, s_w). The forward's two operands are small on most sites of a small model, where each compiled
    call's fixed cost is what matters."""
    return (*quantize_activation.eager(x, act_clip, form), *quantize_weight_rows.eager(w))

