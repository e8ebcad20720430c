"""oneDNN's direct convolution as an exact integer conv: the CPU pipeline's alternative to im2col + GEMM,
taken per conv geometry where it measures faster.

Why: a conv with a window (3x3, a 7x7 stem) on a large feature map with few channels spends most of its
time in the im2col, a copy `window` times the activation's size, not in its GEMM; oneDNN's conv reads the
activation in place. Two forms, one per CPU backend:
  - "int8" (the "torch" backend, on CPUs with int8 dot products): oneDNN's int8 conv
    (`torch.ops.onednn.qconv_pointwise`). Measured on an Intel Xeon with AMX, one thread, im2col + GEMM
    against it: smallcnn's 16->16 3x3 at 28x28 (batch 128) 3.1 -> 1.1 ms, resnet18's 7x7 stem 1.6 -> 0.65 ms.
    It loses where the weight is large and the map small (its per-call weight reorder: 256->256 3x3 at 4x4,
    0.45 -> 2.9 ms) and on 1x1 convs, whose GEMM needs no im2col.
  - "fp32" (the "reference" backend, on CPUs without them): oneDNN's fp32 conv on the integer-valued
    operands; and for dW, on either backend, torch's fp32 weight gradient over chunks of the batch
    (`grad_weight`). With oneDNN capped to AVX2 (a CPU without int8 dot products), one thread, smallcnn's
    16->16 3x3 at 28x28: forward ~30 -> 4 ms, dW ~45 -> 8 ms (im2col, the fp32 copy of the columns and the
    GEMM, against one conv call or 128 weight-gradient calls).
So the choice is measured per geometry (`choose`), once, at a geometry's DECIDE_AT-th call, like the fused
passes' exact-shape variants (int8fx.fusing): a training loop repeats its shapes, a one-off forward does not.

Exactness, "int8". oneDNN's int8 conv takes unsigned activations: the int8 codes plus 128 (a flip of the sign
bit) with zero point 128. With unit scales and an fp32 output, oneDNN turns the int32 sum over the unsigned
codes into fp32 and then removes the zero point's share (128 x the weights' sum), so both must be exact in
fp32: |sum| <= 255 x 127 x K < 2^24, i.e. a reduction K = window x in-channels/group of at most 518.
(Measured on an Intel Xeon with AMX: exact for K <= 518 on codes near +-127 in every trial; thousands
of outputs off by one from K = 540, whose sums stay below 2^24 but whose unsigned sums do not.) Within
that, the result is the integer tensor the GEMM path makes, held in fp32, and the epilogues turn it into
the same bits (`float(acc)` is that fp32). CPUs without int8 dot-product instructions compute u8 x s8
products in saturating 16-bit pair sums (`vpmaddubsw`), which would not be exact either.

Exactness, "fp32": every product of two codes is an integer of at most 127^2, so any sum of at most 1040
of them, in any order, stays below 2^24 and is exact in fp32 (the reason the reference GEMM cuts K at
1040, int8fx.kernels.reference): the forward within K <= 1040, dW by chunks of the batch of at most 1040
output positions, summed in fp64. Only a transform-based algorithm (Winograd, FFT) would round; oneDNN is
called for its direct algorithm (`torch.mkldnn_convolution`, which never takes NNPACK).

Both forms: `exact(form)` runs the worst cases once per process and a form is used only where they came out
right; only on plain CNN geometries (`_ordinary`: one group, no dilation), outside which oneDNN's int8 sums
were sometimes wrong and a dilated conv corrupted the heap; and the timing in `choose` compares both paths'
sums once per geometry.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .. import fusing
from ..quant.core import QMAX
from .im2col import GemmSpec
from .probe import FasterOf, best_of
from .reference import EXACT_K as EXACT_K_FP32  # 1040: the longest reduction fp32 sums exactly

EXACT_K = (2**24 - 1) // (255 * QMAX)  # 518: the longest reduction whose unsigned sums fp32 holds exactly
FORMS = {"torch": "int8", "reference": "fp32"}  # a CPU backend's form of the direct conv
DECIDE_AT = 3  # a geometry's call at which both paths are timed (earlier calls take the GEMM)
MARGIN = 1.1  # the direct conv must be this much faster to be picked
MAX_DECISIONS = 256  # geometries remembered per process; beyond, new ones keep the GEMM
MODE = "measure"  # "measure" (per geometry), "always" (wherever it is exact: tests), "never"

# per geometry: the GEMM (trusted) or the direct conv, each timed as the best of 2 calls
CHOICES = FasterOf(("the GEMM", "oneDNN's direct conv"), lambda fn, key: best_of(fn, reps=2), margin=MARGIN,
                   decide_at=DECIDE_AT, max_keys=MAX_DECISIONS, same=lambda gemm, d: torch.equal(d, gemm.to(d.dtype)))


def exact_k(form: str) -> int:
    """The longest reduction (window x in-channels/group) `form` sums exactly."""
    return EXACT_K if form == "int8" else EXACT_K_FP32


def _form(backend, t: Tensor, form: str | None = None) -> str | None:
    """`form` (default: the backend's own) if this backend's CPU sites may take it here and it passed
    `exact()`, else None; None on other devices, under a torch.func transform or a dispatch mode (a FLOP
    counter, a profiler's recorder), which see the GEMM path's ops as everywhere else."""
    name = getattr(backend, "name", None)
    if name not in FORMS:
        return None
    form = form or FORMS[name]
    return form if (MODE != "never" and t.device.type == "cpu" and exact(form)
                    and fusing.seen_by_everything((t,))) else None


def usable(backend, t: Tensor, spec: GemmSpec, in_channels: int) -> str | None:
    """The form in which the direct conv computes this product exactly here ("int8" / "fp32"), or None: a
    CPU backend whose form passed `exact()`, a non-transposed conv with K within the form's bound and an
    ordinary geometry (`_ordinary`)."""
    form = _form(backend, t)
    return form if (form is not None and not spec.is_linear and not spec.transposed
                    and spec.window * (in_channels // spec.groups) <= exact_k(form)
                    and _ordinary(spec, tuple(t.shape[1:-1]))) else None


def weight_grad_usable(backend, t: Tensor, spec: GemmSpec) -> bool:
    """Whether dW may run as oneDNN's fp32 weight gradient on chunks of the batch (`grad_weight`), on
    either CPU backend, for the int8 activation t [N, C, *S]: an ordinary geometry with at most
    EXACT_K_FP32 output positions per image (each chunk sums over its images' positions)."""
    sizes = tuple(t.shape[2:])
    return (_form(backend, t, "fp32") is not None and not spec.is_linear and not spec.transposed
            and _ordinary(spec, sizes) and math.prod(spec.out_size(sizes)) <= EXACT_K_FP32)


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


def _torch_weight(w: Tensor, spec: GemmSpec, in_channels: int) -> Tensor:
    """The GEMM path's weight operand w [g, K/g, O/g] (K in (kernel position, channel) order) in torch's
    layout [O, C/g, *k]."""
    g, nd = spec.groups, spec.dims
    o = g * w.shape[2]
    return w.reshape(g, *spec.kernel, in_channels // g, o // g).permute(0, nd + 2, nd + 1, *range(1, nd + 1)).reshape(
        o, in_channels // g, *spec.kernel)


def conv(xq_cl: Tensor, w: Tensor, spec: GemmSpec, form: str = "int8") -> Tensor:
    """The exact integer conv of int8 xq_cl [N, *S, C] (contiguous) with the int8 weight as the GEMM path's
    operand w [g, K/g, O/g] (K in (kernel position, channel) order): fp32 [N, *S', O] (contiguous) holding
    the integer sums."""
    n, *sizes, c = xq_cl.shape
    weight = _torch_weight(w, spec, c)
    stride, padding, dilation = list(spec.stride), [lo for lo, _ in spec.padding], list(spec.dilation)
    if form == "fp32":
        x = xq_cl.float().movedim(-1, 1)  # [N, C, *S] channels-last
        y = torch.mkldnn_convolution(x, weight.float(), None, padding, stride, dilation, spec.groups)
        return y.movedim(1, -1).contiguous()  # channels-last for 2-d and 3-d maps: a view, no copy
    o = weight.shape[0]
    ones, zeros = torch.ones(o), torch.zeros(o, dtype=torch.int64)
    packed = torch.ops.onednn.qconv_prepack(weight, ones, 1.0, 128, stride, padding, dilation, spec.groups,
                                            [n, c, *sizes])
    xu = torch.bitwise_xor(xq_cl.view(torch.uint8), 128).movedim(-1, 1)  # codes + 128, [N, C, *S] channels-last
    y = torch.ops.onednn.qconv_pointwise(xu, 1.0, 128, packed, ones, zeros, None, stride, padding, dilation,
                                         spec.groups, 1.0, 0, torch.float32, "none", [], "")
    return y.movedim(1, -1).contiguous()  # oneDNN writes channels-last: a view, no copy


def grad_weight(dq: Tensor, x_q: Tensor, spec: GemmSpec, w_shape) -> Tensor:
    """The exact integer dW [O, C/g, *k] of the quantized dY rows dq [M, O] (int8) and the saved int8
    activation x_q [N, C, *S]: torch's fp32 weight gradient (oneDNN's, or for small chunks its im2col +
    GEMM: no transform-based algorithm in a backward) on chunks of images whose output positions number at
    most EXACT_K_FP32 (so each chunk's sums are exact in fp32), the chunks added in fp64; fp32 where one
    chunk holds the batch."""
    n, c, *sizes = x_q.shape
    out = spec.out_size(tuple(sizes))
    per = EXACT_K_FP32 // math.prod(out)
    dy = dq.view(n, *out, dq.shape[1]).movedim(-1, 1)
    weight = torch.empty(tuple(w_shape), device=x_q.device)  # (only its shape is read)
    stride, padding, dilation = list(spec.stride), [lo for lo, _ in spec.padding], list(spec.dilation)
    acc = None
    for i in range(0, n, per):  # (each chunk converted to fp32 on its own: no fp32 copy of the whole batch)
        part = torch.ops.aten.convolution_backward(dy[i:i + per].float(), x_q[i:i + per].float(), weight, None, stride,
                                                   padding, dilation, False, [0] * spec.dims, spec.groups,
                                                   [False, True, False])[1]
        acc = part if n <= per else part.double() if acc is None else acc.add_(part)
    return acc


def choose(key: tuple, direct, gemm):
    """The result of `direct()` or `gemm()` (the same integers), whichever this geometry measured faster
    (`CHOICES`); a geometry where oneDNN's sums differ from the GEMM's, or where it fails, keeps the GEMM."""
    return direct() if MODE == "always" else CHOICES(key, gemm, direct)


def decisions() -> dict:
    """{geometry key: True where the direct conv was measured faster} (for tests and tools)."""
    return {key: pick == 1 for key, pick in CHOICES.decided.items()}


@functools.lru_cache(maxsize=None)
@fusing.outside_traces
def exact(form: str = "int8") -> bool:
    """Whether this CPU's oneDNN conv of `form` returns exact sums in the worst cases the direct path admits,
    a 1x1 and a 3x3 geometry (different kernels) at K near the form's bound: codes at +-127 whose sums are
    odd and just below 2^24 (one rounding in fp32 would show; for "int8" the unsigned sums), and for "int8"
    255 x 127 pairs (a saturating 16-bit pair sum would show). "fp32" checks dW at its bound likewise."""
    if not (hasattr(torch.ops.onednn, "qconv_pointwise") if form == "int8"
            else torch.backends.mkldnn.is_available() and hasattr(torch, "mkldnn_convolution")):
        return False
    try:
        for k in (1, 3):
            c = exact_k(form) // (k * k)
            spec = GemmSpec(2, (k, k), (1, 1), ((k // 2, k // 2),) * 2, (1, 1), 1)
            x = torch.full((2, 3, 3, c), QMAX, dtype=torch.int8)
            x[1] = -QMAX
            w = torch.full((1, c * k * k, 2), QMAX, dtype=torch.int8)
            w[0, 0, 0], w[0, :, 1] = QMAX - 1, -QMAX  # an odd sum; and its negation
            weight = w[0].t().reshape(2, k, k, c).movedim(-1, 1).double()  # [O, C, k, k]
            want = torch.nn.functional.conv2d(x.movedim(-1, 1).double(), weight, None, 1, k // 2).movedim(1, -1)
            if not torch.equal(conv(x, w, spec, form).double(), want):
                return False
        if form == "fp32":  # dW: 26 x 40 = 1040 output positions per image, two images (two chunks)
            spec = GemmSpec(2, (3, 3), (1, 1), ((1, 1),) * 2, (1, 1), 1)
            x = torch.full((2, 26, 40, 1), QMAX, dtype=torch.int8)
            x[:, 0, 0] = QMAX - 1
            dq = torch.full((2 * 26 * 40, 1), QMAX, dtype=torch.int8)
            xd = x.movedim(-1, 1).double()
            dyd = dq.double().view(2, 26, 40, 1).movedim(-1, 1)
            want = torch.ops.aten.convolution_backward(dyd, xd, xd.new_empty(1, 1, 3, 3), None, [1, 1], [1, 1], [1, 1],
                                                       False, [0, 0], 1, [False, True, False])[1]
            if not torch.equal(grad_weight(dq, x.movedim(-1, 1), spec, (1, 1, 3, 3)), want):
                return False
    except Exception:  # a build without oneDNN's quantized convs, or a torch whose ops take other arguments
        return False
    return True
