"""The faithful form: a QDQ graph that computes what `qmodel.eval()` computes.

Every converted site becomes `Clip -> QuantizeLinear -> DequantizeLinear -> Conv | Gemm | MatMul` with its
weight as an INT8 initializer behind a per-channel DequantizeLinear (`qdq_op`); everything else (BatchNorm,
activations, pooling, residual adds, sites kept in FP32) stays float, as int8fx computes it. Given the same
input, onnxruntime's INT8 codes equal int8fx's and each site's output equals the exact integer GEMM times
s_x * s_w[o] within fp32 summation error. That makes the file a reference for int8fx's numerics; for speed,
see the deploy form.
"""
from __future__ import annotations

import torch.nn as nn

from .calibrate import StaticSite
from .errors import OnnxExportError
from .graphs import (
    COMPUTE_OPS,
    GraphView,
    assign_sites,
    out_major,
    rename,
    site_codes,
    weight_source,
)
from .standins import FaithfulSite, export_with_standins


def build(qmodel: nn.Module, statics: dict[str, StaticSite], dynamic: set[str], args: tuple, *, exporter: str,
          opset: int, input_names, output_names, dynamic_batch: bool):
    """(model, exporter used, {site: [per-call node names and scales]})."""
    model, used, calls, _ = export_with_standins(qmodel, FaithfulSite, statics, dynamic, args, exporter=exporter,
                                                 opset=opset, input_names=input_names, output_names=output_names,
                                                 dynamic_batch=dynamic_batch)
    return model, used, annotate(model, statics, calls)


def annotate(model, statics: dict[str, StaticSite], calls: dict[str, int]) -> dict[str, list[dict]]:
    """Find each site call's QDQ pattern, check it against the site's constants, name its nodes after the
    site, and return the node names per call. Raises OnnxExportError when a call has no pattern."""
    view = GraphView(model)
    candidates, patterns = [], {}
    for n in model.graph.node:
        if n.op_type not in COMPUTE_OPS or len(n.input) < 2:
            continue
        w_src, transposed = weight_source(view, n)
        wdq = view.made_by(w_src, "DequantizeLinear")
        xdq = view.made_by(n.input[0], "DequantizeLinear")
        xq = view.made_by(xdq.input[0], "QuantizeLinear") if xdq is not None else None
        clip = view.made_by(xq.input[0], "Clip") if xq is not None else None
        codes = view.const(wdq.input[0]) if wdq is not None else None
        # (an input the exporter computed at export time, the Clip folded in: RAFT's first flow update reads
        # a zero flow)
        folded = xq is not None and xq.input[0] in view.inits
        if (clip is None and not folded) or codes is None or codes.dtype.name != "int8":
            continue
        candidates.append((n, out_major(codes, transposed)))
        tr = view.made_by(n.input[1], "Transpose") if n.op_type == "MatMul" else None
        users = view.consumers.get(n.output[0], [])
        add = users[0] if n.op_type == "MatMul" and len(users) == 1 and users[0].op_type == "Add" else None
        patterns[id(n)] = {"x_clip": clip, "x_quantize": xq, "x_dequantize": xdq, "w_dequantize": wdq,
                           "w_transpose": tr, "compute": n, "bias_add": add}
    found = assign_sites(candidates, site_codes(statics), calls, up_to_sign=False)
    per_site: dict[str, list[dict]] = {s: [] for s in statics}
    named: dict[int, str] = {}  # a Q/DQ pair two sites share (same input, same scale) keeps its first name

    def name(node_, new: str) -> str:
        if id(node_) not in named:
            named[id(node_)] = rename(view, node_, new)
        return named[id(node_)]

    for node, site in found:
        p, st = patterns[id(node)], statics[site]
        x_scale = float(view.const(p["x_quantize"].input[1]))
        w_scale = view.const(p["w_dequantize"].input[1])
        if x_scale != st.x_scale or w_scale is None or not (w_scale == st.w_scale.numpy()).all():
            raise OnnxExportError(f"internal: the scales in the ONNX graph do not match INT8 site '{site}'")
        k = len(per_site[site]) + 1
        base = site if k == 1 else f"{site}#{k}"
        names = {role: name(node_, f"{base}/{role}") for role, node_ in p.items() if node_ is not None}
        names.update(weight_initializer=p["w_dequantize"].input[0], op_type=node.op_type, x_scale=x_scale)
        per_site[site].append(names)
    missing = [f"'{s}' ({len(per_site[s])} of {calls[s]} calls)" for s in statics if len(per_site[s]) != calls[s]]
    if missing:
        raise OnnxExportError("the exported graph lacks the QuantizeLinear/DequantizeLinear pattern of INT8 site(s) "
                              + ", ".join(missing) + "; the file would compute them in float")
    return per_site
