"""Which exact integer GEMM this CPU runs faster, measured once per process: what `backend="auto"` picks.

CPUs differ by an order of magnitude here. With int8 dot-product instructions (AVX512-VNNI, AVX-VNNI,
AMX-INT8) oneDNN's `torch._int_mm` runs 3-10x an fp32 GEMM; without them (e.g. an AMD EPYC of the Zen 2/3
generations) it ran at 3-6 GOP/s, far below the reference's fp32 GEMMs on K-chunks, and oneDNN's int8
kernels for such CPUs saturate 16-bit pair sums: `torch._int_mm` is first checked against int64 products
(`torch_backend.cpu_int_mm_wrong`) and never taken where it is not exact. Where both are exact they give the
same numbers, so the choice is only about speed, and it is made by measuring rather than by
reading flags (flags say what the CPU has, not what oneDNN in this build does with it): a few conv-shaped
GEMMs, each timed on both, the geometric mean of the ratios decides. `int8fx.kernels.cpu_report()` says what was chosen
and why, with the CPU model and its ISA flags; `inspect` and `int8fx bench` print it.
"""
from __future__ import annotations

import functools
import math
import platform
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..fusing import outside_traces

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16", "asimddp", "i8mm")
PROBE_SHAPES = ((4096, 576, 64), (1024, 1152, 128), (256, 2304, 256), (256, 64, 64))  # (M, K, N) of conv GEMMs
MARGIN = 1.1  # the int8 path must be this much faster to be picked


@dataclass
class CpuChoice:
    backend: str  # "torch" (torch._int_mm) or "reference" (fp32 GEMMs on K-chunks)
    reason: str
    cpu: str
    flags: tuple
    speedup: float  # reference time / int8 time, geometric mean over PROBE_SHAPES
    timings: dict = field(default_factory=dict)


def cpu_model_and_flags() -> tuple[str, tuple]:
    model, flags = platform.processor() or platform.machine(), ()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return model, flags
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            have = set(value.split())
            flags = tuple(f for f in ISA_FLAGS if f in have)
    return model, flags


def best_of(fn, reps: int = 3, warmup: bool = False) -> tuple[float, object]:
    """(the fastest of `reps` timed calls of fn in seconds, the last call's result); one untimed call first
    when `warmup`. The minimum: on a shared machine the noise only ever adds time."""
    if warmup:
        fn()
    best, out = math.inf, None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


class FasterOf:
    """Per key (a conv geometry, a tensor shape), which of several functions making the same numbers runs
    faster, measured once: the kernels' choices that depend on the machine and the shape (oneDNN's direct conv
    or the GEMM, int8fx.kernels.direct; an im2col copy on CUDA, int8fx.kernels.windows).

    The first candidate is the trusted one, what the pipeline computes without the choice: it runs on a key's
    first `decide_at - 1` calls (a one-off call measures nothing; a training loop repeats its shapes), and the
    `decide_at`-th times every candidate with `timer(fn, key)` -> (seconds, result). A candidate is kept only if
    its result equals the trusted one's (`same(trusted, other)`) and it is `margin` times faster; one that
    raises RuntimeError or differs is dropped with a warning naming it (`names`). That call returns the trusted
    result; later calls run the kept candidate. Beyond `max_keys` decided keys, new keys keep the trusted one.
    `decided` maps each key to the index of its candidate."""

    def __init__(self, names: tuple, timer, margin: float = 1.0, decide_at: int = 3, max_keys: int = 256,
                 same=torch.equal) -> None:
        self.names, self.timer, self.margin, self.decide_at, self.max_keys, self.same = (
            names, timer, margin, decide_at, max_keys, same)
        self.decided: dict = {}
        self.calls: dict = {}  # key -> calls so far, until decided

    def __call__(self, key, *candidates):
        pick = self.decided.get(key)
        if pick is not None:
            return candidates[pick]()
        if len(self.decided) >= self.max_keys:
            return candidates[0]()
        if len(self.calls) > 4096:  # (a detector's stream of input sizes: forget the counts, keep memory bounded)
            self.calls.clear()
        calls = self.calls[key] = self.calls.get(key, 0) + 1
        if calls < self.decide_at:
            return candidates[0]()
        self.calls.pop(key, None)  # (pop: two threads may decide the same key at once)
        best_time, trusted = self.timer(candidates[0], key)
        best = 0
        for i, fn in enumerate(candidates[1:], 1):
            try:
                t, out = self.timer(fn, key)
            except RuntimeError as e:  # (a geometry a library refuses: never seen, but training must go on)
                warnings.warn(f"int8fx: {self.names[i]} failed for the geometry {key} ({e}); that geometry keeps "
                              f"{self.names[0]} (same numbers as always)")
                continue
            if not self.same(trusted, out):
                warnings.warn(f"int8fx: {self.names[i]} gave other numbers than {self.names[0]} for the geometry "
                              f"{key}; that geometry keeps {self.names[0]} (same numbers as always)")
                continue
            if t * self.margin < best_time:
                best, best_time = i, t
        self.decided[key] = best
        return trusted


@functools.lru_cache(maxsize=1)
@outside_traces
def cpu_choice() -> CpuChoice:
    """The measured choice for CPU tensors (cached for the process)."""
    from .reference import exact_int_bmm
    from .torch_backend import cpu_int_mm_wrong, int_mm_exact

    model, flags = cpu_model_and_flags()
    wrong = cpu_int_mm_wrong()
    if wrong:  # never faster than exact: the reference computes the same integers on any CPU
        return CpuChoice("reference", f"torch._int_mm is not exact on this CPU: {wrong} -> reference", model, flags, 0.0)
    gen = torch.Generator().manual_seed(0)
    timings, ratios = {}, []
    try:
        for m, k, n in PROBE_SHAPES:
            a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
            b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen)
            af, bf = a.float().unsqueeze(0), b.float().unsqueeze(0)
            t_int8 = best_of(lambda: int_mm_exact(a, b), warmup=True)[0]
            t_ref = best_of(lambda: exact_int_bmm(af, bf), warmup=True)[0]
            timings[f"{m}x{k}x{n}"] = {"int_mm_s": t_int8, "reference_s": t_ref}
            ratios.append(t_ref / t_int8)
    except RuntimeError as e:  # (a failure the exactness check did not meet)
        return CpuChoice("reference", f"torch._int_mm failed on this CPU ({e})", model, flags, 0.0)
    speedup = math.exp(sum(map(math.log, ratios)) / len(ratios))
    pick = "torch" if speedup >= MARGIN else "reference"
    why = (f"torch._int_mm (oneDNN int8) measured {speedup:.1f}x the fp32 reference GEMM on conv-shaped products"
           + (" -> torch" if pick == "torch" else f" (< {MARGIN}x) -> reference"))
    return CpuChoice(pick, why, model, flags, speedup, timings)
