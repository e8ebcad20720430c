"""The numbers of an experiment's summary: per run label, top-1 over seeds (mean, std, min, max), its
difference to FP32 and to the run's reference, each with a standard error (int8fx.train.stats).

The reference of a run is what the papers' ablations compare it with: a gradient policy against
per-tensor quantization (their "global" baseline) with the same rounding, a `+dclrs` run against the
same policy without DCLRS. So "GVQ helps" reads off the `gvq` row, "DCLRS helps" off `dsgc+dclrs`.
"""
from __future__ import annotations

from .recipe import DCLRS_SUFFIX, FP32, ROUNDING_SEP
from .stats import diff_of_means, mean_std, paired_diff

PER_TENSOR = "per-tensor"


def reference_of(label: str) -> str | None:
    """The label a run is compared with in the ablation table (None for FP32 and per-tensor)."""
    name, sep, rounding = label.partition(ROUNDING_SEP)
    if name in (FP32, PER_TENSOR):
        return None
    if name.endswith(DCLRS_SUFFIX):
        return name[: -len(DCLRS_SUFFIX)] + sep + rounding
    return PER_TENSOR + sep + rounding


def _compare(row: dict, rs: list[dict], other: list[dict] | None, key: str) -> None:
    """row[f"delta_vs_{key}"] (+ _se, and the paired version) of rs against other (None: no such run)."""
    if not other:
        row.update({f"delta_vs_{key}": None, f"delta_vs_{key}_se": None,
                    f"paired_vs_{key}": None, f"paired_vs_{key}_se": None})
        return
    a, b = [r["top1"] for r in rs], [r["top1"] for r in other]
    row[f"delta_vs_{key}"], row[f"delta_vs_{key}_se"] = diff_of_means(a, b)
    try:
        row[f"paired_vs_{key}"], row[f"paired_vs_{key}_se"], _ = paired_diff(
            {r["seed"]: r["top1"] for r in rs}, {r["seed"]: r["top1"] for r in other})
    except ValueError:  # no seed in common
        row[f"paired_vs_{key}"] = row[f"paired_vs_{key}_se"] = None


def summarize(records: list[dict]) -> list[dict]:
    """One row per run label, in first-appearance order: mean, std (sample), min and max of top-1 over
    seeds; the gap to FP32 and to the reference run, each with its standard error (None with one seed)
    and paired over common seeds; mean losses, times and the number of diverged runs."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["label"], []).append(r)
    rows = []
    for label, rs in by.items():
        acc = [r["top1"] for r in rs]
        mean, std = mean_std(acc)
        row = {
            "label": label, "rounding": rs[0].get("rounding"), "seeds": [r["seed"] for r in rs], "n": len(rs),
            "top1_mean": mean, "top1_std": std, "top1_min": min(acc), "top1_max": max(acc),
            "final_train_loss_mean": sum(r["final_train_loss"] for r in rs) / len(rs),
            "test_loss_mean": sum(r["test_loss"] for r in rs) / len(rs),
            "train_s_mean": sum(r["train_s"] for r in rs) / len(rs),
            "steps_per_s_mean": sum(r["steps_per_s"] for r in rs) / len(rs),
            "diverged": sum(r["diverged_at"] is not None for r in rs),
        }
        _compare(row, rs, by.get(FP32), "fp32")
        row["reference"] = ref = reference_of(label)
        _compare(row, rs, by.get(ref) if ref else None, "reference")
        if ref not in by:
            row["reference"] = None
        rows.append(row)
    return rows
