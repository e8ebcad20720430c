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
   with quantization (Relu, ReLU6's Clip, MaxPool, reshapes, a channel Split, into a Concat's inputs) to
   the conv output that feeds it, so a conv followed by ReLU rounds once, at the scale int8fx uses.
   Tensors int8fx has no clip for (a conv output feeding a residual Add, the Add itself, pooled features)
   are calibrated on the calibration batches (absmax / 127, symmetric), in a graph whose sites saturate
   their inputs as int8fx does (`_clamp_site_inputs`). Ops without an INT8 kernel are rewritten into equal
   ones that have one (ReLU and, where the scales allow, ReLU6 as LeakyRelu(alpha=0); spatial ReduceMean
   as GlobalAveragePool: `int8_ops`).
3. Give every QuantizeLinear its own scale initializer and exactly one consumer, so that onnxruntime on
   x86 rewrites the int8 activations to its fast u8 kernels: its `QDQS8ToU8Transformer` only converts a
   QuantizeLinear with a single DequantizeLinear after it, and its common-subexpression elimination merges
   QuantizeLinears of one tensor whose scales are equal. Two consumers that want the same scale (a
   block's conv and its downsample shortcut) therefore get scales one float ulp apart (a relative change of
   6e-8, below anything an INT8 code can show); each INT8 site keeps its exact scale. An INT8 op whose
   output feeds several consumers is quantized once and re-quantized per consumer (`quantized.fan_out`), and
   an int32 bias the quantizer computed at another input scale than the site's is re-quantized at s_x * s_w
   (`quantized.exact_biases`). Steps 3 and the float fix-ups below live in int8fx.onnx.quantized.

A transposed conv site is QDQ -> ConvTranspose with its int8 weights on axis 1 (its output channels) and
a BatchNorm after it folded in (`int8_ops`): onnxruntime has no integer ConvTranspose kernel and runs it in
float on the dequantized weights, as for its own quantizer's files (TensorRT takes Q/DQ deconvolutions in
INT8); the metadata lists such sites (`sites_without_onnxruntime_int8_kernel`), with the convs whose output
the model returns (onnxruntime runs those in float too: below).

What stays float, as in int8fx (`float_nodes`): what the model returns (`quantized.float_graph_outputs`: the
quantizer would round the logits too), norms that fold into no conv, layer scales, every sigmoid gate
x * sigmoid(g), SiLU and squeeze-excite, which reads float values (`quantized.float_ops_read_floats`) and
INT8 logits over at most +-8 (`quantized.cap_sigmoid_inputs`), every average pooling of such a float output
(an efficientnet's squeezes and head: `float_nodes.pools_of_floats`), and every op through which no activation
reaches an INT8 site (a detector's box arithmetic and post-processing).

Not equal to `qmodel.eval()`, by design: conv outputs that int8fx keeps in float are quantized here
(where they feed an Add or a SiLU: an INT8 conv writes int8), biases are rounded to int32, and
QuantizeLinear saturates at -128, not -127.
README ("Inspect and export to ONNX") gives the measured effect on top-1.

`target="onnxruntime"` gives up TensorRT's rules for onnxruntime's speed, with the same numbers: activations
are uint8 (`quantized.activations_as_uint8`), the INT8 readers of a fan-out share its codes
(`quantized.fan_out`), and a ReLU runs as a Clip of the codes (`int8_ops.relus_on_codes`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import Counter, defaultdict

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from . import check, float_nodes, int8_ops, quantized
from .calibrate import StaticSite
from .errors import OnnxExportError
from .graphs import (
    COMPUTE_OPS,
    SCALE_PRESERVING,
    GraphView,
    assign_sites,
    float_codes,
    out_codes,
    out_major,
    rename,
    rescaled_channels,
    rows_by_columns,
    set_nodes,
    site_codes,
    weight_source,
)
from .standins import FloatSite, export_with_standins
from .torch_export import clean



def build(qmodel: nn.Module, statics: dict[str, StaticSite], dynamic: set[str], args: tuple, batches: list[tuple],
          *, exporter: str, opset: int, input_names, output_names, dynamic_batch: bool, target: str = "portable"):
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
    calls_found = Counter(site_of.values())
    view = GraphView(fp32)
    float_compute = [n.name for n in fp32.graph.node if n.op_type in COMPUTE_OPS and n.name not in site_of]
    gates = float_nodes.sigmoid_gates(view)
    scales = float_nodes.layer_scales(view, site_of)
    overrides = _activation_overrides(view, site_of, statics)
    floats = set(float_compute + gates + scales)
    pools = float_nodes.pools_of_floats(view, floats)
    rewritten = int8_ops.before_quantization(fp32, frozenset(pools))
    clean(fp32)  # (a rewritten ReduceMean leaves its axes unused)
    feeds = _feeds(fp32, batches)
    float_biases = {n.input[2]: view.const(n.input[2]) for n in fp32.graph.node
                    if n.op_type in COMPUTE_OPS and len(n.input) > 2 and n.input[2]}
    norms = float_nodes.float_norms(GraphView(fp32))
    beyond = float_nodes.beyond_sites(GraphView(fp32), set(site_of))
    pools = [n for n in pools if n not in beyond]
    kept_float = float_compute + gates + scales + norms + beyond + pools
    clamps = _clamp_site_inputs(fp32, site_of, statics, overrides)
    model = _quantize(ortq, fp32, feeds, kept_float, overrides)
    _drop_clamps(model, clamps)
    float_outputs = quantized.float_graph_outputs(model)
    quantized.float_ops_read_floats(model, set(gates))
    quantized.float_ops_read_floats(model, set(pools), sources=floats)
    quantized.shapes_read_floats(model)
    capped = quantized.cap_sigmoid_inputs(model, set(gates))
    rewritten.update(int8_ops.after_quantization(model))
    for_onnxruntime = target == "onnxruntime"
    nudged = quantized.dedicate_quantizers(model, site_of, statics, distinct=not for_onnxruntime)
    requantized = quantized.exact_biases(model, float_biases)
    fanned, sharing = quantized.fan_out(model, site_of, frozenset(kept_float), shared=for_onnxruntime)
    relus_on_codes = 0
    if for_onnxruntime:
        quantized.activations_as_uint8(model)
        relus_on_codes = int8_ops.relus_on_codes(model)
    calls_meta = _annotate(model, site_of, statics)
    clean(model)
    check.runs_in_onnxruntime(model, feeds[0])
    extra = {"producer": {"onnxruntime": onnxruntime.__version__},
             "deploy": {"quantizer": "onnxruntime.quantization.quantize_static (QDQ, int8 symmetric, per-channel)",
                        "target": target, "activations": "uint8" if for_onnxruntime else "int8",
                        "relus_on_codes": relus_on_codes,
                        "float_compute_nodes": float_compute, "float_sigmoid_gates": len(gates) // 2,
                        "float_layer_scales": len(scales), "float_poolings_of_floats": len(pools),
                        "sigmoid_inputs_capped": capped, "float_beyond_int8_sites": len(beyond),
                        "float_graph_outputs": float_outputs,
                        "rewritten_for_int8_kernels": rewritten,
                        "scales_moved_one_ulp_apart": nudged, "fan_outs": fanned,
                        "fan_out_readers_sharing_one_quantizer": sharing,
                        "biases_requantized_at_input_scale": requantized,
                        "site_calls_computed_at_export": {site: n - calls_found[site] for site, n in calls.items()
                                                          if n != calls_found[site]},
                        "sites_without_onnxruntime_int8_kernel": _without_onnxruntime_int8_kernel(model, site_of)}}
    return model, used, calls_meta, extra


def _without_onnxruntime_int8_kernel(model, site_of: dict[str, str]) -> list[str]:
    """The sites that onnxruntime runs in float, on their dequantized INT8 inputs and weights (TensorRT runs
    them in INT8): transposed convs, which it has no integer kernel for, and convs whose output the model
    returns (`quantized.float_graph_outputs`: its integer convs write int8, and a head Gemm/MatMul writes
    float through QGemm, but no conv does in a QDQ graph)."""
    outputs = {o.name for o in model.graph.output}
    nodes = GraphView(model).nodes
    return sorted({site for name, site in site_of.items() if name in nodes and (
        nodes[name].op_type == "ConvTranspose" or (nodes[name].op_type == "Conv" and outputs & set(nodes[name].output)))})


def _feeds(model, batches: list[tuple]) -> list[dict]:
    """The calibration batches as onnxruntime feeds: each batch's tensors in the order the exporter
    flattens them into graph inputs (a detector takes a list of images: one input per image)."""
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
            if w is not None and w.dtype == np.float32 and w.ndim >= 2 and w.size:  # (an empty one is no site's)
                candidates.append((n, float_codes(out_major(w, transposed))))
    codes = site_codes(statics)
    found = assign_sites(candidates, codes, calls, up_to_sign=True)
    count: dict[str, int] = defaultdict(int)
    site_of = {}
    for node, site in found:
        count[site] += 1
        name = rename(view, node, f"{site}/compute" if count[site] == 1 else f"{site}#{count[site]}/compute")
        site_of[name] = site
    # A call on an input known at export time is computed by the exporter, and its node is gone (RAFT's first
    # flow update convolves a zero flow; the torch.export-based exporter folds all of coatnet's relative-
    # position MLPs, which read fixed coordinates): nothing of it runs. A node left unmatched beside a missing
    # call could be that call running in float, so that stays an error, as does a site without any node
    # whose input depends on the model's.
    matched = {id(node) for node, _ in found}
    unmatched = {rows_by_columns(c) for n, c in candidates if id(n) not in matched}
    missing = [f"'{s}' ({count[s]} of {calls[s]} calls)" for s in statics
               if (count[s] == 0 and statics[s].cal.input_varies)
               or (count[s] != calls[s] and rows_by_columns(codes[s]) in unmatched)]
    if missing:
        raise OnnxExportError("cannot find the conv/linear node of INT8 site(s) " + ", ".join(missing) +
                              " in the exported FP32 graph")
    return site_of


def _activation_overrides(view: GraphView, site_of: dict[str, str], statics: dict[str, StaticSite]) -> dict:
    """{tensor: [{"scale", "zero_point"}]}: each site's input at its own scale, carried back through
    scale-preserving ops to the tensor that feeds them (the larger scale where two sites meet). A channel
    Split counts as one (ShuffleNet's, a CSP block's): the quantizer gives its outputs its input's scale,
    so the site's scale on its input lets onnxruntime split int8 codes where DequantizeLinear -> Split ->
    QuantizeLinear ran in float, and the site's bias is at its own scale. The split's other outputs take
    that scale too; on shufflenet_v2_x1_0 (Fashion-MNIST, 1000 test images) agreement with qmodel.eval()
    went from 99.2% to 99.4% and the deploy file from 1.05x / 0.86x FP32 to 0.95x / 0.84x (batch 1 / 16,
    one thread; RESULTS.md). Through a Concat, the scale goes to each input no other op reads, as int8fx
    rounds the concatenation once, at the site: the inputs are then on the site's grid, onnxruntime's
    QLinearConcat copies their codes, and deploy_numerics can follow the file (agreement on shufflenet_v2
    99.4% -> 99.6%, 0.93x / 0.77x FP32). Not on through a Split reached so: a shuffle's pass-through half
    would carry the scale from block to block, the coarsest site scale of a stage for all its tensors."""
    scales: dict[str, float] = {}

    def want(tensor: str, s: float):
        scales[tensor] = max(scales.get(tensor, 0.0), s)

    for name, site in site_of.items():
        s = statics[site].x_scale
        stack = [(view.nodes[name].input[0], False)]  # (tensor, reached through a Concat)
        while stack:
            t, through_concat = stack.pop()
            want(t, s)
            p = view.producer.get(t)
            if p is None or (p.op_type == "Split" and through_concat):
                continue
            if p.op_type == "Concat":
                stack += [(i, True) for i in p.input if len(view.consumers[i]) == 1 and i not in view.inits]
            elif _preserves_scale(view, p) and len(view.consumers[p.input[0]]) == 1:
                stack.append((p.input[0], through_concat))
    return {t: [{"scale": np.array(s, np.float32), "zero_point": np.array(0, np.int8)}] for t, s in scales.items()}


def _clamp_site_inputs(model, site_of: dict[str, str], statics: dict[str, StaticSite], overrides: dict) -> set[str]:
    """Clip each site call's input at +-127 s_x, as int8fx's quantizer saturates it, for the calibration: the
    quantizer calibrates the tensors int8fx has no clip for (residual Adds, conv outputs before a SiLU) by
    running this FP32 graph, and without the sites' saturation a model whose eval-mode forward is bounded
    only by int8fx's clips (a briefly trained one) grows activations of 1e9 there, whose scales round every
    logit to 0 (timm's dla34 two steps from random init). `_drop_clamps` removes them after quantization:
    the site's QuantizeLinear saturates there too, but at -128 steps where int8fx saturates at -127 (ONNX
    has no narrow int8 range; a Clip kept would stop the fusion of the op before), so an input below the
    site's clip that no ReLU bounds is one step apart from int8fx's (`deploy_numerics` adds that step).
    Each Clip's output gets the site's scale in `overrides` (updated in place). Returns the Clip nodes'
    names."""
    view = GraphView(model)
    names = set()
    for name, site in site_of.items():
        node = view.nodes[name]
        s = np.float32(statics[site].x_scale)
        base = f"{name.rsplit('/', 1)[0]}/calibration_clamp"
        clip = quantized.saturating_clip(model, node.input[0], s, base)
        node.input[0] = clip.output[0]
        model.graph.node.insert(list(model.graph.node).index(node), clip)
        overrides[clip.output[0]] = [{"scale": np.array(s, np.float32), "zero_point": np.array(0, np.int8)}]
        names.add(base)
    return names


def _drop_clamps(model, clamps: set[str]) -> None:
    """Remove `_clamp_site_inputs`'s Clips from the quantized graph: the site's QuantizeLinear reads the
    tensor the Clip read, before the QuantizeLinear/DequantizeLinear pair the quantizer put there (dropped
    where nothing else reads it). So each site has a pair of its own: onnxruntime's quantizer gives the
    output of an op it quantizes as its input one pair for all readers, and a Reshape read by a conv site
    and a MatMul (timm's efficientvim flattens a block's input for both) left the site behind a
    DequantizeLinear it shared, which `quantized.fan_out` would have saturated with a Clip that stops the
    conv's fusion."""
    view = GraphView(model)
    drop = set()
    for n in model.graph.node:
        if n.name not in clamps:
            continue
        source = n.input[0]
        dq = view.made_by(source, "DequantizeLinear")
        q = view.made_by(dq.input[0], "QuantizeLinear") if dq is not None else None
        if q is not None:
            source = q.input[0]
            if len(view.consumers[dq.output[0]]) == 1 and len(view.consumers[q.output[0]]) == 1:
                drop |= {id(q), id(dq)}
        for r in view.consumers[n.output[0]]:
            r.input[:] = [source if t == n.output[0] else t for t in r.input]
        drop.add(id(n))
    set_nodes(model, [n for n in model.graph.node if id(n) not in drop])


def _preserves_scale(view: GraphView, node) -> bool:
    if node.op_type in SCALE_PRESERVING or node.op_type == "Split":  # (Split: `_activation_overrides`)
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


def _annotate(model, site_of: dict[str, str], statics: dict[str, StaticSite]) -> dict[str, list[dict]]:
    """Check each site call's Q/DQ structure, name its nodes after the site and return them per call."""
    view = GraphView(model)
    outputs = {o.name for o in model.graph.output}
    per_site: dict[str, list[dict]] = defaultdict(list)
    named: set[int] = set()  # nodes two calls share (a site's weight, read by both of its calls) keep one name
    for name, site in site_of.items():
        node = view.nodes.get(name)
        st = statics[site]
        xdq = view.made_by(node.input[0], "DequantizeLinear") if node is not None else None
        xq = view.quantized_by(xdq.input[0]) if xdq is not None else None
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
            rescaled = rescaled_channels(out_major(codes, transposed), out_codes(st))
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
