"""One im2col/col2im for every convolution dimensionality (and for linear, as the 0-d case).

A layer is described by a `GemmSpec`. `to_cols` turns an activation into the grouped GEMM operand
Xcol[g, M, K] (M = batch x output positions, K = in-channels/groups x kernel window) using strided views
(`Tensor.unfold` once per spatial dim, then a dilation slice) and one copy. `from_cols` does the adjoint
(col2im) by adding each kernel offset's slab into a strided view, so 1d, 2d and 3d share one code path.
Padding in zeros mode happens here on the quantized tensor; other padding modes are applied in floating
point before quantization by the caller (padding copies values, so the per-tensor absmax is unchanged).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class GemmSpec:
    """Static geometry of one conv/linear site. dims = 0 means linear (channels last, no window)."""

    dims: int
    kernel: tuple = ()
    stride: tuple = ()
    padding: tuple = ()  # per spatial dim: (before, after), zeros mode
    dilation: tuple = ()
    groups: int = 1

    @property
    def is_linear(self) -> bool:
        return self.dims == 0

    @property
    def window(self) -> int:
        return math.prod(self.kernel) if self.kernel else 1

    def out_size(self, in_size: tuple) -> tuple:
        return tuple(
            (n + lo + hi - d * (k - 1) - 1) // s + 1
            for n, (lo, hi), d, k, s in zip(in_size, self.padding, self.dilation, self.kernel, self.stride)
        )

    def _pad_arg(self) -> list:
        # F.pad wants the last dim first
        return [p for lohi in reversed(self.padding) for p in lohi]

    @property
    def has_padding(self) -> bool:
        return any(p for lohi in self.padding for p in lohi)


def to_cols(x: Tensor, spec: GemmSpec) -> tuple[Tensor, tuple]:
    """x [N, C, *S] (or [..., K] for linear) -> (Xcol [g, M, K], out_spatial_size)."""
    if spec.is_linear:
        return x.reshape(1, -1, x.shape[-1]), ()
    n, c = x.shape[:2]
    g, nd = spec.groups, spec.dims
    out = spec.out_size(tuple(x.shape[2:]))
    if spec.has_padding:
        x = F.pad(x, spec._pad_arg())
    if all(k == 1 for k in spec.kernel):
        # 1x1: no window, only a strided subsample
        v = x[(slice(None), slice(None)) + tuple(slice(None, s * (o - 1) + 1, s) for s, o in zip(spec.stride, out))]
        m = math.prod(out)  # explicit sizes, not -1: an empty batch (n = 0) makes -1 ambiguous
        cols = v.reshape(n, g, c // g, m).permute(1, 0, 3, 2).reshape(g, n * m, c // g)
        return cols, out
    v = x
    for i, (k, d, s) in enumerate(zip(spec.kernel, spec.dilation, spec.stride)):
        v = v.unfold(2 + i, d * (k - 1) + 1, s)
    if any(d > 1 for d in spec.dilation):
        v = v[(Ellipsis,) + tuple(slice(None, None, d) for d in spec.dilation)]
    # v: [N, C, *out, *kernel] -> [g, N, *out, C/g, *kernel]
    v = v.reshape(n, g, c // g, *out, *spec.kernel)
    perm = (1, 0) + tuple(range(3, 3 + nd)) + (2,) + tuple(range(3 + nd, 3 + 2 * nd))
    cols = v.permute(perm).reshape(g, n * math.prod(out), (c // g) * spec.window)
    return cols, out


def from_cols(cols: Tensor, spec: GemmSpec, in_shape: tuple) -> Tensor:
    """Adjoint of `to_cols`: cols [g, M, K] -> tensor of `in_shape`, overlapping windows summed."""
    if spec.is_linear:
        return cols.reshape(in_shape)
    n, c = in_shape[:2]
    g, nd = spec.groups, spec.dims
    padded = tuple(sz + lo + hi for sz, (lo, hi) in zip(in_shape[2:], spec.padding))
    out = spec.out_size(tuple(in_shape[2:]))
    if nd <= 2:
        return _fold(cols, spec, (n, c) + padded, out)[_unpad(spec, in_shape)]
    # 3-d: no F.fold; add each kernel offset's slab into a strided view of the padded input
    # [g, N, *out, C/g, *kernel] -> [N, g, C/g, *out, *kernel]
    v = cols.reshape(g, n, *out, c // g, *spec.kernel)
    v = v.permute((1, 0, 2 + nd) + tuple(range(2, 2 + nd)) + tuple(range(3 + nd, 3 + 2 * nd)))
    v = v.reshape(n, c, *out, *spec.kernel)
    dx = cols.new_zeros((n, c) + padded)
    for offs in itertools.product(*(range(k) for k in spec.kernel)):
        sl = tuple(slice(o * d, o * d + s * (m - 1) + 1, s) for o, d, s, m in zip(offs, spec.dilation, spec.stride, out))
        dx[(slice(None), slice(None)) + sl] += v[(Ellipsis,) + offs]
    return dx[_unpad(spec, in_shape)]


def _unpad(spec: GemmSpec, in_shape: tuple) -> tuple:
    return (slice(None), slice(None)) + tuple(slice(lo, lo + sz) for sz, (lo, _) in zip(in_shape[2:], spec.padding))


def _fold(cols: Tensor, spec: GemmSpec, padded_shape: tuple, out: tuple) -> Tensor:
    """col2im of 1-d/2-d convolutions through F.fold (C++), 1-d as 2-d with height 1. The sum over
    overlapping windows is exact when the caller hands accumulators in a dtype that holds it exactly."""
    g, m, k = cols.shape
    n, c = padded_shape[:2]
    lsz = m // n if n else 0
    v = cols.reshape(g, n, lsz, k).permute(1, 0, 3, 2).reshape(n, g * k, lsz)
    as2d = lambda t: (1,) * (2 - spec.dims) + tuple(t)  # noqa: E731
    dx = F.fold(v, as2d(padded_shape[2:]), as2d(spec.kernel), dilation=as2d(spec.dilation), stride=as2d(spec.stride))
    return dx.reshape(padded_shape)


def cols_to_output(y: Tensor, spec: GemmSpec, batch_shape: tuple, out: tuple) -> Tensor:
    """GEMM result y [g, M, O/g] -> layer output [N, O, *out] (or [..., O] for linear)."""
    g = y.shape[0]
    if spec.is_linear:
        return y.reshape(*batch_shape, y.shape[-1])
    n = batch_shape[0]
    nd = len(out)
    y = y.reshape(g, n, *out, y.shape[-1]).permute((1, 0, 2 + nd) + tuple(range(2, 2 + nd)))
    return y.reshape(n, g * y.shape[2], *out)  # not -1: ambiguous for an empty batch


def output_to_rows(dy: Tensor, spec: GemmSpec) -> Tensor:
    """Layer-output-shaped dy -> [M, O] with channels last (the layout the gradient quantizers see)."""
    if spec.is_linear:
        return dy.reshape(-1, dy.shape[-1])
    return dy.movedim(1, -1).reshape(-1, dy.shape[1])
