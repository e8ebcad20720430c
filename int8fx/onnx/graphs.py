"""Reading an ONNX graph the way the export needs it: who produces and consumes each tensor, constant
values, and which compute node is which INT8 site.

Sites are found by their weights, not by names: torch's exporters rename initializers (the TorchScript
exporter calls a BatchNorm-folded weight `onnx::Conv_193`), but a site's INT8 values are its fingerprint.
A compute node (Conv, Gemm, MatMul) belongs to a site when the per-output-channel INT8 codes of its weight
equal the site's, channel by channel up to sign: the deploy form folds BatchNorm into the weight
(W * gamma / sigma per channel), which flips the sign of channels with negative gamma and scales the rest,
and a channel with gamma = 0 becomes all zeros. Per-channel quantization commutes with that per-channel
factor, so the folded weight quantizes to the same codes.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")  # a site's compute node, in either form
# ops whose output is quantized exactly as their input (they commute with a zero-point-0 quantizer)
SCALE_PRESERVING = frozenset({"Relu", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                              "Identity"})


def set_nodes(model, nodes) -> None:
    """Make `nodes` the graph's node list, in that order: how every pass drops or places nodes (protobuf's
    repeated field has no slice assignment)."""
    nodes = list(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


class GraphView:
    """Producer, consumers and initializers of a graph (a snapshot: rebuild after editing)."""

    def __init__(self, model) -> None:
        self.model = model
        self.graph = model.graph
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.graph.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.inits = {i.name: i for i in self.graph.initializer}
        self.nodes = {n.name: n for n in self.graph.node}

    def made_by(self, tensor: str, op_type: str):
        n = self.producer.get(tensor)
        return n if n is not None and n.op_type == op_type else None

    def quantized_by(self, codes: str):
        """The QuantizeLinear that writes these codes, directly or through a ReLU on codes (a Clip at the zero
        point, on the quantizer's grid: `int8_ops.relus_on_codes`)."""
        clip = self.made_by(codes, "Clip")
        return self.made_by(clip.input[0] if clip is not None else codes, "QuantizeLinear")

    def const(self, name: str) -> np.ndarray | None:
        """An initializer's value, following Identity nodes (torch's exporters de-duplicate constants so)."""
        from onnx import numpy_helper

        while name not in self.inits:
            n = self.producer.get(name)
            if n is None or n.op_type != "Identity":
                return None
            name = n.input[0]
        return numpy_helper.to_array(self.inits[name])

    def attr(self, node, name: str, default=None):
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def weight_source(view: GraphView, node):
    """(the tensor holding a compute node's weight, whether it is stored [in, out, ...]: a MatMul's, a Gemm's
    without transB, a ConvTranspose's) following a Transpose."""
    w = node.input[1]
    transposed = (node.op_type in ("MatMul", "ConvTranspose")
                  or (node.op_type == "Gemm" and not view.attr(node, "transB", 0)))
    tr = view.made_by(w, "Transpose")
    if tr is not None and list(view.attr(tr, "perm", [])) == [1, 0]:
        return tr.input[0], not transposed
    return w, transposed


def out_major(array: np.ndarray, transposed: bool) -> np.ndarray:
    """A weight as [out channels, ...] (`transposed`: stored [in, out, ...])."""
    return np.swapaxes(array, 0, 1) if transposed else array


def out_codes(site) -> np.ndarray:
    """A site's INT8 weight codes as [out channels, ...]: a transposed conv's W is stored [in, out, *k]."""
    return out_major(site.w_int8.numpy(), site.layer.is_transposed)


def site_codes(statics) -> dict[str, np.ndarray]:
    """{site: `out_codes`} for every static site."""
    return {s: out_codes(st) for s, st in statics.items()}


def float_codes(w: np.ndarray) -> np.ndarray:
    """Symmetric per-output-channel INT8 codes of a float weight [O, ...] (for identification only)."""
    w = w.astype(np.float64).reshape(w.shape[0], -1)
    s = np.abs(w).max(axis=1, keepdims=True) / 127
    return np.round(np.divide(w, s, out=np.zeros_like(w), where=s > 0)).astype(np.int64)


def codes_match(graph_codes: np.ndarray, site_codes: np.ndarray, *, up_to_sign: bool) -> bool:
    """Channel by channel equal (or, for folded weights, equal up to sign, or all zero)."""
    a = graph_codes.reshape(graph_codes.shape[0], -1).astype(np.int64)
    b = site_codes.reshape(site_codes.shape[0], -1).astype(np.int64)
    if a.shape != b.shape:
        return False
    if not up_to_sign:
        return bool((a == b).all())
    return bool(_equal_up_to_sign(a, b).all())


def _equal_up_to_sign(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per output channel of two [O, K] code arrays: equal, sign-flipped, or all zero in `a`."""
    return (a == b).all(1) | (a == -b).all(1) | (a == 0).all(1)


def rescaled_channels(graph_codes: np.ndarray, site_codes: np.ndarray) -> list[int] | None:
    """The output channels whose INT8 weights in the graph are the site's codes (up to sign) at a coarser
    scale, [] if none, None if any channel differs otherwise (or the shapes do).

    onnxruntime's quantizer widens a channel's weight scale where its int32 bias would overflow at
    s_x * s_w: a channel whose folded BatchNorm factor is nearly zero (timm's zero-initialised last BN of a
    residual block, barely trained) has a tiny folded weight and a bias that is all BN shift. The widened
    codes are round(c * r) of the site's codes c for one ratio r < 1 per channel; that channel adds almost
    nothing to its output either way."""
    a = graph_codes.reshape(graph_codes.shape[0], -1).astype(np.int64)
    b = site_codes.reshape(site_codes.shape[0], -1).astype(np.int64)
    if a.shape != b.shape:
        return None
    rescaled = []
    for c in np.flatnonzero(~_equal_up_to_sign(a, b)):
        top, full = np.abs(a[c]).max(), np.abs(b[c]).max()
        ratio = top / full if full else 1.0
        if ratio >= 1 or not any(np.abs(a[c] - np.round(sign * b[c] * ratio)).max() <= 1 for sign in (1, -1)):
            return None
        rescaled.append(int(c))
    return rescaled


def rows_by_columns(codes: np.ndarray) -> tuple[int, int]:
    """A weight's shape as output channels x the rest: what a site and a graph node must share to match."""
    return codes.shape[0], codes.size // codes.shape[0]


def assign_sites(candidates: list[tuple], site_codes: dict[str, np.ndarray], calls: dict[str, int], *,
                 up_to_sign: bool) -> list[tuple]:
    """[(node, site name)] for `candidates` = [(node, codes [O, ...])] in graph order: each node goes to the
    first site (in site order) whose codes match and which still has calls left."""
    left = dict(calls)
    by_shape = defaultdict(list)
    for name, codes in site_codes.items():
        by_shape[rows_by_columns(codes)].append(name)
    found = []
    for node, codes in candidates:
        for name in by_shape.get(rows_by_columns(codes), []):
            if left.get(name, 0) > 0 and codes_match(codes, site_codes[name], up_to_sign=up_to_sign):
                left[name] -= 1
                found.append((node, name))
                break
    return found


def rename(view: GraphView, node, new: str) -> str:
    """Rename a node to `new` (made unique); returns the name given."""
    name, k = new, 1
    while name in view.nodes and view.nodes[name] is not node:
        k += 1
        name = f"{new}_{k}"
    view.nodes.pop(node.name, None)
    node.name = name
    view.nodes[name] = node
    return name
