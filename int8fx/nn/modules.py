"""`Int8Layer`: the module a conv/linear call site becomes, holding its quantization state.

One class for Conv1d/2d/3d and Linear, whether the site was a module (the layer owns `weight`/`bias`
under the original names, so state_dicts load both ways) or a functional call (`F.conv2d`, `F.linear`:
weight and bias arrive as forward arguments). Quantizer state lives in buffers of this module and of
its `grad_quantizer` child; they are optional when loading, so an FP32 checkpoint loads strictly.
"""
from __future__ import annotations

import functools
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import Int8Config
from ..kernels.im2col import GemmSpec
from ..quant.grad import make_grad_quantizer, optional_buffers_on_load
from .functional import Int8GemmFunction

_CONV_TYPES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
# state every Int8Layer adds beyond the original parameters; loading tolerates its absence
QUANT_STATE_KEY = re.compile(r"(^|\.)(grad_quantizer\.[^.]+|step|act_clip|act_clip_ema|deviation)$")


def _tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


@functools.lru_cache(maxsize=1024)
def make_spec(dims: int, kernel: tuple, stride, padding, dilation, groups: int) -> GemmSpec:
    """Resolve conv arguments (ints, tuples, 'same', 'valid') to a GemmSpec with explicit zero padding."""
    if dims == 0:
        return GemmSpec(0)
    stride, dilation = _tuple(stride, dims), _tuple(dilation, dims)
    if padding == "valid":
        pads = ((0, 0),) * dims
    elif padding == "same":
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions (as in PyTorch)")
        pads = tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(dilation, kernel))
    elif isinstance(padding, str):
        raise ValueError(f"padding must be 'same', 'valid', an int or a tuple, got {padding!r}")
    else:
        pads = tuple((p, p) for p in _tuple(padding, dims))
    return GemmSpec(dims, tuple(kernel), stride, pads, dilation, int(groups))


class Int8Layer(nn.Module):
    """INT8-training replacement of one conv/linear site.

    dims: 0 for linear, 1/2/3 for convolutions. For functional sites `weight`/`bias` are None here and
    are passed to `forward`.
    """

    def __init__(self, dims: int, out_channels: int, *, config: Int8Config, name: str = "", index: int = 0,
                 weight: nn.Parameter | None = None, bias: nn.Parameter | None = None, stride=1, padding=0,
                 dilation=1, groups: int = 1, padding_mode: str = "zeros", pre_pad: tuple = (), source: str = "module"):
        super().__init__()
        self.dims, self.out_channels = dims, out_channels
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode, self.pre_pad, self.source = padding_mode, tuple(pre_pad), source
        self.config, self.site_name, self.index = config, name, index
        self.backend_choice = config.backend
        self.tracks_deviation = False
        self.rounding_stream = 0  # set per DDP rank by int8fx.distributed.QuantStateSync (plain attribute)
        self.owns_params = weight is not None
        if weight is not None:
            self.weight = weight
            self.bias = bias
        self.grad_quantizer = make_grad_quantizer(config.grad_quant, out_channels, config)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("act_clip", torch.zeros(()))
        self.register_buffer("act_clip_ema", torch.zeros(()))
        self.register_buffer("deviation", torch.zeros(()))

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_module(cls, mod: nn.Module, name: str, config: Int8Config, index: int) -> "Int8Layer":
        if isinstance(mod, nn.Linear):
            return cls(0, mod.out_features, config=config, name=name, index=index, weight=mod.weight, bias=mod.bias)
        dims = _CONV_TYPES[type(mod)] if type(mod) in _CONV_TYPES else _conv_dims(mod)
        pre_pad, padding = (), mod.padding
        if mod.padding_mode != "zeros":
            pre_pad, padding = tuple(mod._reversed_padding_repeated_twice), 0
        return cls(dims, mod.out_channels, config=config, name=name, index=index, weight=mod.weight, bias=mod.bias,
                   stride=mod.stride, padding=padding, dilation=mod.dilation, groups=mod.groups,
                   padding_mode=mod.padding_mode, pre_pad=pre_pad)

    # ----------------------------------------------------------------- forward
    def spec_for(self, weight: Tensor) -> GemmSpec:
        padding = self.padding if isinstance(self.padding, str) else _tuple(self.padding, max(self.dims, 1))
        return make_spec(self.dims, tuple(weight.shape[2:]), _tuple(self.stride, max(self.dims, 1)), padding,
                         _tuple(self.dilation, max(self.dims, 1)), self.groups)

    def forward(self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        if self.owns_params:
            weight, bias = self.weight, self.bias
        elif weight is None:
            raise TypeError(f"{self.site_name}: a functional INT8 site needs the weight as an argument")
        self._check_input(x, weight)
        if self.pre_pad:
            x = F.pad(x, self.pre_pad, mode=self.padding_mode)
        return Int8GemmFunction.apply(x, weight, bias, self.spec_for(weight), self)

    def call_functional(self, input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                        dilation=1, groups=1) -> Tensor:
        """An F.linear/F.conv*d call seen inside opaque code (see `int8fx.nn.scope`): the geometry is only
        known from the call itself, so it is taken from there."""
        if self.dims:
            self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        return self(input, weight, bias)  # through __call__, so module hooks see scoped sites too

    def _check_input(self, x: Tensor, weight: Tensor) -> None:
        want = self.dims + 2
        if self.dims and x.dim() not in (want, want - 1):
            raise ValueError(f"{self.site_name}: Conv{self.dims}d expects a {want}-d input, got shape {tuple(x.shape)}")
        if self.dims and x.dim() == want - 1:
            raise ValueError(f"{self.site_name}: unbatched input {tuple(x.shape)}: add a batch dimension")
        k_in = weight.shape[1] * (self.groups if self.dims else 1)
        c = x.shape[1] if self.dims else x.shape[-1]
        if c != k_in:
            raise ValueError(f"{self.site_name}: expected {k_in} input channels/features, got {c} (input {tuple(x.shape)})")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{self.site_name}: INT8 training needs a floating-point input, got {x.dtype}")

    # ----------------------------------------------------------------- hooks called by the autograd op
    def eval_act_clip(self) -> Tensor | None:
        """The activation clip this layer quantizes with in eval mode, None for each batch's own absmax
        (`Int8Config.eval_act_clip`); ONNX export's default calibration takes the same. A layer that never
        trained has act_clip_ema 0, which means the batch absmax too (`quantized_forward` picks on the
        device, with no host sync)."""
        return self.act_clip_ema if self.config.eval_act_clip == "ema" else None

    def static_act_clip(self) -> Tensor | None:
        """The static activation clip of the current forward: `eval_act_clip()` in eval mode, None (the
        batch absmax) in training."""
        return None if self.training else self.eval_act_clip()

    def observe_forward(self, s_x: Tensor) -> None:
        if self.training:
            with torch.no_grad():
                clip = s_x.detach() * 127
                if torch.isfinite(clip):
                    first = self.act_clip_ema == 0
                    self.act_clip_ema.copy_(torch.where(first, clip, 0.9 * self.act_clip_ema + 0.1 * clip))
                self.act_clip.copy_(clip)

    def observe_backward(self, poison: Tensor) -> None:
        """Count backward passes with finite gradients: a step that a loss scaler skips leaves no trace
        (the stochastic-rounding stream is keyed on this count). `poison` is 0 or NaN (`nonfinite_poison`);
        the comparison keeps the count on the device, without a sync."""
        self.step += (poison == 0).long()

    def observe_deviation(self, d: Tensor) -> None:
        if torch.isfinite(d):
            self.deviation.copy_(d)

    def grad_rounding(self) -> tuple[str, torch.Generator | None]:
        """Rounding mode for gradients and, for stochastic rounding, a generator seeded from (config seed,
        layer index, step, rounding stream): reproducible, and resumable from the `step` buffer alone.
        The stream (the DDP rank) keeps ranks from drawing the same noise for their shards, which would
        correlate their rounding errors (correlation 1/2) instead of averaging them out."""
        if self.config.rounding == "nearest":
            return "nearest", None
        gen = torch.Generator(device=self.step.device)
        gen.manual_seed((self.config.seed * 1_000_003 + self.index * 7_919 + int(self.step)
                         + self.rounding_stream * 0x9E3779B1) % (2**63))  # CPU generators keep 32 bits
        return "stochastic", gen

    # ----------------------------------------------------------------- state_dict compatibility
    _load_from_state_dict = optional_buffers_on_load(nn.Module._load_from_state_dict)

    def extra_repr(self) -> str:
        kind = "Linear" if self.dims == 0 else f"Conv{self.dims}d"
        return (f"{kind}(out={self.out_channels}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}), source={self.source}, grad_quant={self.config.grad_quant!r}")


def _conv_dims(mod: nn.Module) -> int:
    for t, d in _CONV_TYPES.items():
        if isinstance(mod, t):
            return d
    raise TypeError(f"not a convolution: {type(mod).__name__}")


def float_state_dict(qmodel: nn.Module) -> dict:
    """The converted model's state_dict without int8fx's quantizer state: loads strictly into the FP32 model."""
    prefixes = tuple(f"{n}." if n else "" for n, m in qmodel.named_modules() if isinstance(m, Int8Layer))
    return {k: v for k, v in qmodel.state_dict().items()
            if not any(k.startswith(p) and QUANT_STATE_KEY.search(k[len(p):]) for p in prefixes)}
