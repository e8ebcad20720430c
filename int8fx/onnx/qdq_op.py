"""The INT8 site of the faithful export as one torch op, and its ONNX form for both of torch's exporters.

`torch.ops.int8fx.qdq_gemm(x, s_x, zp_x, W_int8, s_w, zp_w, bias, kind, strides, pads, dilations, groups,
output_padding)` computes, in float, what the QDQ pattern computes:

    x --Clip(-127 s_x)--QuantizeLinear(s_x, 0)--DequantizeLinear--> x~ --+
    W_int8 --DequantizeLinear(s_w[o], axis=0)--> W~ ---------------------+--> Conv | Gemm | MatMul(+Add)
                                                                              | ConvTranspose

and each exporter is told to emit exactly that pattern instead of tracing the float emulation:
`ONNX_TRANSLATIONS` (an onnxscript function) for the torch.export-based exporter, and a TorchScript
symbolic registered per opset for the TorchScript exporter. Why a custom op: torch.export decomposes
anything else into aten ops, and rounding and clamping come out as float `Round`/`Clip` math with no
QuantizeLinear in sight (the failure the issue describes).

The Clip: QuantizeLinear saturates at -128, int8fx's levels stop at -127; clipping at -127 s_x in front keeps
the file exact for inputs beyond the static clip. `kind` is "conv" (pads = begins + ends, ONNX order),
"gemm" (a 2-d input), "matmul" (more dimensions: MatMul with the transposed weight, then Add) or
"conv_transpose" (W [C_in, C_out, *k] with its output channels on axis 1, one group; `output_padding` is
used by this kind only).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("conv", "gemm", "matmul", "conv_transpose")
_CONV_TRANSPOSE = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


# (lists as `typing.List[...]`: the schema torch 2.5 infers for `qdq_gemm` from this signature knows no `list[...]`)
def _emulate(x: Tensor, x_scale: Tensor, x_zero_point: Tensor, w_int8: Tensor, w_scale: Tensor,
             w_zero_point: Tensor, bias: Optional[Tensor], kind: str, strides: List[int], pads: List[int],
             dilations: List[int], groups: int, output_padding: List[int]) -> Tensor:
    xq = torch.clamp(torch.round(x / x_scale), -127, 127) * x_scale  # as int8fx: symmetric, never -128
    w = dequantize_weight(w_int8, w_scale, kind == "conv_transpose")
    if kind == "conv_transpose":
        return conv_transpose_nd(xq, w, bias, strides, pads, dilations, groups, output_padding)
    return F.linear(xq, w, bias) if kind != "conv" else conv_nd(xq, w, bias, strides, pads, dilations, groups)


def dequantize_weight(w_int8: Tensor, w_scale: Tensor, transposed: bool) -> Tensor:
    """W_int8 * s_w per output channel: W's axis 0, or axis 1 for a transposed conv's W [C_in, C_out, *k]
    (one group)."""
    shape = [1] * w_int8.dim()
    shape[1 if transposed else 0] = -1
    return w_int8.float() * w_scale.view(shape)


def conv_transpose_nd(x: Tensor, w: Tensor, bias: Tensor | None, strides: list[int], pads: list[int],
                      dilations: list[int], groups: int, output_padding: list[int]) -> Tensor:
    """F.conv_transpose1d/2d/3d with ONNX's pads (begins + ends; a transposed site's are equal)."""
    nd = w.dim() - 2
    return _CONV_TRANSPOSE[nd - 1](x, w, bias, strides, list(pads[:nd]), output_padding, groups, dilations)


def conv_nd(x: Tensor, w: Tensor, bias: Tensor | None, strides: list[int], pads: list[int], dilations: list[int],
            groups: int) -> Tensor:
    """F.conv1d/2d/3d with ONNX's padding convention (begins + ends, possibly unequal)."""
    nd = w.dim() - 2
    lo, hi = list(pads[:nd]), list(pads[nd:])
    if lo != hi:
        x = F.pad(x, [p for d in reversed(range(nd)) for p in (lo[d], hi[d])])
        lo = [0] * nd
    return (F.conv1d, F.conv2d, F.conv3d)[nd - 1](x, w, bias, strides, lo, dilations, groups)


qdq_gemm = torch.library.custom_op("int8fx::qdq_gemm", _emulate, mutates_args=())
qdq_gemm.register_fake(_emulate)  # shapes: the emulation runs on fake tensors as it is


# --------------------------------------------------------------------------- torch.export-based exporter
def _qdq_gemm_onnx(x, x_scale, x_zero_point, w_int8, w_scale, w_zero_point, bias, kind, strides, pads, dilations,
                   groups, output_padding):
    from onnxscript import opset18 as op

    low = op.Mul(x_scale, op.Constant(value_float=-127.0))
    xq = op.QuantizeLinear(op.Clip(x, low), x_scale, x_zero_point)
    xdq = op.DequantizeLinear(xq, x_scale, x_zero_point)
    wdq = op.DequantizeLinear(w_int8, w_scale, w_zero_point, axis=1 if kind == "conv_transpose" else 0)
    if kind == "conv_transpose":
        return op.ConvTranspose(xdq, wdq, bias, strides=list(strides), pads=list(pads), dilations=list(dilations),
                                group=int(groups), output_padding=list(output_padding))
    if kind == "conv":
        return op.Conv(xdq, wdq, bias, strides=list(strides), pads=list(pads), dilations=list(dilations),
                       group=int(groups))
    if kind == "gemm":
        return op.Gemm(xdq, wdq, bias, transB=1)
    y = op.MatMul(xdq, op.Transpose(wdq, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


ONNX_TRANSLATIONS = {torch.ops.int8fx.qdq_gemm.default: _qdq_gemm_onnx}


# --------------------------------------------------------------------------- TorchScript exporter
def _qdq_gemm_symbolic(g, x, x_scale, x_zero_point, w_int8, w_scale, w_zero_point, bias, kind, strides, pads,
                       dilations, groups, output_padding):
    from torch.onnx import symbolic_helper as sh

    kind, groups = sh._maybe_get_const(kind, "s"), sh._maybe_get_const(groups, "i")
    low = g.op("Mul", x_scale, g.op("Constant", value_t=torch.tensor(-127.0)))
    xq = g.op("QuantizeLinear", g.op("Clip", x, low), x_scale, x_zero_point)
    xdq = g.op("DequantizeLinear", xq, x_scale, x_zero_point)
    wdq = g.op("DequantizeLinear", w_int8, w_scale, w_zero_point, axis_i=1 if kind == "conv_transpose" else 0)
    ins = (xdq, wdq) if sh._is_none(bias) else (xdq, wdq, bias)
    if kind == "conv_transpose":
        return g.op("ConvTranspose", *ins, strides_i=sh._maybe_get_const(strides, "is"),
                    pads_i=sh._maybe_get_const(pads, "is"), dilations_i=sh._maybe_get_const(dilations, "is"),
                    group_i=int(groups), output_padding_i=sh._maybe_get_const(output_padding, "is"))
    if kind == "conv":
        return g.op("Conv", *ins, strides_i=sh._maybe_get_const(strides, "is"), pads_i=sh._maybe_get_const(pads, "is"),
                    dilations_i=sh._maybe_get_const(dilations, "is"), group_i=int(groups))
    if kind == "gemm":
        return g.op("Gemm", *ins, transB_i=1)
    y = g.op("MatMul", xdq, g.op("Transpose", wdq, perm_i=[1, 0]))
    return y if sh._is_none(bias) else g.op("Add", y, bias)


_REGISTERED_OPSETS: set[int] = set()


def register_torchscript_symbolic(opset: int) -> None:
    """Tell the TorchScript exporter how to write `int8fx::qdq_gemm` at `opset` (registered per opset)."""
    if opset not in _REGISTERED_OPSETS:
        torch.onnx.register_custom_op_symbolic("int8fx::qdq_gemm", _qdq_gemm_symbolic, opset)
        _REGISTERED_OPSETS.add(opset)
