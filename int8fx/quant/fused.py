"""The INT8 op's elementwise passes, each one pass over memory where the machine can compile them.

An INT8 training step on a CPU spends as much time in elementwise passes (quantize, dequantize, the
layout change to channels-last, the random draws of stochastic rounding) as in its GEMMs; written as
separate torch ops each costs a pass over memory and a temporary. These are the fused forms, compiled
where the machine can (int8fx.fusing); eagerly they compute the same, bit for bit (tests/test_fused.py).

Numerics (shared with int8fx.quant.core): q = clamp(round(x / s), -127, 127) with round half to even, or
floor(x / s + u) with u from `uniform_bits15`, element index = row-major position in the tensor as given.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..fusing import fused
from .core import QMAX, uniform_bits15


def _divisor(scale: Tensor) -> Tensor:
    # dividing by +inf where the scale is 0 or NaN gives q = 0 (quant.core.quantize does the same)
    return torch.where(scale > 0, scale, torch.full_like(scale, float("inf")))


@fused
def quantize_nearest(x: Tensor, scale: Tensor) -> Tensor:
    """int8 round(x / scale) clamped to [-127, 127], scale broadcast against x."""
    return (x.float() / _divisor(scale.float())).round().clamp(-QMAX, QMAX).to(torch.int8)


@fused
def quantize_channels_last(x: Tensor, scale: Tensor) -> Tensor:
    """int8 round(x / scale) of x [N, C, *S] (any memory format), written channels-last: [N, *S, C]
    contiguous, the layout of the GEMM operand (one pass: quantize and transpose together)."""
    v = (x.float() / _divisor(scale.float())).round().clamp(-QMAX, QMAX).to(torch.int8)
    return v.movedim(1, -1).contiguous()


@fused
def quantize_channels_last_pair(x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """`quantize_channels_last` as int8 and as fp32 (the integers, for a conv run in fp32), one pass."""
    v = (x.float() / _divisor(scale.float())).round().clamp(-QMAX, QMAX).movedim(1, -1)
    return v.to(torch.int8).contiguous(), v.contiguous()


@fused
def scale_accumulators(acc: Tensor, s_x: Tensor, s_w: Tensor, out: Tensor) -> Tensor:
    """out[m, o] = float(acc[m, o]) * (s_x * s_w[o]): the forward's dequantization of int32 accumulators,
    written into `out` (the caller's output tensor, whatever its strides)."""
    return out.copy_(acc.float() * (s_x * s_w))


@fused
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


@fused
def gradient_rows(dy: Tensor) -> Tensor:
    """dY [N, C, *S] stored contiguous as fp32 rows [M, C], channels last (what the gradient quantizers
    read), in one pass. Why compiled: ATen's transposing copy is slow on a CPU, and slowest where the
    channel stride is a multiple of 4 KiB (cache-set aliasing): one thread, 16x96x32x32, 4.5 ms against 0.68
    ms for the compiled loop (0.2 ms for a plain copy of the same bytes)."""
    return dy.float().movedim(1, -1).reshape(-1, dy.shape[1])


@fused
def scale_grad_input(acc: Tensor, scale: Tensor, dtype: torch.dtype, to_nchw: bool) -> Tensor:
    """dX = float(acc) * scale in `dtype`, from the accumulators [N, *S, C] of the channels-last pipeline
    (or a linear's), in one pass: stored as acc is, or [N, C, *S] contiguous when `to_nchw` (a model kept
    in torch's default layout gets dX in it without a transposing copy; see `gradient_rows` for why)."""
    v = (acc.float() * scale).to(dtype)
    return v.movedim(-1, 1).contiguous() if to_nchw else v


@fused
def scale_weight_gradient(acc: Tensor, s_gw: Tensor, s_x: Tensor) -> Tensor:
    """dW = float(acc) * s_gw[o] * s_x (this order: each product alone stays representable), written
    contiguous whatever acc's strides (the conv weight's layout from the GEMM's (kernel, channel) order)."""
    return (acc.float() * s_gw.view(-1, *([1] * (acc.dim() - 1))) * s_x).contiguous()


@fused
def quantize_weight_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 q [O, K], scale [O]) of a weight [O, ...] flattened per output channel, one scale per row
    (absmax / 127), as `quantize_per_channel(w.flatten(1), 0)`. Pass w in its own memory order: over a
    strided view the compiled pass loses its vectorised loads (int8fx.kernels.nhwc reorders the int8)."""
    wf = w.float().flatten(1)
    s = wf.abs().amax(dim=1) / QMAX
    return (wf / _divisor(s)[:, None]).round().clamp(-QMAX, QMAX).to(torch.int8), s
