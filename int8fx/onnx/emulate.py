"""`deploy_numerics`: the converted model computes what its deploy ONNX file computes, to measure and to train.

The deploy file rounds where `qmodel.eval()` keeps floats: at site outputs, biases, residual Adds,
Concats of maps, average poolings, and at -128 steps on site inputs (`roundings.py` reads them from the file,
and refuses a file that rounds anywhere else). Inside
`with deploy_numerics(qmodel, path):` the model rounds there too, at the file's scales and with the file's
int32 biases. In eval mode it then computes the file's numbers: the predictions of four Fashion-MNIST models
agree with onnxruntime's on 99.5-100% of 10,000 test images (RESULTS.md, "The deploy file in PyTorch").
It follows files of both targets: each rounding's scale is read from the file, and the onnxruntime target's
ReLUs on codes (`int8_ops.relus_on_codes`) are exact.
In training mode the roundings are straight-through (the gradient passes where a value is not saturated)
and the biases train as floats (BatchNorm normalizes with batch statistics): fine-tuning inside teaches
the model the file's rounding; export it again afterwards, which recalibrates.

How: site outputs are rounded by forward hooks on the sites; the -128 step is added inside each site call
(`observe_int8_calls`: conv(d, W_int8) s_x s_w, d = -1 where the input rounds to -128 steps or below, an
exact integer conv in fp32, so int8fx's own kernels and their -127 stay untouched); BatchNorm calls (the
fold), residual Adds, concatenations and average poolings are caught by a TorchFunctionMode while the model
runs. A BatchNorm folds into a site when it reads the site's output tensor itself, as torch's exporters fold
it. Adds (4-d or 5-d tensors of one shape, outside the sites), concatenations of 4-d or 5-d tensors and
poolings (and means over any dims) are matched to the file's nodes in execution order, and every forward of
the model must make exactly as many as the file holds, else `DeployNumericsError`: a file of another model,
or a forward that takes another path than the exported one, is never emulated silently wrong. Only the
model's own forward is touched: not a backward pass or an optimizer step run in the block.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ..nn.modules import Int8Function, Int8Layer, float_call, in_backward
from ..observe import observe_int8_calls
from ..passes import conversion_of
from ..quant.core import scale_from_clip
from .calibrate import weight_codes
from .roundings import ROUNDING_KINDS, Roundings, read_roundings, select

_ADDS = frozenset({torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__,
                   torch.Tensor.add_})
_IN_PLACE = frozenset({torch.Tensor.__iadd__, torch.Tensor.add_})
_CATS = frozenset({torch.cat, torch.concat, torch.concatenate})
# what reads a tensor's shape or attributes, not its values (BatchNorm checks its input's dim() first)
_METADATA = frozenset({"__get__", "dim", "size", "numel", "stride", "is_contiguous", "is_floating_point", "__len__",
                       "element_size", "get_device", "data_ptr", "storage_offset", "is_complex", "nelement"})
_POOLS = frozenset({F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.avg_pool1d, F.avg_pool2d,
                    F.avg_pool3d})


class DeployNumericsError(RuntimeError):
    """The model and the deploy file do not match: another model's file, or a forward that makes other
    residual Adds, concatenations or poolings than the exported one."""


# what the forward's matched ops are called in errors, by kind
_MATCHED = {"adds": "residual Adds", "concats": "concatenations", "pools": "average poolings"}


def round_like_onnx(x: torch.Tensor, scale: float) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear, int8 with zero point 0 (saturating at -128 and 127, ties to
    even); straight-through where autograd records (the gradient passes where x is not saturated)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def _round_at(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    return x if scale is None else round_like_onnx(x, scale)


@contextlib.contextmanager
def deploy_numerics(qmodel: nn.Module, path, roundings=ROUNDING_KINDS):
    """Within the block, `qmodel` rounds where its deploy ONNX file at `path` rounds (module docstring): in
    eval mode it computes the file's numbers, in training mode it trains through the file's roundings.

        int8fx.export_onnx(qm, x, "model.onnx", form="deploy", calibration_data=batches)
        with int8fx.deploy_numerics(qm, "model.onnx"):
            for x, y in loader: ...                  # fine-tune through the deploy rounding
        int8fx.export_onnx(qm, x, "model.onnx", form="deploy", calibration_data=batches)

    `roundings` picks which of the file's kinds of rounding to make ("outputs": site outputs, "biases":
    int32 biases, "adds": residual Adds' operands and output, "concats": the inputs and output of
    Concats of feature maps, "pools": average poolings' inputs, "inputs": site inputs saturating at -128
    steps), the others
    kept as `qmodel.eval()` computes them: how much agreement with `qmodel.eval()` each costs, one at a time
    (`benchmarks/deploy_emulation.py --by-rounding`). With none, the model computes exactly `qmodel.eval()`.

    Raises ValueError when `qmodel` is no converted model, the file is no deploy form, its sites are not
    the model's, or `roundings` names another kind; DeployNumericsError when a forward makes other Adds,
    concatenations or poolings than the file holds, or an eval-mode site quantizes its input at another
    scale than the file's."""
    if conversion_of(qmodel) is None:
        raise ValueError("deploy_numerics() needs a model returned by int8fx.convert()")
    roundings = select(read_roundings(path), roundings)
    layers = {m.site_name: m for m in qmodel.modules() if isinstance(m, Int8Layer)}
    unknown = sorted((set(roundings.outputs) | set(roundings.biases)) - set(layers))
    if unknown:
        raise ValueError(f"{os.fspath(path) if not hasattr(path, 'graph') else 'the ONNX model'} has INT8 sites this "
                         f"model does not ({_listed(unknown)}): it was exported from another model")
    mode = _DeployRounding(roundings, layers, qmodel)
    try:
        with mode, observe_int8_calls(qmodel, mode.site_call):
            yield
    finally:
        mode.remove()


@dataclass
class _Output:
    """A site's output on its way to its readers."""
    ref: weakref.ref                     # the tensor the site returned
    site: str
    unbiased: torch.Tensor | None        # the output with its float bias, where the file's bias replaced it
    float_bias: torch.Tensor | None
    rounded: torch.Tensor | None = None  # what every reader but a folding BatchNorm gets


class _DeployRounding(TorchFunctionMode):
    """The roundings of `Roundings` on a running forward (see the module docstring).

    A site's output is rounded where it is first read: by the BatchNorm that folds into it (which rounds its
    own output, with the file's folded bias), else by whatever reads it (a function, a site), all readers
    sharing one rounded copy, as all readers of a QuantizeLinear share its DequantizeLinear."""

    def __init__(self, roundings: Roundings, layers: dict[str, Int8Layer], root: nn.Module) -> None:
        super().__init__()
        self.r = roundings
        # only the model's forward is emulated: not a backward pass (int8fx's own kernels), an optimizer's
        # step (its in-place adds on weights), or other code run inside the block
        self.forwarding = 0
        self.inside = 0          # > 0 while a site computes: its own arithmetic is not the model's
        self.waiting: dict[int, _Output] = {}  # id(a site's output) -> it, until its readers have it rounded
        self.made = dict.fromkeys(_MATCHED, 0)  # matched ops the forward made so far, by kind
        self.hooks = []
        self.seen: set[str] = set()
        self.hooks.append(root.register_forward_pre_hook(self._start))
        self.hooks.append(root.register_forward_hook(self._stop, always_call=True))
        for layer in layers.values():
            self.hooks.append(layer.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.hooks.append(layer.register_forward_hook(self._leave, with_kwargs=True))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.waiting.clear()

    def _start(self, root, args):
        if not self.forwarding:
            self.made = dict.fromkeys(_MATCHED, 0)
        self.forwarding += 1

    def _stop(self, root, args, out):
        """After each forward: it made the file's Adds, concatenations and poolings, no more, no fewer (an
        `out` of None: the forward raised, and that error is the one to see)."""
        self.forwarding -= 1
        if self.forwarding:
            return
        self.waiting.clear()  # (a new forward's outputs are new tensors)
        for kind, what in _MATCHED.items():
            made, held = self.made[kind], len(getattr(self.r, kind))
            if made != held and out is not None:
                raise DeployNumericsError(f"the forward made {made} {what}, the deploy file holds {held}: the file "
                                          "is another model's, or the forward took another path than the exported one")

    def _active(self) -> bool:
        return self.forwarding > 0 and self.inside == 0 and not in_backward()

    def _enter(self, layer, args, kwargs):
        self.inside += 1
        if self.inside == 1 and self.waiting and self.forwarding and not in_backward():
            return tree_map(self._rounded, (tuple(args), kwargs))  # a site reading another site's output
        return None

    def _leave(self, layer, args, kwargs, out):
        self.inside -= 1
        name = layer.site_name
        if not self._active():
            return None
        self.seen.add(name)
        if not isinstance(out, torch.Tensor) or (name not in self.r.outputs and name not in self.r.biases):
            return None
        self.waiting = {k: v for k, v in self.waiting.items() if v.ref() is not None}  # forget outputs now gone
        own = _float_bias(layer, args, kwargs)
        bias = None if layer.training else self.r.biases.get(name)  # (training: the bias trains as a float)
        read = out
        if bias is not None:  # the file's int32 bias in place of the float one (a BatchNorm that folds in
            shape = (1, -1) + (1,) * (out.dim() - 2) if layer.dims else (-1,)  # reads `out` instead, with the
            # file's folded bias; a linear's channels are its last dim)
            read = out + (bias.to(out.device) - (own if own is not None else 0)).view(shape)
        self.waiting[id(read)] = _Output(weakref.ref(read), name, out if read is not out else None, own)
        return read

    def site_call(self, layer, x, weight, bias, out, geometry):
        """An eval-mode site call's output as the file computes it. Its input must be quantized at the file's
        scale, else the emulation would be another file's: refused. Where the input saturates at -128 steps
        (module docstring, 5), `out` plus conv(d, W_int8) s_x s_w, d = -1 where x rounds to -128 steps or
        below. (A training forward quantizes at the batch's absmax, where nothing saturates, as the file's
        scales do not matter to training through its roundings.)"""
        name = layer.site_name
        if name not in self.r.input_scales or layer.training or not self.forwarding or in_backward():
            return None
        clip = layer.eval_act_clip()
        s_x = scale_from_clip(clip.detach()).to(x.device) if clip is not None else None
        _check_input_scale(name, self.r.input_scales[name], s_x)
        if not self.r.saturate_inputs:
            return None
        low = (x.detach().float() / s_x).round() <= -128
        if not bool(low.any()):
            return None
        stride, padding, dilation, groups, output_padding = geometry
        w_q, s_w = weight_codes(weight, layer.is_transposed, groups)
        self.inside += 1  # (these convs are not the model's)
        try:
            acc = float_call(layer.dims, layer.is_transposed, -low.float(), w_q.float().to(x.device), None, stride,
                             padding, dilation, groups, output_padding)
        finally:
            self.inside -= 1
        shape = (1, -1) + (1,) * layer.dims if layer.dims else (-1,)
        return out + (acc * (s_x * s_w.to(x.device)).view(shape)).to(out.dtype)

    def _output(self, t):
        entry = self.waiting.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry if entry is not None and entry.ref() is t else None

    def _rounded(self, t):
        """`t` as its readers see it: rounded (with the file's bias) if it is a site's output."""
        entry = self._output(t)
        if entry is None:
            return t
        if entry.rounded is None:
            scale = self.r.outputs.get(entry.site)
            entry.rounded = round_like_onnx(t, scale) if scale is not None else t
        return entry.rounded

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._active():
            return func(*args, **kwargs)
        target = args[0] if args else None  # (what an in-place add writes to, before any rounding)
        if self.waiting and getattr(func, "__name__", "") not in _METADATA:
            if func is F.batch_norm and args:
                entry = self._output(args[0])
                if entry is not None and entry.rounded is None and entry.site not in self.r.unfolded:
                    del self.waiting[id(args[0])]
                    unbiased = entry.unbiased if entry.unbiased is not None else args[0]
                    return self._folded_batch_norm(func, (unbiased, *args[1:]), kwargs, entry.site, entry.float_bias)
            args, kwargs = tree_map(self._rounded, (tuple(args), kwargs))
        if func in _ADDS and _residual(args) and not kwargs:  # (x + y, not x + alpha * y or out=)
            out = self._add(args)
            if func not in _IN_PLACE:
                return out
            # `y += x` on a site's output: y holds the Add's result now, which its readers must get, not the
            # site's rounded output from before
            self.waiting.pop(id(target), None)
            return target.copy_(out)
        if _is_concat(func, args):
            return self._concat(func, args, kwargs)
        if _is_pool(func, args, kwargs):
            scale = self._next("pools")
            if scale is not None:
                return func(round_like_onnx(args[0], scale), *args[1:], **kwargs)
        return func(*args, **kwargs)

    def _folded_batch_norm(self, func, args, kwargs, site: str, own):
        out = func(*args, **kwargs)
        bias = self.r.biases.get(site)
        params = dict(zip(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                          args), **kwargs)
        if bias is not None and not params.get("training", False):
            g = params["running_var"].add(params.get("eps", 1e-5)).rsqrt()
            if params.get("weight") is not None:
                g = g * params["weight"]
            folded = g * ((own if own is not None else 0) - params["running_mean"])
            if params.get("bias") is not None:
                folded = folded + params["bias"]
            out = out + (bias.to(out.device) - folded).view(1, -1, *([1] * (out.dim() - 2)))
        scale = self.r.outputs.get(site)
        return round_like_onnx(out, scale) if scale is not None else out

    def _add(self, args):
        scales = self._next("adds")
        if scales is None:  # (`roundings` without "adds")
            return args[0] + args[1]
        s_a, s_b, s_out = scales  # (None: a float operand or output)
        return _round_at(_round_at(args[0], s_a) + _round_at(args[1], s_b), s_out)

    def _concat(self, func, args, kwargs):
        scales = self._next("concats")
        if scales is None:  # (`roundings` without "concats")
            return func(*args, **kwargs)
        ins, s_out = scales
        if len(ins) != len(args[0]):
            raise DeployNumericsError(f"the forward concatenates {len(args[0])} tensors where the deploy file's Concat "
                                      f"number {self.made['concats']} has {len(ins)} inputs: the file is another "
                                      "model's, or the forward took another path than the exported one")
        return _round_at(func([_round_at(t, s) for t, s in zip(args[0], ins)], *args[1:], **kwargs), s_out)

    def _next(self, kind: str):
        """The file's next op of `kind` (adds, concats, pools) in execution order: its scales."""
        held = getattr(self.r, kind)
        if self.made[kind] == len(held):
            raise DeployNumericsError(f"the forward makes more {_MATCHED[kind]} than the {len(held)} the deploy file "
                                      "holds")
        self.made[kind] += 1
        return held[self.made[kind] - 1]

    def __exit__(self, *exc):
        self.inside = self.forwarding = 0  # (a forward that raised inside a site)
        unseen = sorted((set(self.r.outputs) | set(self.r.biases)) - self.seen) if self.seen else []
        self.made = dict.fromkeys(_MATCHED, 0)
        self.seen = set()
        self.waiting.clear()
        result = super().__exit__(*exc)
        if unseen and exc[0] is None:
            raise DeployNumericsError(f"INT8 site(s) {_listed(unseen)} of the deploy file ran without a call of their module "
                                      "(routed from library code such as nn.MultiheadAttention), or not at all: "
                                      "their output rounding cannot be emulated")
        return result


def _check_input_scale(site: str, in_file: float, s_x: torch.Tensor | None) -> None:
    """The site quantizes its input at the file's scale (to a few float ulps: the file moves scales one ulp
    apart where two quantizers would share one), else DeployNumericsError naming the likely cause."""
    if s_x is not None and float(s_x) > 0 and abs(float(s_x) - in_file) <= 1e-6 * in_file:
        return
    if s_x is not None and float(s_x) > 0:
        how = (f"at a scale of {float(s_x):.6g} (its running clip)", "a file exported with calibration='inputs', or "
               "a model trained since the export: export the file from this model with calibration='eval' (the "
               "default)")
    else:
        how = ("at each batch's absmax", "the site has no running clip (it never trained, or "
               "Int8Config(eval_act_clip='batch')): train the model before the export")
    raise DeployNumericsError(f"site {site!r} quantizes its input {how[0]}, the deploy file at {in_file:.6g}, so "
                              f"deploy_numerics cannot compute this file's numbers: {how[1]}")


def _listed(names: list[str]) -> str:
    return ", ".join(map(repr, names[:5])) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _float_bias(layer: Int8Layer, args: tuple, kwargs: dict):
    """The float bias a site call adds: a module site's own, a functional site's argument."""
    if isinstance(layer, Int8Function):
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
    else:
        bias = getattr(layer, "bias", None)
    return bias.detach() if isinstance(bias, torch.Tensor) else None


def _residual(args) -> bool:
    """A residual Add as the file holds one: two feature maps of one shape, of 2-d convs (4-d tensors) or
    3-d convs (5-d: volumes, video). Not 3-d tensors, where token adds (a position embedding) that the file
    leaves float would be counted too."""
    return (len(args) == 2 and all(isinstance(a, torch.Tensor) for a in args) and args[0].dim() in (4, 5)
            and args[0].shape == args[1].shape)


def _is_concat(func, args) -> bool:
    """A concatenation of feature maps (4-d or 5-d tensors), as the file holds a Concat of them."""
    return (func in _CATS and bool(args) and isinstance(args[0], (list, tuple)) and len(args[0]) > 0
            and all(isinstance(t, torch.Tensor) for t in args[0]) and args[0][0].dim() in (4, 5))


def _is_pool(func, args, kwargs) -> bool:
    """An average pooling or a mean, each of which the file holds as one (Global)AveragePool or ReduceMean:
    F.adaptive_avg_pool*d / F.avg_pool*d, or a mean over any dims (timm's fast global pooling over (2, 3),
    ConvNeXt's over a channels-last map's (1, 2), a mean of tokens)."""
    if func in _POOLS:
        return True
    return func in (torch.mean, torch.Tensor.mean) and bool(args) and isinstance(args[0], torch.Tensor)
