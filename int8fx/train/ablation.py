"""The ablation grid of the two papers (issue 17): every gradient policy, with stochastic and with
nearest rounding, against FP32 and against per-tensor quantization, over 3 seeds.

`int8fx train --ablation resnet20` trains these runs on a preset's recipe; its output folder
(`ablation_folder`) depends only on the preset and the recipe options changed on the command line,
so running the same command again resumes the grid (int8fx.train.store) and a changed recipe gets
a folder of its own.

Why nearest rounding for the papers' policies: with stochastic rounding (int8fx's default) the
rounding error is unbiased, so the clip choice matters less; the papers' claims are about the clip
choice, so each of their policies is also trained with nearest rounding. `gvq-mcs-search` is int8fx's
own variant and runs with the default rounding only.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from .presets import PRESETS, available
from .recipe import FP32, Recipe

ABLATION_RUNS = (
    FP32, "per-tensor", "gvq", "mcs", "gvq-mcs", "gvq-mcs-search", "dsgc", "dsgc+dclrs",
    "per-tensor:nearest", "gvq:nearest", "mcs:nearest", "gvq-mcs:nearest", "dsgc:nearest", "dsgc+dclrs:nearest",
)
ABLATION_SEEDS = (0, 1, 2)


def ablation_runs() -> tuple[str, ...]:
    """ABLATION_RUNS whose policies this int8fx has registered."""
    return available(ABLATION_RUNS)


def ablation_folder(preset: str, recipe: Recipe, root="runs") -> Path:
    """runs/ablation-<preset>, plus '-<field><value>' for every recipe field that differs from the
    preset's (e.g. runs/ablation-resnet20-lr0.4-fp32-ends): the same command always finds its runs."""
    base = PRESETS[preset]["recipe"]
    parts = []
    for f in dataclasses.fields(Recipe):
        v, v0 = getattr(recipe, f.name), getattr(base, f.name)
        if v != v0:
            key = f.name.replace("_", "-")
            parts.append(key if v is True else f"no-{key}" if v is False else f"{key}{v:g}" if isinstance(v, float)
                         else f"{key}{v}")
    name = "-".join(["ablation", preset] + parts)
    return Path(root) / re.sub(r"[^A-Za-z0-9.+-]", "_", name)
