"""The channels-last INT8 pipeline: each conv/linear site as one integer GEMM per group on int8 operands.

For backends whose GEMM takes int8 operands (`torch._int_mm`), channels-last rows need the fewest copies:
    forward  Xcol[M, K] (int8 im2col of the channels-last activation)  x  W[O, K]^T   -> Y[M, O]
    dX       dYq[M, O] x W[O, K] -> dXcol[M, K] (int32) -> col2im, in int32 (exact) -> dX channels-last
    dW       dYq[M, O]^T x Xcol[M, K]                                                -> dW[O, K]
with M = batch x output positions. Why this layout: the quantizer writes the activation channels-last in
the same pass (int8fx.quant.fused), a 1x1 stride-1 conv and a linear layer need no im2col at all (Xcol is
a view), and Y[M, O] is the channels-last output. That is returned as such when the input or the weight is
channels-last (torch's rule for its own convs; a model run channels-last then needs no copy anywhere, and
the gradient that comes back is the [M, O] matrix both gradient quantizers read), else written contiguous
by the same epilogue pass, with dX following dY's layout. The reduction index K is ordered (kernel position, channel) within each
group, so im2col copies contiguous channel runs; the small weight is reordered to match, and dW back.

A conv's forward and a stride-1 conv's dX (itself a conv of dY) take oneDNN's direct conv instead of
im2col + GEMM where that measured faster for the geometry (int8fx.kernels.direct: its int8 conv with the
"torch" backend, its fp32 conv on the integer-valued operands with the reference), and dW its fp32 weight
gradient by chunks of images: the im2col of a 3x3 conv on a large map with few channels is a copy nine
times the activation, which the direct conv never makes.

Exactness: the GEMMs are exact (int8fx.kernels.torch_backend), col2im adds int32 sums whose bound
127^2 x O/g x window stays below 2^31 (int64 beyond), and every float is made from an exact integer the way
the reference makes it (one rounding to fp32, then the scales), so the results equal the reference's bit for
bit (tests/test_cpu_backend.py).

The im2col, its forms and which copy makes them: int8fx.kernels.windows (on CUDA dW reads it transposed,
`windows.im2col_transposed`).

Depthwise convolutions are no GEMMs (a 1 x window product per channel): their forward and dX run as
torch's own depthwise conv on the integer-valued operands in fp32, exact because every output is a sum of
at most `window` products below 2^24 (`_dw_conv`); dW, a sum over every position of the batch, is reduced
per kernel position in int32 (int64 where a sum could overflow) by a fused pass (`_dw_grad_weight`).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format

from ..fusing import SUM_DTYPE, fused
from ..quant.fused import (
    quantize_operands,
    scale_accumulators,
    scale_accumulators_bias,
)
from . import direct, windows
from .im2col import GemmSpec

QMAX = 127


def applies(backend, device: torch.device, spec: GemmSpec, x_shape: tuple, out_channels: int) -> bool:
    """Whether a site runs on this pipeline: every site of an int8-operand backend, and every CPU site (the
    reference GEMM on a CPU without int8 dot products: measured against its own pipeline, int8fx.kernels.
    layouts, on one CPU, resnet18 / mobilenet_v2 / smallcnn steps took 0.8 / 0.6 / 1.0x the time). On CUDA
    the reference keeps its own pipeline: it is what the GPU kernels are checked against."""
    return backend.operand_dtype == torch.int8 or device.type == "cpu"


def is_depthwise(spec: GemmSpec, x_shape: tuple, out_channels: int) -> bool:
    """A depthwise conv whose window is small enough for fp32 sums to stay exact (`_dw_conv`); a larger
    window (beyond 1040 positions) takes the per-group GEMMs."""
    return (not spec.is_linear and spec.groups > 1 and spec.groups == x_shape[1] == out_channels
            and spec.window <= 1040)


def saved_activation_shape(x_shape: tuple, spec: GemmSpec) -> tuple:
    """Shape and strides of the saved int8 activation: x's shape, channels-last strides for a conv."""
    if spec.is_linear:
        return tuple(x_shape), None
    n, c, *sizes = x_shape
    return tuple(x_shape), (n, *sizes, c)  # stored [N, *S, C] contiguous, viewed as [N, C, *S]


def output_layout(y_shape: tuple, spec: GemmSpec) -> tuple | None:
    """The [N, *S, O] storage of a conv's output (viewed [N, O, *S]); None for linear (contiguous)."""
    if spec.is_linear:
        return None
    n, o, *sizes = y_shape
    return (n, *sizes, o)


# ------------------------------------------------------------------------------------------------ operands
def _weight_rows(weight: Tensor, spec: GemmSpec) -> Tensor:
    """[O, C/g, *k] -> [O, *k, C/g]: the weight with its reduction index in (kernel position, channel)
    order, as a view."""
    return weight if spec.is_linear else weight.movedim(1, -1)


def _weight_source(weight: Tensor, spec: GemmSpec):
    """(the tensor whose rows `quantize_weight_rows` quantizes, a function putting its int8 result [O, K] in this
    pipeline's K order). Quantized in the weight's own order and then reordered as int8: a row's absmax does
    not depend on the order, and a compiled pass over the strided reordering view ran 5x slower (no vectorised
    loads) than a contiguous pass plus a 1-byte copy."""
    if spec.is_linear:
        return weight.contiguous(), _same
    rows = _weight_rows(weight, spec)
    if rows.is_contiguous():  # a channels-last weight is stored in this order already
        return rows.reshape(weight.shape[0], -1), _same
    return weight.contiguous(), lambda w_q: _weight_rows(w_q.view(weight.shape), spec).reshape(weight.shape[0], -1)


def _same(w_q: Tensor) -> Tensor:
    return w_q


def _weight_from_rows(w: Tensor, spec: GemmSpec, w_shape) -> Tensor:
    """Inverse of `_weight_rows` (for dW)."""
    if spec.is_linear:
        return w.reshape(w_shape)
    o, cg, *k = w_shape
    return w.reshape(o, *k, cg).movedim(-1, 1)




def _conv(backend, xq_cl: Tensor, w: Tensor, spec: GemmSpec) -> tuple[Tensor, tuple]:
    """(acc [M, O], output size): the exact integer conv of int8 xq_cl [N, *S, C] with the int8 weight as
    the GEMM's operand w [g, K/g, O/g] (K in (kernel position, channel) order). im2col and one GEMM per
    group, or oneDNN's direct conv where this geometry measured faster (int8fx.kernels.direct); the
    same integers either way (the direct conv's held in fp32)."""
    n, *sizes, c = xq_cl.shape
    g = spec.groups
    o = g * w.shape[2]

    def gemm() -> Tensor:
        cols, _ = windows.im2col(xq_cl, spec)  # [g, M, K/g]
        acc = _per_group(backend, cols, w)  # [g, M, O/g]
        return acc[0] if g == 1 else acc.transpose(0, 1).reshape(-1, o)

    out = spec.out_size(tuple(sizes))
    pointwise = all(k == 1 for k in spec.kernel) and all(s == 1 for s in spec.stride) and not spec.has_padding
    form = None if pointwise and g == 1 else direct.usable(backend, xq_cl, spec, c)  # (1x1: no im2col to save)
    if form is None:
        return gemm(), out
    return direct.choose((form, tuple(xq_cl.shape), o, spec), lambda: direct.conv(xq_cl, w, spec, form).view(-1, o),
                         gemm), out


def _per_group(backend, a: Tensor, b: Tensor) -> Tensor:
    """Exact a [g, P, Q] @ b [g, Q, R] -> [g, P, R] integers, one GEMM per group."""
    return torch.stack([backend.bmm(a[i:i + 1], b[i:i + 1])[0] for i in range(a.shape[0])]) if a.shape[0] > 1 \
        else backend.bmm(a, b)


def _group_columns(t: Tensor, g: int) -> Tensor:
    """[M, O] -> [g, M, O/g] with each group's columns contiguous."""
    if g == 1:
        return t.unsqueeze(0)
    m, o = t.shape
    return t.view(m, g, o // g).transpose(0, 1).contiguous()


# ------------------------------------------------------------------------------------------------ forward
def forward(backend, x: Tensor, weight: Tensor, bias: Tensor | None, spec: GemmSpec, act_clip: Tensor | None):
    """(y, x_q, s_x, w_q [O, K], s_w): y channels-last for convs; x_q the int8 activation (channels-last for
    convs) kept for backward; w_q in this pipeline's K order. `act_clip` as in quantized_forward."""
    o = weight.shape[0]
    w_src, in_k_order = _weight_source(weight.detach(), spec)
    # a depthwise conv runs in fp32 on the integer values: the quantizer writes them too, in the same pass
    form = "rows" if spec.is_linear else "channels_last_pair" if is_depthwise(spec, x.shape, o) else "channels_last"
    s_x, x_q, *xf_cl, w_q, s_w = quantize_operands(x, act_clip, form, w_src)  # both operands in one call
    w_q = in_k_order(w_q)  # [O, K] int8
    if spec.is_linear:
        acc = backend.bmm(x_q.reshape(1, -1, x.shape[-1]), w_q.t().unsqueeze(0))[0]  # [M, O]
        return write_output(acc.view(*x.shape[:-1], o), s_x, s_w, bias, x, weight, spec), x_q, s_x, w_q, s_w
    acc = conv_accumulators(backend, x_q, w_q, spec, *xf_cl)  # x_q channels-last [N, *S, C]; acc [N, *out, O]
    return write_output(acc, s_x, s_w, bias, x, weight, spec), x_q.movedim(-1, 1), s_x, w_q, s_w


def conv_accumulators(backend, xq_cl: Tensor, w_q: Tensor, spec: GemmSpec, xf_cl: Tensor | None = None) -> Tensor:
    """The exact integer conv [N, *out, O] of the int8 channels-last xq_cl [N, *S, C] with the int8 weight
    w_q [O, K] (K in (kernel position, channel) order): integers (int32/int64), or for a depthwise conv
    integer values in fp32 (`_dw_conv`, on `xf_cl`: xq_cl's values in fp32 where the caller has them)."""
    n, *sizes, c = xq_cl.shape
    o, g = w_q.shape[0], spec.groups
    if is_depthwise(spec, (n, c, *sizes), o):
        xf = xq_cl.float() if xf_cl is None else xf_cl
        return _dw_conv(xf.movedim(-1, 1), w_q.view(o, 1, *spec.kernel).float(), spec).movedim(1, -1)
    acc, out = _conv(backend, xq_cl, w_q.view(g, o // g, -1).transpose(1, 2), spec)  # [M, O]
    return acc.view(n, *out, o)


def write_output(acc: Tensor, s_x: Tensor, s_w: Tensor, bias: Tensor | None, x: Tensor, weight: Tensor,
                 spec: GemmSpec) -> Tensor:
    """y = float(acc) s_X s_W[o] (+ bias) from the accumulators [N, *out, O] (channels last; a linear's
    [..., O]), in one pass: a tensor of its own (not a view: autograd lets a view of a Function's output be
    modified in place by nothing, and ReLU(inplace=True) follows convs), for a conv [N, O, *out] stored
    channels-last or contiguous by torch's rule (`output_channels_last`)."""
    if spec.is_linear:
        y = x.new_empty(acc.shape, dtype=torch.float32)
        rows = y
    else:
        n, *out, o = acc.shape
        y_shape = (n, o, *out)
        y = (empty_channels_last(y_shape, torch.float32, x.device) if output_channels_last(x, weight)
             else x.new_empty(y_shape, dtype=torch.float32))
        rows = y.movedim(1, -1)  # the epilogue writes either layout in one pass
    if bias is None:
        scale_accumulators(acc, s_x, s_w, rows)
    else:
        scale_accumulators_bias(acc, s_x, s_w, bias, rows)
    return y


def stored_channels_last(t: Tensor) -> bool:
    """Whether torch takes a 4-d/5-d tensor for channels-last (its strides ordered like channels-last: the
    rule its own convolutions apply to choose their output's layout, and a gradient's dX's). Remembered per
    (sizes, strides) for plain tensors: torch's rule is Python (1.7 us in isolation, a dictionary lookup
    0.4 us), asked three times a site and step (fake and symbolic tensors ask it each time)."""
    if t.dim() not in (4, 5):
        return False
    if type(t) is not Tensor and type(t) is not torch.nn.Parameter:
        return suggest_memory_format(t) != torch.contiguous_format
    key = (t.shape, t.stride())
    known = _CHANNELS_LAST.get(key)
    if known is None:
        if len(_CHANNELS_LAST) > 4096:  # (a detector's stream of sizes: keep memory bounded)
            _CHANNELS_LAST.clear()
        known = _CHANNELS_LAST[key] = suggest_memory_format(t) != torch.contiguous_format
    return known


_CHANNELS_LAST: dict = {}


def output_channels_last(x: Tensor, weight: Tensor) -> bool:
    """torch's rule for a convolution's output layout: channels-last when the input or the weight is stored
    channels-last, else contiguous. The pipeline computes channels-last either way; following the rule keeps
    the converted model's tensors what the user's code expects (`y.view(n, -1)` on a conv output works),
    and a model put in channels-last (`model.to(memory_format=torch.channels_last)` and its inputs) gets
    channels-last outputs without a copy, as in FP32."""
    return stored_channels_last(x) or stored_channels_last(weight)


def empty_channels_last(shape, dtype, device) -> Tensor:
    """An empty [N, C, *S] tensor stored [N, *S, C] (channels-last strides, any number of spatial dims),
    not a view of anything."""
    n, c, *sizes = shape
    strides, acc = [], 1
    for size in reversed((n, *sizes, c)):
        strides.append(acc)
        acc *= max(size, 1)
    st_n, *st_s, st_c = reversed(strides)
    return torch.empty_strided(tuple(shape), (st_n, st_c, *st_s), dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------ backward
def grad_input(backend, gq: Tensor, w_q: Tensor, spec: GemmSpec, x_shape: tuple) -> Tensor:
    """Exact integer dX (int32 or int64; for depthwise convs fp32 holding exact integers) from the quantized
    dY s_W [M, O] (int8; for a depthwise conv int8 or the same integers in fp32, which the gradient
    quantizer writes for it): [N, *S, C] for a conv (channels-last storage), x_shape for linear.

    A stride-1 conv's dX is itself a stride-1 conv of dY with the flipped weight (a full correlation), so
    it is computed as one: an int8 im2col of dY and one GEMM, with no col2im. Other strides take
    dXcol = dY W and add the kernel positions' slabs into dX (col2im, in int32)."""
    o, g = w_q.shape[0], spec.groups
    if is_depthwise(spec, x_shape, o):
        n, c, *sizes = x_shape
        dy = gq.float().view(n, *spec.out_size(tuple(sizes)), o).movedim(-1, 1)  # channels-last (fp32: no copy)
        dx = _dw_conv_transpose(dy, w_q.view(o, 1, *spec.kernel).float(), spec, tuple(sizes))
        # exact integers in fp32 (each a sum of at most `window` products), stored channels-last like every dX
        # here: a gradient in another layout than its activation sends BatchNorm's and ReLU's backward to slow
        # mixed-format kernels (3-4x)
        return dx.movedim(1, -1)
    transposed = None if spec.is_linear else _transposed_conv(spec, x_shape, o)
    if transposed is not None:
        n, c, *sizes = x_shape
        dyq = gq.view(n, *spec.out_size(tuple(sizes)), o)
        dx, _ = _conv(backend, dyq, _flipped_weight(w_q, spec, c), transposed)  # [M_x, C]
        return dx.view(n, *sizes, c)
    dcols = _per_group(backend, _group_columns(gq, g), w_q.view(g, o // g, -1))  # [g, M, K/g]
    if spec.is_linear:
        return dcols[0].reshape(x_shape)
    n, c, *sizes = x_shape
    pointwise = all(k == 1 for k in spec.kernel) and all(s == 1 for s in spec.stride) and not spec.has_padding
    if pointwise and g == 1:
        return dcols[0].view(n, *sizes, c)
    out = spec.out_size(tuple(sizes))
    nd = spec.dims
    if spec.tiles(tuple(sizes)):  # windows that tile X (a k2 s2 upsampling's forward): col2im is a permutation
        v = dcols.view(g, n, *out, *spec.kernel, c // g)  # -> [N, out0, k0, out1, k1, ..., g, C/g]
        v = v.permute(1, *(i for d in range(nd) for i in (2 + d, 2 + nd + d)), 0, 2 + 2 * nd)
        return v.reshape(n, *sizes, c)
    bound = QMAX**2 * (o // g) * spec.window
    if dcols.is_floating_point():  # the reference GEMM's exact sums: fp32 while every sum stays below 2^24
        dtype = torch.float32 if bound < 2**24 and dcols.dtype == torch.float32 else torch.float64
    else:
        dtype = torch.int32 if bound < 2**31 and dcols.dtype == torch.int32 else torch.int64
    padded = tuple(sz + lo + hi for sz, (lo, hi) in zip(sizes, spec.padding))
    dx = torch.zeros((n, *padded, c), dtype=dtype, device=gq.device)
    slabs = dcols.view(g, n, *out, *spec.kernel, c // g)
    groups_view = dx.view(n, *padded, g, c // g).movedim(-2, 0)  # [g, N, *padded, C/g]
    for offs in itertools.product(*(range(k) for k in spec.kernel)):
        sl = tuple(slice(f * d, f * d + s * (m - 1) + 1, s) for f, d, s, m in zip(offs, spec.dilation, spec.stride, out))
        groups_view[(slice(None), slice(None)) + sl] += slabs[(slice(None),) * (2 + nd) + offs]
    return dx[(slice(None),) + tuple(slice(lo, lo + sz) for sz, (lo, _) in zip(sizes, spec.padding))]


def _transposed_conv(spec: GemmSpec, x_shape: tuple, out_channels: int) -> GemmSpec | None:
    """The stride-1 conv that maps dY to dX for a stride-1 `spec` (flipped weight, padding d(k-1) - p on
    each side), or None where that does not apply (strides, padding beyond d(k-1), a 1x1 conv, which needs
    nothing: its dXcol is dX)."""
    if any(s != 1 for s in spec.stride) or all(k == 1 for k in spec.kernel):
        return None
    pads = tuple((d * (k - 1) - lo, d * (k - 1) - hi) for (lo, hi), d, k in zip(spec.padding, spec.dilation, spec.kernel))
    if any(p < 0 for lohi in pads for p in lohi):
        return None
    return GemmSpec(spec.dims, spec.kernel, spec.stride, pads, spec.dilation, spec.groups)


def _flipped_weight(w_q: Tensor, spec: GemmSpec, in_channels: int) -> Tensor:
    """[g, window * O/g, C/g]: the int8 weight [O, K] ((kernel position, channel) order) flipped in space,
    with input and output channels swapped: the transposed conv's GEMM operand. (Its copy keeps runs of
    C/g contiguous; one that moved C/g outermost made resnet18's 512x512 sites' backward 1.6x slower.)"""
    o, g, nd = w_q.shape[0], spec.groups, spec.dims
    w = w_q.view(g, o // g, *spec.kernel, in_channels // g).flip(tuple(range(2, 2 + nd)))
    return w.movedim(1, 1 + nd).reshape(g, -1, in_channels // g)  # [g, *kernel, O/g, C/g]: rows (kernel, o)


def grad_weight(backend, dq: Tensor, x_q: Tensor, spec: GemmSpec, w_shape) -> Tensor:
    """Exact integer dW in the weight's own layout, from the quantized dY [M, O] (int8) and the saved int8
    activation (channels-last for a conv): im2col and one GEMM per group, or oneDNN's fp32 weight gradient
    by chunks of images where this geometry measured faster (int8fx.kernels.direct.grad_weight)."""
    o, g = dq.shape[1], spec.groups
    if is_depthwise(spec, tuple(x_q.shape), o):
        xq_cl = x_q.movedim(1, -1)
        dy = dq.view(xq_cl.shape[0], *spec.out_size(tuple(xq_cl.shape[1:-1])), o)
        acc = _dw_grad_weight(dy, windows.pad(xq_cl, spec), spec.kernel, spec.stride, spec.dilation)  # [C, *k]
        return acc.view(w_shape)

    def gemm() -> Tensor:
        if spec.is_linear:
            cols = x_q.reshape(1, -1, x_q.shape[-1])
        elif windows.gpu_layouts(x_q):  # [g, M, K/g] as a view of the transposed im2col
            cols = windows.im2col_transposed(x_q.movedim(1, -1), spec).transpose(1, 2)
        else:
            cols, _ = windows.im2col(x_q.movedim(1, -1), spec)  # [g, M, K/g]
        # [g, O/g, M]; with one group the transposed view itself: oneDNN reads it as a column-major operand, which
        # saves the int8 transpose (smallcnn's 100352 x 16 dY: 1.8 ms for transpose and GEMM together, not 3.7)
        dqt = dq.t().reshape(g, o // g, -1).contiguous() if g > 1 else dq.t().unsqueeze(0)
        acc = _per_group(backend, dqt, cols)  # [g, O/g, K/g]
        return _weight_from_rows(acc.reshape(o, -1), spec, w_shape)

    if not direct.weight_grad_usable(backend, x_q, spec):
        return gemm()
    return direct.choose(("dW", backend.name, tuple(x_q.shape), o, spec),
                         lambda: direct.grad_weight(dq, x_q, spec, w_shape), gemm)


# ------------------------------------------------------------------------------------------------ depthwise
_DW_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DW_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _dw_conv(x: Tensor, w: Tensor, spec: GemmSpec) -> Tensor:
    """A depthwise conv of integer-valued fp32 operands (x channels-last): exact, since each output sums at
    most `window` (<= 1040) products of at most 127^2 and any order of such a sum is exact in fp32; oneDNN's
    direct depthwise kernel does it ~15x faster than a fused int32 loop. Symmetric padding is the conv's
    own (no padded copy)."""
    symmetric = all(lo == hi for lo, hi in spec.padding)
    pad = tuple(lo for lo, _ in spec.padding) if symmetric else 0
    if not symmetric:
        x = F.pad(x, [p for lohi in reversed(spec.padding) for p in lohi])
    return _DW_CONV[spec.dims](x, w, None, spec.stride, pad, spec.dilation, spec.groups)


def _dw_conv_transpose(dy: Tensor, w: Tensor, spec: GemmSpec, sizes: tuple) -> Tensor:
    """dX of a depthwise conv as the transposed conv of dY (exact for the same reason as `_dw_conv`; 45x
    faster than torch.nn.grad.conv2d_input, which takes a generic path). Symmetric padding is the transposed
    conv's own, so dX is written at its size: computing over the padded input and cropping (what asymmetric
    padding takes) wrote a larger fresh tensor and returned a strided view: 8.6 -> 6.2 ms of mobilenet_v2's
    step (batch 16, 64x64, one thread, timed in place)."""
    symmetric = all(lo == hi for lo, hi in spec.padding)
    pads = tuple(lo for lo, _ in spec.padding) if symmetric else (0,) * spec.dims
    target = sizes if symmetric else tuple(sz + lo + hi for sz, (lo, hi) in zip(sizes, spec.padding))
    reach = tuple((m - 1) * st - 2 * p + d * (k - 1) + 1
                  for m, st, p, d, k in zip(dy.shape[2:], spec.stride, pads, spec.dilation, spec.kernel))
    extra = tuple(t - r for t, r in zip(target, reach))  # in [0, stride): torch's output_padding
    dx = _DW_CONV_T[spec.dims](dy, w, None, spec.stride, pads, extra, spec.groups, spec.dilation)
    if symmetric:
        return dx
    return dx[(slice(None), slice(None)) + tuple(slice(lo, lo + sz) for sz, (lo, _) in zip(sizes, spec.padding))]


@fused
def _dw_grad_weight(dy: Tensor, x: Tensor, kernel: tuple, stride: tuple, dilation: tuple) -> Tensor:
    """Integer dW [C, *k] of a depthwise conv: per kernel position, the sum over batch and positions of
    dY (int8 [N, *out, C]) times the window of x (int8, padded, channels-last) it met. Summed in int32
    where every sum fits (127^2 x N x positions < 2^31: 16 images at 32x32 and far beyond), whose loops
    vectorise: 1.4-1.8x faster than int64 sums on mobilenet_v2's sites; int64 beyond (and on a torch whose
    inductor cannot compile int32 sums: `fusing.SUM_DTYPE`)."""
    out = tuple(dy.shape[1:-1])
    dims = tuple(range(len(out) + 1))
    acc = SUM_DTYPE if QMAX**2 * math.prod(dy.shape[:-1]) < 2**31 else torch.int64
    parts = [(dy.to(torch.int32) * windows.window(x, offs, kernel, stride, dilation, out).to(torch.int32))
             .sum(dims, dtype=acc) for offs in itertools.product(*(range(k) for k in kernel))]
    return torch.stack(parts, dim=-1).view(x.shape[-1], *kernel)
