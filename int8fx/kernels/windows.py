"""The windows of a channels-last int8 activation as a conv's GEMM operand (im2col), and which copy makes them.

`im2col` gives Xcol [g, M, K/g]: rows = batch x output positions, columns = (kernel position, channel) of
each group, so that a window's channels are one contiguous run of the activation; `im2col_transposed` the
same, [g, K/g, M], for the weight gradient on CUDA, where cuBLASLt and the split-K GEMM read both operands
K-major and K is there the batch x positions being summed. Several copies make the same bytes, each fastest
somewhere: a 1x1 stride-1 conv needs none (a view); one or two channels, one copy per kernel position; else a
gather compiled for its exact shapes (`gather_windows`, int8fx.fusing); and on CUDA (`gpu_layouts`) one
strided view of the padded rows (`row_windows`), whose contiguous runs are window[-1] x C bytes instead of C,
timed against the gather once per shape (`ROWS`, a int8fx.kernels.probe.FasterOf: on an H200 the compiled
gather copied a 3-channel stem's windows byte by byte, 15 ms for what a 64-channel layer's took 0.27 ms;
benchmarks/RESULTS.md, 2026-12-04).
The CUDA forms equal the reference bit for bit on an H200 (tests/test_kernels_cuda.py, third and fourth GPU
leases); tests/test_cpu_backend.py runs them on the CPU against the reference too.
"""
from __future__ import annotations

import itertools
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from ..fusing import STATIC_AFTER, fused
from .im2col import GemmSpec
from .probe import FasterOf


def im2col(xq: Tensor, spec: GemmSpec) -> tuple[Tensor, tuple]:
    """int8 xq [N, *S, C] (contiguous) -> (Xcol [g, M, K/g], out size): rows = batch x positions, columns =
    (kernel position, channel) of each group. A 1x1 stride-1 conv without padding is a view."""
    n, *sizes, c = xq.shape
    pointwise = all(k == 1 for k in spec.kernel) and all(s == 1 for s in spec.stride) and not spec.has_padding
    if pointwise and spec.groups == 1:
        return xq.reshape(1, -1, c), tuple(sizes)
    out = spec.out_size(tuple(sizes))
    if spec.groups == 1 and c < 3:
        # one or two channels (a grayscale stem): one copy per kernel position, 5.5x faster than either gather
        # (128x28x28x1, 3x3: 0.33 ms against 1.84 ms for ATen's strided copy; the compiled one is slower still)
        padded = pad(xq, spec)
        slabs = [window(padded, offs, spec.kernel, spec.stride, spec.dilation, out)
                 for offs in itertools.product(*(range(k) for k in spec.kernel))]
        return torch.stack(slabs, dim=-2).view(1, -1, spec.window * c), out
    # compiled for its shapes where runs of channels are long enough: 1.5-4x faster than ATen's strided copy
    # (one thread, C/g 3 to 256), but 6x slower with one channel per group
    gather = gather_windows if c // spec.groups >= 3 else gather_windows.eager

    def gathered() -> Tensor:
        return gather(xq, spec.kernel, spec.stride, spec.padding, spec.dilation, spec.groups)
    if gpu_layouts(xq) and spec.groups == 1 and spec.dilation[-1] == 1:
        return ROWS((tuple(xq.shape), spec, xq.device), gathered, lambda: row_windows(xq, spec, out)), out
    return gathered(), out


def gpu_layouts(t: Tensor) -> bool:
    """Whether the operands of `t`'s site take the GPU's forms: the weight gradient's im2col written
    transposed (`im2col_transposed`) and the im2col copy measured per shape (`ROWS`, `TRANSPOSED`). On CUDA
    tensors; a function, so that a CPU test can run these forms through the CPU's GEMMs against the reference."""
    return t.is_cuda


def row_windows(xq: Tensor, spec: GemmSpec, out: tuple) -> Tensor:
    """`im2col`'s copy for one group and no dilation along the last spatial dim, read through one strided view:
    a window's (last kernel offset, channel) run is one contiguous stretch of the padded row, window[-1] x C
    bytes. On a GPU the compiled gather of a 3-channel stem (7x7/2, 256 images at 224 px) took 15 ms on an
    H200, byte by byte, against 0.27 ms for a 64-channel 3x3 layer of the same size."""
    padded = pad(xq, spec).contiguous()  # [N, *P, C]
    n, *_, c = padded.shape
    st = padded.stride()
    nd = spec.dims
    shape = (n, *out, *spec.kernel[:-1], spec.kernel[-1] * c)
    strides = (st[0], *(st[1 + i] * spec.stride[i] for i in range(nd)),
               *(st[1 + i] * spec.dilation[i] for i in range(nd - 1)), 1)
    return padded.as_strided(shape, strides).reshape(1, -1, spec.window * c)


DECIDE_AT = STATIC_AFTER  # a shape's call that measures: by then the gather is compiled for it (int8fx.fusing)


def _timed(fn, key) -> tuple[float, Tensor]:
    """(seconds, result) of one call of fn after STATIC_AFTER untimed ones (so that a compiled gather is timed
    compiled), CUDA synchronised on the key's device (its last item)."""
    for _ in range(STATIC_AFTER):
        fn()
    sync = torch.cuda.synchronize if key[-1].type == "cuda" else lambda device: None
    sync(key[-1])
    t = time.perf_counter()
    out = fn()
    sync(key[-1])
    return time.perf_counter() - t, out


# on CUDA, per input shape, the copy each form of the im2col takes; the first of each pair is the trusted one
ROWS = FasterOf(("the compiled im2col gather", "the strided-view im2col"), _timed, decide_at=DECIDE_AT)
TRANSPOSED = FasterOf(("the rows' im2col transposed", "the transposed im2col gather"), _timed, decide_at=DECIDE_AT)


def im2col_transposed(xq: Tensor, spec: GemmSpec) -> Tensor:
    """The im2col transposed, [g, K/g, M] contiguous: the weight gradient's B operand on CUDA, where cuBLASLt
    and the split-K GEMM read both operands K-major (here M, the batch x positions being summed): written so
    by the gather (measured against the rows and a transposing copy: resnet18's dW GEMMs spent 26 ms of a
    160 ms step on such copies, at batch 256 on an H200)."""
    def via_rows() -> Tensor:
        return im2col(xq, spec)[0].transpose(1, 2).contiguous()
    pointwise = all(k == 1 for k in spec.kernel) and all(s == 1 for s in spec.stride) and not spec.has_padding
    c = xq.shape[-1]
    if (pointwise and spec.groups == 1) or c // spec.groups < 3:
        return via_rows()
    return TRANSPOSED((tuple(xq.shape), spec, xq.device), via_rows, lambda: gather_windows(
        xq, spec.kernel, spec.stride, spec.padding, spec.dilation, spec.groups, True))


@fused(dynamic=False)
def gather_windows(xq: Tensor, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple, groups: int,
                    transposed: bool = False) -> Tensor:
    """`im2col`'s copy: the windows of xq [N, *S, C] as [g, M, window * C/g] ([g, window * C/g, M] when
    `transposed`)."""
    n, *sizes, c = xq.shape
    nd = len(kernel)
    if any(p for lohi in padding for p in lohi):
        xq = F.pad(xq, [0, 0] + [p for lohi in reversed(padding) for p in lohi])  # spatial dims only
    v = xq
    for i, (k, d, s) in enumerate(zip(kernel, dilation, stride)):
        v = v.unfold(1 + i, d * (k - 1) + 1, s)  # [N, *out, C, *window]
    if any(d > 1 for d in dilation):
        v = v[(Ellipsis,) + tuple(slice(None, None, d) for d in dilation)]
    out = v.shape[1:1 + nd]
    v = v.reshape(n, *out, groups, c // groups, *kernel)
    rows, cols = tuple(range(1, 1 + nd)), tuple(range(3 + nd, 3 + 2 * nd)) + (2 + nd,)  # (*out), (*kernel, C/g)
    m, k = n * math.prod(out), math.prod(kernel) * (c // groups)
    if transposed:  # -> [g, *kernel, C/g, N, *out]
        return v.permute((1 + nd,) + cols + (0,) + rows).reshape(groups, k, m)
    return v.permute((1 + nd, 0) + rows + cols).reshape(groups, m, k)  # -> [g, N, *out, *kernel, C/g]


def pad(t: Tensor, spec: GemmSpec) -> Tensor:
    """Zero-pad the spatial dims of a channels-last [N, *S, C] tensor."""
    return F.pad(t, [0, 0] + spec._pad_arg()) if spec.has_padding else t


def window(t: Tensor, offs: tuple, kernel: tuple, stride: tuple, dilation: tuple, out: tuple) -> Tensor:
    """The [N, *out, C] view of padded t read by kernel position `offs`."""
    return t[(slice(None),) + tuple(slice(f * d, f * d + s * (m - 1) + 1, s)
                                    for f, d, s, m in zip(offs, dilation, stride, out)) + (slice(None),)]
