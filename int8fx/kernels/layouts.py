"""How one conv/linear site becomes exact integer products: three layouts, chosen per call.

All three compute the same integers (tests check each against a naive int64 convolution); they differ
only in memory traffic, which is what a CPU step costs. Measured per layer on the 2-core dev machine
(single-thread CPU time of fwd+bwd, ratio to the FP32 layer, batch 16, per-tensor gradients):
  * "rows": Xcol [g, M, K] with M = batch x positions, one GEMM per group. Best when a sample has few
    output positions: ResNet-18 layer3/layer4 at 64x64 input (L = 16/4) run at 2.2x/1.4x, against
    10x/26x with per-sample GEMMs, which degenerate into skinny products. Also the natural layout of
    linear layers, and the GPU kernels' layout.
  * "samples": per sample, W[g] @ cols[n, g] with cols [N, g, K, L]. The result is already in
    [N, O, *spatial] order and the dX product feeds F.fold without a permute; a stride-1 1x1 conv needs
    no copy. Best for many positions per sample: at L = 256, 3.3x vs 3.7x (3x3) and 2.1x vs 2.7x (1x1).
  * "direct": depthwise convs as a shift-multiply-add over the kernel taps, with no im2col and no
    1 x 9 GEMMs: 6-8x FP32's (very fast) depthwise kernel, against 15-40x in either GEMM layout.
dW follows the forward's layout: per-sample products summed in fp64 for "samples" (the rows layout's
[g, M, K] im2col gathers 6x slower than the per-sample one at L = 256), one long reduction over M for
"rows", taps for "direct".

Operands are integer-valued tensors in the backend's operand dtype; results are exact accumulators
(fp32 where the bound is below 2^24, else fp64/int64), never rounded.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from .im2col import GemmSpec, _windows, fold, from_cols, to_cols, unfold
from .reference import exact_sum_dtype

QMAX = 127
SAMPLES_MIN_POSITIONS = 64  # below this many output positions per sample, "rows" wins (see above)


def layout_for(spec: GemmSpec, x_shape: tuple, out_channels: int) -> str:
    """The layout one call uses (see the module docstring for the measurements behind the rule)."""
    if spec.is_linear:
        return "rows"
    if spec.groups == x_shape[1] == out_channels and spec.window <= 1040:
        return "direct"
    positions = math.prod(spec.out_size(tuple(x_shape[2:])))
    return "samples" if positions >= SAMPLES_MIN_POSITIONS else "rows"


# ----------------------------------------------------------------------------------------- GEMM helpers
def _gemm(backend, a: Tensor, b: Tensor) -> Tensor:
    """Exact a [Na, g, P, Q] @ b [Nb, g, Q, R] (Na, Nb in {1, N}), a size-1 sample dim broadcast without
    copying (a stride-0 batch when g = 1)."""
    n, g = (b.shape[0] if a.shape[0] == 1 else a.shape[0]), a.shape[1]  # N may be 0

    def flat(t: Tensor) -> Tensor:
        t = t.expand(n, *t.shape[1:])
        return t[:, 0] if g == 1 else t.reshape(n * g, *t.shape[2:])

    return backend.bmm(flat(a), flat(b)).view(n, g, a.shape[2], b.shape[3])


def _per_out(v: Tensor, o: int, nd: int) -> Tensor:
    """A per-output-channel vector shaped to broadcast against [N, O, *spatial]."""
    return v.view(1, o, *([1] * nd))


# ----------------------------------------------------------------------------------------- forward
def forward(backend, x_q: Tensor, w_q: Tensor, spec: GemmSpec, layout: str) -> tuple[Tensor, tuple]:
    """Exact accumulators of the layer, already in output order ([N, O, *out], or [M, O] for linear)."""
    g, o = spec.groups, w_q.shape[0]
    if layout == "direct":
        v, out = _windows(x_q, spec)  # [N, C, *out, *kernel] view
        acc = x_q.new_zeros((x_q.shape[0], o) + out)
        w = w_q.view(o, *spec.kernel)
        for offs in itertools.product(*(range(k) for k in spec.kernel)):
            acc.addcmul_(v[(Ellipsis,) + offs], _per_out(w[(slice(None),) + offs], o, spec.dims))
        return acc, out  # |acc| <= 127^2 * window < 2^24: exact in fp32
    if layout == "samples":
        cols, out = unfold(x_q, spec)  # [N, g, K, L]
        acc = _gemm(backend, w_q.view(1, g, o // g, -1), cols)  # [N, g, O/g, L]
        return acc.reshape(acc.shape[0], o, *out), out
    cols, out = to_cols(x_q, spec)  # [g, M, K]
    acc = backend.bmm(cols, w_q.view(g, o // g, -1).transpose(1, 2))  # [g, M, O/g]
    if spec.is_linear:
        return acc[0], out
    n, nd = x_q.shape[0], spec.dims
    acc = acc.reshape(g, n, *out, o // g).permute((1, 0, 2 + nd) + tuple(range(2, 2 + nd)))
    return acc.reshape(n, o, *out), out


# ----------------------------------------------------------------------------------------- dX
def grad_input(backend, g_q: Tensor, w_q: Tensor, spec: GemmSpec, x_shape: tuple, layout: str) -> Tensor:
    """Exact integer dX from the quantized (dY s_W) `g_q`, given in output order ([N, O, *out] / [M, O])."""
    g, o = spec.groups, w_q.shape[0]
    bound = QMAX**2 * (o // g) * spec.window  # what col2im may add up: keep it exact
    if layout == "direct":
        n, c = x_shape[:2]
        padded = tuple(sz + lo + hi for sz, (lo, hi) in zip(x_shape[2:], spec.padding))
        out = tuple(g_q.shape[2:])
        dx = g_q.new_zeros((n, c) + padded)
        w = w_q.view(o, *spec.kernel)
        for offs in itertools.product(*(range(k) for k in spec.kernel)):
            sl = tuple(slice(f * d, f * d + s * (m - 1) + 1, s) for f, d, s, m in zip(offs, spec.dilation, spec.stride, out))
            dx[(slice(None), slice(None)) + sl].addcmul_(g_q, _per_out(w[(slice(None),) + offs], o, spec.dims))
        return dx[(slice(None), slice(None)) + tuple(slice(lo, lo + sz) for sz, (lo, _) in zip(x_shape[2:], spec.padding))]
    w_t = w_q.view(g, o // g, -1)  # [g, O/g, K]
    if layout == "samples":
        gq = g_q.reshape(g_q.shape[0], g, o // g, math.prod(g_q.shape[2:]))  # [N, g, O/g, L] (N may be 0)
        dcols = _gemm(backend, w_t.transpose(1, 2).unsqueeze(0), gq)  # [N, g, K, L]
        return fold(dcols if spec.tiles(tuple(x_shape[2:])) else exact_sum_dtype(dcols, bound), spec, x_shape)
    if spec.is_linear:
        rows = g_q.reshape(1, -1, o)
    else:
        rows = g_q.movedim(1, -1).reshape(-1, g, o // g).transpose(0, 1)  # [g, M, O/g]
    dcols = backend.bmm(rows, w_t)  # [g, M, K]
    return from_cols(dcols if spec.tiles(tuple(x_shape[2:])) else exact_sum_dtype(dcols, bound), spec, x_shape)


# ----------------------------------------------------------------------------------------- dW
def grad_weight(backend, dq_rows: Tensor, x_q: Tensor, spec: GemmSpec, layout: str) -> Tensor:
    """Exact integer dW [g, O/g, K] from the quantized dY in rows layout [M, O] and the saved INT8 input."""
    o = dq_rows.shape[1]
    g = spec.groups
    if layout == "direct":
        v, out = _windows(x_q, spec)  # [N, C, *out, *kernel]
        dq = dq_rows.view(x_q.shape[0], *out, o).movedim(-1, 1)  # [N, O, *out] strided view, no copy
        return torch.stack([_exact_channel_dot(dq, v[(Ellipsis,) + offs])
                            for offs in itertools.product(*(range(k) for k in spec.kernel))], dim=1).view(g, 1, spec.window)
    if layout == "samples":
        cols, out = unfold(x_q, spec)  # [N, g, K, L]
        n, L = cols.shape[0], cols.shape[3]
        dq = dq_rows.view(n, L, g, o // g).permute(0, 2, 3, 1)  # [N, g, O/g, L], a view
        return _gemm_sum_samples(backend, dq, cols.transpose(2, 3))
    cols, _ = to_cols(x_q, spec)  # [g, M, K]
    return backend.bmm(dq_rows.view(-1, g, o // g).permute(1, 2, 0), cols)  # [g, O/g, K]


DW_BATCH_ELEMENTS = 2**22  # per-sample dW partials held at once (16 MB of fp32)


def _gemm_sum_samples(backend, a: Tensor, b: Tensor) -> Tensor:
    """Exact sum over samples of a[n] @ b[n] -> [g, P, R]. Each sample's product is exact (the backend
    chunks its reduction over positions); the sum over samples is taken in fp64 (int64 for integer
    accumulators), a bounded number of samples at a time."""
    n, g, p, r = a.shape[0], a.shape[1], a.shape[2], b.shape[3]
    step = max(1, DW_BATCH_ELEMENTS // max(1, g * p * r))
    total = None
    for n0 in range(0, n, step):
        part = _gemm(backend, a[n0:n0 + step], b[n0:n0 + step])
        part = part.sum(0, dtype=torch.float64 if part.is_floating_point() else torch.int64)
        total = part if total is None else total.add_(part)
    return total


def _exact_channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum over every dim but 1 of a * b, exactly, for integer-valued fp32 a, b in [-127, 127]: products
    are exact in fp32, each sample's sum over positions is exact in fp32 while it has at most 1040 terms
    (chunked otherwise), and the per-sample sums are added in fp64."""
    n, c = a.shape[:2]
    prod = (a * b).reshape(n, c, -1)
    parts = [chunk.sum(-1) for chunk in prod.split(1040, dim=-1)] if prod.shape[-1] else [prod.sum(-1)]
    per_sample = parts[0] if len(parts) == 1 else torch.stack(parts, -1).double().sum(-1)
    return per_sample.sum(0, dtype=torch.float64)
