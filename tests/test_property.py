"""Property test: the INT8 op's integer results equal a naive int64 convolution, element for element,
over random conv configurations (1-3 spatial dims, groups incl. depthwise, stride, padding as int /
per-dim tuple / 'same' (asymmetric for even kernels) / 'valid', dilation, padding modes, odd sizes).

How the op is made to expose its integers: inputs are integers in [-127, 127] whose absmax is exactly
127 (x per tensor, every weight output channel, dY per tensor), so every scale is exactly 1 and
quantization is the identity. Then the op's forward output is the int32 accumulator of the forward GEMM,
and its backward returns the dX accumulators (after col2im) and the dW accumulators, all through the
real path: Int8Layer -> Int8GemmFunction -> im2col/col2im -> exact_int_bmm. fp32 holds them exactly
below 2^24; cases beyond that (random data essentially never gets there) are skipped with `assume`.

The naive reference shares nothing with im2col: a loop over kernel offsets, each one strided slice of
the padded input and one int64 einsum per group. It is itself checked against F.conv*d in float64
(exact for these magnitudes), so it encodes PyTorch's semantics, including where 'same' puts the odd
padding element.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import int8fx
from int8fx.kernels import direct

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FCONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@st.composite
def conv_cases(draw, plain: bool = False):
    """Convolutions of every kind; `plain`: the geometries the direct conv takes (int8fx.kernels.direct.
    _ordinary: one group, no dilation, padding within "same"), mostly."""
    dims = draw(st.integers(1, 3))
    groups = 1 if plain else draw(st.sampled_from([1, 1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kmax = {1: 5, 2: 4, 3: 3}[dims]
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(dims))
    dilation = (1,) * dims if plain else tuple(draw(st.integers(1, 3)) for _ in range(dims))
    pad_kind = draw(st.sampled_from(["tuple", "valid"] if plain else ["int", "tuple", "same", "valid"]))
    stride = (1,) * dims if pad_kind == "same" else tuple(draw(st.integers(1, 3)) for _ in range(dims))
    if plain and pad_kind == "tuple":
        pads = padding = tuple(draw(st.integers(0, (k - 1) // 2)) for k in kernel)
    elif pad_kind == "int":
        padding = draw(st.integers(0, 2))
        pads = (padding,) * dims
    elif pad_kind == "tuple":
        pads = padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    else:
        padding, pads = pad_kind, None
    if pads is None:  # explicit (before, after) per dim, as PyTorch pads: the odd element goes after
        tot = [d * (k - 1) if padding == "same" else 0 for d, k in zip(dilation, kernel)]
        lohi = tuple((t // 2, t - t // 2) for t in tot)
    else:
        lohi = tuple((p, p) for p in pads)
    smax = {1: 11, 2: 8, 3: 6}[dims]
    low = [k + st_ if plain else max(1, d * (k - 1) + 1 - lo - hi)  # plain: at least two outputs per dim
           for d, k, st_, (lo, hi) in zip(dilation, kernel, stride, lohi)]
    size = tuple(draw(st.integers(lo_, lo_ + smax)) for lo_ in low)
    mode = "zeros"
    if pad_kind in ("int", "tuple") and any(pads):
        mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
        if mode == "reflect" and any(p >= n for p, n in zip(pads, size)):
            mode = "zeros"
        if mode == "circular" and any(p > n for p, n in zip(pads, size)):
            mode = "zeros"
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(dims=dims, groups=groups, cin=cin, cout=cout, kernel=kernel, stride=stride, padding=padding,
                lohi=lohi, dilation=dilation, mode=mode, size=size, batch=batch, seed=seed)


def int_tensor(shape, gen, absmax_rows: int = 0) -> torch.Tensor:
    """Integers in [-127, 127] with |.|max exactly 127 overall, and in each of the first `absmax_rows`
    slices along dim 0 (weights: one scale per output channel)."""
    t = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int64)
    flat = t.view(t.shape[0], -1) if absmax_rows else t.view(1, -1)
    for r in range(flat.shape[0]):
        flat[r, torch.randint(0, flat.shape[1], (1,), generator=gen)] = 127 * (1 if r % 2 else -1)
    return t


def naive_conv_int64(xp, w, stride, dilation, groups):
    """(y, adjoint maps) of a conv over an already padded int64 input; loops over kernel offsets only."""
    n, c = xp.shape[:2]
    o, cg = w.shape[:2]
    kernel = w.shape[2:]
    out = tuple((sz - d * (k - 1) - 1) // s + 1 for sz, d, k, s in zip(xp.shape[2:], dilation, kernel, stride))

    def window(offs):
        return (slice(None), slice(None)) + tuple(
            slice(k * d, k * d + s * (m - 1) + 1, s) for k, d, s, m in zip(offs, dilation, stride, out))

    return out, window


def reference(case, x, w, dy):
    """Naive int64 (y, dX, dW) of the conv described by `case`, with PyTorch's padding semantics."""
    dims, g = case["dims"], case["groups"]
    pad_arg = [p for lohi in reversed(case["lohi"]) for p in lohi]
    mode = "constant" if case["mode"] == "zeros" else case["mode"]
    xd = x.double().requires_grad_()
    xp = F.pad(xd, pad_arg, mode=mode) if any(pad_arg) else xd
    xp_i = xp.detach().to(torch.int64)
    out, window = naive_conv_int64(xp_i, w, case["stride"], case["dilation"], g)
    n, o, cg = x.shape[0], w.shape[0], w.shape[1]
    y = torch.zeros((n, o) + out, dtype=torch.int64)
    dxp = torch.zeros_like(xp_i)
    dw = torch.zeros_like(w)
    dyg = dy.view(n, g, o // g, *out)
    letters = "xyz"[:dims]  # spatial subscripts (n, g, o, c are taken)
    for offs in itertools.product(*(range(k) for k in w.shape[2:])):
        xs = xp_i[window(offs)].reshape(n, g, cg, *out)
        wk = w[(slice(None), slice(None)) + offs].view(g, o // g, cg)
        y += torch.einsum(f"ngc{letters},goc->ngo{letters}", xs, wk).reshape(y.shape)
        dxp[window(offs)] += torch.einsum(f"ngo{letters},goc->ngc{letters}", dyg, wk).reshape(n, g * cg, *out)
        dw[(slice(None), slice(None)) + offs] = torch.einsum(f"ngo{letters},ngc{letters}->goc", dyg, xs).reshape(o, cg)
    (dx,) = torch.autograd.grad(xp, xd, dxp.double()) if any(pad_arg) else (dxp.double(),)
    return y, dx.to(torch.int64), dw


@settings(max_examples=60, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_int8_op_equals_naive_int64(case):
    _check_against_naive(case)


@pytest.mark.skipif(not direct.exact(), reason="this CPU's oneDNN int8 conv is not exact (no VNNI/AMX)")
@settings(max_examples=40, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_int8_op_equals_naive_int64_with_the_direct_conv(case):
    """The same, with oneDNN's direct int8 conv taken wherever it is exact (int8fx.kernels.direct)."""
    previous, direct.MODE = direct.MODE, "always"
    try:
        _check_against_naive(case)
    finally:
        direct.MODE = previous


@settings(max_examples=30, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases(plain=True))
def test_reference_op_equals_naive_int64_with_the_direct_fp32_conv(case):
    """The same on the reference backend with oneDNN's fp32 conv and weight gradient taken wherever they are
    exact (int8fx.kernels.direct, form "fp32": what a CPU without int8 dot products runs)."""
    previous, direct.MODE = direct.MODE, "always"
    try:
        _check_against_naive(case, backend="reference")
    finally:
        direct.MODE = previous


def _check_against_naive(case, backend="auto"):
    gen = torch.Generator().manual_seed(case["seed"])
    dims = case["dims"]
    mod = CONV[dims](case["cin"], case["cout"], case["kernel"], stride=case["stride"], padding=case["padding"],
                     dilation=case["dilation"], groups=case["groups"], bias=False, padding_mode=case["mode"])
    x = int_tensor((case["batch"], case["cin"]) + case["size"], gen)
    w = int_tensor(tuple(mod.weight.shape), gen, absmax_rows=1)
    with torch.no_grad():
        mod.weight.copy_(w.float())
    layer = int8fx.convert(mod, int8fx.Int8Config(grad_quant="per-tensor", backend=backend), inplace=True)
    xf = x.float().requires_grad_()
    y = layer(xf)
    dy = int_tensor(tuple(y.shape), gen)
    y.backward(dy.float())

    y_ref, dx_ref, dw_ref = reference(case, x, w, dy)
    assume(max(t.abs().max() for t in (y_ref, dx_ref, dw_ref)) < 2**24)  # exact in the op's fp32 outputs
    # the naive reference encodes PyTorch's conv: float64 conv is exact at these magnitudes
    assert torch.equal(y_ref.double(), copy.deepcopy(mod).double()(x.double()).detach())

    assert torch.equal(y.detach().to(torch.int64), y_ref), "forward accumulators"
    assert torch.equal(xf.grad.to(torch.int64), dx_ref), "input-gradient accumulators (col2im)"
    assert torch.equal(mod.weight.grad.to(torch.int64), dw_ref), "weight-gradient accumulators"
    assert torch.equal(xf.grad, xf.grad.round()) and torch.equal(mod.weight.grad, mod.weight.grad.round())
