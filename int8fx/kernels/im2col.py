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
from dataclasses import dataclass, replace

import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class GemmSpec:
    """Static geometry of one conv/linear site. dims = 0 means linear (channels last, no window).

    `transposed`: the site is the transposed conv of this geometry (`F.conv_transpose*d`), whose output
    is the conv's input: `conv` is the conv it is the adjoint of, and `output_padding` says which of the
    conv input sizes that map onto the transposed conv's input it produces."""

    dims: int
    kernel: tuple = ()
    stride: tuple = ()
    padding: tuple = ()  # per spatial dim: (before, after), zeros mode
    dilation: tuple = ()
    groups: int = 1
    transposed: bool = False
    output_padding: tuple = ()

    @property
    def is_linear(self) -> bool:
        return self.dims == 0

    @property
    def window(self) -> int:
        return math.prod(self.kernel) if self.kernel else 1

    @property
    def conv(self) -> "GemmSpec":
        """The (non-transposed) conv of this geometry."""
        return replace(self, transposed=False, output_padding=()) if self.transposed else self

    def out_size(self, in_size: tuple) -> tuple:
        if self.transposed:
            return tuple((n - 1) * s - lo - hi + d * (k - 1) + op + 1 for n, (lo, hi), d, k, s, op in
                         zip(in_size, self.padding, self.dilation, self.kernel, self.stride, self.output_padding))
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

    def tiles(self, in_size: tuple) -> bool:
        """Whether the windows tile an input of `in_size`: kernel = stride, no padding or dilation, and sizes
        that are whole numbers of windows (a patchify conv, a k2 s2 upsampling). No two windows overlap and
        none is left out, so col2im adds nothing up: it is a permutation."""
        return (not self.is_linear and self.kernel == self.stride and not self.has_padding
                and all(d == 1 for d in self.dilation) and all(n % k == 0 for n, k in zip(in_size, self.kernel)))


def _windows(x: Tensor, spec: GemmSpec) -> tuple[Tensor, tuple]:
    """Zero-pad x [N, C, *S] and return a strided view [N, C, *out, *kernel] of every window, no copy."""
    out = spec.out_size(tuple(x.shape[2:]))
    if spec.has_padding:
        x = F.pad(x, spec._pad_arg())
    v = x
    for i, (k, d, s) in enumerate(zip(spec.kernel, spec.dilation, spec.stride)):
        v = v.unfold(2 + i, d * (k - 1) + 1, s)
    if any(d > 1 for d in spec.dilation):
        v = v[(Ellipsis,) + tuple(slice(None, None, d) for d in spec.dilation)]
    return v, out


def _is_pointwise(spec: GemmSpec) -> bool:
    return all(k == 1 for k in spec.kernel) and all(s == 1 for s in spec.stride) and not spec.has_padding


def to_cols(x: Tensor, spec: GemmSpec) -> tuple[Tensor, tuple]:
    """x [N, C, *S] (or [..., K] for linear) -> (Xcol [g, M, K], out_spatial_size): the row-major GEMM
    layout (M = batch x positions) that the GPU kernels use."""
    if spec.is_linear:
        return x.reshape(1, -1, x.shape[-1]), ()
    n, c = x.shape[:2]
    g, nd = spec.groups, spec.dims
    v, out = _windows(x, spec)
    # v: [N, C, *out, *kernel] -> [g, N, *out, C/g, *kernel]; explicit sizes: -1 is ambiguous for N = 0
    v = v.reshape(n, g, c // g, *out, *spec.kernel)
    perm = (1, 0) + tuple(range(3, 3 + nd)) + (2,) + tuple(range(3 + nd, 3 + 2 * nd))
    cols = v.permute(perm).reshape(g, n * math.prod(out), (c // g) * spec.window)
    return cols, out


def unfold(x: Tensor, spec: GemmSpec) -> tuple[Tensor, tuple]:
    """x [N, C, *S] -> (cols [N, g, K, L], out): per sample, one K x L matrix per group (L = output
    positions). This is the CPU op's layout: `W[g] @ cols[n, g]` is the output already in [N, O, *out]
    order, and a stride-1 1x1 conv needs no copy at all. Linear is the case N = 1, cols = X^T (a view)."""
    if spec.is_linear:
        x2 = x.reshape(-1, x.shape[-1])
        return x2.t().view(1, 1, x2.shape[1], x2.shape[0]), ()
    n, c = x.shape[:2]
    g, nd = spec.groups, spec.dims
    if _is_pointwise(spec):
        return x.reshape(n, g, c // g, math.prod(x.shape[2:])), tuple(x.shape[2:])
    v, out = _windows(x, spec)
    v = v.reshape(n, g, c // g, *out, *spec.kernel)
    perm = (0, 1, 2) + tuple(range(3 + nd, 3 + 2 * nd)) + tuple(range(3, 3 + nd))
    return v.permute(perm).reshape(n, g, (c // g) * spec.window, math.prod(out)), out


def fold(dcols: Tensor, spec: GemmSpec, in_shape: tuple) -> Tensor:
    """Adjoint of `unfold`: [N, g, K, L] -> tensor of `in_shape`, overlapping windows summed (exactly, if
    the caller hands a dtype that holds the sums: see `reference.exact_sum_dtype`)."""
    if spec.is_linear:
        k, m = dcols.shape[-2:]
        return dcols.reshape(k, m).t().reshape(in_shape)
    n, c = in_shape[:2]
    if _is_pointwise(spec):
        return dcols.reshape(in_shape)
    out = spec.out_size(tuple(in_shape[2:]))
    if spec.tiles(tuple(in_shape[2:])):
        # [N, C, *kernel, *out] -> [N, C, out0, k0, out1, k1, ...]: one copy, any dtype (nothing is summed)
        nd = spec.dims
        v = dcols.reshape(n, c, *spec.kernel, *out)
        v = v.permute(0, 1, *(i for d in range(nd) for i in (2 + nd + d, 2 + d)))
        return v.reshape(in_shape)
    padded = tuple(sz + lo + hi for sz, (lo, hi) in zip(in_shape[2:], spec.padding))
    if spec.dims <= 2:
        as2d = lambda t: (1,) * (2 - spec.dims) + tuple(t)  # noqa: E731
        dx = F.fold(dcols.reshape(n, -1, dcols.shape[-1]) if n else dcols.new_zeros(0, c * spec.window, math.prod(out)),
                    as2d(padded), as2d(spec.kernel), dilation=as2d(spec.dilation), stride=as2d(spec.stride))
        return dx.reshape((n, c) + padded)[_unpad(spec, in_shape)]
    # 3-d: no F.fold; add each kernel offset's slab into a strided view of the padded input
    v = dcols.reshape(n, c, *spec.kernel, *out)
    dx = dcols.new_zeros((n, c) + padded)
    for offs in itertools.product(*(range(k) for k in spec.kernel)):
        sl = tuple(slice(o * d, o * d + s * (m - 1) + 1, s) for o, d, s, m in zip(offs, spec.dilation, spec.stride, out))
        dx[(slice(None), slice(None)) + sl] += v[(slice(None), slice(None)) + offs]
    return dx[_unpad(spec, in_shape)]


def from_cols(cols: Tensor, spec: GemmSpec, in_shape: tuple) -> Tensor:
    """Adjoint of `to_cols`: cols [g, M, K] -> tensor of `in_shape`, overlapping windows summed."""
    if spec.is_linear:
        return cols.reshape(in_shape)
    g, m, k = cols.shape
    n = in_shape[0]
    lsz = m // n if n else 0
    return fold(cols.reshape(g, n, lsz, k).permute(1, 0, 3, 2), spec, in_shape)


def _unpad(spec: GemmSpec, in_shape: tuple) -> tuple:
    return (slice(None), slice(None)) + tuple(slice(lo, lo + sz) for sz, (lo, _) in zip(in_shape[2:], spec.padding))


def output_to_rows(dy: Tensor, spec: GemmSpec) -> Tensor:
    """Layer-output-shaped dy -> [M, O] with channels last (the layout the gradient quantizers see)."""
    if spec.is_linear:
        return dy.reshape(-1, dy.shape[-1])
    return dy.movedim(1, -1).reshape(-1, dy.shape[1])
