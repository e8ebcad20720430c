"""`int8fx convert MODEL -o out.pt`: convert a model and save it as a checkpoint the other commands read.

The checkpoint is a plain dict, not a pickled module: {"arch": MODEL string, "state_dict": the converted
model's state_dict (original parameter names plus quantizer state), "int8fx_config": the config as a dict}.
Loading re-runs the conversion from `arch`, so it does not depend on the classes torch.fx generates.
"""
from __future__ import annotations

import argparse
import io
import os

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .modelspec import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="PATH", help="where to write the checkpoint (.pt)")


def run(args: argparse.Namespace) -> int:
    from .cli import bad_input
    from .files import check_writable, write_atomically
    from .modelspec import load_converted, read_checkpoint
    from .passes import conversion_of
    from .report import inspect

    try:  # (every bad input, the output path included, before the work)
        check_writable(args.output)
        arch = args.arch or (_arch_of(read_checkpoint(args.model), args.model) if os.path.isfile(args.model)
                             else args.model)
        qm, _, label = load_converted(args)
    except ValueError as e:  # (ModelSpecError, OutputPathError, ConfigError)
        return bad_input("convert", e)
    buffer = io.BytesIO()
    torch.save({"arch": arch, "state_dict": qm.state_dict(), "int8fx_config": conversion_of(qm).config.to_dict()},
               buffer)
    write_atomically(buffer.getvalue(), args.output)
    rep = inspect(qm)
    print(f"{label}: {len(rep.converted)}/{len(rep.layers)} conv/linear sites in INT8 -> {args.output}")
    return 0


def _arch_of(saved, path: str) -> str:
    """The MODEL string a checkpoint was built from: what this checkpoint format stores, so a checkpoint of a
    whole pickled module (whose class may not be importable later) or a bare state_dict needs --arch."""
    from .modelspec import ModelSpecError

    arch = saved.get("arch") if isinstance(saved, dict) else None
    if not isinstance(arch, str):
        raise ModelSpecError(f"{path} does not say its architecture; pass --arch torchvision:NAME, timm:NAME or "
                             "module:function")
    return arch
