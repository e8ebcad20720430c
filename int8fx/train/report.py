"""The files an experiment leaves in its output folder: results.json (everything), results.md (a header
saying what ran where, and the tables) and the plots (int8fx.train.tables, int8fx.train.plots).
"""
from __future__ import annotations

import json
from pathlib import Path

from .plots import write_plots
from .tables import tables_markdown


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
    head += "\nRecipe: " + ", ".join(f"{k} {v}" for k, v in r.items()) + ".\n"
    head += wall_time_line(results)
    paths["table"].write_text(head + "\n" + tables_markdown(results) + "\n")
    for p in write_plots(results, out):
        paths[p.stem] = p
    return paths


def wall_time_line(results: dict) -> str:
    """'Wall time: ...' for results.md: this session's, and with a run store the total over every session
    that trained runs of the folder (a resumed grid), and how many runs were read back."""
    line = f"\nWall time: {results['experiment_s'] / 60:.1f} min this session"
    sessions = results.get("sessions") or []
    if len(sessions) > 1:
        line += f", {results['wall_s_total'] / 60:.1f} min over {len(sessions)} sessions"
    if results.get("reused"):
        line += f"; {len(results['reused'])} of {len(results['runs'])} runs read back from earlier sessions"
    return line + ".\n"
