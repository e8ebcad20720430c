"""The tables of an experiment, as Markdown (results.md) and as rich tables (the terminal), built from
one list of cells so the two never disagree: the per-run table, and with several seeds the summary
(mean ± std over seeds, the difference to FP32 and to the run's reference, each ± its standard error).
"""
from __future__ import annotations

from .recipe import FP32


def _pm(d: float | None, se: float | None) -> str:
    if d is None:
        return ""
    return f"{d:+.2f}" + (f" ± {se:.2f}" if se is not None else "")


def run_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-run table."""
    head = ["run", "seed", "top-1 (%)", "test loss", "final train loss", "train time (s)", "steps/s"]
    rows = [[r["label"] + (f" (diverged at {r['diverged_at']})" if r["diverged_at"] else ""), str(r["seed"]),
             f"{r['top1']:.2f}", f"{r['test_loss']:.4f}", f"{r['final_train_loss']:.4f}", f"{r['train_s']:.0f}",
             f"{r['steps_per_s']:.2f}"] for r in results["runs"]]
    return head, rows


def summary_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows) of the mean-over-seeds table, or None when every run has a single seed. The
    reference column appears when some run has a reference (int8fx.train.summary.reference_of)."""
    summary = results["summary"]
    if not any(s["n"] > 1 for s in summary):
        return None
    with_ref = any(s.get("reference") for s in summary)
    head = ["run", "seeds", "top-1 mean ± std (%)", "min..max", "vs FP32 ± SE (points)"]
    head += ["vs reference ± SE (points)"] if with_ref else []
    head += ["train time (s)", "steps/s"]
    rows = []
    for s in summary:
        row = [s["label"], str(s["n"]), f"{s['top1_mean']:.2f} ± {s['top1_std']:.2f}",
               f"{s['top1_min']:.2f}..{s['top1_max']:.2f}",
               "" if s["label"] == FP32 else _pm(s["delta_vs_fp32"], s.get("delta_vs_fp32_se"))]
        if with_ref:
            ref = s.get("reference")
            row.append(f"{_pm(s['delta_vs_reference'], s['delta_vs_reference_se'])} vs {ref}" if ref else "")
        row += [f"{s['train_s_mean']:.0f}", f"{s['steps_per_s_mean']:.2f}"]
        rows.append(row)
    return head, rows


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def tables_markdown(results: dict) -> str:
    """The per-run table and, with several seeds, the per-policy summary, as Markdown."""
    out = _markdown(*run_table(results))
    summary = summary_table(results)
    if summary:
        out += "\n\n" + _markdown(*summary)
    return out


def print_tables(results: dict, file=None) -> None:
    """Print the tables with rich (plain Markdown when rich is missing)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(tables_markdown(results), file=file)
        return
    probe = Console(file=file)
    console = Console(file=file, width=probe.width if probe.is_terminal else 160)  # logs: no wrapped cells
    for title, table in (("int8fx train: per run", run_table(results)), ("mean over seeds", summary_table(results))):
        if table is None:
            continue
        head, rows = table
        t = Table(title=title)
        for c in head:
            t.add_column(c, justify="left" if c == "run" else "right")
        for r in rows:
            t.add_row(*r)
        console.print(t)
