"""The transposed conv as an INT8 training op: its conv's three integer products, with roles exchanged.

A transposed conv (`F.conv_transpose*d`) with weight W [C_in, C_out/g, *k] is the adjoint of the conv of
the same weight and geometry from C_out to C_in channels (`GemmSpec.conv`). So
    forward  Y  = the conv's dX product applied to X          (col2im of X . W)
    dX          = the conv's forward applied to dY             (im2col of dY . W^T)
    dW          = the conv's dW product with X in dY's role and dY in X's
and the exact layouts of `int8fx.kernels.layouts` serve unchanged, each exact as it is for a conv.

The quantizers keep their meaning: X per tensor; W per *output* channel, which for a transposed conv is W's
dim 1 within each group (dim 0 is the reduction); dY per output channel for dW, and (dY s_W[o]) per tensor
for dX, where the output channel o is reduced (as for a conv, `int8fx.nn.functional`). Every per-channel
scale therefore sits on an index the integer sums keep apart, and the results are the exact gradients of
the quantized forward (straight-through for the quantizers).

These sites run the layouts of the reference pipeline. On CPU an int8-operand backend ("torch": oneDNN's
int8 GEMM) computes their products, in the "rows" layout (one GEMM per group, the only one whose products
are GEMMs big enough for it); depthwise ones, and every transposed site on CUDA, take the reference
backend (fp32 GEMMs on integer values, K-chunked to stay exact). Either way the integers are the same.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kernels import layouts
from ..kernels.im2col import GemmSpec
from ..quant.core import quantize_per_channel


def weight_operand(weight: Tensor, groups: int, out_dtype) -> tuple[Tensor, Tensor]:
    """(W's integer codes in W's own layout as the conv's GEMM operand [C_in, C_out/g x window], one scale
    per output channel [C_out]): W quantized with one scale per output channel."""
    c_in, og = weight.shape[:2]
    g, window = groups, math.prod(weight.shape[2:])
    by_out = weight.reshape(g, c_in // g, og, window).transpose(1, 2).reshape(g * og, (c_in // g) * window)
    q, s_w = quantize_per_channel(by_out, 0, out_dtype=out_dtype)
    w_q = q.view(g, og, c_in // g, window).transpose(1, 2).reshape(c_in, og * window)
    return w_q, s_w


def _layout(backend, conv: GemmSpec, x_shape: tuple, out_channels: int) -> str:
    """"rows" for int8 operands (the other layouts' small products and fp32 taps are no place for them), else
    the layouts' own rule."""
    return "rows" if backend.operand_dtype == torch.int8 else layouts.layout_for(conv, x_shape, out_channels)


def forward(backend, x_op: Tensor, w_q: Tensor, spec: GemmSpec) -> Tensor:
    """Exact accumulators of the transposed conv [N, C_out, *out] from the quantized X [N, C_in, *in]."""
    y_shape = (x_op.shape[0], w_q.shape[1] // spec.window * spec.groups, *spec.out_size(tuple(x_op.shape[2:])))
    conv = spec.conv
    return layouts.grad_input(backend, x_op, w_q, conv, y_shape, _layout(backend, conv, y_shape, w_q.shape[0]))


def grad_input(backend, g_op: Tensor, w_q: Tensor, spec: GemmSpec) -> Tensor:
    """Exact integer dX [N, C_in, *in] from the quantized (dY s_W) `g_op` [N, C_out, *out]."""
    conv = spec.conv
    acc, _ = layouts.forward(backend, g_op, w_q, conv, _layout(backend, conv, tuple(g_op.shape), w_q.shape[0]))
    return acc


def grad_weight(backend, dq_op: Tensor, x_op: Tensor, spec: GemmSpec) -> Tensor:
    """Exact integer dW [C_in, C_out/g, window] from dY quantized per channel `dq_op` [N, C_out, *out] and
    the saved quantized X [N, C_in, *in]."""
    conv = spec.conv
    c_in = x_op.shape[1]
    x_rows = x_op.movedim(1, -1).reshape(-1, c_in)  # X in dY's role: rows [M, C_in]
    layout = _layout(backend, conv, tuple(dq_op.shape), c_in)
    acc = layouts.grad_weight(backend, x_rows.contiguous(), dq_op, conv, layout)  # [g, C_in/g, C_out/g x window]
    return acc.reshape(c_in, -1, spec.window)
