"""`export_onnx`: calibrate, build the chosen form, verify it, attach the metadata, write the file.

Nothing is written until the graph has passed the form's own structural check (every INT8 site call has
its Q/DQ pattern with the site's INT8 weights and scales: `faithful.annotate`, `deploy._annotate`),
`onnx.checker` (full check) and the validation `read_onnx_metadata` applies to the metadata.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Iterable

import torch
import torch.nn as nn

from ..files import check_writable, write_atomically
from ..observe import as_args, to_device
from ..passes import AFTER_CONVERT, conversion_of, sites_of
from ..quant.core import QMAX
from . import check, metadata
from .calibrate import CALIBRATIONS, calibrate, find_input_dependent, static_sites
from .errors import OnnxExportError
from .torch_export import DEFAULT_OPSET, EXPORTERS, MIN_OPSET, max_opset, resolve_exporter


def export_onnx(qmodel: nn.Module, example_inputs, path: str | os.PathLike, *, form: str = "faithful",
                exporter: str = "auto", opset: int = DEFAULT_OPSET, calibration: str = "eval",
                calibration_data: Iterable | None = None, dynamic_batch: bool = True,
                input_names: list[str] | None = None, output_names: list[str] | None = None,
                lr_scaler=None, target: str = "portable") -> dict:
    """Export `qmodel` (from `int8fx.convert`) to ONNX at `path`; returns the metadata dict it stored.

    form: "faithful" (default: QDQ around each INT8 site, everything else float; computes what
        `qmodel.eval()` computes) or "deploy" (BatchNorm folded, int8 weights and int32 biases, Q/DQ on
        every tensor an INT8 kernel reads or writes, so that runtimes run the convolutions in INT8; needs
        onnxruntime). README, "Inspect and export to ONNX", says how far deploy is from `qmodel.eval()`.
    exporter: "auto" (torch.export-based where torch defaults to it, else TorchScript), "dynamo",
        "torchscript".
    example_inputs: a tensor or tuple of tensors, the model's positional inputs; they trace the graph and
        calibrate the static activation scales.
    calibration: "eval" (default: the clip the eval-mode model itself uses, `act_clip_ema` where training
        set it, else the calibration absmax), "inputs" (absmax over example_inputs and calibration_data) or
        "ema" (`act_clip_ema` where set, else the calibration absmax). The deploy form also calibrates the
        tensors int8fx has no clip for (conv outputs feeding residual adds, ...) on these batches.
    calibration_data: more batches (tensors or tuples) for calibration; a tensor alone is one batch.
    dynamic_batch: make dimension 0 of every input and output symbolic. A model that computes an input
        differently alone than in a batch (code that branches on the batch size) is refused then: its traced
        graph holds one branch, and the file would be wrong at the other sizes.
    target (deploy form): "portable" (default: symmetric int8, every zero point 0, as TensorRT requires;
        onnxruntime runs it too) or "onnxruntime" (uint8 activations; the INT8 readers of a value share
        one quantizer; each ReLU between two quantizers of one grid runs as a Clip of the uint8 codes:
        faster there, the same numbers, and TensorRT refuses it).
    input_names, output_names: one name per tensor input / output (a string for the one there is); default
        "input"/"output", numbered when there are several, and a returned dict's keys ("out", "aux").
    lr_scaler: a `DeviationLRScaler`; its alpha/beta and each layer's LR factor go into the metadata.
    Raises `OnnxExportError` (naming the node or site) when part of the model has no ONNX form or the
    graph lacks a site's Q/DQ pattern; ValueError for bad arguments and for a model holding NaN/inf weights or
    statistics (a diverged training). Nothing is written then.
    """
    qmodel = _uncompiled(qmodel)
    record = conversion_of(qmodel)
    if record is None:
        raise ValueError("export_onnx() needs a model returned by int8fx.convert()")
    if form not in metadata.FORMS:
        raise ValueError(f"form must be one of {metadata.FORMS}, got {form!r}")
    if target not in metadata.TARGETS:
        raise ValueError(f"target must be one of {metadata.TARGETS}, got {target!r}")
    if target != "portable" and form != "deploy":
        raise ValueError(f"target={target!r} tunes the deploy form; the {form} form has no target")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset():
        raise ValueError(f"opset must be an integer from {MIN_OPSET} (per-axis DequantizeLinear) to {max_opset()} "
                         f"(this onnx), got {opset!r}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    resolve_exporter(exporter, opset)  # raises for an impossible combination
    check_writable(path)
    import onnx

    _check_finite(qmodel)
    sites = sites_of(qmodel)
    _check_transposed_sites(sites, form)
    _warn_changed_after_convert(sites)
    args = as_args(example_inputs)
    batches = [args] + [as_args(b) for b in _batches(calibration_data)]
    if form == "deploy":
        _check_feedable(batches)
    cal = calibrate(qmodel, batches)
    find_input_dependent(qmodel, args, cal)
    statics = static_sites(sites, cal, calibration)
    if form == "faithful" and calibration == "eval":
        _warn_batch_scaled(statics)
    dynamic = {name for name, rec in cal.items() if rec.weight_varies}
    cpu_args = to_device(args, "cpu")
    build_args = dict(exporter=exporter, opset=opset, input_names=input_names, output_names=output_names,
                      dynamic_batch=dynamic_batch)
    extra: dict = {}
    if form == "faithful":
        from . import faithful

        model, used, calls = faithful.build(qmodel, statics, dynamic, cpu_args, **build_args)
    else:
        from . import deploy

        model, used, calls, extra = deploy.build(qmodel, statics, dynamic, cpu_args,
                                                 [to_device(b, "cpu") for b in batches], target=target, **build_args)
    root_cfg = record.config
    layers = {}
    for s in sites:
        if s.converted:
            status = "int8" if s.name in statics else "float" if s.name in dynamic else "not called"
            if status == "int8" and not calls.get(s.name):
                status = "computed at export"  # (every call on an input the model's does not change: folded)
            layers[s.name] = metadata.layer_entry(s, statics.get(s.name), status, calls.get(s.name, []), root_cfg,
                                                  lr_scaler)
    meta = {
        "schema": metadata.SCHEMA,
        "schema_version": metadata.SCHEMA_VERSION,
        "form": form,
        "exporter": used,
        "producer": {"int8fx": _version(), "torch": torch.__version__.split("+")[0], "onnx": onnx.__version__,
                     **extra.pop("producer", {})},
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": int(model.ir_version),
        "levels": [-QMAX, QMAX],
        "calibration": {"method": calibration, "batches": len(batches)},
        "config": root_cfg.to_dict() if root_cfg is not None else {},
        "layers": layers,
        "skipped": [{"name": s.name, "op": s.op, "source": s.source, "reason": s.reason} for s in sites
                    if not s.converted],
        "opaque_modules": [dict(o.__dict__) for o in record.opaque],
        **extra,
    }
    metadata.attach(model, meta)
    check.full_check(model)
    metadata.validate(json.loads(metadata.dumps(meta)), model, "the exported model")
    write_atomically(_serialize(model), path)
    return json.loads(metadata.dumps(meta))


def _check_feedable(batches: list[tuple]) -> None:
    """The deploy form calibrates and checks its graph in onnxruntime, fed through numpy, which has no
    bfloat16 (it failed with "Got unsupported ScalarType BFloat16"): a ValueError before any work. A
    bfloat16 model exports from float32 inputs (the file then takes float32)."""
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for b in batches for t in b):
        raise ValueError("form='deploy' runs the example and calibration inputs in onnxruntime, which cannot be fed "
                         "bfloat16 tensors: pass them as float32 (a bfloat16 model exports from float32 inputs)")


def _uncompiled(model: nn.Module) -> nn.Module:
    """The model a `torch.compile` wrapper holds: it computes the same, and the exporters trace Python code,
    which the wrapper hides (torch.jit.trace refuses a dynamo-optimized function)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else model


def _batches(calibration_data) -> list:
    """The calibration batches: a tensor alone is one batch (as `int8fx export --calibration-data` reads a
    saved tensor), not one batch per image, each without its batch dimension."""
    if calibration_data is None:
        return []
    if isinstance(calibration_data, torch.Tensor):
        return [calibration_data]
    try:
        return list(calibration_data)
    except TypeError:
        raise ValueError("calibration_data must be a tensor (one batch) or an iterable of batches (tensors or "
                         f"tuples), got {type(calibration_data).__name__}") from None


def _warn_batch_scaled(statics: dict) -> None:
    """`qmodel.eval()` quantizes the input of a site without a running clip (never trained and committed, or
    `Int8Config(eval_act_clip="batch")`) at each batch's own absmax; a file's scale is static (the
    calibration batches' absmax), so the faithful file equals `qmodel.eval()` there only on inputs whose
    absmax is the calibrated one. Said once per export, naming the sites."""
    names = [n for n, st in statics.items() if st.clip_source == "calibration"]
    if names:
        shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(f"int8fx.export_onnx: {len(names)} site(s) ({shown}) have no running activation clip (a model "
                      "not trained, or trained without committing its state, or eval_act_clip='batch'): "
                      "qmodel.eval() quantizes their input with each batch's absmax, the file with the absmax of "
                      "the calibration batches, so the two agree only on inputs of that range. Train (optimizer "
                      "step or int8fx.commit) before exporting, or pass calibration_data covering the inputs.",
                      stacklevel=3)


def _warn_changed_after_convert(sites) -> None:
    """A conv/linear module assigned or added after `convert` (timm's `reset_classifier`, its
    `reparameterize_model` fusing a block's branches into a new conv) is no INT8 site: the model runs it in
    float, and so does the file. `inspect` lists such modules; the export says so too, since it is where a
    file believed to be INT8 is made (the metadata's "skipped" names them as well)."""
    names = [s.name for s in sites if not s.converted and s.reason.endswith(AFTER_CONVERT)]
    if names:
        shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(f"int8fx.export_onnx: {len(names)} conv/linear module(s) ({shown}) were assigned or added "
                      "after int8fx.convert and run in full precision, in the model and in the file. To export them "
                      "in INT8, convert the changed model again (int8fx.convert(model) keeps every other site's "
                      "trained state) and pass calibration_data for their new clips.", stacklevel=3)


def _version() -> str:
    from .. import __version__

    return __version__


def _check_finite(qmodel: nn.Module) -> None:
    """A model whose training diverged holds NaN/inf weights or statistics: no scale quantizes them, and the
    export would fail deep inside (a NaN weight never equals itself, so its site looked input-dependent)."""
    bad = [name for name, t in qmodel.named_parameters() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    # (a buffer may hold -inf on purpose, an attention mask; NaN never)
    bad += [name for name, t in qmodel.named_buffers() if t.is_floating_point() and bool(torch.isnan(t).any())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(f"the model holds NaN or infinite values in {len(bad)} parameter(s)/buffer(s) ({shown}): its "
                         "training diverged, and there is nothing to quantize; lower the learning rate and retrain")


def _check_transposed_sites(sites, form: str) -> None:
    """INT8 transposed convs export as QDQ -> ConvTranspose with one group: a grouped one's per-output-channel
    scales lie on no single axis of its weight, which DequantizeLinear needs."""
    transposed = [s for s in sites if s.converted and s.op.startswith("conv_transpose")]
    grouped = [s.name for s in transposed if getattr(s.layer, "groups", 1) != 1]
    if grouped:
        raise OnnxExportError(f"grouped INT8 transposed convolution site(s) {', '.join(grouped)} have no ONNX form: "
                              "convert with Int8Config(exclude=[...]) naming them to export them in FP32")


def _serialize(model) -> bytes:
    """The model as one protobuf; a model over protobuf's 2 GB limit cannot be one file."""
    try:
        return model.SerializeToString()
    except ValueError as e:
        raise ValueError(f"the ONNX model is too large for a single file (protobuf limit 2 GB): {e}") from e
