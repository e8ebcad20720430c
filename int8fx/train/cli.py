"""Train a CNN on Fashion-MNIST in FP32 and in INT8 with each gradient policy, side by side.

The `int8fx train` command: its options, the preset they override, and the run that writes the output
folder (results.json, results.md, accuracy.png, loss.png, curves.png; see `int8fx.train`). Finished
runs are kept in the folder (runs/*.json), so the same command with the same --out resumes.
`--ablation PRESET` trains the papers' ablation grid (int8fx.train.ablation) into a folder named
after the preset and the options changed.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import sys
from pathlib import Path

import torch

from ..cli import positive_int
from .ablation import ABLATION_SEEDS, ablation_folder, ablation_runs
from .presets import PRESETS, preset_runs
from .progress import LineProgress, TqdmProgress
from .recipe import (AUGMENTS, DCLRS_SUFFIX, ROUNDING_SEP, TRAIN_IMAGES, Recipe, RecipeError, dclrs_available,
                     parse_runs)
from .report import write_outputs
from .runner import RunsFailed, run_experiment
from .store import RunStore, StoreMismatch
from .tables import print_tables


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="the README run: fp32 + 2 INT8 policies, 20k images, 2 epochs (default)")
    g.add_argument("--full", dest="preset", action="store_const", const="full",
                   help="fp32 + gvq-mcs, dsgc, per-tensor x 3 seeds on all 60k images (about 90 min on 2 cores)")
    g.add_argument("--preset", choices=tuple(PRESETS), help="a named experiment: " + ", ".join(PRESETS)
                   + " (resnet20/mobilenetv2: the papers' networks, FP32 + gvq-mcs, per-tensor, one seed)")
    g.add_argument("--ablation", metavar="PRESET", choices=tuple(PRESETS),
                   help="the papers' ablation grid on PRESET's recipe (" + ", ".join(PRESETS) + "): fp32 and "
                        "every gradient policy with stochastic and nearest rounding, seeds 0,1,2; resumable, "
                        "into runs/ablation-PRESET[-changed options] unless --out")
    p.add_argument("--runs", help="comma list: 'fp32' and/or gradient policies, e.g. fp32,gvq-mcs,dsgc"
                                  + (f"; append '{DCLRS_SUFFIX}' for DCLRS" if dclrs_available() else "")
                                  + f"; append '{ROUNDING_SEP}nearest' or '{ROUNDING_SEP}stochastic' for a run's "
                                    "own gradient rounding")
    p.add_argument("--seeds", help="comma list of seeds, e.g. 0,1,2")
    p.add_argument("--model", help="resnet20 | mobilenetv2 | mobilenetv2-s2 | smallcnn | any torchvision "
                                   "classification model")
    p.add_argument("--width", type=float, help="channel width of int8fx's models (ResNet/CNN base, MobileNet multiplier)")
    p.add_argument("--size", type=int, help="input resolution (default: 28, or what a torchvision model needs)")
    p.add_argument("--epochs", type=float, help="passes over the training images (fractions allowed)")
    p.add_argument("--train-subset", type=int, help="train on this many images (balanced); 0 = all 60,000")
    p.add_argument("--test-subset", type=int, help="score on this many test images; 0 = all 10,000 (default)")
    p.add_argument("--batch-size", type=int, help="images per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate (SGD, Nesterov momentum 0.9, warmup + cosine)")
    p.add_argument("--weight-decay", type=float, help="SGD weight decay (L2)")
    p.add_argument("--augment", choices=AUGMENTS, help="training augmentation: none, random horizontal flips, "
                                                        "or flips and random shifts of up to 2 pixels")
    p.add_argument("--evals", type=int, help="test evaluations per run (curve points)")
    p.add_argument("--rounding", choices=("stochastic", "nearest"), help="gradient rounding of the INT8 runs "
                                                                        "(default: stochastic, as Int8Config)")
    p.add_argument("--fp32-ends", action="store_const", const=True,
                   help="keep the first and last conv/linear layer in FP32 in INT8 runs (as the papers do)")
    p.add_argument("--no-end-bn", dest="end_bn", action="store_const", const=False,
                   help="remove the BatchNorm right after the first and the last conv/linear layer")
    p.add_argument("--max-steps", type=int, help="stop each run after this many steps (smoke tests)")
    p.add_argument("--device", default="auto", help="auto (default: cuda when torch sees a GPU, else cpu), cpu, "
                                                   "cuda, cuda:1")
    p.add_argument("--data", help="folder with the Fashion-MNIST IDX files (default: $INT8FX_DATA, then "
                                  "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", help="output folder (default: runs/<timestamp>; with --ablation runs/ablation-...); "
                                 "runs already finished there with the same recipe are not trained again")
    p.add_argument("--jobs", type=positive_int, help="runs trained at once on CPU, in worker processes (full preset: 2)")
    p.add_argument("--threads", type=positive_int, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                   help="tqdm bars, plain log lines, or nothing (auto: bars on a terminal, else lines)")
    if dclrs_available():
        p.add_argument("--dclrs", action="store_true", help="add deviation-counteractive LR scaling to INT8 runs")
    p.set_defaults(preset="quick")


def preset_name(args) -> str:
    return getattr(args, "ablation", None) or args.preset


def recipe_from_args(args) -> tuple[Recipe, tuple, tuple, int]:
    """(recipe, runs, seeds, jobs) from the preset with the command-line overrides applied; --ablation
    takes its preset's recipe and jobs, and the ablation grid's runs and seeds."""
    ablation = getattr(args, "ablation", None)
    preset = PRESETS[preset_name(args)]
    changes = {}
    for name in ("model", "width", "size", "epochs", "batch_size", "lr", "weight_decay", "augment", "evals",
                 "max_steps", "rounding", "fp32_ends", "end_bn"):
        v = getattr(args, name, None)
        if v is not None:
            changes[name] = v
    if args.model is not None and args.width is None and args.model != preset["recipe"].model:
        changes["width"] = None  # the preset's width belongs to its own model
    for name in ("train_subset", "test_subset"):
        v = getattr(args, name, None)
        if v is not None:
            changes[name] = v or None
    try:
        recipe = dataclasses.replace(preset["recipe"], **changes)
    except RecipeError as e:  # (named as the options the user typed)
        raise ValueError("; ".join(f"--{name.replace('_', '-')} {value!r}: takes {takes}"
                                   for name, value, takes in e.problems)) from None
    if ablation and args.rounding and not args.runs:
        raise ValueError("--ablation trains every policy with both roundings ('gvq' and 'gvq:nearest'); "
                         "--rounding would make them the same runs: choose runs with --runs instead")
    runs = tuple(args.runs.split(",")) if args.runs else ablation_runs() if ablation else preset_runs(args.preset)
    seeds = _seeds(args.seeds) if args.seeds else ABLATION_SEEDS if ablation else preset["seeds"]
    jobs = args.jobs if args.jobs is not None else preset["jobs"]
    from ..zoo import check_model_name

    check_model_name(recipe.model)
    return recipe, runs, seeds, jobs


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated whole numbers such as 0,1,2") from None
    if not seeds:
        raise ValueError(f"--seeds {text!r}: no seed given")
    return seeds


def run(args) -> int:
    try:
        recipe, runs, seeds, jobs = recipe_from_args(args)
        parse_runs(runs, getattr(args, "dclrs", False))
    except ValueError as e:
        print(f"int8fx train: {e}", file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("int8fx train: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    ablation = getattr(args, "ablation", None)
    if args.out:
        out = Path(args.out)
    elif ablation:
        out = ablation_folder(ablation, recipe)
    else:
        out = Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    from ..data import DataNotFound, find_fashion_mnist
    from ..files import check_folder_writable

    try:
        check_folder_writable(out)
        find_fashion_mnist(args.data)
    except (DataNotFound, ValueError) as e:
        print(f"int8fx train: {e}", file=sys.stderr)
        return 2
    what = f"ablation of {ablation}" if ablation else preset_name(args)
    print(f"int8fx train ({what}): {recipe.model} on Fashion-MNIST, runs {', '.join(runs)}, seeds "
          f"{', '.join(map(str, seeds))}, {recipe.epochs:g} epochs on {recipe.train_subset or TRAIN_IMAGES} images, "
          f"device {device}, {jobs} job(s); writing to {out}", file=sys.stderr)
    mode = args.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "lines"
    progress = {"bar": lambda: TqdmProgress(slots=jobs), "lines": LineProgress, "none": lambda: None}[mode]()
    try:
        results = run_experiment(recipe, runs, seeds, device, args.data, jobs, args.threads,
                                 getattr(args, "dclrs", False), progress, store=RunStore(out, recipe.to_dict()))
    except StoreMismatch as e:
        print(f"int8fx train: {e}", file=sys.stderr)
        return 2
    except RunsFailed as e:
        import traceback

        traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"int8fx train: {e}. The runs that finished are in {out}; run the same command again to retry "
              "the others.", file=sys.stderr)
        return 1
    if results["reused"]:
        print(f"int8fx train: {len(results['reused'])} of {len(results['runs'])} runs read back from {out}",
              file=sys.stderr)
    results["command"] = "int8fx train " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["train"] else " ".join(sys.argv)
    paths = write_outputs(results, out)
    print_tables(results)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
