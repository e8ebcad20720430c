"""What a deploy ONNX file rounds beyond what `qmodel.eval()` rounds: read from its graph and metadata for
`deploy_numerics` (emulate.py), which makes the same roundings in the model.

The deploy file rounds where `qmodel.eval()` keeps floats (README, "How far deploy is from `qm.eval()`"):
  1. every INT8 site's output, after the BatchNorm the file folds into it (QLinearConv writes int8), at the
     scale of the site's output QuantizeLinear;
  2. every bias of a site, to int32 on its accumulator grid s_x * s_w (BatchNorm folded in);
  3. both operands and the output of every residual Add (QLinearAdd);
  4. the input of every average pooling the file runs in INT8 (QLinearGlobalAveragePool);
  5. the inputs and the output of every Concat of feature maps the file runs in INT8 (QLinearConcat), each
     input at its own scale: a UNet's skip connection, which the encoder reads too, has a scale of its own,
     and the concatenation is rounded again at the reading site's;
  6. every INT8 site's input saturates at -128 steps, where int8fx's quantizer stops at -127 (ONNX's int8
     QuantizeLinear has no narrow range, and a Clip kept in front would stop the op's fusion: `deploy.
     _drop_clamps`): an input below the site's clip that no ReLU bounds is one step lower in the file.
Every other rounding of the file must be a site input's, which int8fx does itself, or one of a value
already on its grid: a file that also rounds elsewhere (the inputs of a Resize, a Split or a Softmax, a layer
scale's factor, the parameters of a norm it does not fold) is refused, naming those places (`_other_roundings`).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .graphs import SCALE_PRESERVING, GraphView

_POOL_NODES = ("GlobalAveragePool", "AveragePool", "ReduceMean")
# the kinds of rounding the deploy file adds to qmodel.eval()'s (the module docstring's six)
ROUNDING_KINDS = ("outputs", "biases", "adds", "concats", "pools", "inputs")


@dataclass(frozen=True)
class Roundings:
    """What the deploy file rounds beyond the sites' inputs, read from its graph and metadata."""
    outputs: dict[str, float]            # site -> scale of its output QuantizeLinear
    biases: dict[str, torch.Tensor]      # site -> the file's bias (int32 codes * their scales), per out channel
    unfolded: frozenset                  # sites whose BatchNorm the file keeps as a node (not folded)
    adds: tuple                          # (s_a, s_b, s_out) (each None: float) per Add of maps, in graph order
    pools: tuple                         # input scale (None: float) per average pooling, in graph order
    concats: tuple                       # ((s_in per input, None: float), s_out or None) per Concat of maps
    input_scales: dict[str, float]       # site -> scale of its input QuantizeLinear (every INT8 site)
    saturate_inputs: bool = True         # add the -128 step where a site's input saturates there


def read_roundings(path_or_model) -> Roundings:
    """The deploy file's roundings (module docstring). Raises ValueError for a file that is no deploy form."""
    import onnx

    from .metadata import read_onnx_metadata

    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(os.fspath(path_or_model))
    meta = read_onnx_metadata(model)
    if meta.get("form") != "deploy":
        raise ValueError(f"deploy_numerics() needs a file exported with form='deploy', this one is {meta.get('form')!r}")
    view = GraphView(model)
    outputs, biases, unfolded, input_scales = {}, {}, set(), {}
    for site, entry in meta["layers"].items():
        calls = entry.get("onnx") or []
        if entry.get("export") != "int8" or not calls:
            continue
        call = calls[0]  # (every call of a site has the same scales and bias)
        if "x_quantize" in call:
            input_scales[site] = _scalar(view, view.nodes[call["x_quantize"]].input[1])
        if "y_quantize" in call:
            q = view.nodes[call["y_quantize"]]
            outputs[site] = _scalar(view, q.input[1])
            if any(_batch_norm_reads(view, dq.output[0]) for dq in view.consumers[q.output[0]]):
                unfolded.add(site)
        if "b_dequantize" in call:
            dq = view.nodes[call["b_dequantize"]]
            b = view.const(dq.input[0]).astype(np.float64) * view.const(dq.input[1]).astype(np.float64)
            biases[site] = torch.from_numpy(b.astype(np.float32))
    shapes = _inferred_shapes(model)
    adds, concats, pools = [], [], []
    for n in model.graph.node:
        if n.op_type == "Add" and len(n.input) == 2:
            ins, s_out = _scales_around(view, n)
            if (None not in ins and s_out is not None) or (
                    not any(t in view.inits for t in n.input) and _maps_of_one_shape(shapes, n.input)):
                adds.append((*ins, s_out))  # (an Add of maps with a float operand or output too: the forward's)
        elif n.op_type == "Concat":
            ins, s_out = _scales_around(view, n)
            if s_out is not None or any(s is not None for s in ins) or len(shapes.get(n.output[0], ())) in (4, 5):
                concats.append((ins, s_out))  # (not a Concat of shapes: a Reshape's target)
        elif n.op_type in _POOL_NODES:
            pools.append(_quantized_input(view, n.input[0]))
    calls = [call for entry in meta["layers"].values() for call in entry.get("onnx") or []]
    others = _other_roundings(view, {call["compute"] for call in calls}, {call["x_quantize"] for call in calls})
    if others:
        raise ValueError("the deploy file also rounds where deploy_numerics does not follow it (" +
                         ", ".join(f"{what}: {n}" for what, n in sorted(others.items())) +
                         "): it cannot compute this file's numbers")
    return Roundings(outputs, biases, frozenset(unfolded), tuple(adds), tuple(pools), tuple(concats), input_scales)


def select(r: Roundings, kinds) -> Roundings:
    """`r` with only the kinds of rounding in `kinds`; the Adds and poolings left float stay listed (a forward
    must still make exactly the file's)."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in ROUNDING_KINDS]
    if unknown:
        raise ValueError(f"deploy_numerics(roundings=...) takes some of {', '.join(ROUNDING_KINDS)}; got {unknown}")
    return Roundings(r.outputs if "outputs" in kinds else {}, r.biases if "biases" in kinds else {}, r.unfolded,
                     r.adds if "adds" in kinds else (None,) * len(r.adds),
                     r.pools if "pools" in kinds else (None,) * len(r.pools),
                     r.concats if "concats" in kinds else (None,) * len(r.concats),
                     r.input_scales, "inputs" in kinds)


# ops that round their DequantizeLinear'd input at its scale in the emulation too (Adds, Concats and poolings:
# `_quantized_input`; a site's input: int8fx)
_ROUNDING_READERS = {"Add", "Concat", *_POOL_NODES}
# ops a rounding commutes with (ReLU and ReLU6 as the deploy form writes them, max pooling, data movement):
# rounding before them or after gives the same values
_COMMUTING = SCALE_PRESERVING | {"LeakyRelu", "Clip"}


def _other_roundings(view: GraphView, computes: set[str], site_inputs: set[str]) -> dict[str, int]:
    """{what: count} of the file's roundings that deploy_numerics does not make: a QuantizeLinear that is no
    site's input or output, no Add's or Concat's output, whose rounding the emulation neither makes itself
    (an Add's, a Concat's or a pooling's input) or in effect (the value is already on that grid, or reaches,
    through ops rounding commutes with, only roundings at the same scale that the emulation makes); and int8
    constants that are no site's weight or bias (a layer scale's factor). A value several ops read is
    quantized once for all of them (`quantized.fan_out`): that rounding counts too, as the emulation rounds
    only where each reader does (a UNet encoder's ReLU output, rounded for its skip connection before the
    MaxPool too)."""
    found: Counter = Counter()

    def origin(tensor: str):
        """The QuantizeLinear or op a value comes from, through DequantizeLinear and value-preserving ops."""
        node = view.producer.get(tensor)
        while node is not None and (node.op_type in _COMMUTING or node.op_type == "DequantizeLinear"):
            if node.op_type == "DequantizeLinear":
                return view.quantized_by(node.input[0]) or view.producer.get(node.input[0])
            node = view.producer.get(node.input[0])
        return node

    def made(q) -> bool:
        """Whether the emulation makes q's rounding itself: a site's input, an Add's, Concat's or pooling's."""
        readers = [r for dq in _dequantized(view, q) for r in view.consumers[dq.output[0]]]
        return q.name in site_inputs or (bool(readers) and all(r.op_type in _ROUNDING_READERS for r in readers))

    def unmade(q, s: float) -> set[str]:
        """The ops that read q's rounding at `s` without the emulation making it (empty: it does, in effect)."""
        blocking = set()
        stack = [(r, True) for dq in _dequantized(view, q) for r in view.consumers[dq.output[0]]]
        while stack:
            r, direct = stack.pop()  # (direct: r reads the DequantizeLinear itself)
            if direct and r.op_type in _ROUNDING_READERS:
                continue
            if r.op_type == "QuantizeLinear" and made(r) and _same_scale(_scalar(view, r.input[1]), s):
                continue
            if r.op_type in _COMMUTING:
                stack += [(c, False) for c in view.consumers[r.output[0]]]
            elif r.op_type == "QuantizeLinear":  # (requantized at another scale: named by what reads it)
                blocking.update(c.op_type for dq in _dequantized(view, r) for c in view.consumers[dq.output[0]])
            else:
                blocking.add(r.op_type)
        return blocking

    for q in view.graph.node:
        if q.op_type == "DequantizeLinear" and q.input[0] in view.inits:  # an int8 constant
            found.update(f"int8 constant read by {r.op_type}" for r in view.consumers[q.output[0]]
                         if r.name not in computes)
            continue
        if q.op_type != "QuantizeLinear" or q.input[0] in view.inits:
            continue
        made_by = view.producer.get(q.input[0])
        if (made_by is not None and (made_by.name in computes or made_by.op_type in ("Add", "Concat"))) or made(q):
            continue
        s = _scalar(view, q.input[1])
        blocking = unmade(q, s)
        if not blocking:
            continue
        before = origin(q.input[0])
        if before is not None and before.op_type == "QuantizeLinear" and _same_scale(_scalar(view, before.input[1]), s):
            continue  # (the same grid again)
        found[f"inputs of {'/'.join(sorted(blocking))}"] += 1
    return dict(found)


def _dequantized(view: GraphView, q) -> list:
    """The DequantizeLinears of q's codes, directly or through a ReLU on codes (`GraphView.quantized_by`)."""
    out = []
    for c in view.consumers[q.output[0]]:
        out += [c] if c.op_type == "DequantizeLinear" else \
            [d for d in view.consumers[c.output[0]] if d.op_type == "DequantizeLinear"] if c.op_type == "Clip" else []
    return out


def _same_scale(a: float, b: float) -> bool:
    """One grid: the file moves a scale one float ulp where two quantizers would otherwise share one
    initializer, which moves no code (|code| <= 255 and a relative difference of 1e-6)."""
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b))


def _scales_around(view: GraphView, node) -> tuple[tuple, float | None]:
    """(the scale of each input, None where float; the scale of the output's QuantizeLinear, None if none)."""
    outs = [c for c in view.consumers[node.output[0]] if c.op_type == "QuantizeLinear"]
    return tuple(_quantized_input(view, t) for t in node.input), _scalar(view, outs[0].input[1]) if outs else None


def _inferred_shapes(model) -> dict[str, tuple]:
    """{tensor: its dims (a number, a symbol, None where unknown)} as onnx infers them; {} where it cannot.
    The Adds and Concats of feature maps are told apart from others by them (a Concat of shapes, an Add of
    a broadcast bias), as the forward's are by their tensors' ranks and shapes."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # (then only the Adds and Concats the file quantizes are matched)
        return {}
    shapes = {}
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                   for d in v.type.tensor_type.shape.dim)
    return shapes


def _maps_of_one_shape(shapes: dict[str, tuple], names) -> bool:
    """Whether the tensors are 4-d or 5-d, of one fully known shape (as `_residual` sees two maps)."""
    got = [shapes.get(t) for t in names]
    return all(g is not None and len(g) in (4, 5) and None not in g for g in got) and len(set(got)) == 1


def _batch_norm_reads(view: GraphView, tensor: str) -> bool:
    """Whether a BatchNormalization reads `tensor`, or the Clip that saturates it where several ops read it
    (`quantized.fan_out`: a pre-activation block's BatchNorm beside the residual Add): a BatchNorm the file
    keeps in float, on the site's rounded output."""
    return any(c.op_type == "BatchNormalization" or (c.op_type == "Clip" and _batch_norm_reads(view, c.output[0]))
               for c in view.consumers[tensor])


def _scalar(view: GraphView, name: str) -> float:
    return float(view.const(name).reshape(()))


def _quantized_input(view: GraphView, tensor: str) -> float | None:
    """The scale at which `tensor` was quantized, where it is DequantizeLinear(QuantizeLinear(...))."""
    dq = view.made_by(tensor, "DequantizeLinear")
    if dq is None or dq.input[0] in view.inits:
        return None
    return _scalar(view, dq.input[1])
