"""The `int8fx` command line (also `python -m int8fx`).

Each subcommand lives with the code it drives: a module exposing `add_arguments(parser)` and
`run(args) -> int`. This file maps names to those modules and imports them lazily, so
`int8fx --help` stays fast and one subcommand's dependencies never break another; and it holds the one
argument type and the one-line report of a bad input they share (`positive_int`, `bad_input`).
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "convert": ("int8fx.checkpoint", "convert a model and save it as a checkpoint the other commands read"),
    "train": ("int8fx.train.cli", "train a model on real data in FP32 and INT8 side by side"),
    "inspect": ("int8fx.report", "show which conv/linear sites a model converts, and why not"),
    "export": ("int8fx.onnx.cli", "export a converted model to ONNX (deploy or faithful form) with its quantization metadata"),
    "bench": ("int8fx.bench", "time a training step of FP32 vs INT8 on this machine"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="int8fx", description="Train PyTorch CNNs in INT8 (forward and backward).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # a subcommand whose optional dependency is missing
            p = sub.add_parser(name, help=f"{help_text} (unavailable: {e})")
            p.set_defaults(_run=lambda args, e=e: _unavailable(e))
            continue
        if not hasattr(mod, "add_arguments"):
            continue
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (a batch, a size, a count of steps or threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return value


def bad_input(command: str, error) -> int:
    """Say a bad input as one line, `int8fx COMMAND: ...`, on stderr, and return its exit status, 2."""
    print(f"int8fx {command}: {one_line(error)}", file=sys.stderr)
    return 2


def one_line(error) -> str:
    return " ".join(str(error).split())


def _unavailable(e: Exception) -> int:
    print(f"int8fx: this command needs a missing package: {e}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
