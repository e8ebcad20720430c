"""Symmetric INT8 quantization math, device-agnostic (ALGORITHMS.md, "INT8 quantizer").

Levels are -127..127 (never -128, so negation is exact and the fp32 reference GEMM stays exact).
scale = clip / 127. A zero clip gives scale 0 and quantizes to 0, never NaN. A non-finite clip gives a
non-finite scale, which makes every dequantized value non-finite: that is deliberate, it is how an
Inf/NaN gradient stays visible to loss scalers instead of being clamped into 127.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

QMAX = 127


def scale_from_clip(clip: Tensor) -> Tensor:
    """clip (any shape) -> scale = clip / 127, in fp32."""
    return divide(clip.float(), QMAX)


def divide(a: Tensor, c: int | float) -> Tensor:
    """a / c for a Python number c: an IEEE division (the quantizer's definition, and what the CUDA kernels
    compute with `__fdiv_rn`) on every device, eager or compiled. Why not `a / c`: on CUDA tensors ATen
    divides by a CPU scalar as a multiplication by its reciprocal, and inductor lowers a division by a
    constant the same way (on CUDA on every torch, on CPU before torch 2.11); that differs in the last bit
    for ~4% of values (`clip / 127`), so scales would differ between devices and between compiled and eager
    passes. So on CUDA the divisor is a device tensor, and while compiling it is computed from `a` (c, or 2c
    where a is NaN and the quotient NaN anyway), which inductor cannot take for a constant; its value is c
    exactly. (CPU tensors divide by a Python number exactly, eagerly; a symbolic size is no constant to
    inductor.) The compiled GPU division itself rounds as eager's under `fusing.EAGER_NUMERICS`."""
    if not isinstance(c, (int, float)):
        return a / c
    if torch.compiler.is_compiling():  # (two values: a `where` of equal branches could be folded to c)
        return a / torch.where(a.isnan(), 2.0 * c, float(c)).to(a.dtype)
    if a.device.type == "cpu":
        return a / c
    return a / torch.full((), c, dtype=a.dtype, device=a.device)


def absmax(x: Tensor, dim: int | tuple | None = None) -> Tensor:
    """max |x| over `dim` (all dims when None), in fp32. NaN anywhere gives NaN, Inf gives Inf."""
    if dim is None:
        if x.numel() == 0:
            return x.new_zeros((), dtype=torch.float32)
        lo, hi = torch.aminmax(_dense_flat(x.detach()))  # one pass, no |x| temporary (vector_norm(inf) is ~20x
        return torch.maximum(-lo, hi).float()              # slower on CPU)
    if x.numel() == 0:  # amax refuses empty reductions; an empty slice has range 0 (scale 0, never NaN)
        return x.detach().float().sum(dim=dim).zero_()
    return x.detach().abs().amax(dim=dim).float()


def _dense_flat(x: Tensor) -> Tensor:
    """x as a flat view when its elements fill its storage in some order (e.g. a channels-last activation);
    aminmax would otherwise copy a non-contiguous tensor to contiguous before it reduces (order-free). Not
    while compiling: a compiled reduction reads any layout in place, and dynamo cannot sort symbolic strides
    (it raised "sort with non-constant keys" for a batch-1 gradient, and the policy ran eagerly)."""
    if x.is_contiguous() or torch.compiler.is_compiling():
        return x
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    v = x.permute(order)
    return v.reshape(-1) if v.is_contiguous() else x


def nonfinite_poison(x: Tensor) -> Tensor:
    """0 when x is all finite, NaN otherwise: add it to any clip so that a non-finite input poisons
    the scale even when the clip comes from running state rather than from x itself."""
    m = absmax(x)
    return m - m


def quantize(
    x: Tensor,
    scale: Tensor,
    rounding: str = "nearest",
    key: Tensor | int | None = None,
    out_dtype: torch.dtype = torch.int8,
) -> Tensor:
    """q = clamp(round(x / scale), -127, 127), with `scale` broadcastable against x.

    rounding "nearest" is round-half-to-even; "stochastic" is floor(x/s + u), u uniform on the 2^15
    midpoints (r + 1/2) / 2^15 of [0, 1), r from the counter-based stream `key` (`uniform_bits15`;
    unbiased to within 2^-16 of a step: E[q] = x/s inside the range). Where scale is 0 or NaN, q is 0.
    out_dtype lets a backend receive its GEMM operand type directly (the reference GEMM wants fp32
    holding the integers), saving one pass over memory.
    """
    scale = scale.to(x.device, torch.float32)
    # dividing by +inf where the scale is 0 or NaN gives q = 0 with one pass over x (the `where` only
    # touches the small scale tensor); a NaN scale still poisons the dequantized result
    v = x.float() / torch.where(scale > 0, scale, torch.full_like(scale, float("inf")))
    if rounding == "nearest":
        v = v.round_()
    elif rounding == "stochastic":
        if key is None:
            raise ValueError("stochastic rounding needs a key (the counter-based stream to draw from)")
        # u = r/2^15 + 1/2^16 is exact in fp32, so v + u rounds once, as the CUDA kernel's __fadd_rn does
        v = v.add_(uniform_bits15(v.shape, key, v.device).float().mul_(2.0 ** -15).add_(2.0 ** -16)).floor_()
    else:
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    v = v.clamp_(-QMAX, QMAX)
    return v if out_dtype == v.dtype else v.to(out_dtype)


def _i64(c: int) -> int:
    """A 64-bit pattern as the int64 torch holds it (two's complement)."""
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= 1 << 63 else c


def _i32(c: int) -> int:
    c &= (1 << 32) - 1
    return c - (1 << 32) if c >= 1 << 31 else c


GOLDEN32, MIX32_1, MIX32_2 = _i32(0x9E3779B9), _i32(0x7FEB352D), _i32(0x846CA68B)
MIX64_1, MIX64_2 = _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _xorshift(z: Tensor, k: int, bits: int) -> Tensor:
    """z ^ (z >>> k) with a logical shift (torch's >> is arithmetic on signed integers)."""
    return z ^ ((z >> k) & ((1 << (bits - k)) - 1))


def hash32(z: Tensor) -> Tensor:
    """The 'lowbias32' integer hash, element-wise on int32 (multiplications wrap modulo 2^32)."""
    z = _xorshift(z, 16, 32) * MIX32_1
    z = _xorshift(z, 15, 32) * MIX32_2
    return _xorshift(z, 16, 32)


def stream_key(base: int | Tensor, counter: Tensor, role: int) -> Tensor:
    """The int32 key of one stream, on the counter's device (no host read): the splitmix64 finaliser of
    (per-site constant `base`, device counter, role), role 0 for the dX operand and 1 for the dW operand,
    so the two backward GEMMs never share draws whichever of them runs."""
    z = counter.to(torch.int64) * 2 + (role + (_i64(base) if isinstance(base, int) else base))
    z = _xorshift(z, 30, 64) * MIX64_1
    z = _xorshift(z, 27, 64) * MIX64_2
    return _xorshift(z, 31, 64).to(torch.int32)  # the low 32 bits


def uniform_bits15(shape, key: Tensor | int, device) -> Tensor:
    """int32 tensor of uniform integers in [0, 32767]: the top 15 bits of hash32(i * golden + key) for
    element i (row-major).

    Counter-based: a draw depends only on the key and the element's index, so it needs no generator and no
    host value, gives the same numbers in any order, fused or not, on any device (the CUDA quantize kernel
    computes the same function), and streams with different keys are independent. One 32-bit hash per
    element is a single fused pass where the quantizer is compiled (int8fx.quant.fused)."""
    n = math.prod(shape)
    key = torch.as_tensor(key, device=device).to(torch.int32)
    i = torch.arange(n, dtype=torch.int64 if n > 2**31 else torch.int32, device=device).to(torch.int32)
    return (hash32(i * GOLDEN32 + key) >> 17).bitwise_and_(0x7FFF).view(shape)


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """x_hat = scale * q (fp32)."""
    return q.float() * scale.to(q.device, torch.float32)


def quantize_per_tensor(x: Tensor, rounding: str = "nearest", key=None, out_dtype=torch.int8):
    """Absmax per-tensor quantization: (q, scale)."""
    s = scale_from_clip(absmax(x))
    return quantize(x, s, rounding, key, out_dtype), s


def quantize_per_channel(x: Tensor, axis: int = 0, rounding: str = "nearest", key=None, out_dtype=torch.int8):
    """Absmax quantization with one scale per index of `axis`: (q, scale of shape [x.shape[axis]])."""
    axis = axis % x.dim()
    dims = tuple(d for d in range(x.dim()) if d != axis)
    s = scale_from_clip(absmax(x, dims) if dims else x.detach().abs().float())
    shape = [1] * x.dim()
    shape[axis] = -1
    return quantize(x, s.view(shape), rounding, key, out_dtype), s


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - <a, b> / (|a| |b|), in fp32; 0 when either is zero; NaN when either holds Inf/NaN.

    Each vector is divided by its absmax first: the distance is scale-invariant, and without this the
    squares overflow for |x| ~ 1e20 (NaN) and underflow for |x| ~ 1e-20 (distance reported as 0)."""
    a, b = a.detach().reshape(-1).float(), b.detach().reshape(-1).float()
    a = a / torch.where(absmax(a) > 0, absmax(a), torch.ones((), device=a.device))
    b = b / torch.where(absmax(b) > 0, absmax(b), torch.ones((), device=b.device))
    den = a.norm() * b.norm()
    d = torch.where(den > 0, 1 - (a @ b) / den.clamp_min(1e-38), torch.zeros((), device=a.device))
    return d + nonfinite_poison(a) + nonfinite_poison(b)  # Inf/NaN input: NaN, not a plausible number
