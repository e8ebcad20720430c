"""oneDNN's direct int8 convolution as an exact integer conv: the "torch" backend's alternative to im2col +
GEMM on the CPU, taken per conv geometry where it measures faster.

Why: a conv with a window (3x3, a 7x7 stem) on a large feature map with few channels spends most of its
time in the int8 im2col, a copy `window` times the activation's size, not in its GEMM. oneDNN's int8 conv
(`torch.ops.onednn.qconv_pointwise`) reads the activation in place. Measured on an Intel Xeon with AMX, one
thread, im2col + GEMM against it: smallcnn's 16->16 3x3 at 28x28 (batch 128) 3.1 -> 1.1 ms, resnet18's
7x7 stem 1.6 -> 0.65 ms. It loses where the weight is large and the map small (its per-call weight
reorder: 256->256 3x3 at 4x4, 0.45 -> 2.9 ms) and on 1x1 convs, whose GEMM needs no im2col, so the choice
is measured per geometry (`choose`), once, at a geometry's DECIDE_AT-th call, like the fused passes'
exact-shape variants (int8fx.fusing): a training loop repeats its shapes, a one-off forward does not.

Exactness. oneDNN's int8 conv takes unsigned activations: the int8 codes plus 128 (a flip of the sign
bit) with zero point 128. With unit scales and an fp32 output, oneDNN turns the int32 sum over the unsigned
codes into fp32 and then removes the zero point's share (128 x the weights' sum), so both must be exact in
fp32: |sum| <= 255 x 127 x K < 2^24, i.e. a reduction K = window x in-channels/group of at most EXACT_K =
518. (Measured on an Intel Xeon with AMX: exact for K <= 518 on codes near +-127 in every trial; thousands
of outputs off by one from K = 540, whose sums stay below 2^24 but whose unsigned sums do not.) Within
that, the result is the integer tensor the GEMM path makes, held in fp32, and the epilogues turn it into
the same bits (`float(acc)` is that fp32). CPUs without int8 dot-product instructions compute u8 x s8
products in saturating 16-bit pair sums (`vpmaddubsw`), which would not be exact either: `exact()` runs
the worst cases once per process and the direct conv is used only where they came out right. It is also
used only on plain CNN geometries (`_ordinary`: one group, no dilation), outside which oneDNN's sums were
sometimes wrong and a dilated conv corrupted the heap, and the timing in `choose` compares both paths' sums
once per geometry.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from .. import fusing
from ..quant.core import QMAX
from .im2col import GemmSpec
from .probe import best_of

EXACT_K = (2**24 - 1) // (255 * QMAX)  # 518: the longest reduction whose unsigned sums fp32 holds exactly
DECIDE_AT = 3  # a geometry's call at which both paths are timed (earlier calls take the GEMM)
MARGIN = 1.1  # the direct conv must be this much faster to be picked
MAX_DECISIONS = 256  # geometries remembered per process; beyond, new ones keep the GEMM
MODE = "measure"  # "measure" (per geometry), "always" (wherever it is exact: tests), "never"

_decided: dict = {}  # key -> True (direct) / False (GEMM)
_seen: dict = {}  # key -> calls so far, until decided


def usable(backend, t: Tensor, spec: GemmSpec, in_channels: int) -> bool:
    """Whether the direct conv computes this product exactly here: the "torch" backend on a CPU whose
    oneDNN int8 conv passed `exact()`, a non-transposed conv with K <= EXACT_K and an ordinary geometry
    (`_ordinary`); not under a torch.func transform or a dispatch mode (a FLOP counter, a profiler's
    recorder), which see the GEMM path's ops as everywhere else."""
    return (MODE != "never" and getattr(backend, "name", None) == "torch" and t.device.type == "cpu"
            and not spec.is_linear and not spec.transposed and spec.window * (in_channels // spec.groups) <= EXACT_K
            and _ordinary(spec, tuple(t.shape[1:-1])) and exact()
            and fusing.seen_by_everything((t,)))


def _ordinary(spec: GemmSpec, sizes: tuple) -> bool:
    """One group, no dilation, symmetric zero padding of at most "same" ((k - 1) / 2 per side), an input at
    least one window wide and no output one position wide, in every spatial dim: the geometries of plain CNN
    layers, where oneDNN's int8 conv was exact. Outside them it was not always (torch 2.14, an Intel Xeon
    with AMX):
      - grouped convs: wrong sums for 17 to 31 channels per group with more than 8 output channels per group
        at some map sizes (2 x 8 groups of 24 channels, 3x3, 28x28: 131,712 of 150,528 outputs wrong; at
        14x14 or 22x22 none), found on timm's visformer_tiny;
      - dilated convs: heap corruption ("corrupted size vs. prev_size", the process aborts) for a 3x3 conv
        of dilation 2 on a 9x45 input, 50 -> 47 channels;
      - a 9x4 input, 3x3 kernel, stride (1, 3) (one output column); windows wholly in the padding.
    Within these rules 77,000 random 2-d geometries (1 to 3 images, sizes 4 to 60, 1 to 72 channels, kernels
    1 to 7, strides 1 and 2) were exact, with glibc's heap checks on (MALLOC_CHECK_=3). The direct conv pays
    on plain convs of large maps (stems, early 3x3 layers), which these rules keep, and `choose` compares
    both paths' sums once per geometry besides."""
    return spec.groups == 1 and all(
        d == 1 and lo == hi and lo <= (k - 1) // 2 and n >= k and m > 1
        for n, m, k, d, (lo, hi) in zip(sizes, spec.out_size(sizes), spec.kernel, spec.dilation, spec.padding))


def conv(xq_cl: Tensor, w: Tensor, spec: GemmSpec) -> Tensor:
    """The exact integer conv of int8 xq_cl [N, *S, C] (contiguous) with the int8 weight as the GEMM path's
    operand w [g, K/g, O/g] (K in (kernel position, channel) order): fp32 [N, *S', O] (contiguous) holding
    the integer sums."""
    n, *sizes, c = xq_cl.shape
    g, nd = spec.groups, spec.dims
    o = g * w.shape[2]
    weight = w.reshape(g, *spec.kernel, c // g, o // g).permute(0, nd + 2, nd + 1, *range(1, nd + 1)).reshape(
        o, c // g, *spec.kernel)  # [O, C/g, *k], torch's layout
    ones, zeros = torch.ones(o), torch.zeros(o, dtype=torch.int64)
    stride, padding = list(spec.stride), [lo for lo, _ in spec.padding]
    dilation, shape = list(spec.dilation), [n, c, *sizes]
    packed = torch.ops.onednn.qconv_prepack(weight, ones, 1.0, 128, stride, padding, dilation, spec.groups, shape)
    xu = torch.bitwise_xor(xq_cl.view(torch.uint8), 128).movedim(-1, 1)  # codes + 128, [N, C, *S] channels-last
    y = torch.ops.onednn.qconv_pointwise(xu, 1.0, 128, packed, ones, zeros, None, stride, padding, dilation,
                                         spec.groups, 1.0, 0, torch.float32, "none", [], "")
    return y.movedim(1, -1).contiguous()  # oneDNN writes channels-last: a view, no copy


def choose(key: tuple, direct, gemm):
    """The result of `direct()` or `gemm()` (the same integers), whichever this geometry measured faster."""
    pick = True if MODE == "always" else _decided.get(key)
    if pick is None:
        if len(_decided) >= MAX_DECISIONS:
            return gemm()
        if len(_seen) > 4096:  # (a detector's stream of input sizes: forget the counts, keep memory bounded)
            _seen.clear()
        calls = _seen[key] = _seen.get(key, 0) + 1
        if calls < DECIDE_AT:
            return gemm()
        _seen.pop(key, None)  # (pop: two threads may decide the same geometry at once)
        (t_direct, out_direct), (t_gemm, out) = best_of(direct, reps=2), best_of(gemm, reps=2)
        # the two must agree on these operands too: a geometry where oneDNN's sums are wrong keeps the GEMM
        agree = torch.equal(out_direct, out.to(out_direct.dtype))
        if not agree:
            warnings.warn(f"int8fx: oneDNN's int8 conv gave other sums than the exact GEMM for the geometry {key}; "
                          "that geometry keeps the GEMM (same numbers as always)")
        _decided[key] = agree and t_direct * MARGIN < t_gemm
        return out
    return direct() if pick else gemm()


def decisions() -> dict:
    """{geometry key: True where the direct conv was measured faster} (for tests and tools)."""
    return dict(_decided)


@functools.lru_cache(maxsize=1)
def exact() -> bool:
    """Whether this CPU's oneDNN int8 conv returns exact sums in the worst cases the direct path admits,
    a 1x1 and a 3x3 geometry (different kernels) at K near EXACT_K: codes at +-127 whose unsigned sums are
    odd and just below 2^24 (one rounding in fp32 would show), and 255 x 127 pairs (a saturating 16-bit
    pair sum would show)."""
    if not hasattr(torch.ops.onednn, "qconv_pointwise"):
        return False
    try:
        for k in (1, 3):
            c = EXACT_K // (k * k)
            spec = GemmSpec(2, (k, k), (1, 1), ((k // 2, k // 2),) * 2, (1, 1), 1)
            x = torch.full((2, 3, 3, c), QMAX, dtype=torch.int8)
            x[1] = -QMAX
            w = torch.full((1, c * k * k, 2), QMAX, dtype=torch.int8)
            w[0, 0, 0], w[0, :, 1] = QMAX - 1, -QMAX  # an odd unsigned sum; and its negation
            weight = w[0].t().reshape(2, k, k, c).movedim(-1, 1).double()  # [O, C, k, k]
            want = torch.nn.functional.conv2d(x.movedim(-1, 1).double(), weight, None, 1, k // 2).movedim(1, -1)
            if not torch.equal(conv(x, w, spec).double(), want):
                return False
    except Exception:  # a build without oneDNN's quantized convs, or a torch whose ops take other arguments
        return False
    return True
