"""The deploy form's second half: the graph onnxruntime's quantizer wrote, made into one that onnxruntime's
optimizer fuses into INT8 kernels and that computes what int8fx computes (int8fx.onnx.deploy builds it and
says why in its module docstring; each rewrite here says what it fixes and what it measured).

What stays float, as in int8fx: what the model returns (`float_graph_outputs`), sigmoid gates that read
float values (`float_ops_read_floats`) and INT8 logits over at most +-8 (`cap_sigmoid_inputs`), and the
tensors Shape nodes read (`shapes_read_floats`). What onnxruntime needs to fuse: one scale initializer and
one reader per QuantizeLinear (`dedicate_quantizers`, `fan_out`; a QuantizeLinear/DequantizeLinear pair of
its own for each site comes with the calibration clamp, `deploy._drop_clamps`), int32 biases at s_x * s_w
(`exact_biases`), and, for the onnxruntime target, uint8 activations (`activations_as_uint8`).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .calibrate import StaticSite
from .errors import OnnxExportError
from .graphs import COMPUTE_OPS, GraphView, set_nodes, weight_source

# ops onnxruntime fuses with their input DequantizeLinears and their output QuantizeLinear into one INT8 op
_FUSED = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool",
          "Sigmoid", "LeakyRelu", "Softmax", "Resize", "Where"}


def fan_out(model, site_of: dict[str, str], float_nodes: frozenset = frozenset(), *,
            shared: bool = False) -> tuple[int, int]:
    """Make every activation QuantizeLinear feed one DequantizeLinear, and every activation
    DequantizeLinear one consumer: onnxruntime duplicates a DequantizeLinear per consumer, and converts a
    QuantizeLinear to its u8 kernels only when a single DequantizeLinear follows it; an INT8 op must also
    write exactly one QuantizeLinear to be fused. Where a value fans out, it is dequantized once and
    saturated at -127 steps as int8fx does (a Clip, which changes a value, so no optimizer folds it away),
    and the consumers read the Clip:
      * an INT8 op whose output several QuantizeLinears read (a projection conv read by the next block and
        by a residual Add): quantize once (at the reading site's scale, else the largest of theirs),
            out -> Q0 -> DQ0 -> Clip(-127 s0, 127 s0) -> {Q1 -> DQ1 -> conv, Q2 -> DQ2 -> Add};
        a float op among the readers (a detector's RoiAlign on an FPN level) reads the Clip too: the
        int8 values the op writes, as every reader of an INT8 op does here;
      * a DequantizeLinear read by several float ops (the Sigmoid and Mul of SiLU): DQ -> Clip -> {...}.
    A Shape node counts as a reader though it reads no values (a TorchScript graph flattens by a Shape and
    a Reshape): moved to the DequantizeLinear, it still gets a duplicate of it from onnxruntime, and the
    op before stopped running as QLinearConv (tried on a segmentation head's classifier).

    `shared` (the onnxruntime target, whose activations are uint8: `activations_as_uint8`): the INT8 ops
    among the readers read Q0's codes themselves, through DQ0, where each takes its input's scale from its
    DequantizeLinear (Add, Concat, pooling; a conv at s0 exactly, as its int32 bias is at s0 x s_w), so
        out -> Q0 -> DQ0 -> {conv, Add}        (onnxruntime gives each reader a DequantizeLinear of its own)
    rounds once where the portable form rounds twice, and leaves no pass of its own: in the portable form
    the Clip, the DequantizeLinear before it and a QuantizeLinear per reader run as separate passes, 1.5 of
    ghostnet_100's 4.7 ms (its GhostModules concatenate a conv's output with the cheap conv reading it).
    Int8 codes shared so stay int8 in onnxruntime and take every op around them out of their INT8 kernels
    (ghostnet_100: 23 of 95 convs left in QLinearConv), hence uint8 only. Readers that need another scale
    (a second conv site, a float op) read the Clip as before. A value that a float op writes (a MaxPool or a
    shuffle's Reshape read by two convs, or by a conv and a residual Add) gets one pair for the INT8 readers
    that can share it, where two or more can: with one QuantizeLinear after it, onnxruntime can drop the
    pairs around a data-movement op and run it on codes (shufflenet_v2: 9 QuantizeLinears left, now 4).
    Returns (how many fan-outs, how many readers share Q0's codes)."""
    _float_readers_beside_int8_readers(model, float_nodes)
    view = GraphView(model)
    after: dict[int, list] = {}  # new nodes to place right after a node (topological order)
    dropped: set[int] = set()
    fanning = [(view.producer[t], t, users) for t, users in view.consumers.items()
               if t in view.producer and len(users) > 1]
    # (before any rewiring: a reader of shared codes reads the new DQ0, which `view` does not know, and an
    # INT8 op whose input was so rewired would look like a float op when its own output's turn comes)
    int8_ops = {id(producer): _is_int8_op(view, producer) for producer, _, _ in fanning}
    for producer, tensor, users in fanning:
        qs = [u for u in users if u.op_type == "QuantizeLinear"]
        int8_op = int8_ops[id(producer)]
        if qs and (int8_op or (shared and producer.op_type != "DequantizeLinear")):  # (that one: below)
            scales = [np.float32(view.const(q.input[1]).reshape(())) for q in qs]
            at_site = [sc for q, sc in zip(qs, scales) if site_behind(view, q, site_of)]
            s0 = at_site[0] if at_site else max(scales)
            zp = view.const(qs[0].input[2]).reshape(())
            sharing = [q for q in qs if _int8_ops_read(view, q, s0, zp, float_nodes)] if shared else []
            if not int8_op and len(sharing) < 2:
                continue
            after[id(producer)] = _requantize_and_clip(model, view, tensor, s0, zp, users if int8_op else sharing,
                                                       sharing)
            dropped |= {id(n) for q in sharing for n in [q] + view.consumers[q.output[0]]}
    for producer, tensor, users in fanning:  # (after the above: a DequantizeLinear it dropped has no readers)
        if producer.op_type == "DequantizeLinear" and producer.input[0] not in view.inits \
                and id(producer) not in dropped:
            s0, zp = view.const(producer.input[1]).reshape(()), view.const(producer.input[2]).reshape(())
            after[id(producer)] = _requantize_and_clip(model, view, tensor, s0, zp, users, requantize=False)
    if after:
        set_nodes(model, [m for n in model.graph.node if id(n) not in dropped for m in [n] + after.get(id(n), [])])
    return len(after), len(dropped) // 2


def _int8_ops_read(view: GraphView, q, s0, zp, float_nodes: frozenset) -> bool:
    """Whether only INT8 ops read this QuantizeLinear (through one DequantizeLinear) and can read codes at
    scale s0 instead: any fusable op but a compute op (its int32 bias is at its input's scale), which only
    where that scale is s0."""
    dqs = view.consumers[q.output[0]]
    if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear" or view.const(q.input[2]).reshape(()) != zp:
        return False
    same_scale = np.float32(view.const(dqs[0].input[1]).reshape(())) == s0
    readers = view.consumers[dqs[0].output[0]]
    return bool(readers) and all(r.op_type in _FUSED and r.name not in float_nodes
                                 and (r.op_type not in COMPUTE_OPS or same_scale) for r in readers)


def _float_readers_beside_int8_readers(model, float_nodes: frozenset) -> None:
    """Where a DequantizeLinear of an INT8 op's output feeds an INT8 op and float ops (an FPN level read by
    the RPN head's conv and by RoiAlign), the float ops read the op's output itself, which `fan_out` then
    quantizes once for all its readers: a Clip between the DequantizeLinear and the conv would stop the
    conv's fusion."""
    view = GraphView(model)
    for tensor, users in list(view.consumers.items()):
        dq = view.producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear" or len(users) < 2:
            continue
        q = view.made_by(dq.input[0], "QuantizeLinear")
        source = view.producer.get(q.input[0]) if q is not None else None
        floats = [u for u in users if u.op_type not in _FUSED or u.name in float_nodes]
        if source is None or not _is_int8_op(view, source) or not floats or len(floats) == len(users):
            continue
        for u in floats:
            u.input[:] = [q.input[0] if name == tensor else name for name in u.input]


def float_graph_outputs(model) -> list[str]:
    """Remove the QuantizeLinear/DequantizeLinear pair the quantizer puts on each graph output, so the file
    returns what `qmodel.eval()` returns: float logits, not logits rounded to 255 levels of their calibrated
    range. Rounded logits tie and swap the top two classes: on a Fashion-MNIST resnet18 that alone cost
    0.8 points of top-1 agreement with qmodel.eval(). A head Gemm/MatMul still runs in INT8 (onnxruntime's
    QGemm / MatMulIntegerToFloat write float); a conv whose output the model returns runs on its dequantized
    INT8 weights in float. Returns the outputs made float."""
    view = GraphView(model)
    done = []
    for out in model.graph.output:
        dq, q = _requantized(view, out.name)
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
        set_nodes(model, [n for n in model.graph.node if id(n) not in drop])
        view = GraphView(model)
        done.append(out.name)
    return done


def float_ops_read_floats(model, float_ops: set[str], sources: set[str] | None = None) -> None:
    """A float op (`float_ops`, by name) that the quantizer handed a DequantizeLinear(QuantizeLinear(t)) of
    another float op's output t (one of `sources`, by default `float_ops`) reads t itself, as int8fx does: a
    squeeze-excite gate multiplies the float SiLU output, not that output rounded to its calibrated range
    (the QuantizeLinear stays for the INT8 readers of t). Outputs of INT8 ops stay dequantized: read in
    float, they would stop onnxruntime from fusing the op that writes them."""
    sources = float_ops if sources is None else sources
    view = GraphView(model)
    for n in model.graph.node:
        if n.name not in float_ops:
            continue
        for i, name in enumerate(n.input):
            dq, q = _requantized(view, name)
            source = view.producer.get(q.input[0]) if q is not None else None
            if source is not None and source.name in sources:
                n.input[i] = q.input[0]


def shapes_read_floats(model) -> None:
    """A Shape or Size node reads the float tensor, not its quantized copy, where that tensor is a graph
    input or a float op's output: it needs no values, and a second reader of a DequantizeLinear makes it a
    fan-out (`fan_out`), whose Clip stops onnxruntime from fusing the INT8 op that is the real reader
    (torchvision's convnext_tiny takes the batch size of its input). The output of an INT8 op stays read
    through its DequantizeLinear: a second reader of the op's output would stop the op's own fusion (the
    size a segmentation head's upsampling takes from its last conv)."""
    view = GraphView(model)
    for n in model.graph.node:
        if n.op_type in ("Shape", "Size"):
            dq, q = _requantized(view, n.input[0])
            source = view.producer.get(q.input[0]) if q is not None else None
            if q is not None and (source is None or not _is_int8_op(view, source)):
                n.input[0] = q.input[0]


# Sigmoid is within 3.4e-4 of 0 or 1 beyond +-8: an INT8 sigmoid input needs no wider range
SIGMOID_RANGE = 8.0


def cap_sigmoid_inputs(model, float_ops: set[str]) -> int:
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
        dq, q = _requantized(view, n.input[0])
        if q is None or len(view.consumers[dq.output[0]]) != 1 or np.float32(view.const(q.input[1]).reshape(())) <= cap:
            continue
        name = f"{q.output[0]}_sigmoid_range_scale"
        model.graph.initializer.append(numpy_helper.from_array(np.array(cap, np.float32), name))
        q.input[1] = dq.input[1] = name
        capped += 1
    return capped


def _requantized(view: GraphView, tensor: str) -> tuple:
    """(DequantizeLinear, QuantizeLinear) where `tensor` is DequantizeLinear(QuantizeLinear(t)) of an activation
    t (q.input[0]), the quantizer's usual pair; None for each that is not there."""
    dq = view.made_by(tensor, "DequantizeLinear")
    return dq, (view.made_by(dq.input[0], "QuantizeLinear") if dq is not None else None)


def _names(values) -> set[str]:
    return {v.name for v in values}


def _is_int8_op(view: GraphView, node) -> bool:
    """Whether onnxruntime can fuse `node` into an INT8 op: a fusable type whose every activation input is
    dequantized (its output Q is what the fan-out is about)."""
    acts = [i for i in node.input if i and i not in view.inits]
    return node.op_type in _FUSED and all(view.made_by(i, "DequantizeLinear") is not None for i in acts)


def _requantize_and_clip(model, view: GraphView, tensor: str, s0, zp, users, sharing=(),
                         requantize: bool = True) -> list:
    """[Q0, DQ0,] Clip nodes on `tensor`: the readers of the QuantizeLinears in `sharing` read DQ0 (those
    QuantizeLinears and their DequantizeLinears are for the caller to drop), the other `users` the Clip
    (none if there are none)."""
    from onnx import helper, numpy_helper

    base = f"{tensor}_fanout"
    s0 = np.float32(s0)
    nodes, source = [], tensor
    if requantize:
        model.graph.initializer.extend([numpy_helper.from_array(np.array(s0, np.float32), f"{base}_scale"),
                                        numpy_helper.from_array(np.array(zp), f"{base}_zero_point")])
        nodes = [helper.make_node("QuantizeLinear", [tensor, f"{base}_scale", f"{base}_zero_point"],
                                  [f"{base}_quantized"], name=f"{base}_quantize"),
                 helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
                                  [f"{base}_dequantized"], name=f"{base}_dequantize")]
        source = f"{base}_dequantized"
    for q in sharing:
        dq = view.consumers[q.output[0]][0]
        _rewire(view.consumers[dq.output[0]], dq.output[0], source)
    rest = [u for u in users if all(u is not q for q in sharing)]
    if rest:
        nodes.append(saturating_clip(model, source, s0, f"{base}_clip"))
        _rewire(rest, tensor, f"{base}_clip_out")
    return nodes


def saturating_clip(model, tensor: str, scale, name: str):
    """A Clip node `name` that saturates `tensor` at +-127 `scale`, as int8fx's quantizer does (its bounds
    added as initializers); it writes f"{name}_out"."""
    from onnx import helper, numpy_helper

    scale = np.float32(scale)
    model.graph.initializer.extend([numpy_helper.from_array(np.array(-127 * scale, np.float32), f"{name}_min"),
                                    numpy_helper.from_array(np.array(127 * scale, np.float32), f"{name}_max")])
    return helper.make_node("Clip", [tensor, f"{name}_min", f"{name}_max"], [f"{name}_out"], name=name)


def _rewire(readers, old: str, new: str) -> None:
    for r in readers:
        r.input[:] = [new if name == old else name for name in r.input]


def dedicate_quantizers(model, site_of: dict[str, str], statics: dict[str, StaticSite], distinct: bool = True) -> int:
    """One scale and zero-point initializer per activation QuantizeLinear, the site's exact scale on each
    site input, and (`distinct`) distinct scales among the QuantizeLinears of one tensor (module docstring,
    step 3: for onnxruntime's own int8-to-uint8 conversion, which a uint8 file does not need).
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
        ordered = sorted(qs, key=lambda q: site_behind(view, q, site_of) is None)
        for q in ordered:
            site = site_behind(view, q, site_of)
            s = np.float32(statics[site].x_scale if site else view.const(q.input[1]).reshape(()))
            while distinct and float(s) in taken:
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


def exact_biases(model, float_biases: dict[str, np.ndarray | None]) -> list[str]:
    """Re-quantize every int32 bias whose scale is not s_x * s_w of its conv/matmul, from the float bias:
    onnxruntime fuses a conv into QLinearConv only where bias scale = input scale x weight scale (QLinearConv
    takes no bias scale). The quantizer computes the bias at the input scale it chose, and it ignores a scale
    override on the output of the ops it quantizes as their input (AveragePool, Split): there
    `dedicate_quantizers` then gives the site its own scale, and left alone the bias would be read at the
    wrong scale. (A conv after AvgPool in timm's resnet26d-style downsample, after the channel Split of a
    ShuffleNet or CSP block; since the calibration clamps and the Split's scale, only where the portable
    file moves a site's scale an ulp from another reader's: 1 bias of resnet26d, 3 of shufflenet_v2_x0_5, 5 of
    ghostnet_100.) Returns the compute nodes whose bias was re-quantized."""
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
            raise OnnxExportError(f"the int32 bias of '{n.name}' overflows at its input's scale "
                                  f"{float(scale.ravel()[0])} x weight scale")
        base = f"{n.name}/bias_at_input_scale"
        model.graph.initializer.extend([numpy_helper.from_array(codes.astype(np.int32), f"{base}_codes"),
                                        numpy_helper.from_array(np.broadcast_to(scale, codes.shape).copy(),
                                                                f"{base}_scale")])
        bdq.input[0], bdq.input[1] = f"{base}_codes", f"{base}_scale"
        done.append(n.name)
    return done


def site_behind(view: GraphView, q, site_of: dict[str, str]) -> str | None:
    """The site whose input this QuantizeLinear quantizes (through its DequantizeLinear), if any."""
    for dq in view.consumers[q.output[0]]:
        for c in view.consumers[dq.output[0]] if dq.op_type == "DequantizeLinear" else []:
            if c.name in site_of and c.input[0] == dq.output[0]:
                return site_of[c.name]
    return None


def activations_as_uint8(model) -> int:
    """Store every activation QuantizeLinear/DequantizeLinear pair as uint8, its zero point moved by 128:
    the same values on the same grid (q_u8 = q_s8 + 128), in the type of onnxruntime's x86 INT8 kernels.
    onnxruntime converts int8 pairs itself (QDQS8ToU8Transformer), but only a QuantizeLinear with a single
    DequantizeLinear after it, and only after it has given each reader of a shared DequantizeLinear a copy:
    the codes `fan_out(shared=True)` shares would stay int8 and take the ops around them out of their INT8
    kernels. Weights and biases keep their types (int8, int32). Returns how many zero points were moved."""
    from onnx import numpy_helper

    view = GraphView(model)
    moved: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3 or not n.input[2] \
                or (n.op_type == "DequantizeLinear" and n.input[0] in view.inits):
            continue
        name = n.input[2]
        if name not in moved:
            zp = view.const(name)
            if zp.dtype != np.int8:
                raise OnnxExportError(f"activation zero point '{name}' is {zp.dtype}, not int8")
            moved[name] = f"{name}_uint8"
            model.graph.initializer.append(numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8),
                                                                   moved[name]))
        n.input[2] = moved[name]
    return len(moved)
