"""Which nodes of the deploy graph stay float: what int8fx computes in float, where quantizing would add
roundings `qmodel.eval()` never makes (or where no INT8 kernel would run anyway).

Each selector reads the FP32 graph before onnxruntime's quantizer runs and returns node names, which
`deploy.build` excludes from quantization (`nodes_to_exclude`):
  * normalizations that fold into no conv, with a GroupNorm's affine (`float_norms`);
  * layer scales, a Mul of a site's output by a constant (`layer_scales`);
  * sigmoid gates, SiLU and squeeze-excite (`sigmoid_gates`);
  * average poolings of what those float nodes write (`pools_of_floats`);
  * whatever no activation of an INT8 site passes through, a detector's box arithmetic (`beyond_sites`).
Measured and left to the quantizer: GELUs written with Erf (in float, a trained fastvit_t8's file agreed
less with `qmodel.eval()`: 97.96% against 98.30%, RESULTS.md, session 22).
"""
from __future__ import annotations

from .graphs import GraphView

# normalizations left in float: onnxruntime has no integer kernel for them (it runs a quantized one as
# DequantizeLinear, the float op, QuantizeLinear: the same passes), and its quantizer rounds their scale and shift
# to int8 with one scale per tensor (a LayerNorm's, convnext; an identity branch's BatchNorm that nothing folds,
# repvgg), which int8fx never does; quantizing an exported GroupNorm (InstanceNormalization between two Reshapes)
# made the quantizer fail ("Quantization parameter shared mode is not supported for weight yet", resnet50_gn)
FLOAT_NORMS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "BatchNormalization")


def float_norms(view: GraphView) -> list[str]:
    """The normalization nodes left in float (`FLOAT_NORMS`), with the per-channel affine a GroupNorm is
    exported with: InstanceNormalization normalizes the groups (between two Reshapes), then a Mul by gamma
    and an Add of beta, both constants. Quantized, that affine had gamma and beta rounded to int8 with one
    scale per tensor and the normalized tensor rounded twice more, where int8fx keeps the whole GroupNorm
    float (deploy_numerics refused such files); in float it is faster too (timm's resnet50_gn at 64 px: 3.70
    against 4.37 ms at batch 1, RESULTS.md, session 22)."""
    names = []
    for n in view.graph.node:
        if n.op_type not in FLOAT_NORMS:
            continue
        names.append(n.name)
        tensor = n.output[0]
        while n.op_type == "InstanceNormalization" and len(view.consumers[tensor]) == 1:
            op = view.consumers[tensor][0]
            if op.op_type not in ("Reshape", "Mul", "Add") or (op.op_type != "Reshape" and not any(
                    view.const(t) is not None for t in op.input if t != tensor)):
                break
            names.append(op.name)
            tensor = op.output[0]
    return names


def layer_scales(view: GraphView, site_of: dict[str, str]) -> list[str]:
    """Every Mul of an INT8 site's output (a MatMul's after its bias Add) by a constant: a layer scale
    (ConvNeXt's gamma, per channel, trained from 1e-6). Left in float, as int8fx computes it: quantized,
    gamma became int8 codes with one scale per tensor, which round a channel whose gamma is under 1/254 of
    the largest to zero, and deploy_numerics refused such files."""
    names = []
    for n in view.graph.node:
        if n.op_type != "Mul" or len(n.input) != 2:
            continue
        consts = [view.const(t) is not None for t in n.input]
        if consts.count(True) != 1:
            continue
        writer = view.producer.get(n.input[consts.index(False)])
        if writer is not None and writer.op_type == "Add" and any(view.const(t) is not None for t in writer.input):
            writer = view.producer.get(next(t for t in writer.input if view.const(t) is None))
        if writer is not None and writer.name in site_of:
            names.append(n.name)
    return names


def sigmoid_gates(view: GraphView) -> list[str]:
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


# the ops an exported graph pools with (torch.export writes adaptive average pooling as a ReduceMean)
POOLS = ("GlobalAveragePool", "AveragePool", "ReduceMean")


def pools_of_floats(view: GraphView, float_ops: set[str]) -> list[str]:
    """The average poolings whose input a float node writes (an efficientnet's squeeze-excite and final
    pooling of a SiLU output): left in float, as int8fx computes them. Quantized, the pooling's input would
    be rounded to its calibrated range, a rounding `qmodel.eval()` never makes, before the mean is rounded
    again at the next site's scale; in float only that last rounding is made (a trained efficientnet_b0's
    logits: 0.081 of their norm from `qmodel.eval()`'s, 0.178 with the pools in INT8; RESULTS.md, session
    26). Not slower: the float input is there anyway, and the quantized form needs a QuantizeLinear pass over
    it, where the float mean (a ReduceMean: `int8_ops.float_means`) reads it once. A pooling of an INT8 op's
    output (a ReLU after a residual QLinearAdd, resnet18's) reads its codes and stays INT8."""
    return [n.name for n in view.graph.node
            if n.op_type in POOLS and (w := view.producer.get(n.input[0])) is not None and w.name in float_ops]


# ops whose inputs after the first are positions, sizes or indices, not activations: a detector's RoiAlign
# reads a feature map (input 0) at box coordinates (input 1), which are no INT8 site's activations
_DATA_INPUT_FIRST = {"RoiAlign", "Resize", "Upsample", "Reshape", "Expand", "Tile", "Slice", "Pad", "Gather",
                     "GatherElements", "GatherND", "TopK", "ScatterND", "ScatterElements"}


def beyond_sites(view: GraphView, sites: set[str]) -> list[str]:
    """The nodes through which no activation reaches an INT8 site: a detector's box decoding and
    post-processing, a segmentation head's final upsampling, whatever runs after the last sites. int8fx
    computes them in float (`qmodel.eval()` does), so the deploy graph does too: quantized, a box
    coordinate up to 320 rounds to 2.5 pixels, and onnxruntime 1.32 crashed (a segfault) running
    fasterrcnn's box rescaling as QLinearMul on an image without detections (an empty tensor)."""
    feeding: set[str] = set()
    stack = [view.nodes[name].input[0] for name in sites]
    while stack:
        node = view.producer.get(stack.pop())
        if node is None or node.name in feeding:
            continue
        feeding.add(node.name)
        stack.extend(i for i in (node.input[:1] if node.op_type in _DATA_INPUT_FIRST else node.input) if i)
    return [n.name for n in view.graph.node if n.name not in feeding and n.name not in sites]
