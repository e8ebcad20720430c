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
    return clip.float() / QMAX


def absmax(x: Tensor, dim: int | tuple | None = None) -> Tensor:
    """max |x| over `dim` (all dims when None), in fp32. NaN anywhere gives NaN, Inf gives Inf."""
    if dim is None:
        if x.numel() == 0:
            return x.new_zeros((), dtype=torch.float32)
        lo, hi = torch.aminmax(x.detach())  # one pass, no |x| temporary (vector_norm(inf) is ~20x slower on CPU)
        return torch.maximum(-lo, hi).float()
    if x.numel() == 0:  # amax refuses empty reductions; an empty slice has range 0 (scale 0, never NaN)
        return x.detach().float().sum(dim=dim).zero_()
    return x.detach().abs().amax(dim=dim).float()


def nonfinite_poison(x: Tensor) -> Tensor:
    """0 when x is all finite, NaN otherwise: add it to any clip so that a non-finite input poisons
    the scale even when the clip comes from running state rather than from x itself."""
    m = absmax(x)
    return m - m


def quantize(
    x: Tensor,
    scale: Tensor,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    out_dtype: torch.dtype = torch.int8,
) -> Tensor:
    """q = clamp(round(x / scale), -127, 127), with `scale` broadcastable against x.

    rounding "nearest" is round-half-to-even; "stochastic" is floor(x/s + u), u uniform on the 2^15
    midpoints (r + 1/2) / 2^15 of [0, 1), drawn from `generator` (`uniform_bits15`; unbiased to within
    2^-16 of a step: E[q] = x/s inside the range). Where scale is 0 or NaN, q is 0.
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
        v = v.add_(uniform_bits15(v.shape, generator, v.device), alpha=2.0 ** -15).add_(2.0 ** -16).floor_()
    else:
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    v = v.clamp_(-QMAX, QMAX)
    return v if out_dtype == v.dtype else v.to(out_dtype)


def uniform_bits15(shape, generator: torch.Generator | None, device) -> Tensor:
    """int16 tensor of independent uniform integers in [0, 32767], drawn from `generator`.

    Stochastic rounding as floor(v + (r + 1/2) / 2^15): unbiased to within 2^-16 of a quantization step,
    far below anything an INT8 gradient resolves. Why not `torch.rand`: on the CPU it costs ~3.5 ms per
    1.6 M numbers on one core, which made stochastic rounding ~15% of a mobilenet_v2 training step. One
    64-bit draw (`random_` fills [0, 2^63)) gives four 16-bit lanes; masking to 15 bits drops the
    always-zero top bit of the last lane. Same total cost as 1/4 of the draws plus one integer pass."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(generator=generator)
    return words.view(torch.int16)[:n].view(shape).bitwise_and_(0x7FFF)


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """x_hat = scale * q (fp32)."""
    return q.float() * scale.to(q.device, torch.float32)


def quantize_per_tensor(x: Tensor, rounding: str = "nearest", generator=None, out_dtype=torch.int8):
    """Absmax per-tensor quantization: (q, scale)."""
    s = scale_from_clip(absmax(x))
    return quantize(x, s, rounding, generator, out_dtype), s


def quantize_per_channel(x: Tensor, axis: int = 0, rounding: str = "nearest", generator=None, out_dtype=torch.int8):
    """Absmax quantization with one scale per index of `axis`: (q, scale of shape [x.shape[axis]])."""
    axis = axis % x.dim()
    dims = tuple(d for d in range(x.dim()) if d != axis)
    s = scale_from_clip(absmax(x, dims) if dims else x.detach().abs().float())
    shape = [1] * x.dim()
    shape[axis] = -1
    return quantize(x, s.view(shape), rounding, generator, out_dtype), s


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
