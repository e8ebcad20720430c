"""Train a CNN on Fashion-MNIST in FP32 and in INT8 with each gradient policy, side by side.

Every run of one invocation shares the recipe (model, data subset, schedule, augmentation); runs with
the same seed also share the initial weights and the order of the batches, so the only difference
between `fp32` and `gvq-mcs` at seed 0 is the INT8 arithmetic. The command writes to its output folder:

    results.json   the recipe, the machine, every run with its curves, and the per-policy summary
    results.md     the tables printed at the end (per run, and mean +- std over seeds)
    accuracy.png   test top-1 against epochs, one line per policy (band: min..max over seeds)
    loss.png       training loss against epochs
    curves.png     both side by side

    runs/*.json    every finished run (recipe + record), written as it ends: the same command resumes

Presets (presets.py): `--quick` (the README command, a few minutes on a 2-core CPU: a 20k-image
subset, 2 epochs, scored on the full 10k test set), `--full` (FP32 + gvq-mcs, dsgc, per-tensor x 3
seeds on all 60k images; about 45-90 minutes on a 2-core CPU with `--jobs 2`), and the papers'
networks `--preset resnet20|mobilenetv2`. `--ablation PRESET` trains the papers' ablation grid on a
preset's recipe (ablation.py). Any option overrides the preset. Library use:
`run_experiment(recipe, runs, seeds)` returns the same dict as results.json.

One module per job, in the order a run flows through them:

    recipe.py      Recipe (what every run shares), RunSpec (what tells runs apart), parse_runs
    presets.py     the named experiments (--quick, --full, --preset resnet20|mobilenetv2)
    ablation.py    the papers' ablation grid and its (resumable) output folder
    data.py        Fashion-MNIST tensors, fixed balanced subsets, seeded augmentation
    ends.py        the first and last layer: kept in FP32, or without their BatchNorm
    loop.py        one run: build the model, train, evaluate, return its record
    progress.py    progress bars / log lines / a queue from worker processes
    runner.py      every (run, seed) of an experiment, sequential or in worker processes
    store.py       finished runs on disk, so an experiment resumes
    provenance.py  version, git commit and machine of a result
    stats.py       mean, std, difference of means with its standard error
    summary.py     per-label numbers over seeds, vs FP32 and vs the reference run
    tables.py      the Markdown and rich tables
    plots.py       accuracy and loss curves
    report.py      the output files
    cli.py         `int8fx train`: options -> recipe -> run -> files
"""
from .ablation import ABLATION_RUNS, ABLATION_SEEDS, ablation_folder, ablation_runs
from .cli import add_arguments, recipe_from_args, run
from .data import Data, augment, balanced_subset, fit_input, load_data
from .loop import build_models, evaluate, lr_at, train_run
from .plots import write_plots
from .presets import PRESETS, preset_runs
from .progress import LineProgress, Progress, TqdmProgress
from .recipe import DCLRS_SUFFIX, FP32, Recipe, RunKind, RunSpec, dclrs_available, parse_runs
from .report import write_outputs
from .runner import RunsFailed, run_experiment
from .store import RunStore, StoreMismatch
from .summary import summarize
from .tables import print_tables, tables_markdown

__all__ = ["ABLATION_RUNS", "ABLATION_SEEDS", "DCLRS_SUFFIX", "FP32", "PRESETS", "Data", "LineProgress", "Progress",
           "Recipe", "RunKind", "RunSpec", "RunStore", "RunsFailed", "StoreMismatch", "TqdmProgress",
           "ablation_folder", "ablation_runs", "add_arguments", "augment", "balanced_subset", "build_models",
           "dclrs_available", "evaluate", "fit_input", "load_data", "lr_at", "parse_runs", "preset_runs",
           "print_tables", "recipe_from_args", "run", "run_experiment", "summarize", "tables_markdown", "train_run",
           "write_outputs", "write_plots"]
