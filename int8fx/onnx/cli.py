"""`int8fx export`: a converted model to ONNX (deploy form by default) with its quantization metadata.

Every bad input (a model that cannot be resolved, an input shape the model cannot take, a missing
calibration file, an unwritable output path, an opset out of range, ...) is reported as one line
`int8fx export: ...` with exit status 2 before anything is written; an export that fails on the model
itself (an op without an ONNX form) exits with 1. Neither leaves a file behind.
"""
from __future__ import annotations

import os
import sys

import torch
from torch import Tensor

from ..cli import bad_input, one_line
from .errors import OnnxExportError
from .metadata import FORMS, METADATA_KEY, SCHEMA, SCHEMA_VERSION, TARGETS
from .torch_export import DEFAULT_OPSET, EXPORTERS, MIN_OPSET


class BadInput(ValueError):
    """A command-line input that cannot work; the message says which and why."""


def add_arguments(parser) -> None:
    from ..modelspec import add_model_arguments

    add_model_arguments(parser)
    parser.error = lambda message: parser.exit(2, f"int8fx export: {one_line(message)}\n")
    parser.add_argument("-o", "--output", metavar="OUT.onnx", required=True, help="where to write the ONNX model")
    parser.add_argument("--form", choices=FORMS, default="deploy",
                        help="'deploy' (default): BatchNorm folded, int8 weights and int32 biases, Q/DQ wherever an "
                             "INT8 kernel reads or writes, so onnxruntime/TensorRT run the convolutions in INT8 "
                             "(needs onnxruntime); 'faithful': QDQ around each INT8 site only, equal to the "
                             "eval-mode model")
    parser.add_argument("--target", choices=TARGETS, default="portable",
                        help="deploy form: 'portable' (default: every zero point 0, TensorRT's rule; onnxruntime "
                             "runs it too) or 'onnxruntime' (uint8 activations, ReLUs run on the codes, "
                             "one quantizer shared by a value's INT8 readers, which onnxruntime fuses into its "
                             "INT8 ops: faster there; TensorRT refuses it)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="auto",
                        help="torch's exporter: 'auto' (the torch.export-based one where torch defaults to it, "
                             "else TorchScript), 'dynamo' or 'torchscript'")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (>= {MIN_OPSET} for per-axis DequantizeLinear, >= 18 for the "
                             f"torch.export-based exporter; default {DEFAULT_OPSET})")
    parser.add_argument("--calibration", choices=("eval", "inputs", "ema"), default="eval",
                        help="static activation scales of the INT8 sites: 'eval' (default) = what the eval-mode "
                             "model uses (the running training clip act_clip_ema of trained layers, else 'inputs'); "
                             "'inputs' = absmax of each INT8 layer's input over the calibration batches; 'ema' = "
                             "act_clip_ema where training recorded one, else 'inputs'")
    parser.add_argument("--calibration-data", metavar="FILE.pt", default=None,
                        help="torch.save'd tensor [N, ...] or list of tensors/tuples: batches to calibrate on (the "
                             "first also traces the graph); default: one random normal batch of --input-shape, "
                             "which suits only a smoke test: calibrate a real model on real data")
    parser.add_argument("--static-batch", action="store_true",
                        help="fix the batch dimension to the example's (default: dimension 0 is dynamic)")


def run(args) -> int:
    from ..modelspec import ModelSpecError, load_converted
    from .export import export_onnx
    from ..files import check_writable

    try:
        check_writable(args.output)
        if not MIN_OPSET <= args.opset:
            raise BadInput(f"--opset {args.opset}: needs >= {MIN_OPSET} (per-axis DequantizeLinear)")
        if args.target != "portable" and args.form != "deploy":
            raise BadInput(f"--target {args.target}: tunes the deploy form, not --form {args.form}")
        batches = _calibration_batches(args.calibration_data)
        qm, example, label = load_converted(args)
        if batches:
            example = batches[0]
        if example is None:
            raise BadInput("export needs an example input: pass --input-shape N,C,... or --calibration-data")
        _preflight(qm, example)
        meta = export_onnx(qm, example, args.output, form=args.form, target=args.target, exporter=args.exporter,
                           opset=args.opset, calibration=args.calibration,
                           calibration_data=batches[1:] if batches else None, dynamic_batch=not args.static_batch)
    except (BadInput, ModelSpecError, ValueError) as e:
        return bad_input("export", e)
    except OnnxExportError as e:
        print(f"int8fx export: {one_line(e)}", file=sys.stderr)
        return 1
    n_int8 = sum(e["exported"] for e in meta["layers"].values())
    print(f"{label}: wrote {args.output} ({meta['form']} form, opset {meta['opset']}, IR {meta['ir_version']}, "
          f"{meta['exporter']} exporter): {n_int8} INT8 sites with QuantizeLinear/DequantizeLinear, "
          f"{len(meta['skipped'])} kept in FP32; quantization metadata under '{METADATA_KEY}' "
          f"(schema {SCHEMA} v{SCHEMA_VERSION})")
    if meta["form"] == "deploy":
        print(_runtime_summary(args.output, meta))
    if not args.calibration_data:
        print("note: calibrated on a random input; pass --calibration-data with real batches for real scales")
    return 0


def _calibration_batches(path: str | None) -> list | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise BadInput(f"--calibration-data {path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise BadInput(f"--calibration-data {path}: not a torch.save file ({type(e).__name__}: {e})") from None
    batches = [data] if isinstance(data, Tensor) else list(data) if isinstance(data, (list, tuple)) else None
    if not batches or not all(isinstance(b, Tensor) or (isinstance(b, (tuple, list)) and b) for b in batches):
        raise BadInput(f"--calibration-data {path}: expected a tensor [N, ...] or a non-empty list of tensors/tuples")
    return batches


def _preflight(qm, example) -> None:
    """Run the model once on the example: a wrong shape or channel count is a bad input, said in one line."""
    from ..nn.scope import no_fused_fastpath
    from ..observe import as_args, device_of, eval_mode, to_device

    args = as_args(example)
    shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, Tensor))
    try:
        with eval_mode(qm), no_fused_fastpath():
            qm(*to_device(args, device_of(qm)))
    except Exception as e:  # the model's own error says what it wanted
        raise BadInput(f"the model cannot run on an input of shape {shapes}: {one_line(e)}") from None


def _runtime_summary(path: str, meta: dict) -> str:
    try:
        from .check import INT8_KERNELS, int8_sites, runtime_ops

        ran = int8_sites(meta, runtime_ops(path))
    except ImportError:
        return "note: onnxruntime is not installed, so which kernels it runs was not checked"
    exported = [s for s, e in meta["layers"].items() if e["exported"]]
    fast = [s for s in exported if ran.get(s) and all(op in INT8_KERNELS for op in ran[s])]
    slow = [f"{s} ({'/'.join(ran.get(s) or ['?'])})" for s in exported if s not in fast]
    return (f"onnxruntime (CPU) runs {len(fast)} of {len(exported)} INT8 sites in INT8 kernels"
            + (f"; in float: {', '.join(slow)}" if slow else ""))
