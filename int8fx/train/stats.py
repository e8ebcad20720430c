"""Statistics over seeds: mean, sample standard deviation, and the difference of two runs' means with
its standard error.

Why the standard error of the difference (and not just the two stds): the question a table answers
is "is policy A better than B", and with 3 seeds a 0.2-point gap means nothing unless it is large
against sqrt(s_A^2/n_A + s_B^2/n_B). The paired version uses that runs of one seed share their initial
weights and batches; it is reported too, as the sharper test when the seed effects are shared.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the std of a single value is 0."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    m = math.fsum(values) / n
    if n == 1:
        return m, 0.0
    return m, math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))


def diff_of_means(a: Sequence[float], b: Sequence[float]) -> tuple[float, float | None]:
    """(mean(a) - mean(b), its standard error sqrt(s_a^2/n_a + s_b^2/n_b)); the error is None when either
    side has a single value (no spread to estimate)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b)) if len(a) > 1 and len(b) > 1 else None
    return ma - mb, se


def paired_diff(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[float, float | None, int]:
    """Over the seeds both have: (mean of a[s] - b[s], its standard error std/sqrt(n), n); None error for n < 2."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("paired_diff: no seed in common")
    d = [a[s] - b[s] for s in seeds]
    m, sd = mean_std(d)
    return m, (sd / math.sqrt(len(d)) if len(d) > 1 else None), len(d)
