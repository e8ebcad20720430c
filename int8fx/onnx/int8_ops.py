"""Rewrite ops of the deploy graph into equal ops that runtimes have INT8 kernels for.

With symmetric int8 (zero point 0, as TensorRT requires), a ReLU cannot be folded into the quantizer in
front of it (that takes a zero point at the bottom of the range), so `DequantizeLinear -> Relu ->
QuantizeLinear` would run in float, three passes over the tensor. onnxruntime has no INT8 Relu, but it
has an INT8 LeakyRelu (QLinearLeakyRelu, one table lookup per element), and LeakyRelu with alpha = 0 is
the same function.

Before quantization (the FP32 graph, whose float outputs calibrate the scales; only exact rewrites):
  * a BatchNormalization right after a Conv or ConvTranspose (its only reader) folded into its weight and
    bias: torch's TorchScript exporter folds it into a Conv but leaves it after a ConvTranspose, where the
    quantizer would round the BatchNorm's own scale and shift to int8 (3% of the output of a small decoder)
    and the ConvTranspose's output once more;
  * Relu -> LeakyRelu(alpha=0);
  * ReduceMean over the spatial axes of a 4-d tensor, keeping them (how torch.export writes adaptive
    average pooling to 1x1) -> GlobalAveragePool, which onnxruntime runs as QLinearGlobalAveragePool.
After quantization (the QDQ graph, where the scales are known):
  * ReLU6 `DequantizeLinear -> Clip(x, 0, hi) -> QuantizeLinear(s)` -> LeakyRelu(alpha=0) when every
    consumer quantizes at an s with 127 s <= hi: the quantizer saturates at 127 s before the clip's upper
    bound can act, so both give the same INT8 codes (a site reading a ReLU6 output has a running clip
    <= 6 by construction).
With `target="onnxruntime"`, last (`relus_on_codes`, once activations are uint8): each such LeakyRelu(alpha=0)
between a DequantizeLinear and a QuantizeLinear of one grid becomes a Clip of the codes at the zero point,
the same numbers in one vectorised pass (an op on codes, outside the Q/DQ pairs, is not TensorRT's
explicit-quantization form: the portable file keeps the LeakyRelu).
"""
from __future__ import annotations

from onnx import helper

from .graphs import GraphView, set_nodes


def before_quantization(model, float_pools: frozenset = frozenset()) -> dict[str, int]:
    """Rewrite the FP32 graph in place; returns how many nodes of each kind. The poolings named in
    `float_pools` stay float, and are written as spatial ReduceMeans (`float_means`)."""
    import onnx

    folded = _fold_batch_norms(model)
    ranks = _ranks(onnx.shape_inference.infer_shapes(model))
    view = GraphView(model)

    def replace(n):
        if n.op_type == "Relu":
            return helper.make_node("LeakyRelu", [n.input[0]], list(n.output), name=n.name, alpha=0.0)
        if n.op_type == "ReduceMean" and n.name not in float_pools and _spatial_mean(view, n, ranks.get(n.input[0])):
            return helper.make_node("GlobalAveragePool", [n.input[0]], list(n.output), name=n.name)
        return None

    done = _replace(model, replace)
    float_means(model, float_pools, ranks)
    return {**done, "BatchNormalization": folded} if folded else done


def float_means(model, pools: frozenset, ranks: dict[str, int]) -> None:
    """Each GlobalAveragePool named in `pools` (left float) as the ReduceMean over the spatial axes it is:
    onnxruntime runs a float GlobalAveragePool in NCHW, and between its INT8 kernels, which run in NHWC, it
    then transposes the whole tensor first (efficientnet_b0 at batch 16: 1.5 ms, and 1.3 ms for the pools
    themselves), where a ReduceMean's axes follow the layout (0.45-0.62 ms; RESULTS.md, session 26)."""
    def replace(n):
        if n.op_type == "GlobalAveragePool" and n.name in pools and ranks.get(n.input[0], 0) >= 3:
            return spatial_reduce_mean(model, n, ranks[n.input[0]])
        return None

    _replace(model, replace)


def _fold_batch_norms(model) -> int:
    """Fold each BatchNormalization whose input a Conv or one-group ConvTranspose writes for it alone, with
    constant weights and statistics, into that node: W * gamma / sigma per output channel (axis 0 of a Conv's
    W, axis 1 of a ConvTranspose's), bias (b - mean) * gamma / sigma + beta, in new initializers (a weight
    two nodes share stays as it is for the other). Returns how many."""
    import numpy as np
    from onnx import numpy_helper

    view = GraphView(model)
    folded, drop = 0, set()
    for i, bn in enumerate(model.graph.node):
        conv = view.producer.get(bn.input[0]) if bn.op_type == "BatchNormalization" and len(bn.output) == 1 else None
        if (conv is None or conv.op_type not in ("Conv", "ConvTranspose") or len(view.consumers[bn.input[0]]) != 1
                or (conv.op_type == "ConvTranspose" and view.attr(conv, "group", 1) != 1)):
            continue
        w = view.const(conv.input[1])
        stats = [view.const(t) for t in bn.input[1:5]]
        if w is None or any(v is None for v in stats):
            continue
        has_bias = len(conv.input) > 2 and conv.input[2]
        b = view.const(conv.input[2]) if has_bias else np.zeros(stats[0].shape, np.float32)
        if b is None:
            continue
        gamma, beta, mean, var = (v.astype(np.float64) for v in stats)
        factor = gamma / np.sqrt(var + view.attr(bn, "epsilon", 1e-5))
        shape = [1, -1] if conv.op_type == "ConvTranspose" else [-1, 1]
        w2 = w.astype(np.float64) * factor.reshape(shape + [1] * (w.ndim - 2))
        b2 = (b.astype(np.float64) - mean) * factor + beta
        base = f"{conv.name or conv.output[0]}/batch_norm_folded"
        model.graph.initializer.extend([numpy_helper.from_array(w2.astype(np.float32), f"{base}_weight"),
                                        numpy_helper.from_array(b2.astype(np.float32), f"{base}_bias")])
        conv.input[1] = f"{base}_weight"
        if has_bias:
            conv.input[2] = f"{base}_bias"
        else:
            conv.input.append(f"{base}_bias")
        conv.output[0] = bn.output[0]
        drop.add(i)
        folded += 1
    if drop:
        set_nodes(model, [n for i, n in enumerate(model.graph.node) if i not in drop])
    return folded


# onnxruntime's QLinearGlobalAveragePool needs s_x / (s_y * H * W) below this
GAP_SCALE_RATIO = 256.0


def after_quantization(model) -> dict[str, int]:
    """Rewrite ReLU6 Clips of the QDQ graph in place where quantization makes them a ReLU, and global
    average pools whose scales onnxruntime's INT8 kernel cannot take into a float mean (module docstring)."""
    import onnx

    ranks = _ranks(onnx.shape_inference.infer_shapes(model))
    view = GraphView(model)

    def replace(n):
        if n.op_type == "Clip" and view.made_by(n.input[0], "DequantizeLinear") is not None and _relu6_below(view, n):
            return helper.make_node("LeakyRelu", [n.input[0]], list(n.output), name=n.name, alpha=0.0)
        if n.op_type == "GlobalAveragePool" and ranks.get(n.input[0], 0) >= 3 and _pool_out_of_range(view, n):
            return spatial_reduce_mean(model, n, ranks[n.input[0]])
        return None

    return _replace(model, replace)


def relus_on_codes(model) -> int:
    """Run each ReLU of the onnxruntime target on its codes (`export_onnx(target="onnxruntime")`).

    `DQ(s, z) -> LeakyRelu(alpha=0) -> Q(s, z)` becomes `Clip(codes, z)`: dequantizing, taking the ReLU and
    quantizing again on one grid gives max(q, z) for every code q, so the file computes what the portable
    file's QLinearLeakyRelu computes, in a vectorised pass over the uint8 codes instead of a table lookup per
    element (a quarter of mobilenet_v2's time at batch 1, three times the Clip's: RESULTS.md, session 22).
    Folding the ReLU into the zero point of the quantizer before it (until session 22) costs no pass at all,
    but saturates at 255 s where int8fx saturates at 127 s. A ReLU6 arrives here as such a LeakyRelu only
    where its quantizer saturates at or below its bound (`after_quantization`), so it is exact too. A
    DequantizeLinear that only the ReLU read goes with it; a data-movement op after the Clip (a stem's
    MaxPool) then sits between a DequantizeLinear and a QuantizeLinear of one grid, which onnxruntime drops
    to run it on codes. Returns how many ReLUs."""
    view = GraphView(model)
    replaced: dict[int, object] = {}
    dropped: set[int] = set()
    for relu in model.graph.node:
        if relu.op_type != "LeakyRelu" or next((a.f for a in relu.attribute if a.name == "alpha"), 0.01) != 0.0:
            continue
        dq = view.made_by(relu.input[0], "DequantizeLinear")
        users = view.consumers.get(relu.output[0], [])
        q = users[0] if len(users) == 1 and users[0].op_type == "QuantizeLinear" else None
        if dq is None or q is None or dq.input[0] in view.inits or not _same_grid(view, dq, q):
            continue
        replaced[id(q)] = helper.make_node("Clip", [dq.input[0], dq.input[2]], list(q.output),
                                           name=f"{relu.name}_codes")
        dropped.add(id(relu))
        if len(view.consumers[dq.output[0]]) == 1:
            dropped.add(id(dq))
    if replaced:
        set_nodes(model, [replaced.get(id(n), n) for n in model.graph.node if id(n) not in dropped])
    return len(replaced)


def _same_grid(view: GraphView, a, b) -> bool:
    """Two Q/DQ nodes of one scalar scale and one zero point (same type and value)."""
    scales = [view.const(n.input[1]) for n in (a, b)]
    zps = [view.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None for n in (a, b)]
    return (all(s is not None and s.size == 1 for s in scales) and all(z is not None and z.size == 1 for z in zps)
            and float(scales[0].reshape(())) == float(scales[1].reshape(()))
            and zps[0].dtype == zps[1].dtype and int(zps[0].reshape(())) == int(zps[1].reshape(())))


def _pool_out_of_range(view: GraphView, node) -> bool:
    dq = view.made_by(node.input[0], "DequantizeLinear")
    users = view.consumers.get(node.output[0], [])
    if dq is None or len(users) != 1 or users[0].op_type != "QuantizeLinear":
        return False
    s_x, s_y = view.const(dq.input[1]), view.const(users[0].input[1])
    return s_x is not None and s_y is not None and float(s_x.reshape(())) >= GAP_SCALE_RATIO * float(s_y.reshape(()))


def spatial_reduce_mean(model, node, rank: int):
    """ReduceMean over axes 2.. keeping them: GlobalAveragePool's result, in an op with no INT8 kernel."""
    from onnx import numpy_helper

    import numpy as np

    axes = list(range(2, rank))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    if opset < 18:
        return helper.make_node("ReduceMean", [node.input[0]], list(node.output), name=node.name, axes=axes,
                                keepdims=1)
    name = f"{node.name}_axes"
    model.graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), name))
    return helper.make_node("ReduceMean", [node.input[0], name], list(node.output), name=node.name, keepdims=1)


def _replace(model, replace) -> dict[str, int]:
    done: dict[str, int] = {}
    nodes = []
    for n in model.graph.node:
        new = replace(n)
        if new is not None:
            done[n.op_type] = done.get(n.op_type, 0) + 1
        nodes.append(new or n)
    set_nodes(model, nodes)
    return done


def _relu6_below(view: GraphView, node) -> bool:
    """Clip(x, 0, hi) whose every consumer is a QuantizeLinear saturating at or below hi."""
    if len(node.input) < 3 or not node.input[1] or not node.input[2]:
        return False
    low, high = view.const(node.input[1]), view.const(node.input[2])
    users = view.consumers.get(node.output[0], [])
    if low is None or high is None or float(low) != 0.0 or not users:
        return False
    for q in users:
        scale = view.const(q.input[1]) if q.op_type == "QuantizeLinear" else None
        if scale is None or scale.size != 1 or not 127 * float(scale.reshape(())) <= float(high):
            return False
    return True


def _spatial_mean(view: GraphView, node, rank: int | None) -> bool:
    if rank != 4 or not view.attr(node, "keepdims", 1):
        return False
    axes = view.const(node.input[1]) if len(node.input) > 1 and node.input[1] else view.attr(node, "axes")
    return axes is not None and sorted(int(a) % 4 for a in list(axes)) == [2, 3]


def _ranks(model) -> dict[str, int]:
    out = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = len(t.shape.dim)
    return out
