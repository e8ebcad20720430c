"""Identical INT8 quantizer state on every DistributedDataParallel rank, one collective per step.

Why this exists. DDP averages gradients but knows nothing of quantizer state: each rank's INT8 layers
update their clips, running per-channel clips, MCS families, DSGC ratios and DCLRS deviations from
that rank's shard only, so the ranks drift apart (DDP's default `broadcast_buffers=True` hides this
by overwriting every rank with rank 0's values at the next forward: rank 0's shard then decides for
everyone, and the DCLRS factors of the step just taken still differed per rank). `QuantStateSync`
combines the ranks' state after every backward so all ranks continue from the same, all-shard state.

Use (the whole recipe is in examples/train_ddp.py)::

    qm = int8fx.convert(model, cfg).to(device)
    ddp = DistributedDataParallel(qm, device_ids=[local_rank] if cuda else None)
    sync = QuantStateSync(ddp)                 # after init_process_group; once
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        sync()                                 # after backward, BEFORE optimizer.step
        opt.step()                             # e.g. a DeviationLRScaler: reads the synced deviations

Why after backward and before `step`: forward and backward stage the quantizer state they compute as
*pending* state, which the optimizer step commits (int8fx.nn.state); the sync combines the pending state,
so every rank commits the same values, and DeviationLRScaler reads the (pending) deviations in `step`, so
the factors are equal on every rank only if the deviations were combined in between. With gradient accumulation (`ddp.no_sync()`), call it once per
optimizer step, after the last backward.

Why an explicit call rather than a DDP communication hook: a hook runs once per *gradient bucket*
while backward is still running, so when it fires the layers of later buckets have not updated their
state yet; piggy-backing on the last bucket depends on DDP's bucket order, on `static_graph`, and on
every INT8 layer owning a parameter (functional sites do not). One call after backward sees every
layer's final state whatever the bucketing, and costs one small extra collective per step.

Why one all-gather rather than one all-reduce: the state needs different reductions (max for
absmax-like clips, mean for ratios and deviations, a vote for families), and an all-reduce applies one
op to the whole buffer; two all-reduces would double the latency. So every buffer of every layer is
packed into ONE flat float64 vector (exact for fp32 values and int64 counters below 2^53), gathered in
ONE collective ([world_size, n]; n is a few floats per output channel, kilobytes for a ResNet), and
each rank applies the per-buffer reductions locally to the same gathered data in the same order. That
also makes the result bit-identical on every rank by construction, independent of the collective's
summation order.

Reductions, by buffer name (fnmatch patterns, first match wins; a policy class may declare its own in
a `sync_reductions = {name: kind}` class attribute, which takes precedence):

    step, steps           equal  counters of backward passes. Identical by construction (every rank
                                 runs every step); they seed stochastic rounding and DSGC's search
                                 period, so a difference is a real desynchronisation: raise, naming it.
    act_clip              max    the batch absmax of the layer input: the max over shards IS the
                                 absmax of the concatenated batch (exact).
    act_clip_ema          max    ema' = 0.9 ema + 0.1 clip (or clip on the first step) is monotone in
                                 clip and ema was synced the step before, so max over ranks equals the
                                 EMA of the all-shard absmax (exact, even in floating point).
    last_clip_*, *_clip   max    absmax-like per-channel clips. For absmax rules max over shards is the
                                 all-shard absmax (exact). MCS's inverted-T running clip
                                 (1 - kA) prev + A absmax is monotone in absmax with prev synced, so max
                                 is exact too when the ranks agree on the family; when they disagree it
                                 keeps the larger clip (less clipping: no rank's largest gradients are
                                 clipped harder than that rank chose).
    *_gaussian            vote   MCS family flags (1 = Gaussian): 1 where at least half of the ranks
                                 say Gaussian (a tie picks Gaussian, whose clip is the unclipped absmax).
                                 Every rank ends up with the same family for every channel.
    *_ratio               mean   DSGC / search ratios c / absmax: a shape parameter of the gradient
                                 distribution each shard estimates with noise; the mean of the shard
                                 estimates is the natural pooled estimate (max would bias every search
                                 back towards plain absmax).
    deviation             mean   DCLRS cosine distance of the layer's quantized dY. The exact all-shard
                                 value would need <g, q>, |g|^2 and |q|^2 per rank; with equal shards
                                 the mean of the shards' distances is their pooled estimate.

NaN in a rank's value (a step with a non-finite activation, say) is ignored by max/mean/vote, so one
rank's NaN does not poison the others; NaN remains only where every rank has NaN.

Units: with a mean-reduced loss each rank's dY is world_size times larger than the dY of one process
on the concatenated batch (DDP divides the gradients by world_size afterwards), so gradient clips in
the synced state are world_size times the single-process values; ratios, families and deviations are
scale-free. Checkpoints move between world sizes fine: the running clips re-adapt within a few steps.

Stochastic rounding: the sync gives each rank its own rounding stream (`Int8Layer.rounding_stream` =
rank), so ranks do not draw identical noise for their shards (which would correlate their rounding
errors and not average them out); noise remains reproducible from (seed, layer, step, rank).

Backends: gloo (CPU tensors; state on CUDA is moved to the CPU for the collective) and NCCL (the state's
own CUDA device). Tested with gloo on CPU across 2 processes, and with NCCL on one H200 (one rank: NCCL
takes one per GPU; tests/test_ddp.py, 2026-12-04); NCCL across several GPUs is the same code, not yet run.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from .nn.modules import Int8Layer

REDUCTIONS: tuple[tuple[str, str], ...] = (
    ("step", "equal"),
    ("steps", "equal"),
    ("act_clip", "max"),
    ("act_clip_ema", "max"),
    ("last_clip_*", "max"),
    ("*_clip", "max"),
    ("*_gaussian", "vote"),
    ("*_ratio", "mean"),
    ("deviation", "mean"),
)
KINDS = ("equal", "max", "mean", "vote")


def reduction_for(module: nn.Module, name: str) -> str | None:
    """The reduction kind of buffer `name` of `module`: the class's `sync_reductions`, else REDUCTIONS."""
    declared = getattr(type(module), "sync_reductions", None) or {}
    if name in declared:
        return declared[name]
    for pattern, kind in REDUCTIONS:
        if fnmatch.fnmatchcase(name, pattern):
            return kind
    return None


def reduce_gathered(kind: str, x: Tensor) -> Tensor:
    """Combine one kind's segment of the gathered state, x [world_size, n] float64 -> [n].
    NaN entries are ignored (NaN only where every rank has NaN)."""
    nan = torch.isnan(x)
    if kind in ("max", "equal"):
        m = torch.where(nan, torch.full_like(x, -torch.inf), x).amax(0)
        return torch.where(nan.all(0), torch.full_like(m, torch.nan), m)
    if kind == "mean":
        return torch.nanmean(x, 0)
    if kind == "vote":
        return (torch.nanmean(x, 0) >= 0.5).to(x.dtype)
    raise ValueError(f"unknown reduction {kind!r}; known: {', '.join(KINDS)}")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class QuantStateSync:
    """Make every rank's INT8 quantizer state identical after each step; see the module docstring.

    model: the converted model, bare or wrapped in DistributedDataParallel.
    process_group: the DDP group (default: the world).
    check_counters: raise when the step counters differ between ranks (a rank skipped a backward);
        counters are never written, so with False they are left as each rank has them.

    Without an initialised process group (or with one rank) `sync()` does nothing, so one training
    script runs with and without torchrun. `pack`, `reduce` and `unpack` are the three stages of
    `sync()`, public so that a single process can apply the same combination to model replicas.
    """

    def __init__(self, model: nn.Module, process_group=None, check_counters: bool = True) -> None:
        self.model, self.group, self.check_counters = _unwrap(model), process_group, check_counters
        # (full name, pending state tensor of that buffer, kind): what a step's forward/backward computed,
        # before the optimizer step commits it (int8fx.nn.state)
        self.entries: list[tuple[str, torch.Tensor, str]] = []
        unknown = []
        for lname, layer in self.model.named_modules():
            if not isinstance(layer, Int8Layer):
                continue
            for sname in layer.state_tensors():
                owner_path, _, bname = sname.rpartition(".")
                owner = layer.get_submodule(owner_path) if owner_path else layer
                kind = reduction_for(owner, bname)
                full = f"{lname}.{sname}" if lname else sname
                if kind is None:
                    unknown.append(f"{full} ({type(owner).__name__})")
                elif kind not in KINDS:
                    raise ValueError(f"{type(owner).__name__}.sync_reductions[{bname!r}] = {kind!r}; "
                                     f"known: {', '.join(KINDS)}")
                else:
                    self.entries.append((full, layer.pending_tensors([sname])[0], kind))
        if unknown:
            raise ValueError(
                "QuantStateSync has no reduction rule for quantizer buffer(s) " + ", ".join(unknown) + ". Declare "
                "one on the class, e.g. `sync_reductions = {'my_buffer': 'max'}` (kinds: " + ", ".join(KINDS) + ")")
        if not self.entries:
            raise ValueError("QuantStateSync found no Int8Layer in the model: pass the model returned by int8fx.convert()")
        self.entries.sort(key=lambda e: KINDS.index(e[2]))  # stable: one contiguous segment per kind
        self.segments: dict[str, tuple[int, int]] = {}
        offset = 0
        for kind in KINDS:
            n = sum(t.numel() for _, t, k in self.entries if k == kind)
            self.segments[kind] = (offset, offset + n)
            offset += n
        self.numel = offset
        self.rank, self.world_size = 0, 1
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        for m in self.model.modules():
            if isinstance(m, Int8Layer):
                m.rounding_stream = self.rank

    # ------------------------------------------------------------------ the three stages
    def pack(self) -> Tensor:
        """All quantizer state as one flat float64 vector (entries grouped by reduction kind)."""
        return torch.cat([t.detach().reshape(-1).to(torch.float64) for _, t, _ in self.entries])

    def reduce(self, gathered: Tensor) -> Tensor:
        """[world_size, n] gathered vectors -> the combined vector [n]. Raises if counters differ."""
        out = torch.empty_like(gathered[0])
        for kind, (lo, hi) in self.segments.items():
            if hi > lo:
                out[lo:hi] = reduce_gathered(kind, gathered[:, lo:hi])
        lo, hi = self.segments["equal"]
        if self.check_counters and hi > lo and not bool((gathered[:, lo:hi] == gathered[:1, lo:hi]).all()):
            bad = (gathered[:, lo:hi] != gathered[:1, lo:hi]).any(0).nonzero().flatten().tolist()
            names = self._names_at(lo + i for i in bad)
            raise RuntimeError(
                f"INT8 step counters differ between ranks for {', '.join(names)}: the ranks ran different "
                f"numbers of backward passes through these layers (values per rank: "
                f"{gathered[:, lo + bad[0]].tolist()}). Every rank must run forward+backward on every step.")
        return out

    def unpack(self, flat: Tensor) -> None:
        """Write a combined vector back into the buffers (cast to each buffer's dtype and device)."""
        i = 0
        with torch.no_grad():
            for _, buf, kind in self.entries:
                n = buf.numel()
                if kind != "equal":  # counters were checked equal: nothing to write
                    buf.copy_(flat[i:i + n].view(buf.shape).to(buf.device, buf.dtype))
                i += n

    # ------------------------------------------------------------------ collective
    def _device(self, like: Tensor) -> torch.device:
        return torch.device("cpu") if dist.get_backend(self.group) == "gloo" else like.device

    def gather(self) -> Tensor:
        """The packed state of every rank, [world_size, n] (ONE collective: all_gather)."""
        flat = self.pack()
        flat = flat.to(self._device(flat))
        parts = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(parts, flat, group=self.group)
        return torch.stack(parts)

    def sync(self) -> None:
        """Combine every rank's quantizer state; call after backward, before optimizer.step()."""
        if self.world_size == 1:
            return
        self.unpack(self.reduce(self.gather()))

    __call__ = sync

    def divergence(self) -> float:
        """Largest |difference| of any quantizer state value between this rank and any other (0.0 when all
        ranks agree). A diagnostic: it costs one collective and a device sync, so not for every step."""
        if self.world_size == 1:
            return 0.0
        g = self.gather()
        d = torch.nan_to_num((g - g[self.rank]).abs(), nan=0.0)  # NaN on both sides: equal
        d = torch.where(torch.isnan(g) != torch.isnan(g[self.rank]), torch.inf, d)  # NaN on one side: not
        return float(d.max())

    def _names_at(self, positions) -> list[str]:
        bounds, start = [], 0
        for name, t, _ in self.entries:
            n = t.numel()
            bounds.append((start, start + n, name))
            start += n
        return sorted({name for p in positions for lo, hi, name in bounds if lo <= p < hi})

    def __repr__(self) -> str:
        counts = {k: sum(1 for e in self.entries if e[2] == k) for k in KINDS}
        return (f"QuantStateSync(buffers={len(self.entries)} {counts}, values={self.numel}, "
                f"rank={self.rank}/{self.world_size})")


__all__ = ["QuantStateSync", "REDUCTIONS", "reduce_gathered", "reduction_for"]
