"""Train a CNN on Fashion-MNIST in FP32 and in INT8 with each gradient policy, side by side.

Every run of one invocation shares the recipe (model, data subset, schedule, augmentation); runs with
the same seed also share the initial weights and the order of the batches, so the only difference
between `fp32` and `gvq-mcs` at seed 0 is the INT8 arithmetic. The command writes to its output folder:

    results.json   the recipe, the machine, every run with its curves, and the per-policy summary
    results.md     the tables printed at the end (per run, and mean +- std over seeds)
    accuracy.png   test top-1 against epochs, one line per policy (band: min..max over seeds)
    loss.png       training loss against epochs
    curves.png     both side by side

Presets: `--quick` (the README command, a few minutes on a 2-core CPU: a 20k-image subset, 2 epochs,
scored on the full 10k test set) and `--full` (FP32 + gvq-mcs, dsgc, per-tensor x 3 seeds on all 60k
images; sized to finish in about 90 minutes on a 2-core CPU with `--jobs 2`). Any option overrides the
preset. Library use: `run_experiment(recipe, runs, seeds)` returns the same dict as results.json.

One module per job, in the order a run flows through them:

    recipe.py      Recipe (what every run shares), RunSpec (what tells runs apart), parse_runs
    presets.py     the named experiments (--quick, --full)
    data.py        Fashion-MNIST tensors, fixed balanced subsets, seeded augmentation
    loop.py        one run: build the model, train, evaluate, return its record
    progress.py    progress bars / log lines / a queue from worker processes
    runner.py      every (run, seed) of an experiment, sequential or in worker processes
    provenance.py  version, git commit and machine of a result
    report.py      summary over seeds, tables, plots, the output files
    cli.py         `int8fx train`: options -> recipe -> run -> files
"""
from .cli import add_arguments, recipe_from_args, run
from .data import Data, augment, balanced_subset, fit_input, load_data
from .loop import build_models, evaluate, lr_at, train_run
from .presets import PRESETS, preset_runs
from .progress import LineProgress, Progress, TqdmProgress
from .recipe import DCLRS_SUFFIX, FP32, Recipe, RunSpec, dclrs_available, parse_runs
from .report import print_tables, summarize, tables_markdown, write_outputs, write_plots
from .runner import run_experiment

__all__ = ["DCLRS_SUFFIX", "FP32", "PRESETS", "Data", "LineProgress", "Progress", "Recipe", "RunSpec", "TqdmProgress",
           "add_arguments", "augment", "balanced_subset", "build_models", "dclrs_available", "evaluate", "fit_input",
           "load_data", "lr_at", "parse_runs", "preset_runs", "print_tables", "recipe_from_args", "run",
           "run_experiment", "summarize", "tables_markdown", "train_run", "write_outputs", "write_plots"]
