"""`int8fx convert MODEL -o out.pt`: convert a model and save it as a checkpoint the other commands read.

The checkpoint is a plain dict, not a pickled module: {"arch": MODEL string, "state_dict": the converted
model's state_dict (original parameter names plus quantizer state), "int8fx_config": the config as a dict}.
Loading re-runs the conversion from `arch`, so it does not depend on the classes torch.fx generates.
"""
from __future__ import annotations

import argparse
import os

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .modelspec import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="PATH", help="where to write the checkpoint (.pt)")


def run(args: argparse.Namespace) -> int:
    from .modelspec import load_converted
    from .passes import conversion_of
    from .report import inspect

    if os.path.isfile(args.model) and not args.arch:
        saved = torch.load(args.model, map_location="cpu", weights_only=False)
        arch = saved.get("arch") if isinstance(saved, dict) else None
    else:
        arch = args.arch or args.model
    if arch is None:
        print(f"int8fx convert: {args.model} does not say its architecture; pass --arch", flush=True)
        return 2
    qm, _, label = load_converted(args)
    torch.save({"arch": arch, "state_dict": qm.state_dict(), "int8fx_config": conversion_of(qm).config.to_dict()},
               args.output)
    rep = inspect(qm)
    print(f"{label}: {len(rep.converted)}/{len(rep.layers)} conv/linear sites in INT8 -> {args.output}")
    return 0
