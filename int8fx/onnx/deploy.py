"""The deploy form: a graph that runtimes execute in INT8 kernels, with int8fx's trained scales.

Built in three steps:

1. Export an FP32 graph of the model whose sites compute with their dequantized INT8 weights
   (W_int8 * s_w): torch's exporter folds each BatchNorm into the conv before it (W * gamma / sigma per
   output channel). Per-channel quantization commutes with that per-channel factor, so the folded weight
   quantizes back to int8fx's very codes (sign-flipped where gamma < 0) with scale |gamma / sigma| * s_w.
2. Quantize that graph with onnxruntime's own static quantizer (`quantize_static`, QDQ format), which knows
   where runtimes want Q/DQ: around convs and matmuls (weights int8 per output channel, biases int32 with
   scale s_x * s_w), residual Adds, Muls, Concat, pooling. TensorRT's explicit-quantization rules
   hold: symmetric int8, zero point 0, scales and zero points as initializers. The activation scale of
   every INT8 site's input is int8fx's (`TensorQuantOverrides`), carried back through the ops that commute
   with quantization (Relu, ReLU6's Clip, MaxPool, reshapes) to the conv output that feeds it, so a conv
   followed by ReLU rounds once, at the scale int8fx uses. Tensors int8fx has no clip for (a conv output
   feeding a residual Add, the Add itself, pooled features) are calibrated on the calibration batches
   (absmax / 127, symmetric). Ops without an INT8 kernel are rewritten into equal ones that have one (ReLU
   and, where the scales allow, ReLU6 as LeakyRelu(alpha=0); spatial ReduceMean as GlobalAveragePool:
   `int8_ops`).
3. Give every QuantizeLinear its own scale initializer and exactly one consumer, so that onnxruntime on
   x86 rewrites the int8 activations to its fast u8 kernels: its `QDQS8ToU8Transformer` only converts a
   QuantizeLinear with a single DequantizeLinear after it, and its common-subexpression elimination merges
   QuantizeLinears of one tensor whose scales are equal. Two consumers that want the same scale (a
   block's conv and its downsample shortcut) therefore get scales one float ulp apart (a relative change of
   6e-8, below anything an INT8 code can show); each INT8 site keeps its exact scale. An INT8 op whose
   output feeds several consumers is quantized once and re-quantized per consumer (`_fan_out`).

What stays float, as in int8fx: what the model returns (`_float_graph_outputs`: the quantizer would round
the logits too), and every sigmoid gate x * sigmoid(g), SiLU and squeeze-excite (`_sigmoid_gates`), which
reads float values (`_float_ops_read_floats`) and INT8 logits over at most +-8 (`_cap_sigmoid_inputs`).

Not equal to `qmodel.eval()`, by design: conv outputs that int8fx keeps in float are quantized here
(where they feed an Add or a SiLU: an INT8 conv writes int8), biases are rounded to int32, and
QuantizeLinear saturates at -128, not -127.
README ("Inspect and export to ONNX") gives the measured effect on top-1.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import defaultdict

import numpy as np
import torch.nn as nn

from . import int8_ops
from .calibrate import StaticSite
from .errors import OnnxExportError
from .graphs import (
    COMPUTE_OPS,
    GraphView,
    assign_sites,
    float_codes,
    out_major,
    rename,
    rescaled_channels,
    weight_source,
)
from .standins import FloatSite, export_with_standins
from .torch_export import clean

# ops whose output is quantized exactly as their input (they commute with a zero-point-0 quantizer)
_SCALE_PRESERVING = {"Relu", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"}


def build(qmodel: nn.Module, statics: dict[str, StaticSite], dynamic: set[str], args: tuple, batches: list[tuple],
          *, exporter: str, opset: int, input_names, output_names, dynamic_batch: bool):
    """(model, exporter used, {site: [per-call node names and scales]}, extra top-level metadata)."""
    try:
        import onnxruntime
        from onnxruntime import quantization as ortq
    except ImportError as e:
        raise OnnxExportError(f"the deploy form is quantized with onnxruntime's quantizer: pip install onnxruntime "
                              f"({e})") from None

    fp32, used, calls, _ = export_with_standins(qmodel, FloatSite, statics, dynamic, args, exporter=exporter,
                                                opset=opset, input_names=input_names, output_names=output_names,
                                                dynamic_batch=dynamic_batch)
    site_of = _name_site_nodes(fp32, statics, calls)
    view = GraphView(fp32)
    float_compute = [n.name for n in fp32.graph.node if n.op_type in COMPUTE_OPS and n.name not in site_of]
    gates = _sigmoid_gates(view)
    overrides = _activation_overrides(view, site_of, statics)
    rewritten = int8_ops.before_quantization(fp32)
    clean(fp32)  # (a rewritten ReduceMean leaves its axes unused)
    feeds = _feeds(fp32, batches)
    float_biases = {n.input[2]: view.const(n.input[2]) for n in fp32.graph.node
                    if n.op_type in COMPUTE_OPS and len(n.input) > 2 and n.input[2]}
    model = _quantize(ortq, fp32, feeds, float_compute + gates, overrides)
    float_outputs = _float_graph_outputs(model)
    _float_ops_read_floats(model, set(gates))
    _shapes_read_floats(model)
    capped = _cap_sigmoid_inputs(model, set(gates))
    rewritten.update(int8_ops.after_quantization(model))
    nudged = _dedicate_quantizers(model, site_of, statics)
    requantized = _exact_biases(model, float_biases)
    fanned = _fan_out(model, site_of)
    calls_meta = _annotate(model, site_of, statics)
    clean(model)
    extra = {"producer": {"onnxruntime": onnxruntime.__version__},
             "deploy": {"quantizer": "onnxruntime.quantization.quantize_static (QDQ, int8 symmetric, per-channel)",
                        "float_compute_nodes": float_compute, "float_sigmoid_gates": len(gates) // 2,
                        "sigmoid_inputs_capped": capped,
                        "float_graph_outputs": float_outputs,
                        "rewritten_for_int8_kernels": rewritten,
                        "scales_moved_one_ulp_apart": nudged, "requantized_fan_outs": fanned,
                        "biases_requantized_at_input_scale": requantized}}
    return model, used, calls_meta, extra


def _feeds(model, batches: list[tuple]) -> list[dict]:
    """The calibration batches as onnxruntime feeds: each batch's tensors in the order the exporter
    flattens them into graph inputs (a detector takes a list of images: one input per image)."""
    import torch
    from torch.utils._pytree import tree_leaves

    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    feeds = []
    for b in batches:
        tensors = [a for a in tree_leaves(b) if isinstance(a, torch.Tensor)]
        if len(tensors) != len(names):
            raise OnnxExportError(f"a calibration batch holds {len(tensors)} tensors, the exported graph takes "
                                  f"{len(names)} inputs ({', '.join(names)}): give batches shaped like the "
                                  f"example input")
        feeds.append({n: np.ascontiguousarray(t.detach().cpu().numpy()) for n, t in zip(names, tensors)})
    return feeds


def _name_site_nodes(model, statics: dict[str, StaticSite], calls: dict[str, int]) -> dict[str, str]:
    """Find each site call's compute node in the FP32 graph by its weight's INT8 codes, name it
    "<site>/compute" ("#k" for later calls) and return {node name: site}."""
    view = GraphView(model)
    candidates = []
    for n in model.graph.node:
        if n.op_type in COMPUTE_OPS and len(n.input) >= 2:
            src, transposed = weight_source(view, n)
            w = view.const(src)
            if w is not None and w.dtype == np.float32 and w.ndim >= 2:
                candidates.append((n, float_codes(out_major(w, transposed))))
    found = assign_sites(candidates, {s: st.w_int8.numpy() for s, st in statics.items()}, calls, up_to_sign=True)
    count: dict[str, int] = defaultdict(int)
    site_of = {}
    for node, site in found:
        count[site] += 1
        name = rename(view, node, f"{site}/compute" if count[site] == 1 else f"{site}#{count[site]}/compute")
        site_of[name] = site
    missing = [f"'{s}' ({count[s]} of {calls[s]} calls)" for s in statics if count[s] != calls[s]]
    if missing:
        raise OnnxExportError("cannot find the conv/linear node of INT8 site(s) " + ", ".join(missing) +
                              " in the exported FP32 graph")
    return site_of


def _activation_overrides(view: GraphView, site_of: dict[str, str], statics: dict[str, StaticSite]) -> dict:
    """{tensor: [{"scale", "zero_point"}]}: each site's input at its own scale, carried back through
    scale-preserving ops to the tensor that feeds them (the larger scale where two sites meet)."""
    scales: dict[str, float] = {}

    def want(tensor: str, s: float):
        scales[tensor] = max(scales.get(tensor, 0.0), s)

    for name, site in site_of.items():
        s = statics[site].x_scale
        t = view.nodes[name].input[0]
        want(t, s)
        p = view.producer.get(t)
        while p is not None and _preserves_scale(view, p) and len(view.consumers[p.input[0]]) == 1:
            t = p.input[0]
            want(t, s)
            p = view.producer.get(t)
    return {t: [{"scale": np.array(s, np.float32), "zero_point": np.array(0, np.int8)}] for t, s in scales.items()}


def _sigmoid_gates(view: GraphView) -> list[str]:
    """The Sigmoid and Mul of every x * sigmoid(g): left in float, as int8fx computes them.
      * SiLU/Swish (g = x): onnxruntime fuses the pair into one op (QuickGelu) between a DequantizeLinear and
        a QuantizeLinear; quantized, x would feed two INT8 ops and need a re-quantizing fan-out (several
        passes over the tensor) for each.
      * A squeeze-excite gate (g from a pooled branch): quantized, the gate would be rounded to 1/127 and the
        gated tensor to its calibrated range before the product is rounded again at the next site's scale.
        In float only the product is rounded, at that site's scale, as in qmodel.eval(). On efficientnet_b0
        (Fashion-MNIST, 1200 steps) top-1 agreement with qmodel.eval() went from 87.3% to 90.0% and top-1
        from -5.3 to -3.4 points, at the same speed: the gate is a vector per image, and the product is one
        float pass where an INT8 Mul was one too."""
    names = []
    for n in view.graph.node:
        if n.op_type != "Mul" or len(n.input) != 2:
            continue
        for b in n.input:
            sig = view.made_by(b, "Sigmoid")
            if sig is not None and len(view.consumers[b]) == 1:
                names += [sig.name, n.name]
                break
    return names


def _preserves_scale(view: GraphView, node) -> bool:
    if node.op_type in _SCALE_PRESERVING:
        return True
    if node.op_type == "Clip" and len(node.input) > 1 and node.input[1]:  # ReLU6: Clip(x, 0, 6)
        low = view.const(node.input[1])
        return low is not None and float(low) >= 0
    return False


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def _quantize(ortq, fp32, feeds: list[dict], excluded: list[str], overrides: dict):
    import onnx

    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "DedicatedQDQPair": True,
             "TensorQuantOverrides": overrides, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
    with tempfile.TemporaryDirectory(prefix="int8fx-deploy-") as d, _quiet_onnxruntime():
        src, dst = os.path.join(d, "fp32.onnx"), os.path.join(d, "int8.onnx")
        onnx.save(fp32, src)
        try:
            ortq.quantize_static(src, dst, _Batches(feeds), quant_format=ortq.QuantFormat.QDQ, per_channel=True,
                                 activation_type=ortq.QuantType.QInt8, weight_type=ortq.QuantType.QInt8,
                                 nodes_to_exclude=excluded, calibrate_method=ortq.CalibrationMethod.MinMax,
                                 extra_options=extra)
        except Exception as e:
            raise OnnxExportError(f"onnxruntime's quantizer failed on the FP32 graph: {type(e).__name__}: {e}") from e
        return onnx.load(dst)


@contextlib.contextmanager
def _quiet_onnxruntime():
    """The quantizer logs advice (pre-processing) on the root logger; the export checks its result itself."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


# ops onnxruntime fuses with their input DequantizeLinears and their output QuantizeLinear into one INT8 op
_FUSED = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool",
          "Sigmoid", "LeakyRelu", "Softmax", "Resize", "Where"}


def _fan_out(model, site_of: dict[str, str]) -> int:
    """Make every activation QuantizeLinear feed one DequantizeLinear, and every activation
    DequantizeLinear one consumer: onnxruntime duplicates a DequantizeLinear per consumer, and converts a
    QuantizeLinear to its u8 kernels only when a single DequantizeLinear follows it; an INT8 op must also
    write exactly one QuantizeLinear to be fused. Where a value fans out, it is dequantized once and
    saturated at -127 steps as int8fx does (a Clip, which changes a value, so no optimizer folds it away),
    and the consumers read the Clip:
      * an INT8 op whose output several QuantizeLinears read (a projection conv read by the next block and
        by a residual Add): quantize once (at the reading site's scale, else the largest of theirs),
            out -> Q0 -> DQ0 -> Clip(-127 s0, 127 s0) -> {Q1 -> DQ1 -> conv, Q2 -> DQ2 -> Add};
      * a DequantizeLinear read by several float ops (the Sigmoid and Mul of SiLU): DQ -> Clip -> {...}.
    Returns how many fan-outs."""
    view = GraphView(model)
    after: dict[int, list] = {}  # new nodes to place right after a node (topological order)
    for tensor, users in list(view.consumers.items()):
        producer = view.producer.get(tensor)
        if producer is None or len(users) < 2:
            continue
        qs = [u for u in users if u.op_type == "QuantizeLinear"]
        if len(qs) == len(users) and _is_int8_op(view, producer):
            scales = [np.float32(view.const(q.input[1]).reshape(())) for q in qs]
            at_site = [sc for q, sc in zip(qs, scales) if _site_behind(view, q, site_of)]
            s0 = at_site[0] if at_site else max(scales)
            zp = view.const(qs[0].input[2]).reshape(())
            after[id(producer)] = _requantize_and_clip(model, tensor, s0, zp, users)
        elif producer.op_type == "DequantizeLinear" and producer.input[0] not in view.inits:
            s0, zp = view.const(producer.input[1]).reshape(()), view.const(producer.input[2]).reshape(())
            after[id(producer)] = _requantize_and_clip(model, tensor, s0, zp, users, requantize=False)
    if after:
        nodes = [m for n in model.graph.node for m in [n] + after.get(id(n), [])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return len(after)


def _float_graph_outputs(model) -> list[str]:
    """Remove the QuantizeLinear/DequantizeLinear pair the quantizer puts on each graph output, so the file
    returns what `qmodel.eval()` returns: float logits, not logits rounded to 255 levels of their calibrated
    range. Rounded logits tie and swap the top two classes: on a Fashion-MNIST resnet18 that alone cost
    0.8 points of top-1 agreement with qmodel.eval(). A head Gemm/MatMul still runs in INT8 (onnxruntime's
    QGemm / MatMulIntegerToFloat write float); a conv whose output the model returns runs on its dequantized
    INT8 weights in float. Returns the outputs made float."""
    view = GraphView(model)
    done = []
    for out in model.graph.output:
        dq = view.made_by(out.name, "DequantizeLinear")
        q = view.made_by(dq.input[0], "QuantizeLinear") if dq is not None else None
        if q is None or len(view.consumers[q.output[0]]) != 1 or q.input[0] in view.inits:
            continue
        source = q.input[0]
        producer = view.producer.get(source)
        if producer is not None and len(view.consumers[source]) == 1 and source not in _names(model.graph.output):
            for i, name in enumerate(producer.output):  # the producer writes the output itself
                if name == source:
                    producer.output[i] = out.name
            drop = {id(q), id(dq)}
        else:  # (the graph input, or a tensor other nodes read too)
            dq.op_type, dq.input[:] = "Identity", [source]
            del dq.attribute[:]
            drop = {id(q)}
        kept = [n for n in model.graph.node if id(n) not in drop]
        del model.graph.node[:]
        model.graph.node.extend(kept)
        view = GraphView(model)
        done.append(out.name)
    return done


def _float_ops_read_floats(model, float_ops: set[str]) -> None:
    """A float op (`float_ops`, by name) that the quantizer handed a DequantizeLinear(QuantizeLinear(t)) of
    another float op's output t reads t itself, as int8fx does: a squeeze-excite gate multiplies the float
    SiLU output, not that output rounded to its calibrated range (the QuantizeLinear stays for the INT8
    readers of t, here the squeeze's pooling). Outputs of INT8 ops stay dequantized: read in float, they
    would stop onnxruntime from fusing the op that writes them."""
    view = GraphView(model)
    for n in model.graph.node:
        if n.name not in float_ops:
            continue
        for i, name in enumerate(n.input):
            dq = view.made_by(name, "DequantizeLinear")
            q = view.made_by(dq.input[0], "QuantizeLinear") if dq is not None else None
            source = view.producer.get(q.input[0]) if q is not None else None
            if source is not None and source.name in float_ops:
                n.input[i] = q.input[0]


def _shapes_read_floats(model) -> None:
    """A Shape or Size node reads the float tensor, not its quantized copy, where that tensor is a graph
    input or a float op's output: it needs no values, and a second reader of a DequantizeLinear makes it a
    fan-out (`_fan_out`), whose Clip stops onnxruntime from fusing the INT8 op that is the real reader
    (torchvision's convnext_tiny takes the batch size of its input). The output of an INT8 op stays read
    through its DequantizeLinear: a second reader of the op's output would stop the op's own fusion (the
    size a segmentation head's upsampling takes from its last conv)."""
    view = GraphView(model)
    for n in model.graph.node:
        if n.op_type in ("Shape", "Size"):
            dq = view.made_by(n.input[0], "DequantizeLinear")
            q = view.made_by(dq.input[0], "QuantizeLinear") if dq is not None else None
            source = view.producer.get(q.input[0]) if q is not None else None
            if q is not None and (source is None or not _is_int8_op(view, source)):
                n.input[0] = q.input[0]


# Sigmoid is within 3.4e-4 of 0 or 1 beyond +-8: an INT8 sigmoid input needs no wider range
SIGMOID_RANGE = 8.0


def _cap_sigmoid_inputs(model, float_ops: set[str]) -> int:
    """Quantize the INT8 output that a float Sigmoid gate reads (a squeeze-excite conv) over at most
    +-SIGMOID_RANGE: calibrated over its whole range (+-85 for some of efficientnet_b0's), its step rounds
    the gate by up to 0.08; capped, by 0.008 at most, plus 3.4e-4 where it saturates. On efficientnet_b0
    (Fashion-MNIST, 1200 steps) top-1 agreement with qmodel.eval() went from 90.0% to 90.6%. Returns how
    many inputs were capped."""
    from onnx import numpy_helper

    view = GraphView(model)
    cap = np.float32(SIGMOID_RANGE / 127)
    capped = 0
    for n in model.graph.node:
        if n.op_type != "Sigmoid" or n.name not in float_ops:
            continue
        dq = view.made_by(n.input[0], "DequantizeLinear")
        q = view.made_by(dq.input[0], "QuantizeLinear") if dq is not None else None
        if q is None or len(view.consumers[dq.output[0]]) != 1 or np.float32(view.const(q.input[1]).reshape(())) <= cap:
            continue
        name = f"{q.output[0]}_sigmoid_range_scale"
        model.graph.initializer.append(numpy_helper.from_array(np.array(cap, np.float32), name))
        q.input[1] = dq.input[1] = name
        capped += 1
    return capped


def _names(values) -> set[str]:
    return {v.name for v in values}


def _is_int8_op(view: GraphView, node) -> bool:
    """Whether onnxruntime can fuse `node` into an INT8 op: a fusable type whose every activation input is
    dequantized (its output Q is what the fan-out is about)."""
    acts = [i for i in node.input if i and i not in view.inits]
    return node.op_type in _FUSED and all(view.made_by(i, "DequantizeLinear") is not None for i in acts)


def _requantize_and_clip(model, tensor: str, s0, zp, users, requantize: bool = True) -> list:
    """[Q0, DQ0,] Clip nodes on `tensor`, rewiring `users` to the Clip's output."""
    from onnx import helper, numpy_helper

    base = f"{tensor}_fanout"
    s0 = np.float32(s0)
    model.graph.initializer.extend([numpy_helper.from_array(np.array(-127 * s0, np.float32), f"{base}_min"),
                                    numpy_helper.from_array(np.array(127 * s0, np.float32), f"{base}_max")])
    nodes, source = [], tensor
    if requantize:
        model.graph.initializer.extend([numpy_helper.from_array(np.array(s0, np.float32), f"{base}_scale"),
                                        numpy_helper.from_array(np.array(zp), f"{base}_zero_point")])
        nodes = [helper.make_node("QuantizeLinear", [tensor, f"{base}_scale", f"{base}_zero_point"],
                                  [f"{base}_quantized"], name=f"{base}_quantize"),
                 helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
                                  [f"{base}_dequantized"], name=f"{base}_dequantize")]
        source = f"{base}_dequantized"
    nodes.append(helper.make_node("Clip", [source, f"{base}_min", f"{base}_max"], [f"{base}_clipped"],
                                  name=f"{base}_clip"))
    for u in users:
        for i, name in enumerate(u.input):
            if name == tensor:
                u.input[i] = f"{base}_clipped"
    return nodes


def _dedicate_quantizers(model, site_of: dict[str, str], statics: dict[str, StaticSite]) -> int:
    """One scale and zero-point initializer per activation QuantizeLinear, the site's exact scale on each
    site input, and distinct scales among the QuantizeLinears of one tensor (module docstring, step 3).
    Returns how many scales were moved by an ulp."""
    from onnx import numpy_helper

    view = GraphView(model)
    by_tensor: dict[str, list] = defaultdict(list)
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in view.inits:
            by_tensor[n.input[0]].append(n)
    nudged = 0
    new_inits = []
    for tensor, qs in by_tensor.items():
        taken: set[float] = set()
        # sites first: they keep their exact scale
        ordered = sorted(qs, key=lambda q: _site_behind(view, q, site_of) is None)
        for q in ordered:
            site = _site_behind(view, q, site_of)
            s = np.float32(statics[site].x_scale if site else view.const(q.input[1]).reshape(()))
            while float(s) in taken:
                s = np.nextafter(s, np.float32(np.inf))
                nudged += 1
            taken.add(float(s))
            zp = view.const(q.input[2]).reshape(())
            sn, zn = f"{q.output[0]}_scale", f"{q.output[0]}_zero_point"
            new_inits += [numpy_helper.from_array(np.array(s, np.float32), sn), numpy_helper.from_array(zp, zn)]
            for n in [q] + view.consumers[q.output[0]]:
                if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                    n.input[1], n.input[2] = sn, zn
    model.graph.initializer.extend(new_inits)  # (the ones they replace are dropped by torch_export.clean)
    return nudged


def _exact_biases(model, float_biases: dict[str, np.ndarray | None]) -> list[str]:
    """Re-quantize every int32 bias whose scale is not s_x * s_w of its conv/matmul, from the float bias:
    onnxruntime fuses a conv into QLinearConv only where bias scale = input scale x weight scale (QLinearConv
    takes no bias scale). The quantizer computes the bias at the input scale it chose, and it ignores a scale
    override on the output of the ops it quantizes as their input (AveragePool, Split): there
    `_dedicate_quantizers` then gives the site its own scale, and left alone the bias would be read at the
    wrong scale. (A conv after AvgPool in timm's resnet26d-style downsample, after the channel Split of a
    ShuffleNet or CSP block.) Returns the compute nodes whose bias was re-quantized."""
    from onnx import numpy_helper

    view = GraphView(model)
    done = []
    for n in model.graph.node:
        if n.op_type not in COMPUTE_OPS or len(n.input) < 3 or not n.input[2]:
            continue
        xdq, bdq = view.made_by(n.input[0], "DequantizeLinear"), view.made_by(n.input[2], "DequantizeLinear")
        wdq = view.made_by(weight_source(view, n)[0], "DequantizeLinear")
        if xdq is None or bdq is None or wdq is None or bdq.input[0] not in view.inits:
            continue
        scale = (np.float32(view.const(xdq.input[1]).reshape(())) * view.const(wdq.input[1])).astype(np.float32)
        if np.array_equal(view.const(bdq.input[1]), np.broadcast_to(scale, view.const(bdq.input[1]).shape)):
            continue
        bias = float_biases.get(bdq.output[0])
        if bias is None:  # (not in the FP32 graph by that name: what the quantizer rounded)
            bias = view.const(bdq.input[0]) * view.const(bdq.input[1])
        codes = np.round(bias.astype(np.float64) / scale)
        if np.abs(codes).max(initial=0) > np.iinfo(np.int32).max:
            raise OnnxExportError(f"the int32 bias of '{n.name}' overflows at its input's scale {float(scale.ravel()[0])}"
                                  f" x weight scale")
        base = f"{n.name}/bias_at_input_scale"
        model.graph.initializer.extend([numpy_helper.from_array(codes.astype(np.int32), f"{base}_codes"),
                                        numpy_helper.from_array(np.broadcast_to(scale, codes.shape).copy(),
                                                                f"{base}_scale")])
        bdq.input[0], bdq.input[1] = f"{base}_codes", f"{base}_scale"
        done.append(n.name)
    return done


def _site_behind(view: GraphView, q, site_of: dict[str, str]) -> str | None:
    """The site whose input this QuantizeLinear quantizes (through its DequantizeLinear), if any."""
    for dq in view.consumers[q.output[0]]:
        for c in view.consumers[dq.output[0]] if dq.op_type == "DequantizeLinear" else []:
            if c.name in site_of and c.input[0] == dq.output[0]:
                return site_of[c.name]
    return None


def _annotate(model, site_of: dict[str, str], statics: dict[str, StaticSite]) -> dict[str, list[dict]]:
    """Check each site call's Q/DQ structure, name its nodes after the site and return them per call."""
    view = GraphView(model)
    outputs = _names(model.graph.output)
    per_site: dict[str, list[dict]] = defaultdict(list)
    named: set[int] = set()  # nodes two calls share (a site's weight, read by both of its calls) keep one name
    for name, site in site_of.items():
        node = view.nodes.get(name)
        st = statics[site]
        xdq = view.made_by(node.input[0], "DequantizeLinear") if node is not None else None
        xq = view.made_by(xdq.input[0], "QuantizeLinear") if xdq is not None else None
        src, transposed = weight_source(view, node) if node is not None else (None, False)
        wdq = view.made_by(src, "DequantizeLinear") if src else None
        codes = view.const(wdq.input[0]) if wdq is not None else None
        bdq = view.made_by(node.input[2], "DequantizeLinear") if node is not None and len(node.input) > 2 else None
        users = view.consumers.get(node.output[0], []) if node is not None else []
        yq = users[0] if len(users) == 1 and users[0].op_type == "QuantizeLinear" else None
        returned = node is not None and node.output[0] in outputs  # float, as the model returns it
        problems = []
        if xq is None:
            problems.append("its input is not quantized")
        if codes is None or codes.dtype != np.int8:
            problems.append("its weight is not an int8 initializer")
        rescaled: list[int] = []
        if codes is not None and codes.dtype == np.int8:
            rescaled = rescaled_channels(out_major(codes, transposed), st.w_int8.numpy())
        if codes is not None and codes.dtype == np.int8 and rescaled is None:
            problems.append("its int8 weights differ from int8fx's")
        bias = view.const(bdq.input[0]) if bdq is not None else None
        if len(node.input) > 2 and node.input[2] and (bias is None or bias.dtype != np.int32):
            problems.append("its bias is not an int32 initializer")  # (a MatMul's bias is a separate Add)
        if yq is None and not returned:
            problems.append("its output is not quantized")
        if problems:
            raise OnnxExportError(f"the deploy graph cannot run INT8 site '{site}' in INT8: " + "; ".join(problems))
        base = name.rsplit("/", 1)[0]
        roles = {"x_quantize": xq, "x_dequantize": xdq, "w_dequantize": wdq, "b_dequantize": bdq, "y_quantize": yq}
        names = {role: n.name if id(n) in named else rename(view, n, f"{base}/{role}")
                 for role, n in roles.items() if n is not None}
        named.update(id(n) for n in roles.values() if n is not None)
        w_scale = view.const(wdq.input[1])
        if rescaled:
            names["channels_rescaled_for_int32_bias"] = rescaled
        names.update(compute=name, op_type=node.op_type, weight_initializer=wdq.input[0],
                     x_scale=float(view.const(xq.input[1]).reshape(())),
                     weight_scale={"dtype": "float32", "shape": list(w_scale.shape), "data": w_scale.tolist()})
        per_site[site].append(names)
    return dict(per_site)
