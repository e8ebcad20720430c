"""The quantization metadata of an exported file: its schema, how it is written, and how it is read back.

One JSON document under the model's `metadata_props` key `int8fx.quantization` (schema in README, section
"Inspect and export to ONNX"); it is stored once, at model level. Floats are written with `repr` precision,
so values read back bit for bit, and a tensor is `{"dtype", "shape", "data"}` (flat, row-major).

Reading validates before returning: a reader that trusted a damaged or hand-edited file would hand NaN
scales or missing layers to a deployment tool. Every rejection names the key that is wrong, and, when the
graph is at hand, the node whose scale disagrees with the document.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from torch import Tensor

SCHEMA = "int8fx.onnx.quantization"
SCHEMA_VERSION = 2
METADATA_KEY = "int8fx.quantization"
FORMS = ("faithful", "deploy")
# what the deploy form is tuned for: "portable" keeps every zero point 0 (TensorRT's rule, onnxruntime runs it
# too); "onnxruntime" stores activations as uint8, lets the INT8 readers of a fan-out share its codes
# (quantized.fan_out) and runs ReLUs as Clips of the codes (int8_ops.relus_on_codes), all of which it fuses
TARGETS = ("portable", "onnxruntime")


class OnnxMetadataError(ValueError):
    """The int8fx metadata of an ONNX file is missing, malformed or disagrees with its graph."""


# --------------------------------------------------------------------------- tensors as JSON
def tensor_to_json(t: Tensor) -> dict:
    """{"dtype", "shape", "data"}: exact for every dtype JSON can hold (floats via repr, ints, bools)."""
    t = t.detach().cpu()
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "data": t.reshape(-1).tolist()}


def tensor_from_json(obj: dict) -> Tensor:
    """Inverse of `tensor_to_json`, bit for bit."""
    dtype = getattr(torch, obj["dtype"])
    return torch.tensor(obj["data"], dtype=dtype).reshape(obj["shape"])


def is_tensor_json(obj: Any) -> bool:
    return isinstance(obj, dict) and set(obj) == {"dtype", "shape", "data"}


def tensors_in(obj: Any) -> Any:
    """`obj` with every tensor object turned into the torch.Tensor it came from."""
    if is_tensor_json(obj):
        return tensor_from_json(obj)
    if isinstance(obj, dict):
        return {k: tensors_in(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tensors_in(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True)


def attach(model, meta: dict) -> None:
    """Store `meta` in `model` (replacing an earlier document)."""
    for i, p in reversed(list(enumerate(model.metadata_props))):
        if p.key == METADATA_KEY:
            del model.metadata_props[i]
    model.metadata_props.add(key=METADATA_KEY, value=dumps(meta))


# --------------------------------------------------------------------------- reading back
def read_onnx_metadata(path_or_model, *, as_tensors: bool = False) -> dict:
    """The quantization metadata `export_onnx` stored, validated against the file's graph.

    as_tensors: turn every {"dtype", "shape", "data"} object into the torch.Tensor it came from.
    Raises `OnnxMetadataError` (a ValueError) naming what is wrong.
    """
    import onnx

    if isinstance(path_or_model, onnx.ModelProto):
        model, where = path_or_model, "this ONNX model"
    else:
        where = os.fspath(path_or_model)
        try:
            model = onnx.load(where, load_external_data=False)
        except FileNotFoundError:
            raise OnnxMetadataError(f"{where}: no such file") from None
        except Exception as e:  # protobuf's DecodeError and friends
            raise OnnxMetadataError(f"{where}: not an ONNX model ({type(e).__name__}: {e})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise OnnxMetadataError(f"{where}: no int8fx metadata ({METADATA_KEY!r}) in this ONNX model")
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise OnnxMetadataError(f"{where}: the int8fx metadata is not valid JSON (truncated or damaged?): {e}") from None
    validate(meta, model, where)
    return tensors_in(meta) if as_tensors else meta


def validate(meta: Any, model=None, where: str = "metadata") -> None:
    """Check `meta` against the schema (and, given the model, against its graph); raise OnnxMetadataError."""
    def fail(key: str, problem: str):
        raise OnnxMetadataError(f"{where}: int8fx metadata {key} {problem}")

    if not isinstance(meta, dict):
        fail("document", f"is a {type(meta).__name__}, expected a JSON object")
    if meta.get("schema") != SCHEMA:
        fail("'schema'", f"is {meta.get('schema')!r}, expected {SCHEMA!r}")
    version = meta.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        fail("'schema_version'", f"is {version!r}, expected an integer >= 1")
    if version > SCHEMA_VERSION:
        fail("'schema_version'", f"is {version}, newer than this int8fx reads ({SCHEMA_VERSION}); upgrade int8fx")
    for key, kind in (("layers", dict), ("skipped", list), ("config", dict)):
        if not isinstance(meta.get(key), kind):
            fail(f"'{key}'", "is missing" if key not in meta else f"is a {type(meta[key]).__name__}, expected a "
                 f"JSON {'object' if kind is dict else 'array'}")
    if version >= 2 and meta.get("form") not in FORMS:
        fail("'form'", f"is {meta.get('form')!r}, expected one of {FORMS}")
    for site, entry in meta["layers"].items():
        _validate_layer(f"layers[{site!r}]", entry, version, fail)
    if model is not None:
        _validate_against_graph(meta, model, version, fail)


def _validate_layer(key: str, entry: Any, version: int, fail) -> None:
    if not isinstance(entry, dict):
        fail(key, f"is a {type(entry).__name__}, expected a JSON object")
    if not isinstance(entry.get("exported"), bool):
        fail(f"{key}.exported", "is missing or not true/false")
    if not entry["exported"]:
        return
    fwd = entry.get("forward")
    if not isinstance(fwd, dict) or not isinstance(fwd.get("activation"), dict) or not isinstance(fwd.get("weight"), dict):
        fail(f"{key}.forward", "needs 'activation' and 'weight' objects for an exported layer")
    _positive(f"{key}.forward.activation.scale", fwd["activation"].get("scale"), fail)
    w_scale = _tensor(f"{key}.forward.weight.scale", fwd["weight"].get("scale"), fail)
    if not torch.isfinite(w_scale).all() or (w_scale < 0).any():
        fail(f"{key}.forward.weight.scale", "holds a negative or non-finite value")
    calls = entry.get("onnx")
    if not isinstance(calls, list) or not calls:
        fail(f"{key}.onnx", "must list the graph nodes of every call of an exported layer")
    for i, call in enumerate(calls):
        if not isinstance(call, dict) or not all(isinstance(call.get(r), str) for r in ("x_quantize", "compute")):
            fail(f"{key}.onnx[{i}]", "needs the node names 'x_quantize' and 'compute'")
        if version >= 2:
            _positive(f"{key}.onnx[{i}].x_scale", call.get("x_scale"), fail)


def _positive(key: str, value: Any, fail) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(key, f"is {value!r}, expected a number")
    if not (math.isfinite(value) and value > 0):
        fail(key, f"is {value!r}, expected a positive finite number")


def _tensor(key: str, obj: Any, fail) -> Tensor:
    if not is_tensor_json(obj):
        fail(key, "is not a tensor object {dtype, shape, data}")
    try:
        return tensor_from_json(obj)
    except (AttributeError, TypeError, RuntimeError, ValueError) as e:
        fail(key, f"is not a valid tensor ({e})")


def _validate_against_graph(meta: dict, model, version: int, fail) -> None:
    """Node names exist, and each call's activation scale is the one its QuantizeLinear reads."""
    from onnx import numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if "opset" in meta and meta["opset"] != opset:
        fail("'opset'", f"is {meta['opset']!r} but the graph's opset is {opset}")
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    for site, entry in meta["layers"].items():
        for i, call in enumerate(entry.get("onnx") or []):
            key = f"layers[{site!r}].onnx[{i}]"
            for role, name in call.items():
                if role in ("x_quantize", "x_dequantize", "w_dequantize", "compute") and name not in nodes:
                    fail(f"{key}.{role}", f"names node {name!r}, which is not in the graph")
            q = nodes[call["x_quantize"]]
            if len(q.input) < 2 or q.input[1] not in inits:
                fail(f"{key}.x_quantize", f"node {q.name!r} does not read its scale from an initializer")
            s = numpy_helper.to_array(inits[q.input[1]])
            want = call["x_scale"] if version >= 2 else entry["forward"]["activation"]["scale"]
            if s.size != 1 or float(s.reshape(-1)[0]) != want:
                fail(f"{key}.x_scale" if version >= 2 else f"layers[{site!r}].forward.activation.scale",
                     f"is {want!r} but node {q.name!r} quantizes with scale {s.reshape(-1).tolist()}")


# --------------------------------------------------------------------------- writing
def layer_entry(site, static, status: str, onnx_calls: list[dict], root_cfg, lr_scaler=None) -> dict:
    """The metadata of one converted site. status: "int8" (in the graph with static INT8 weights), "float"
    (weight computed from the model input: exported in float), "computed at export" (its input does not
    depend on the model's, and the exporter folded every call into a constant) or "not called" (calibration
    never reached it)."""
    layer = site.layer
    q = layer.grad_quantizer
    entry: dict[str, Any] = {"op": site.op, "source": site.source, "index": int(layer.index),
                             "backend": layer.backend_choice, "exported": status == "int8", "export": status}
    if status == "float":
        entry["reason"] = "its weight is computed from the model input: no static INT8 weights; exported in float"
    elif status == "computed at export":
        entry["reason"] = ("its input does not depend on the model's (fixed coordinates): the exporter computed "
                           "every call, in float on the INT8 weights, into a constant of the graph")
    entry["onnx"] = onnx_calls
    if static is not None and not static.cal.input_varies:  # (onnxruntime folds its input's quantization and
        entry["fixed_input"] = True                          # runs it in float, on constants, once per run)
    if static is not None:
        cal = static.cal
        entry["forward"] = {
            "activation": {"granularity": "per-tensor", "clip": static.clip, "clip_source": static.clip_source,
                           "scale": static.x_scale, "calibration_absmax": float(cal.absmax),
                           "input_shape": list(cal.input_shape)},
            "weight": {"granularity": "per-channel", "axis": 1 if layer.is_transposed else 0,
                       "shape": list(static.w_int8.shape),
                       "scale": tensor_to_json(static.w_scale)},
        }
    else:
        entry["forward"] = None
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
        from ..optim import deviation_factor

        entry["dclrs"].update(alpha=lr_scaler.alpha, beta=lr_scaler.beta,
                              lr_factor=float(deviation_factor(dev, lr_scaler.alpha, lr_scaler.beta)))
    entry["state"] = {n: tensor_to_json(b) for n, b in layer.named_buffers(recurse=False) if b is not None}
    entry["config_overrides"] = _config_overrides(layer.config, root_cfg)
    return entry


def _config_overrides(layer_cfg, root_cfg) -> dict:
    if layer_cfg is root_cfg or root_cfg is None:
        return {}
    a, b = layer_cfg.to_dict(), root_cfg.to_dict()
    return {k: v for k, v in a.items() if k not in ("exclude", "overrides") and b.get(k) != v}
