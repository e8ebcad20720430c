"""Export a converted model to ONNX for inference, with every layer's quantization parameters.

Graph. Every converted conv/linear site becomes the standard QDQ pattern that ONNX runtimes recognise:

    x --QuantizeLinear(s_x, 0)--> int8 --DequantizeLinear--> x~ --+
    W_int8 (initializer) --DequantizeLinear(s_w[o], axis=0)--> W~ -+--> Conv | Gemm | MatMul(+Add) --> y

activations per tensor, weights per output channel, exactly as the INT8 forward of int8fx computes them
(ALGORITHMS.md). The weight initializer holds the very INT8 values of `quantize_per_channel(weight)`.
Sites left in full precision stay plain float ops. BatchNorm, activations and pooling stay float.

Static activation scales. An ONNX graph needs a constant s_x per site. The default, `calibration="eval"`,
takes the clip the eval-mode model itself uses, so the file computes what `qmodel.eval()` computes: a
trained layer's `act_clip_ema` (the running clip of its training batches; `Int8Config.eval_act_clip`),
and, for a layer that never trained (or one configured to quantize eval batches with their own absmax),
the calibration absmax: the model runs in eval mode on `example_inputs` (plus any `calibration_data`)
and s_x = absmax over those batches / 127 per site, computed exactly as the INT8 op computes it.
`calibration="inputs"` always takes the calibration absmax, `calibration="ema"` always prefers
`act_clip_ema`; the metadata says which source every layer used. Either way ONNX output and eval-mode
output (on the calibration batch, for calibrated sites) quantize every activation to the same INT8
values and differ only by float summation order (and the rare activation whose rounding that order
flips by one INT8 step).

Why the TorchScript-based exporter (`dynamo=False`): it exists in every torch >= 2.5 and lets an
`autograd.Function` state its own ONNX lowering (`symbolic`), so the QDQ pattern above is emitted
verbatim, with INT8 initializers, instead of being pattern-matched back out of decomposed float math.

Metadata (schema in README, section "ONNX export"): one JSON document under the model's `metadata_props`
key `int8fx.quantization`; with onnx >= 1.16 (IR version 10) each site's nodes also carry
`int8fx.site`/`int8fx.role`, and its compute node the layer's own JSON entry. JSON floats are written with
`repr` precision, so `read_onnx_metadata` gives back bit-identical values.

Failure. An op torch cannot lower to ONNX raises `OnnxExportError` naming the fx node (or source line)
that calls it; the file is written to a temporary name and moved into place only after the checker
passed, so a failed export leaves no partial file behind.
"""
from __future__ import annotations

import contextlib
import copy
import json
import linecache
import os
import re
import sys
import tempfile
import warnings
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .nn.modules import Int8Layer, ModuleSite, _hashable, make_spec
from .nn.scope import no_fused_fastpath
from .passes import conversion_of, sites_of
from .quant.core import QMAX, absmax, quantize_per_channel, scale_from_clip

SCHEMA = "int8fx.onnx.quantization"
SCHEMA_VERSION = 1
METADATA_KEY = "int8fx.quantization"
NODE_SITE_KEY, NODE_ROLE_KEY, NODE_LAYER_KEY = "int8fx.site", "int8fx.role", "int8fx.layer"
DEFAULT_OPSET = 17
_NODE_METADATA_IR = 10  # NodeProto.metadata_props appeared in IR version 10 (onnx 1.16)


class OnnxExportError(RuntimeError):
    """The model (or a node of it) cannot be expressed in ONNX; the message names the node."""


# --------------------------------------------------------------------------- tensors as JSON
def tensor_to_json(t: Tensor) -> dict:
    """{"dtype", "shape", "data"}: exact for every dtype JSON can hold (floats via repr, ints, bools)."""
    t = t.detach().cpu()
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "data": t.reshape(-1).tolist()}


def tensor_from_json(obj: dict) -> Tensor:
    """Inverse of `tensor_to_json`, bit for bit."""
    dtype = getattr(torch, obj["dtype"])
    return torch.tensor(obj["data"], dtype=dtype).reshape(obj["shape"])


def _is_tensor_json(obj: Any) -> bool:
    return isinstance(obj, dict) and set(obj) == {"dtype", "shape", "data"}


def _tensors_in(obj: Any) -> Any:
    if _is_tensor_json(obj):
        return tensor_from_json(obj)
    if isinstance(obj, dict):
        return {k: _tensors_in(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_tensors_in(v) for v in obj]
    return obj


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=False, separators=(",", ":"), allow_nan=True)


# --------------------------------------------------------------------------- the exported op
class _QDQGemm(torch.autograd.Function):
    """Eager: the float emulation of the QDQ graph (used while tracing). Export: the QDQ pattern itself."""

    @staticmethod
    def forward(ctx, x, x_scale, x_zp, w_int8, w_scale, w_zp, bias, kind, attrs):
        xq = torch.clamp(torch.round(x / x_scale), -127, 127) * x_scale  # as int8fx: symmetric, never -128
        w = w_int8.float() * w_scale.view(-1, *([1] * (w_int8.dim() - 1)))
        if kind == "conv":
            kernel, strides, pads, dilations, group = attrs
            nd = len(kernel)
            lo, hi = pads[:nd], pads[nd:]
            if any(a != b for a, b in zip(lo, hi)):
                xq = F.pad(xq, [p for d in reversed(range(nd)) for p in (lo[d], hi[d])])
                lo = [0] * nd
            conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
            return conv(xq, w, bias, tuple(strides), tuple(lo), tuple(dilations), group)
        return F.linear(xq, w, bias)

    @staticmethod
    def symbolic(g, x, x_scale, x_zp, w_int8, w_scale, w_zp, bias, kind, attrs):
        # QuantizeLinear saturates at -128; int8fx's levels stop at -127. A Clip at -127 s in front keeps
        # the file exact for inputs beyond the static clip (onnxruntime keeps it: it is not redundant).
        low = g.op("Mul", x_scale, g.op("Constant", value_t=torch.tensor(-127.0)))
        xq = g.op("QuantizeLinear", g.op("Clip", x, low), x_scale, x_zp)
        xdq = g.op("DequantizeLinear", xq, x_scale, x_zp)
        wdq = g.op("DequantizeLinear", w_int8, w_scale, w_zp, axis_i=0)
        has_bias = not (bias is None or bias.node().mustBeNone())
        if kind == "conv":
            kernel, strides, pads, dilations, group = attrs
            ins = (xdq, wdq, bias) if has_bias else (xdq, wdq)
            return g.op("Conv", *ins, kernel_shape_i=list(kernel), strides_i=list(strides), pads_i=list(pads),
                        dilations_i=list(dilations), group_i=int(group))
        if kind == "gemm":
            ins = (xdq, wdq, bias) if has_bias else (xdq, wdq)
            return g.op("Gemm", *ins, transB_i=1)
        y = g.op("MatMul", xdq, g.op("Transpose", wdq, perm_i=[1, 0]))
        return g.op("Add", y, bias) if has_bias else y


class ExportSite(nn.Module):
    """Stands in for one converted `Int8Layer` during export: static INT8 weights and scales as buffers."""

    def __init__(self, layer: Int8Layer, weight: Tensor, bias: Tensor | None, clip: float, spec) -> None:
        super().__init__()
        self.site_name, self.dims = layer.site_name, layer.dims
        # a module site in a non-zeros padding mode pads in floating point before its conv (as nn.Conv2d)
        self.padding_mode = getattr(layer, "padding_mode", "zeros") if isinstance(layer, ModuleSite) else "zeros"
        self.pre_pad = tuple(layer._reversed_padding_repeated_twice) if self.padding_mode != "zeros" else ()
        w2 = weight.detach().float().reshape(weight.shape[0], -1)
        w_q, s_w = quantize_per_channel(w2, 0)
        self.register_buffer("w_int8", w_q.to(torch.int8).reshape(weight.shape))
        self.register_buffer("w_scale", s_w.float())
        self.register_buffer("w_zero_point", torch.zeros(weight.shape[0], dtype=torch.int8))
        s_x = float(scale_from_clip(torch.tensor(clip, dtype=torch.float32)))
        # QuantizeLinear divides by its scale: a site whose calibration input was all zeros gets the smallest
        # normal fp32 scale, which maps 0 to 0 (as int8fx's zero scale does) without a division by zero.
        self.register_buffer("x_scale", torch.tensor(s_x if s_x > 0 else torch.finfo(torch.float32).tiny))
        self.register_buffer("x_zero_point", torch.zeros((), dtype=torch.int8))
        self.register_buffer("qdq_bias", None if bias is None else bias.detach().float().clone())
        if layer.owns_params:  # code that reads the module's weight/bias (e.g. MultiheadAttention's out_proj)
            self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        if layer.dims:
            pads = [lo for lo, _ in spec.padding] + [hi for _, hi in spec.padding]
            self.attrs = (tuple(spec.kernel), tuple(spec.stride), tuple(pads), tuple(spec.dilation), spec.groups)
        else:
            self.attrs = ()
        self.trace_log: list | None = None

    def int8_functional(self, input: Tensor, weight: Tensor, bias=None, stride=1, padding=0, dilation=1, groups=1):
        """Entry of routed calls and of calls on a module site's weight; the geometry is the one calibration
        saw, in `attrs`, and the weight and bias are the static buffers."""
        return self._qdq(input)

    def forward(self, x: Tensor, *unused) -> Tensor:
        # `unused`: a functional site's run-time weight/bias/geometry; their static values are in the buffers
        if self.pre_pad:
            x = F.pad(x, self.pre_pad, mode=self.padding_mode)
        return self._qdq(x)

    def _qdq(self, x: Tensor) -> Tensor:
        if self.trace_log is not None and torch.jit.is_tracing():
            self.trace_log.append(self.site_name)
        kind = "conv" if self.dims else ("gemm" if x.dim() == 2 else "matmul")
        if x.dtype != torch.float32:
            x = x.float()
        return _QDQGemm.apply(x, self.x_scale, self.x_zero_point, self.w_int8, self.w_scale,
                              self.w_zero_point, self.qdq_bias, kind, self.attrs)


class _NotCalibrated(nn.Module):
    """Stands in for an Int8Layer the calibration forward never called: if the export trace reaches it after
    all, the model's eval-mode forward and its traced forward differ, and no static scale exists for it."""

    def __init__(self, site_name: str) -> None:
        super().__init__()
        self.site_name = site_name

    def forward(self, *args, **kwargs):
        raise OnnxExportError(f"INT8 site '{self.site_name}' is used by the traced forward but was never called "
                              "by the eval-mode calibration forward, so it has no static activation scale")

    int8_functional = forward


# --------------------------------------------------------------------------- calibration
def _as_args(example_inputs) -> tuple:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _to(args: tuple, device) -> tuple:
    return tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode and no_grad for the duration; every module's own training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, t in flags:
            m.training = t


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def observe_int8_calls(model: nn.Module, callback):
    """Call `callback(layer, x, weight, bias, out, geometry)` after every INT8 computation of every site of
    `model`, however it is reached (a module call, a routed call, a call on a module site's weight): all go
    through `Int8Layer.int8_functional`, which is shadowed per instance for the duration."""
    layers = [m for m in model.modules() if isinstance(m, Int8Layer)]
    for m in layers:
        def int8_functional(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, _m=m):
            out = Int8Layer.int8_functional(_m, input, weight, bias, stride, padding, dilation, groups)
            callback(_m, input, weight, bias, out, (stride, padding, dilation, groups))
            return out

        m.int8_functional = int8_functional
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop("int8_functional", None)


def calibrate(qmodel: nn.Module, batches: Iterable[tuple]) -> dict[str, dict]:
    """Run `qmodel` in eval mode on each batch; per converted site: absmax of its input over all batches,
    the weight and bias it used (functional sites get them as arguments) and the number of calls."""
    seen: dict[str, dict] = {}

    def record(mod, x, weight, bias, out, geometry):
        rec = seen.setdefault(mod.site_name, {"absmax": torch.zeros((), dtype=torch.float32), "calls": 0})
        rec["absmax"] = torch.maximum(rec["absmax"], absmax(x).cpu())
        rec["calls"] += 1
        rec.setdefault("weight", weight.detach().cpu())
        rec.setdefault("bias", None if bias is None else bias.detach().cpu())
        rec.setdefault("input_shape", tuple(x.shape))
        if mod.dims:
            rec.setdefault("spec", make_spec(mod.dims, tuple(weight.shape[2:]), *map(_hashable, geometry)))

    device = _device_of(qmodel)
    with observe_int8_calls(qmodel, record), eval_mode(qmodel), no_fused_fastpath():
        for batch in batches:
            qmodel(*_to(batch, device))
    return seen


# --------------------------------------------------------------------------- metadata
def _layer_state(layer: Int8Layer) -> dict:
    return {n: tensor_to_json(b) for n, b in layer.named_buffers(recurse=False) if b is not None}


def _config_overrides(layer_cfg, root_cfg) -> dict:
    if layer_cfg is root_cfg or root_cfg is None:
        return {}
    a, b = layer_cfg.to_dict(), root_cfg.to_dict()
    return {k: v for k, v in a.items() if k not in ("exclude", "overrides") and b.get(k) != v}


def _layer_metadata(site, layer: Int8Layer, cal: dict | None, export_site: ExportSite | None, clip: float | None,
                    clip_source: str, root_cfg, lr_scaler) -> dict:
    q = layer.grad_quantizer
    entry: dict[str, Any] = {
        "op": site.op,
        "source": site.source,
        "index": int(layer.index),
        "backend": layer.backend_choice,
        "exported": export_site is not None,
        "onnx": [],  # filled after export: one entry per call of the site in the graph
    }
    if export_site is not None:
        entry["forward"] = {
            "activation": {"granularity": "per-tensor", "clip": clip, "clip_source": clip_source,
                           "scale": float(export_site.x_scale), "calibration_absmax": float(cal["absmax"]),
                           "input_shape": list(cal["input_shape"])},
            "weight": {"granularity": "per-channel", "axis": 0, "shape": list(export_site.w_int8.shape),
                       "scale": tensor_to_json(export_site.w_scale)},
        }
    else:
        entry["forward"] = None  # never called on the calibration inputs: not in the graph
    entry["grad"] = {
        "policy": q.policy,
        "rounding": layer.config.rounding,
        "weight_grad_granularity": "per-channel" if getattr(q, "channelwise", False) else "per-tensor",
        "input_grad_granularity": "per-tensor",
        "state": {n: tensor_to_json(b) for n, b in q.named_buffers() if b is not None},
    }
    dev = float(layer.deviation)
    entry["dclrs"] = {"tracks_deviation": bool(layer.tracks_deviation), "deviation": dev}
    if lr_scaler is not None:
        from .optim import deviation_factor

        entry["dclrs"].update(alpha=lr_scaler.alpha, beta=lr_scaler.beta,
                              lr_factor=float(deviation_factor(dev, lr_scaler.alpha, lr_scaler.beta)))
    entry["state"] = _layer_state(layer)
    entry["config_overrides"] = _config_overrides(layer.config, root_cfg)
    return entry


# --------------------------------------------------------------------------- export
def export_onnx(qmodel: nn.Module, example_inputs, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                calibration: str = "eval", calibration_data: Iterable | None = None, dynamic_batch: bool = True,
                input_names: list[str] | None = None, output_names: list[str] | None = None,
                lr_scaler=None) -> dict:
    """Export `qmodel` (from `int8fx.convert`) to ONNX at `path`; returns the metadata dict it stored.

    example_inputs: a tensor or tuple of tensors, the model's positional inputs; they trace the graph and
        calibrate the static activation scales (module docstring).
    calibration: "eval" (default: the clip the eval-mode model itself uses, so that the file computes what
        `qmodel.eval()` computes: `act_clip_ema` where training set it and the layer's
        `Int8Config.eval_act_clip` is "ema", else the calibration absmax), "inputs" (absmax over
        example_inputs and calibration_data) or "ema" (`act_clip_ema` where set, else the calibration absmax).
    calibration_data: more batches (tensors or tuples) for the calibration absmax.
    dynamic_batch: make dimension 0 of every input and output symbolic.
    lr_scaler: a `DeviationLRScaler`; its alpha/beta and each layer's LR factor go into the metadata.
    Raises `OnnxExportError` (naming the node) when a part of the model has no ONNX form; nothing is
    written then.
    """
    record = conversion_of(qmodel)
    if record is None:
        raise ValueError("export_onnx() needs a model returned by int8fx.convert()")
    sites = sites_of(qmodel)
    if calibration not in ("eval", "inputs", "ema"):
        raise ValueError(f"calibration must be 'eval', 'inputs' or 'ema', got {calibration!r}")
    if opset < 13:
        raise ValueError(f"per-axis DequantizeLinear needs opset >= 13, got {opset}")
    import onnx

    args = _as_args(example_inputs)
    batches = [args] + [_as_args(b) for b in (calibration_data or [])]
    cal = calibrate(qmodel, batches)
    args = _to(args, "cpu")  # the export copy lives on the CPU
    root_cfg = record.config

    # the export copy: every converted layer replaced by its static ExportSite (one per layer object)
    em = copy.deepcopy(qmodel).cpu()
    em_layers = {m.site_name: m for m in em.modules() if isinstance(m, Int8Layer)}
    exports: dict[str, ExportSite] = {}
    clips: dict[str, tuple[float, str]] = {}
    trace_log: list[str] = []
    for site in sites:
        if not site.converted or site.name not in cal:
            continue
        layer, rec = site.layer, cal[site.name]
        clip, source = float(rec["absmax"]), "calibration"
        use_ema = calibration == "ema" or (calibration == "eval" and layer.eval_act_clip() is not None)
        if use_ema and float(layer.act_clip_ema) > 0:
            clip, source = float(layer.act_clip_ema), "act_clip_ema"
        es = ExportSite(em_layers[site.name], rec["weight"], rec["bias"], clip, rec.get("spec"))
        es.trace_log = trace_log
        exports[site.name], clips[site.name] = es, (clip, source)
    _swap_layers(em, exports)

    layers_meta = {}
    for site in sites:
        if site.converted:
            es = exports.get(site.name)
            clip, source = clips.get(site.name, (None, "not called"))
            layers_meta[site.name] = _layer_metadata(site, site.layer, cal.get(site.name), es, clip, source, root_cfg,
                                                     lr_scaler)
    meta = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "producer": {"int8fx": _version(), "torch": torch.__version__.split("+")[0], "onnx": onnx.__version__},
        "opset": opset,
        "levels": [-QMAX, QMAX],
        "calibration": {"method": calibration, "batches": len(batches)},
        "config": root_cfg.to_dict() if root_cfg is not None else {},
        "layers": layers_meta,
        "skipped": [{"name": s.name, "op": s.op, "source": s.source, "reason": s.reason} for s in sites if not s.converted],
        "opaque_modules": [dict(o.__dict__) for o in record.opaque],
    }

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".int8fx-", suffix=".onnx.tmp", dir=directory)
    os.close(fd)
    try:
        n_in = sum(isinstance(a, Tensor) for a in args)
        input_names = list(input_names or [f"input{i}" if n_in > 1 else "input" for i in range(n_in)])
        em.eval()
        with torch.no_grad(), no_fused_fastpath():
            probe = em(*args)
        n_out = len(probe) if isinstance(probe, (tuple, list)) else 1
        output_names = list(output_names or [f"output{i}" if n_out > 1 else "output" for i in range(n_out)])
        dynamic_axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
        trace_log.clear()
        _torch_export(em, args, tmp, opset, input_names, output_names, dynamic_axes)
        model = onnx.load(tmp)
        _annotate(model, trace_log, exports, layers_meta)
        model.metadata_props.add(key=METADATA_KEY, value=_dumps(meta))
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:  # the graph torch produced is not valid ONNX: say which node if we can
            raise OnnxExportError(f"the exported graph fails onnx.checker: {e}") from e
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return json.loads(_dumps(meta))


def _version() -> str:
    from . import __version__

    return __version__


def _swap_layers(root: nn.Module, exports: dict[str, ExportSite]) -> None:
    """Replace every Int8Layer in `root` (under all its names, shared ones too) by its ExportSite, or by a
    `_NotCalibrated` stub when calibration never called it."""
    for name, mod in list(root.named_modules(remove_duplicate=False)):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Int8Layer):
                setattr(mod, child_name, exports.get(child.site_name) or _NotCalibrated(child.site_name))


@contextlib.contextmanager
def _quiet_fds():
    """torch's TorchScript exporter dumps its whole IR to the C++ stderr/stdout when it fails; keep that out
    of the user's terminal (the exception we raise says what went wrong)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for s in saved:
                os.close(s)


def _torch_export(em, args, tmp, opset, input_names, output_names, dynamic_axes) -> None:
    kwargs = dict(opset_version=opset, input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                  do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL)
    if "dynamo" in torch.onnx.export.__code__.co_varnames:
        kwargs["dynamo"] = False
    try:
        with warnings.catch_warnings(), _quiet_fds(), no_fused_fastpath():
            warnings.simplefilter("ignore")
            torch.onnx.export(em, args, tmp, **kwargs)
    except OnnxExportError:
        raise
    except Exception as e:
        if isinstance(e.__cause__, OnnxExportError):
            raise e.__cause__ from None
        raise OnnxExportError(_explain_failure(em, args, e, opset)) from e


_ATEN_RE = re.compile(r"(aten|prim|onnx)::(\w+)")
_SRC_RE = re.compile(r"^(.*)\((\d+)\): (\S+)$")
_ASSIGN_RE = re.compile(r"^\s*(\w+)\s*=")


def _explain_failure(em: nn.Module, args: tuple, e: Exception, opset: int) -> str:
    """Name the fx node (or source line) whose op torch could not lower to ONNX."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    found = _ATEN_RE.search(str(e))
    where = []
    if found:
        kind = f"{found.group(1)}::{found.group(2)}"
        graph_files = {type(m).forward.__code__.co_filename: n or "(root)"
                       for n, m in em.named_modules() if isinstance(m, fx.GraphModule)}
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(em, args, check_trace=False, strict=False)
            nodes = [n for n in traced.inlined_graph.nodes() if n.kind() == kind]
        except Exception:  # tracing itself failed: fall back to the exporter's own message
            nodes = []
        for n in nodes:
            desc = _describe_jit_node(n, graph_files)
            if desc and desc not in where:
                where.append(desc)
    if where:
        return (f"cannot export to ONNX (opset {opset}): {'; '.join(where)} has no ONNX form "
                f"({found.group(0)}). torch says: {text}")
    return f"cannot export to ONNX (opset {opset}): {text}"


def _describe_jit_node(node, graph_files: dict) -> str | None:
    lines = str(node.sourceRange()).splitlines()
    if not lines:
        return None
    m = _SRC_RE.match(lines[0].strip())
    if not m:
        return None
    file, lineno = m.group(1), int(m.group(2))
    code = linecache.getline(file, lineno)
    if file in graph_files:
        a = _ASSIGN_RE.match(code)
        if a:
            return f"fx node '{a.group(1)}' of graph '{graph_files[file]}' (`{code.strip().split(';')[0]}`)"
    scope = node.scopeName().split("/")[-1] if node.scopeName() else ""
    return f"code at {file}:{lineno} (`{code.strip()}`{', module ' + scope if scope else ''})"


# --------------------------------------------------------------------------- post-processing the ONNX graph
_COMPUTE = ("Conv", "Gemm", "MatMul")


def _annotate(model, trace_log: list[str], exports: dict[str, ExportSite], layers_meta: dict) -> None:
    """Find each site's QDQ pattern (in trace order), name its nodes after the site, check its INT8 weights
    against the layer's, and record node names in the metadata (and the metadata on the nodes)."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def made_by(name, op):
        n = producer.get(name)
        return n if n is not None and n.op_type == op else None

    found = []
    for n in graph.node:
        if n.op_type not in _COMPUTE or len(n.input) < 2:
            continue
        w_src = n.input[1]
        tr = made_by(w_src, "Transpose") if n.op_type == "MatMul" else None
        wdq = made_by(tr.input[0] if tr is not None else w_src, "DequantizeLinear")
        xdq = made_by(n.input[0], "DequantizeLinear")
        xq = made_by(xdq.input[0], "QuantizeLinear") if xdq is not None else None
        if wdq is None or xq is None or wdq.input[0] not in inits:
            continue
        add = None
        if n.op_type == "MatMul":
            users = consumers.get(n.output[0], [])
            add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
        found.append((n, xq, xdq, wdq, tr, add))
    if len(found) != len(trace_log):
        raise OnnxExportError(f"internal: {len(trace_log)} INT8 site calls were traced but {len(found)} QDQ patterns "
                              "are in the ONNX graph")
    supports_node_meta = hasattr(onnx.NodeProto(), "metadata_props")
    calls: dict[str, int] = {}
    taken = {n.name for n in graph.node}
    for (n, xq, xdq, wdq, tr, add), site in zip(found, trace_log):
        es = exports[site]
        w = numpy_helper.to_array(inits[wdq.input[0]])
        if w.shape != tuple(es.w_int8.shape) or not (w == es.w_int8.numpy()).all():
            raise OnnxExportError(f"internal: the INT8 weights in the ONNX graph do not match site {site}")
        k = calls[site] = calls.get(site, 0) + 1
        base = site if k == 1 else f"{site}#{k}"
        roles = {"x_quantize": xq, "x_dequantize": xdq, "w_dequantize": wdq, "compute": n}
        if tr is not None:
            roles["w_transpose"] = tr
        if add is not None and len(add.input) == 2 and add.input[1] in inits:
            roles["bias_add"] = add
        names = {}
        for role, node in roles.items():
            new = f"{base}/{role}"
            if new in taken and node.name != new:
                new = f"{new}_{len(taken)}"
            taken.discard(node.name)
            node.name = new
            taken.add(new)
            names[role] = new
        names["weight_initializer"] = wdq.input[0]
        names["op_type"] = n.op_type
        layers_meta[site]["onnx"].append(names)
    for site, entry in layers_meta.items():
        if not supports_node_meta:
            break
        for names in entry["onnx"]:
            by_name = {nd.name: nd for nd in graph.node}
            for role in ("x_quantize", "x_dequantize", "w_dequantize", "w_transpose", "compute", "bias_add"):
                if role in names:
                    nd = by_name[names[role]]
                    nd.metadata_props.add(key=NODE_SITE_KEY, value=site)
                    nd.metadata_props.add(key=NODE_ROLE_KEY, value=role)
            by_name[names["compute"]].metadata_props.add(key=NODE_LAYER_KEY, value=_dumps(entry))
    if supports_node_meta and model.ir_version < _NODE_METADATA_IR:
        model.ir_version = _NODE_METADATA_IR


# --------------------------------------------------------------------------- reading back
def read_onnx_metadata(path_or_model, *, as_tensors: bool = False) -> dict:
    """The quantization metadata `export_onnx` stored, as Python objects (dicts, lists, floats, ints).

    as_tensors: turn every {"dtype", "shape", "data"} object into the torch.Tensor it came from.
    """
    import onnx

    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(os.fspath(path_or_model))
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"no int8fx metadata ({METADATA_KEY!r}) in this ONNX model")
    meta = json.loads(props[METADATA_KEY])
    if meta.get("schema") != SCHEMA or not isinstance(meta.get("schema_version"), int):
        raise ValueError(f"unknown int8fx metadata schema {meta.get('schema')!r}")
    if meta["schema_version"] > SCHEMA_VERSION:
        raise ValueError(f"int8fx metadata schema version {meta['schema_version']} is newer than this int8fx "
                         f"reads ({SCHEMA_VERSION}); upgrade int8fx")
    return _tensors_in(meta) if as_tensors else meta


def read_node_metadata(path_or_model) -> dict[str, dict]:
    """{node name: {key: value}} of every node carrying int8fx metadata (`int8fx.layer` parsed as JSON)."""
    import onnx

    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(os.fspath(path_or_model))
    out = {}
    for n in model.graph.node:
        props = {p.key: p.value for p in getattr(n, "metadata_props", [])}
        if NODE_SITE_KEY in props:
            if NODE_LAYER_KEY in props:
                props[NODE_LAYER_KEY] = json.loads(props[NODE_LAYER_KEY])
            out[n.name] = props
    return out


# --------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    from .modelspec import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("-o", "--output", metavar="OUT.onnx", required=True, help="where to write the ONNX model")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (>= 13 for per-axis DequantizeLinear; default {DEFAULT_OPSET})")
    parser.add_argument("--calibration", choices=("eval", "inputs", "ema"), default="eval",
                        help="static activation scales: 'eval' (default) = what the eval-mode model uses (the "
                             "running training clip act_clip_ema of trained layers, else 'inputs'); 'inputs' = "
                             "absmax of each INT8 layer's input over the calibration batches; 'ema' = act_clip_ema "
                             "where training recorded one, else 'inputs'")
    parser.add_argument("--calibration-data", metavar="FILE.pt", default=None,
                        help="torch.save'd tensor [N, ...] or list of tensors/tuples: batches to calibrate on (the "
                             "first also traces the graph); default: one random normal batch of --input-shape, "
                             "which suits only a smoke test: calibrate a real model on real data or use --calibration ema")
    parser.add_argument("--static-batch", action="store_true",
                        help="fix the batch dimension to the example's (default: dimension 0 is dynamic)")


def run(args) -> int:
    from .modelspec import ModelSpecError, load_converted

    try:
        qm, example, label = load_converted(args)
        batches = None
        if args.calibration_data:
            data = torch.load(args.calibration_data, map_location="cpu", weights_only=False)
            batches = [data] if isinstance(data, Tensor) else list(data)
            example = batches[0]
        if example is None:
            raise ModelSpecError("export needs an example input: pass --input-shape N,C,... or --calibration-data")
    except ModelSpecError as e:
        print(f"int8fx export: {e}", file=sys.stderr)
        return 2
    try:
        meta = export_onnx(qm, example, args.output, opset=args.opset, calibration=args.calibration,
                           calibration_data=batches[1:] if batches else None, dynamic_batch=not args.static_batch)
    except OnnxExportError as e:
        print(f"int8fx export: {e}", file=sys.stderr)
        return 1
    n = len(meta["layers"])
    print(f"{label}: wrote {args.output} (opset {args.opset}): {n} INT8 sites with QuantizeLinear/DequantizeLinear, "
          f"{len(meta['skipped'])} kept in FP32; quantization metadata under '{METADATA_KEY}' "
          f"(schema {SCHEMA} v{SCHEMA_VERSION})")
    if not args.calibration_data and args.calibration == "inputs":
        print("note: activation scales were calibrated on a random input; use --calibration-data for real scales")
    return 0
