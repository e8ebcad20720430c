"""Named experiments of `int8fx train` (`--quick`, `--full`): a recipe plus the runs, seeds and parallel
jobs it is meant to be trained with. Any command-line option overrides a preset's value.
"""
from __future__ import annotations

from .recipe import FP32, Recipe

PRESETS: dict[str, dict] = {
    # fp32 + 2 INT8 policies, two runs at a time with one thread each (see run_experiment for why)
    "quick": dict(recipe=Recipe(), runs=(FP32, "gvq-mcs", "per-tensor"), seeds=(0,), jobs=2),
    # 12 runs; sized from measured step times (benchmarks/RESULTS.md, section train)
    "full": dict(recipe=Recipe(epochs=5, train_subset=None, evals=5, eval_subset=None),
                 runs=(FP32, "gvq-mcs", "dsgc", "per-tensor"), seeds=(0, 1, 2), jobs=2),
}


def preset_runs(preset: str) -> tuple[str, ...]:
    """The preset's runs that this int8fx has registered (a policy still in development is skipped)."""
    from ..quant import grad_quantizer_names

    names = grad_quantizer_names()
    return tuple(r for r in PRESETS[preset]["runs"] if r == FP32 or r in names)
