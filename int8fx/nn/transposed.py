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

On CPU these sites run the channels-last pipeline of conv sites (int8fx.kernels.nhwc), its products with
the same roles exchanged (`*_channels_last` below): the forward is nhwc's dX product of the int8 X, dX its
conv of the int8 dY (oneDNN's direct conv where measured faster, depthwise ones in exact fp32), dW its
weight gradient with X and dY swapped, so a decoder's upsampling costs about what its convs cost
(`benchmarks/transposed_sites.py` on one CPU: 1.0-1.6x an FP32 layer, where the layouts' products took
1.4-4.5x). On CUDA they run the layouts of the reference pipeline with the reference backend (fp32 GEMMs on
integer values, K-chunked to stay exact). The integers are the same either way
(tests/test_transposed.py compares the two pipelines bit for bit).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kernels import layouts, nhwc
from ..kernels.im2col import GemmSpec
from ..quant.core import quantize_per_channel
from ..quant.fused import quantize_operands


def weight_operand(weight: Tensor, groups: int, out_dtype) -> tuple[Tensor, Tensor]:
    """(W's integer codes in W's own layout as the conv's GEMM operand [C_in, C_out/g x window], one scale
    per output channel [C_out]): W quantized with one scale per output channel."""
    c_in, og = weight.shape[:2]
    g, window = groups, math.prod(weight.shape[2:])
    by_out = weight.reshape(g, c_in // g, og, window).transpose(1, 2).reshape(g * og, (c_in // g) * window)
    q, s_w = quantize_per_channel(by_out, 0, out_dtype=out_dtype)
    w_q = q.view(g, og, c_in // g, window).transpose(1, 2).reshape(c_in, og * window)
    return w_q, s_w


def forward(backend, x_op: Tensor, w_q: Tensor, spec: GemmSpec) -> Tensor:
    """Exact accumulators of the transposed conv [N, C_out, *out] from the quantized X [N, C_in, *in]."""
    y_shape = (x_op.shape[0], w_q.shape[1] // spec.window * spec.groups, *spec.out_size(tuple(x_op.shape[2:])))
    conv = spec.conv
    return layouts.grad_input(backend, x_op, w_q, conv, y_shape, layouts.layout_for(conv, y_shape, w_q.shape[0]))


def grad_input(backend, g_op: Tensor, w_q: Tensor, spec: GemmSpec) -> Tensor:
    """Exact integer dX [N, C_in, *in] from the quantized (dY s_W) `g_op` [N, C_out, *out]."""
    conv = spec.conv
    acc, _ = layouts.forward(backend, g_op, w_q, conv, layouts.layout_for(conv, tuple(g_op.shape), w_q.shape[0]))
    return acc


def grad_weight(backend, dq_op: Tensor, x_op: Tensor, spec: GemmSpec) -> Tensor:
    """Exact integer dW [C_in, C_out/g, window] from dY quantized per channel `dq_op` [N, C_out, *out] and
    the saved quantized X [N, C_in, *in]."""
    conv = spec.conv
    c_in = x_op.shape[1]
    x_rows = x_op.movedim(1, -1).reshape(-1, c_in)  # X in dY's role: rows [M, C_in]
    layout = layouts.layout_for(conv, tuple(dq_op.shape), c_in)
    acc = layouts.grad_weight(backend, x_rows.contiguous(), dq_op, conv, layout)  # [g, C_in/g, C_out/g x window]
    return acc.reshape(c_in, -1, spec.window)


# ------------------------------------------------------------------------------------ channels-last pipeline
def forward_channels_last(backend, x: Tensor, weight: Tensor, bias: Tensor | None, spec: GemmSpec,
                          act_clip: Tensor | None):
    """`int8fx.kernels.nhwc.forward` for a transposed conv: (y, x_q, s_x, w_q, s_w), y the conv's dX product
    of the int8 channels-last X, written by the same epilogue. W is quantized per output channel (its rows
    regrouped as in `weight_operand`) in the same call as X, then its int8 codes go to the pipeline's
    [C_in, window x C_out/g] (kernel position, channel) order."""
    c_in, og = weight.shape[:2]
    g, window = spec.groups, spec.window
    by_out = weight.detach().reshape(g, c_in // g, og, window).transpose(1, 2).reshape(g * og, -1)
    s_x, xq_cl, w_by_out, s_w = quantize_operands(x, act_clip, "channels_last", by_out)  # X [N, *S_in, C_in]
    w_q = w_by_out.view(g, og, c_in // g, window).permute(0, 2, 3, 1).reshape(c_in, window * og)
    y_shape = (x.shape[0], og * g, *spec.out_size(tuple(x.shape[2:])))
    acc = nhwc.grad_input(backend, xq_cl.view(-1, c_in), w_q, spec.conv, y_shape)  # [N, *S_out, C_out]
    return nhwc.write_output(acc, s_x, s_w, bias, x, weight, spec), xq_cl.movedim(-1, 1), s_x, w_q, s_w


def grad_input_channels_last(backend, gq: Tensor, w_q: Tensor, spec: GemmSpec, x_shape: tuple) -> Tensor:
    """Exact integer dX [N, *S_in, C_in] (channels last) from the quantized (dY s_W) rows `gq` [M, C_out]:
    the conv's forward product applied to dY."""
    n, c_in, *sizes = x_shape
    dyq = gq.view(n, *spec.out_size(tuple(sizes)), gq.shape[1])
    return nhwc.conv_accumulators(backend, dyq, w_q, spec.conv)


def grad_weight_channels_last(backend, dq: Tensor, x_q: Tensor, spec: GemmSpec, w_shape) -> Tensor:
    """Exact integer dW [C_in, C_out/g, *k] from dY quantized per channel `dq` [M, C_out] and the saved int8
    X (channels-last [N, C_in, *S_in]): the conv's dW product with X in dY's role and dY in X's."""
    n, c_in, *sizes = x_q.shape
    dy_cl = dq.view(n, *spec.out_size(tuple(sizes)), dq.shape[1]).movedim(-1, 1)  # [N, C_out, *S_out], X's role
    return nhwc.grad_weight(backend, x_q.movedim(1, -1).reshape(-1, c_in), dy_cl, spec.conv, w_shape)


def per_output_channel(dw: Tensor, s_gw: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """(dW as [g, C_in/g, C_out/g, window], s_gW as [g, 1, C_out/g, 1]): the weight gradient's output-channel
    scale placed on W's dim 1 within each group, for the epilogue to multiply (a view where dW allows)."""
    c_in, og = dw.shape[:2]
    return dw.reshape(groups, c_in // groups, og, -1), s_gw.view(groups, 1, og, 1)


CHANNELS_LAST = (grad_input_channels_last, grad_weight_channels_last)  # (dX, dW) products, as nhwc's
