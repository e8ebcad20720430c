"""Modules that stand in for the INT8 sites of a copy of the model while torch exports it.

The export copy is the user's model with every `Int8Layer` replaced (under all its names) by one of:
  * `FaithfulSite`: the `int8fx::qdq_gemm` op on the site's static INT8 weights and activation scale
    (becomes the QDQ pattern; faithful form);
  * `FloatSite`: a plain float conv/linear on the dequantized INT8 weights (W_int8 * s_w), which the deploy
    form exports in FP32 and then quantizes in ONNX with int8fx's scales;
  * `DynamicFloatSite`: the float call on whatever weight the model computes (a weight computed from the
    model input has no static INT8 form);
  * `NotCalibrated`: a site the calibration forward never reached; the export fails if the trace reaches it.

All take calls the way an `Int8Layer` does: as a module (a module site's `forward(x)`, a functional site's
`forward(x, weight, bias, stride, padding, dilation, groups)`) or through `int8_functional` (routed calls,
calls on a module site's weight). Geometry and weights are the static ones calibration saw; the run-time
arguments of a functional site are ignored, so the code computing them drops out of the graph. Each stand-in
counts its calls, so the export can check that the graph holds as many site patterns as the model makes calls.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..nn.modules import Int8Layer, ModuleSite, float_call
from ..nn.scope import no_fused_fastpath
from .batch_size import refuse_batch_dependent_code
from .calibrate import StaticSite
from .qdq_op import conv_nd, conv_transpose_nd, dequantize_weight, qdq_gemm
from .torch_export import clean, export_graph


class StandIn(nn.Module):
    """What every stand-in shares: the site's name, a module site's floating-point padding, its own
    weight/bias and geometry attributes (`stride`, `kernel_size`, `in_features`, ...: the torch class's
    `__constants__`) for code that reads them, and a call counter."""

    def __init__(self, layer: Int8Layer) -> None:
        super().__init__()
        if isinstance(layer, ModuleSite):  # code that reads the module's geometry (transformers' TF-style
            for name in getattr(type(layer), "__constants__", ()):  # "same" padding reads its stride and kernel)
                if hasattr(layer, name):
                    setattr(self, name, getattr(layer, name))
        self.site_name, self.dims, self.site_op = layer.site_name, layer.dims, layer.site_op
        self.transposed = layer.is_transposed
        # a module site in a non-zeros padding mode pads in floating point before its conv (as nn.Conv2d)
        mode = getattr(layer, "padding_mode", "zeros") if isinstance(layer, ModuleSite) else "zeros"
        self.padding_mode = mode
        self.pre_pad = tuple(layer._reversed_padding_repeated_twice) if mode != "zeros" else ()
        if layer.owns_params:  # code that reads the module's weight/bias (e.g. MultiheadAttention's out_proj)
            self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.calls = 0

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.pre_pad:
            x = F.pad(x, self.pre_pad, mode=self.padding_mode)
        self.calls += 1
        return self.compute(x, args, kwargs)

    def int8_functional(self, input: Tensor, weight: Tensor, bias=None, stride=1, padding=0, dilation=1, groups=1,
                        output_padding=0):
        self.calls += 1
        return self.compute(input, (weight, bias, stride, padding, dilation, groups, output_padding), {})

    def compute(self, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        raise NotImplementedError


class _StaticGeometry(StandIn):
    """A stand-in with the calibrated geometry: ONNX attributes (pads as begins + ends)."""

    def __init__(self, layer: Int8Layer, site: StaticSite) -> None:
        super().__init__(layer)
        spec = site.cal.spec
        if spec is not None:
            self.strides, self.dilations, self.groups = list(spec.stride), list(spec.dilation), spec.groups
            self.pads = [lo for lo, _ in spec.padding] + [hi for _, hi in spec.padding]
            self.output_padding = list(spec.output_padding) if spec.transposed else [0] * spec.dims
        else:
            self.strides, self.dilations, self.groups, self.pads, self.output_padding = [], [], 1, [], []


class FaithfulSite(_StaticGeometry):
    """The QDQ op on static INT8 weights and scales (buffers, so they become initializers)."""

    def __init__(self, layer: Int8Layer, site: StaticSite) -> None:
        super().__init__(layer, site)
        self.register_buffer("w_int8", site.w_int8.clone())
        self.register_buffer("w_scale", site.w_scale.clone())
        self.register_buffer("w_zero_point", torch.zeros(site.w_scale.numel(), dtype=torch.int8))
        self.register_buffer("x_scale", torch.tensor(site.x_scale, dtype=torch.float32))
        self.register_buffer("x_zero_point", torch.zeros((), dtype=torch.int8))
        self.register_buffer("qdq_bias", None if site.bias is None else site.bias.clone())

    def compute(self, x, args, kwargs):
        kind = ("conv_transpose" if self.transposed else "conv") if self.dims else ("gemm" if x.dim() == 2 else "matmul")
        x = x if x.dtype == torch.float32 else x.float()  # (a no-op .float() would be a Cast in the graph)
        return qdq_gemm(x, self.x_scale, self.x_zero_point, self.w_int8, self.w_scale, self.w_zero_point,
                        self.qdq_bias, kind, self.strides, self.pads, self.dilations, self.groups, self.output_padding)


class FloatSite(_StaticGeometry):
    """A float conv/linear on the dequantized INT8 weights: the FP32 graph the deploy form quantizes."""

    def __init__(self, layer: Int8Layer, site: StaticSite) -> None:
        super().__init__(layer, site)
        self.register_buffer("dequantized_weight", dequantize_weight(site.w_int8, site.w_scale, self.transposed))
        self.register_buffer("float_bias", None if site.bias is None else site.bias.clone())
        if not self.dims:  # a linear over tokens runs as a 1x1 conv1d / conv2d (`compute`): its weight in
            for nd in (1, 2):  # those shapes, as constants (the deploy form finds a site's node by its weight)
                w = self.dequantized_weight
                self.register_buffer(f"pointwise_weight_{nd}d", w.reshape(*w.shape, *([1] * nd)).clone())

    def compute(self, x, args, kwargs):
        x = x if x.dtype == torch.float32 else x.float()
        if not self.dims:
            if x.dim() not in (3, 4) or torch.jit.is_tracing():
                return F.linear(x, self.dequantized_weight, self.float_bias)
            # a linear over tokens (ConvNeXt's channels-last MLP, a transformer block's) as the 1x1 conv it
            # is, on the channels moved to dim 1 and back: its bias is then an int32 of the accumulator
            # (QLinearConv), as a 2-d input's is (QGemm). Exported as it is (MatMul, then an Add of the bias)
            # the quantizer rounds the bias to int8 codes with one scale for all channels; as a reshape to
            # rows of one GEMM, the exporters read the input's shape. Transposes read no shape, whatever dim
            # the batch is. Not for the TorchScript exporter, which writes every size the model's own code
            # reads (a .view() of the output) as a Shape node: onnxruntime moves those through the transpose
            # onto the quantized output, whose int8 codes then no longer become its fast uint8 kernels'.
            nd = x.dim() - 2
            to_channels, back = ((0, 2, 1), (0, 2, 1)) if nd == 1 else ((0, 3, 1, 2), (0, 2, 3, 1))
            conv = F.conv1d if nd == 1 else F.conv2d  # (explicit dims: TorchScript writes movedim's -1 as is)
            y = conv(x.permute(to_channels), getattr(self, f"pointwise_weight_{nd}d"), self.float_bias)
            return y.permute(back).contiguous()  # (as F.linear's: code after it may .view() it)
        if self.transposed:
            return conv_transpose_nd(x, self.dequantized_weight, self.float_bias, self.strides, self.pads,
                                     self.dilations, self.groups, self.output_padding)
        return conv_nd(x, self.dequantized_weight, self.float_bias, self.strides, self.pads, self.dilations,
                       self.groups)


class DynamicFloatSite(StandIn):
    """A functional site's own float call on the weight the model computes from its input: no static INT8
    form exists for it. (A module site computes with its parameters, which are always static.)"""

    def compute(self, x, args, kwargs):
        names = ("weight", "bias", "stride", "padding", "dilation", "groups", "output_padding")
        call = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
        return float_call(self.dims, self.transposed, x, **call)


class NotCalibrated(nn.Module):
    """Stands in for a site the calibration forward never called: if the export trace reaches it after all,
    the model's eval-mode forward and its traced forward differ, and no static scale exists for it."""

    def __init__(self, site_name: str) -> None:
        super().__init__()
        self.site_name = site_name

    def forward(self, *args, **kwargs):
        from .errors import OnnxExportError

        raise OnnxExportError(f"INT8 site '{self.site_name}' is used by the traced forward but was never called "
                              "by the eval-mode calibration forward, so it has no static activation scale")

    int8_functional = forward


def swap_layers(root: nn.Module, standins: dict[str, nn.Module]) -> None:
    """Replace every Int8Layer in `root` (under all its names, shared ones too) by its stand-in, or by
    `NotCalibrated` when there is none."""
    for _, mod in list(root.named_modules(remove_duplicate=False)):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Int8Layer):
                setattr(mod, child_name, standins.get(child.site_name) or NotCalibrated(child.site_name))


def export_copy(qmodel: nn.Module, make: Callable[[Int8Layer], nn.Module | None]) -> nn.Module:
    """A CPU copy of `qmodel` in eval mode with each site replaced by `make(its layer in the copy)`."""
    em = copy.deepcopy(qmodel).cpu()
    standins: dict[str, nn.Module] = {}
    for m in em.modules():
        if isinstance(m, Int8Layer) and m.site_name not in standins:
            s = make(m)
            if s is not None:
                standins[m.site_name] = s
    swap_layers(em, standins)
    if isinstance(em, Int8Layer):  # a converted bare module (nn.Conv2d itself): the model is its one site
        em = standins.get(em.site_name) or NotCalibrated(em.site_name)
    return em.eval()


def probe(em: nn.Module, args: tuple) -> tuple[dict[str, int], object]:
    """One eager forward of the export copy: (calls per site, what it returned)."""
    standins = {m.site_name: m for m in em.modules() if isinstance(m, StandIn)}
    for m in standins.values():
        m.calls = 0
    with torch.no_grad(), no_fused_fastpath():
        out = em(*args)
    calls = {name: m.calls for name, m in standins.items()}
    for m in standins.values():
        m.calls = 0
    return calls, out


def export_with_standins(qmodel: nn.Module, site_class: type, statics: dict[str, StaticSite], dynamic: set[str],
                         args: tuple, *, exporter: str, opset: int, input_names, output_names, dynamic_batch: bool):
    """The first step of both forms: export a copy of `qmodel` whose calibrated sites are `site_class`
    stand-ins (FaithfulSite or FloatSite) and whose input-dependent sites are float.
    With a dynamic batch, the copy must compute an input alone as it does in a batch
    (`batch_size.refuse_batch_dependent_code`, on a copy with `FloatSite`s).
    Returns (ONNX model, exporter used, {site: calls in one forward}, input names)."""
    def copy_with(cls: type) -> nn.Module:
        def make(layer: Int8Layer):
            if layer.site_name in statics:
                return cls(layer, statics[layer.site_name])
            return DynamicFloatSite(layer) if layer.site_name in dynamic else None

        return export_copy(qmodel, make)

    em = copy_with(site_class)
    calls, returned = probe(em, args)
    if dynamic_batch:
        refuse_batch_dependent_code(em if site_class is FloatSite else copy_with(FloatSite), args)
    in_names, out_names = io_names(args, returned, input_names, output_names)
    model, used = export_graph(em, args, exporter=exporter, opset=opset, input_names=in_names,
                               output_names=out_names, dynamic_batch=dynamic_batch)
    clean(model)
    return model, used, {s: calls.get(s, 0) for s in statics}, in_names


def io_names(args: tuple, returned, input_names, output_names) -> tuple[list[str], list[str]]:
    """"input"/"output" for one of each, else "input0", "input1", ... unless the caller named them: one name
    alone (a string) names the one input or output, and a list must name each of them (torch's exporters
    would name the first few and number the rest, or drop the extra names, without a word). The outputs are
    the tensors of what the model returned, in the order the exporters flatten it; those of a dict are
    named after their keys ("out", "aux"; "output0.boxes" for a list of dicts), not after graph nodes."""
    n_in = sum(hasattr(a, "shape") for a in args)
    ins = _names("input", input_names, n_in)
    paths, keyed = _output_paths(returned)
    outs = _names("output", output_names, len(paths), paths if keyed else None)
    return ins, outs


def _output_paths(returned) -> tuple[list[str], bool]:
    """(a name per tensor of `returned`: its path of dict keys and positions, a top-level position as
    "output<i>"; whether any path holds a dict key)."""
    from torch.utils._pytree import tree_flatten_with_path

    paths, keyed = [], False
    for path, leaf in tree_flatten_with_path(returned)[0]:
        if not isinstance(leaf, Tensor):
            continue
        keyed = keyed or any(hasattr(k, "key") for k in path)
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if parts and hasattr(path[0], "idx"):
            parts[0] = f"output{parts[0]}"
        paths.append(".".join(parts))
    return paths, keyed


def _names(kind: str, given, n: int, keyed: list[str] | None = None) -> list[str]:
    if given is None:
        if keyed and len(set(keyed)) == n and all(keyed):
            return keyed
        return [f"{kind}{i}" if n > 1 else kind for i in range(n)]
    names = [given] if isinstance(given, str) else list(given)
    if len(names) != n or not all(isinstance(x, str) and x for x in names) or len(set(names)) != len(names):
        raise ValueError(f"{kind}_names={given!r}: the model has {n} tensor {kind}(s); give one distinct, non-empty "
                         f"name for each")
    return names
