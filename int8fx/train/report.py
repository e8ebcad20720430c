"""What an experiment reports: the per-policy summary over seeds, the Markdown and rich tables, the
accuracy and loss plots, and the files (results.json, results.md, PNGs) in the output folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .recipe import FP32


def summarize(records: list[dict]) -> list[dict]:
    """One row per run label: mean, std (sample), min and max of top-1 over seeds, and the gap to FP32."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["label"], []).append(r)
    rows = []
    for label, rs in by.items():
        acc = torch.tensor([r["top1"] for r in rs], dtype=torch.float64)
        rows.append({
            "label": label, "seeds": [r["seed"] for r in rs], "n": len(rs),
            "top1_mean": acc.mean().item(), "top1_std": acc.std().item() if len(rs) > 1 else 0.0,
            "top1_min": acc.min().item(), "top1_max": acc.max().item(),
            "final_train_loss_mean": sum(r["final_train_loss"] for r in rs) / len(rs),
            "test_loss_mean": sum(r["test_loss"] for r in rs) / len(rs),
            "train_s_mean": sum(r["train_s"] for r in rs) / len(rs),
            "steps_per_s_mean": sum(r["steps_per_s"] for r in rs) / len(rs),
            "diverged": sum(r["diverged_at"] is not None for r in rs),
        })
    fp = next((r for r in rows if r["label"] == FP32), None)
    for r in rows:
        r["delta_vs_fp32"] = r["top1_mean"] - fp["top1_mean"] if fp else None
    return rows


# ---------------------------------------------------------------------------------------- output


def tables_markdown(results: dict) -> str:
    """The per-run table and, with several seeds, the per-policy summary, as Markdown."""
    lines = ["| run | seed | top-1 (%) | test loss | final train loss | train time (s) | steps/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        flag = f" (diverged at {r['diverged_at']})" if r["diverged_at"] else ""
        lines.append(f"| {r['label']}{flag} | {r['seed']} | {r['top1']:.2f} | {r['test_loss']:.4f} | "
                     f"{r['final_train_loss']:.4f} | {r['train_s']:.0f} | {r['steps_per_s']:.2f} |")
    out = "\n".join(lines)
    if any(s["n"] > 1 for s in results["summary"]):
        lines = ["| run | seeds | top-1 mean ± std (%) | min..max | vs FP32 (points) | train time (s) | steps/s |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for s in results["summary"]:
            d = "" if s["delta_vs_fp32"] is None or s["label"] == FP32 else f"{s['delta_vs_fp32']:+.2f}"
            lines.append(f"| {s['label']} | {s['n']} | {s['top1_mean']:.2f} ± {s['top1_std']:.2f} | "
                         f"{s['top1_min']:.2f}..{s['top1_max']:.2f} | {d} | {s['train_s_mean']:.0f} | "
                         f"{s['steps_per_s_mean']:.2f} |")
        out += "\n\n" + "\n".join(lines)
    return out


def print_tables(results: dict, file=None) -> None:
    """Print the tables with rich (plain Markdown when rich is missing)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(tables_markdown(results), file=file)
        return
    console = Console(file=file, width=max(100, Console().width))
    t = Table(title="int8fx train: per run")
    for c in ("run", "seed", "top-1 %", "test loss", "final train loss", "train s", "steps/s"):
        t.add_column(c, justify="left" if c == "run" else "right")
    for r in results["runs"]:
        t.add_row(r["label"] + (" (diverged)" if r["diverged_at"] else ""), str(r["seed"]), f"{r['top1']:.2f}",
                  f"{r['test_loss']:.4f}", f"{r['final_train_loss']:.4f}", f"{r['train_s']:.0f}",
                  f"{r['steps_per_s']:.2f}")
    console.print(t)
    if any(s["n"] > 1 for s in results["summary"]):
        t = Table(title="mean over seeds")
        for c in ("run", "seeds", "top-1 mean ± std", "min..max", "vs FP32", "train s", "steps/s"):
            t.add_column(c, justify="left" if c == "run" else "right")
        for s in results["summary"]:
            d = "" if s["delta_vs_fp32"] is None or s["label"] == FP32 else f"{s['delta_vs_fp32']:+.2f}"
            t.add_row(s["label"], str(s["n"]), f"{s['top1_mean']:.2f} ± {s['top1_std']:.2f}",
                      f"{s['top1_min']:.2f}..{s['top1_max']:.2f}", d, f"{s['train_s_mean']:.0f}",
                      f"{s['steps_per_s_mean']:.2f}")
        console.print(t)


def _curves(results: dict, series: str, key: str):
    """{label: (x, mean, min, max)} over seeds for a history ('history' or 'evals') field."""
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


def write_plots(results: dict, out: Path) -> list[Path]:
    """accuracy.png, loss.png and curves.png (both) in `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    title = f"{results['recipe']['model']} on Fashion-MNIST"
    seeds = max(s["n"] for s in results["summary"])
    if seeds > 1:
        title += f" (mean of {seeds} seeds, band min..max)"

    def draw(ax, kind):
        if kind == "acc":
            curves = _curves(results, "evals", "test_acc")
            ax.set_ylabel("test top-1 (%)")
            lo = min((min(c[2]) for c in curves.values()), default=0)
            ax.set_ylim(max(lo - 2, 0), 100 if lo < 80 else min(100, max(max(c[3]) for c in curves.values()) + 1))
        else:
            curves = _curves(results, "history", "train_loss")
            ax.set_ylabel("training loss")
            ax.set_yscale("log")
        for label, (x, m, lo_, hi) in curves.items():
            style = "-" if label == FP32 else "--"
            line, = ax.plot(x, m, style, label=label, marker="o" if kind == "acc" else None, markersize=3)
            if seeds > 1:
                ax.fill_between(x, lo_, hi, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    paths = []
    for name, kinds in (("accuracy.png", ("acc",)), ("loss.png", ("loss",)), ("curves.png", ("loss", "acc"))):
        fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds) + 0.5, 3.6), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            draw(ax, kind)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        p = out / name
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def write_outputs(results: dict, out) -> dict[str, Path]:
    """results.json, results.md and the PNGs; returns {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "table": out / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=1, default=str) + "\n")
    r, m = results["recipe"], results["machine"]
    cap = f" (capped at {r['max_steps']} steps)" if r["max_steps"] else ""
    head = (f"# int8fx train: {r['model']} on Fashion-MNIST\n\n{results['date']}, device {results['device']}, "
            f"{m.get('processor', '')}, {m.get('cpu_count')} cores, {results['jobs']} run(s) at a time; "
            f"{r['epochs']:g} epochs{cap} on {r['train_subset'] or 60000} training images, top-1 on "
            f"{r['test_subset'] or 10000} test images.\n")
    if results.get("command"):
        head += f"\nCommand: `{results['command']}`\n"
    paths["table"].write_text(head + "\n" + tables_markdown(results) + "\n")
    for p in write_plots(results, out):
        paths[p.stem] = p
    return paths
