"""Training curves of an experiment: test top-1 and training loss against epochs, one line per run
label (the mean over seeds, with a min..max band when there are several seeds).

When some runs set their own gradient rounding ('gvq:nearest'), each rounding gets its own row of
panels, with FP32 drawn in every row as the common reference, so a grid of a dozen runs stays readable.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .recipe import FP32, ROUNDING_SEP


def curves(results: dict, series: str, key: str) -> dict[str, tuple[list, list, list, list]]:
    """{label: (epochs, mean, min, max)} over seeds for a field of 'history' or 'evals'."""
    by: dict[str, list[dict]] = {}
    for r in results["runs"]:
        by.setdefault(r["label"], []).append(r[series])
    out = {}
    for label, hs in by.items():
        n = min(len(h[key]) for h in hs)
        if n == 0:
            continue
        v = torch.tensor([h[key][:n] for h in hs], dtype=torch.float64)
        out[label] = (hs[0]["epoch"][:n], v.mean(0).tolist(), v.min(0).values.tolist(), v.max(0).values.tolist())
    return out


def panel_groups(labels, recipe_rounding: str = "") -> list[tuple[str, list[str]]]:
    """[(rounding, labels)]: runs with the recipe's rounding first, then one group per rounding a run
    sets itself; FP32 joins every group. A single group, titled "", when no run sets its own rounding."""
    groups: dict[str, list[str]] = {"": []}
    for label in labels:
        _, sep, rounding = label.partition(ROUNDING_SEP)
        groups.setdefault(rounding if sep else "", []).append(label)
    if len(groups) == 1:
        return [("", groups[""])]
    fp = [FP32] if FP32 in labels else []
    return [(r or recipe_rounding, ls if not r else fp + ls) for r, ls in groups.items() if ls]


def write_plots(results: dict, out: Path) -> list[Path]:
    """accuracy.png, loss.png and curves.png (both) in `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    title = f"{results['recipe']['model']} on Fashion-MNIST"
    seeds = max(s["n"] for s in results["summary"])
    if seeds > 1:
        title += f" (mean of {seeds} seeds, band min..max)"
    acc, loss = curves(results, "evals", "test_acc"), curves(results, "history", "train_loss")
    groups = panel_groups([s["label"] for s in results["summary"]], results["recipe"].get("rounding", ""))

    def draw(ax, kind, group_title, labels):
        if kind == "acc":
            cs = {k: acc[k] for k in labels if k in acc}
            ax.set_ylabel("test top-1 (%)")
            lo = min((min(c[2]) for c in cs.values()), default=0)
            ax.set_ylim(max(lo - 2, 0), 100 if lo < 80 else min(100, max(max(c[3]) for c in cs.values()) + 1))
        else:
            cs = {k: loss[k] for k in labels if k in loss}
            ax.set_ylabel("training loss")
            ax.set_yscale("log")
        for label, (x, m, lo_, hi) in cs.items():
            style = "-" if label == FP32 else "--"
            line, = ax.plot(x, m, style, label=label, marker="o" if kind == "acc" else None, markersize=3)
            if seeds > 1:
                ax.fill_between(x, lo_, hi, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("epoch")
        if group_title:
            ax.set_title(f"gradient rounding: {group_title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    paths = []
    for name, kinds in (("accuracy.png", ("acc",)), ("loss.png", ("loss",)), ("curves.png", ("loss", "acc"))):
        fig, axes = plt.subplots(len(groups), len(kinds), figsize=(5 * len(kinds) + 0.5, 3.6 * len(groups)),
                                 squeeze=False)
        for row, (group_title, labels) in zip(axes, groups):
            for ax, kind in zip(row, kinds):
                draw(ax, kind, group_title, labels)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        p = out / name
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths
