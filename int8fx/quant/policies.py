"""The gradient clip policies of the two papers (ALGORITHMS.md), built as one structure.

A policy is a clip *rule* applied at two granularities. The input-gradient GEMM reduces over the output
channel o, so its operand can only have one clip (per tensor); the weight-gradient GEMM reduces over rows,
so its operand may have one clip per output channel (GVQ). Every rule therefore works on a matrix
g[N, C] and returns one clip per column: a per-channel slot is dY itself ([M, O]), a per-tensor slot is
the [numel, 1] view of it. That gives the paper's ablation as a table instead of six classes of code:

    policy            rule          dW operand clip   dX operand clip
    per-tensor        absmax        per tensor        per tensor       (the baseline, in grad.py)
    gvq               absmax        per channel       per tensor
    mcs               mcs           per tensor        per tensor
    gvq-mcs           mcs           per channel       per tensor       (default)
    gvq-mcs-search    mcs-search    per channel       per tensor
    dsgc              dsgc          per tensor        per tensor

State rules: each rule names its running state (one [C] buffer per name and slot, so it is in
`state_dict` and `inspect` can read it). A column whose gradient is all zero tells nothing about its
distribution, and a step with a non-finite gradient tells nothing at all: neither updates state (the
op poisons that step's scales itself, so Inf/NaN still reaches the loss scaler).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..fusing import SUM_DTYPE, computed_once
from .core import dequantize, divide, quantize, scale_from_clip
from .grad import GradQuantizer, register_grad_quantizer

# Bounded 1-D search over clip = r * absmax, r in [SEARCH_LO, 1]: a geometric grid first (heavy tails
# put the optimum of a direction/magnitude objective far below absmax, so the grid must reach there
# at constant relative resolution), then SEARCH_ROUNDS linear grids, each spanning the previous grid's
# neighbours of its best point: resolution ~0.5% of r for 32 + 3 * 9 objective evaluations.
SEARCH_LO = 2.0 ** -10
SEARCH_COARSE = 32
SEARCH_FINE = 8
SEARCH_ROUNDS = 3


def fake_quant(g: Tensor, clip: Tensor) -> Tensor:
    """Q_c(g) with nearest rounding, one clip per column of g (clip broadcast against g's last dim)."""
    s = scale_from_clip(clip)
    return dequantize(quantize(g, s, out_dtype=torch.float32), s)


def column_cosine_distance(g: Tensor, clip: Tensor) -> Tensor:
    """d(c) = 1 - <g, Q_c(g)> / (|g| |Q_c(g)|) per column; 1 where Q_c(g) is all zero (direction lost).

    Computed as |g/|g| - q/|q||^2 / 2, which equals it but keeps its precision: for INT8, d is ~1e-5,
    below the rounding error of 1 - cos in fp32 over a large tensor, so the textbook form would make
    the search chase noise (and can even go negative)."""
    q = fake_quant(g, clip)
    gn, qn = g.norm(dim=0), q.norm(dim=0)
    ok = (gn > 0) & (qn > 0)
    d = (g * qn - q * gn).square().sum(0) / (2 * (gn * qn).square()).clamp_min(1e-38)
    return torch.where(ok, d, torch.ones_like(d))


def magnitude_weight(g: Tensor, amax: Tensor, alpha: float) -> Tensor:
    """exp(alpha |g| / |g|_max): large gradient elements move the weights most, so clipping them costs
    more than rounding many small ones coarsely; dividing by the column's |g|_max makes alpha scale-free."""
    return torch.exp(alpha * g.abs() / torch.where(amax > 0, amax, torch.ones_like(amax)))


def magnitude_weighted_error(g: Tensor, clip: Tensor, weight: Tensor) -> Tensor:
    """MCS's discrete objective per column: sum |g - Q_c(g)| * weight (weight from `magnitude_weight`)."""
    return ((g - fake_quant(g, clip)).abs() * weight).sum(0)


def search_ratio(objective: Callable[[Tensor], Tensor], amax: Tensor) -> Tensor:
    """argmin over r in [SEARCH_LO, 1] of objective(r * amax), independently per column: ratio [C].

    Vectorised over columns (each candidate is one pass over g for all columns at once); the loops are
    over candidates and rounds, never over channels."""

    def best(ratios: Tensor) -> Tensor:  # ratios [R, C] -> index [C] of the best row
        return torch.stack([objective(r * amax) for r in ratios]).argmin(0)

    C = amax.numel()
    grid = torch.logspace(math.log2(SEARCH_LO), 0.0, SEARCH_COARSE, base=2.0, device=amax.device)[:, None].expand(-1, C)
    t = torch.linspace(0.0, 1.0, SEARCH_FINE, device=amax.device)[:, None]
    for round_ in range(SEARCH_ROUNDS + 1):
        i = best(grid)[None]
        centre = grid.gather(0, i)[0]
        if round_ == SEARCH_ROUNDS:
            return centre
        left, right = grid.gather(0, (i - 1).clamp_min(0))[0], grid.gather(0, (i + 1).clamp_max(len(grid) - 1))[0]
        grid = torch.cat([centre[None], left + t * (right - left)]).sort(0).values  # the winner stays a candidate


def mcs_gaussian(g, lam: float) -> Tensor:
    """MCS family test per column: True (bell-shaped) when P(|g| > sigma) > lam, else inverted-T.

    P(|g|>sigma) is 0.317 for a Gaussian and e^-sqrt(2) = 0.243 for a Laplace; lam = 0.3 separates them.
    `g` is the matrix [N, C], or the `SlotMoments` of one (the backward op's fast path)."""
    if isinstance(g, SlotMoments):
        return g.count_above(g.sigma()) > lam * g.n
    n = g.shape[0]
    # moments by two plain sums: Tensor.std(dim=0) runs ~27x slower on CPU (3.5 ms vs 0.13 ms measured on a
    # [4096, 144] gradient). Gradients are near zero-mean, so E[g^2] - E[g]^2 loses no useful precision.
    mean = divide(g.sum(0), n)
    sigma = (divide((g * g).sum(0), n) - mean * mean).clamp_min(0).sqrt()
    return (g.abs() > sigma).sum(0) > lam * n


class SlotMoments:
    """The statistics of one slot that the absmax and MCS rules read, from per-column moments of dY [M, O]
    without forming the slot's matrix: the dW slot per channel (the columns) or per tensor, the dX slot as
    dY s_W[o] per tensor (weighted sums of the columns' moments; |dY s_W| > t is |dY| > t / s_W). The
    counts take one more pass over dY. Same definitions as on the matrix; float sums round differently."""

    def __init__(self, rows: Tensor, n, total, total_sq, amax, weights: Tensor | None, per_column: bool) -> None:
        self.rows, self.n, self.total, self.total_sq, self.amax = rows, n, total, total_sq, amax
        self.weights, self.per_column = weights, per_column

    def sigma(self) -> Tensor:
        mean = divide(self.total, self.n)
        return (divide(self.total_sq, self.n) - mean * mean).clamp_min(0).sqrt()

    def count_above(self, threshold: Tensor) -> Tensor:
        thr = threshold if self.weights is None else threshold / self.weights  # [C] thresholds on |dY|
        above = (self.rows.abs() > computed_once(thr)).sum(0, dtype=SUM_DTYPE)
        return above if self.per_column else above.sum().reshape(1)


def slot_moments(rows: Tensor, s_w: Tensor, channelwise: bool) -> tuple[SlotMoments, SlotMoments]:
    """(dW slot, dX slot) moments of dY rows [M, O]: one pass for sums, squares and extremes."""
    m, o = rows.shape
    lo, hi = torch.aminmax(rows, dim=0)
    camax = torch.maximum(-lo, hi)
    csum, csq = rows.sum(0), (rows * rows).sum(0)
    if channelwise:
        w = SlotMoments(rows, m, csum, csq, camax, None, True)
    else:
        w = SlotMoments(rows, m * o, csum.sum().reshape(1), csq.sum().reshape(1), camax.amax().reshape(1), None, False)
    x = SlotMoments(rows, m * o, (s_w * csum).sum().reshape(1), (s_w * s_w * csq).sum().reshape(1),
                    (s_w * camax).amax().reshape(1), s_w, False)
    return w, x


# ----------------------------------------------------------------------------------------------- rules
# rule(g [N, C], amax [C], state {name: [C]}, step, config) -> (clip [C], new state {name: [C]})


def absmax_rule(g, amax, state, step, cfg):
    return amax, {}


def mcs_rule(g, amax, state, step, cfg):
    """Gaussian column: clip = absmax. Inverted-T column: s_t = (1 - kA) s_{t-1} + A absmax_t (first
    time the column is seen, when no previous clip exists: s = absmax)."""
    gaussian = mcs_gaussian(g, cfg.mcs_lambda)
    prev = state["clip"]
    blended = (1 - cfg.mcs_k * cfg.mcs_a) * prev + cfg.mcs_a * amax
    clip = torch.where(gaussian | (prev <= 0), amax, blended)
    return clip, {"clip": clip, "gaussian": gaussian.float()}


def mcs_search_rule(g, amax, state, step, cfg):
    w = magnitude_weight(g, amax, cfg.mcs_alpha)
    ratio = search_ratio(lambda c: magnitude_weighted_error(g, c, w), amax)
    return ratio * amax, {"ratio": ratio}


SEARCH_SAMPLE = 2**15  # DSGC searches on at most this many entries of a per-tensor operand (below)


def dsgc_rule(g, amax, state, step, cfg):
    """Every `clip_update_period` steps take the searched ratio; in between reuse the last one, applied to
    the current absmax (the clip follows the gradient's scale, which drifts much faster than its shape).

    The choice is a device-side `where` on the step counter, so no step count is read on the host: the
    search runs every step, on at most SEARCH_SAMPLE entries (a deterministic stride that is prime, so it
    visits every channel of the [M, O] or [N, O, ...] order it reads), which keeps its cost bounded. The
    distance is an average over entries, so a 32k sample estimates it to well below the flat minimum's
    width; tensors smaller than that are searched whole."""
    unit = torch.where(amax > 0, amax, torch.ones_like(amax))
    # the distance is scale-free: search on g / absmax, whose squares neither underflow (|g| ~ 1e-30) nor
    # overflow (|g| ~ 1e30), which would make every candidate tie
    g_unit = _strided_sample(g) / unit
    searched = search_ratio(lambda c: column_cosine_distance(g_unit, c), amax / unit)
    reused = torch.where(state["ratio"] > 0, state["ratio"], torch.ones_like(amax))  # never searched: absmax
    ratio = torch.where(step % cfg.clip_update_period == 0, searched, reused)
    return ratio * amax, {"ratio": ratio}


def _strided_sample(g: Tensor) -> Tensor:
    rows = g.shape[0]
    if rows <= SEARCH_SAMPLE:
        return g
    stride = _next_prime(-(-rows // SEARCH_SAMPLE))
    return g[::stride]


def _next_prime(n: int) -> int:
    n = max(n, 2)
    while any(n % d == 0 for d in range(2, int(n**0.5) + 1)):
        n += 1
    return n


absmax_rule.state = ()
mcs_rule.state = ("clip", "gaussian")
absmax_rule.moments = mcs_rule.moments = True  # they read only moments and counts: SlotMoments serves them
mcs_search_rule.state = ("ratio",)
dsgc_rule.state = ("ratio",)


class ClipPolicy(GradQuantizer):
    """A rule at the granularities of the module docstring. Subclasses set `rule` and `channelwise`.

    Buffers: `steps` (backward passes; DSGC's period counts it) and, per slot `w` (dW operand, [O] or [1])
    and `x` (dX operand, [1]), one buffer per name in `rule.state`, e.g. `w_clip`, `w_gaussian`, `x_ratio`.
    """

    rule = staticmethod(absmax_rule)

    def __init__(self, num_channels: int, config) -> None:
        super().__init__(num_channels, config)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        for slot, width in (("w", num_channels if self.channelwise else 1), ("x", 1)):
            for name in self.rule.state:
                self.register_buffer(f"{slot}_{name}", torch.zeros(width))

    @classmethod
    def compute_clips(cls, g, g_input, state, params):
        step = state["steps"]
        g_w = g if cls.channelwise else g.reshape(-1, 1)
        cw, new = cls._column_clips(g_w, "w", state, step, params)
        cx, new_x = cls._column_clips(g_input.reshape(-1, 1), "x", state, step, params)
        new.update(new_x, steps=step + 1)
        return (cw if cls.channelwise else cw.expand(g.shape[-1])), cx[0], new

    @classmethod
    def statistics(cls, rows: Tensor, s_w: Tensor, state: dict, params):
        """For rules that read only moments and counts (absmax, MCS): dY is read twice (moments, counts)
        and the dX operand dY s_W is never formed (`SlotMoments`)."""
        if not getattr(cls.rule, "moments", False):
            return super().statistics(rows, s_w, state, params)
        g = rows.float()
        w_slot, x_slot = slot_moments(g, s_w, cls.channelwise)
        step = state["steps"]
        cw, new = cls._column_clips(w_slot, "w", state, step, params, w_slot.amax)
        cx, new_x = cls._column_clips(x_slot, "x", state, step, params, x_slot.amax)
        new.update(new_x, steps=step + 1)
        cw, cx, new = cls.finish(cw if cls.channelwise else cw.expand(g.shape[-1]), cx[0], new, g.shape[-1])
        poison = torch.where(torch.isfinite(w_slot.amax).all(), 0.0, float("nan")).to(g.device)
        return cw, cx, new, poison

    @classmethod
    def _column_clips(cls, g, slot: str, state: dict, step: Tensor, params, amax: Tensor | None = None):
        if amax is None:
            g = g.detach().float()
            amax = g.abs().amax(0)
        old = {n: state[f"{slot}_{n}"] for n in cls.rule.state}
        clip, new = cls.rule(g, amax, old, step, params)
        seen = (amax > 0) & torch.isfinite(amax).all()  # all-zero column or non-finite step: state kept
        kept = {f"{slot}_{n}": torch.where(seen, v, old[n]).to(old[n].dtype) for n, v in new.items()}
        return torch.where(amax > 0, clip, torch.zeros_like(clip)), kept  # zero column: scale 0, no NaN


@register_grad_quantizer("gvq")
class GVQ(ClipPolicy):
    """Gradient Vectorized Quantization alone: per-channel absmax for dW (no clipping)."""

    fusable = True

    channelwise = True


@register_grad_quantizer("mcs")
class MCS(ClipPolicy):
    """Magnitude-aware Clipping alone: the MCS rule on one per-tensor clip (the ablation without GVQ)."""

    fusable = True

    rule = staticmethod(mcs_rule)


@register_grad_quantizer("gvq-mcs")
class GVQMCS(ClipPolicy):
    """Distribution Adaptive INT8 as transcribed: per-channel family test and inverted-T running clip."""

    fusable = True

    rule = staticmethod(mcs_rule)
    channelwise = True


@register_grad_quantizer("gvq-mcs-search")
class GVQMCSSearch(ClipPolicy):
    """Per channel, the clip that numerically minimises MCS's magnitude-weighted error (alpha = mcs_alpha)."""

    rule = staticmethod(mcs_search_rule)
    channelwise = True


@register_grad_quantizer("dsgc")
class DSGC(ClipPolicy):
    """Direction Sensitive Gradient Clipping: per-tensor clip minimising the cosine distance."""

    rule = staticmethod(dsgc_rule)
