"""`Int8Layer`: what a conv/linear call site becomes, and the quantization state it holds.

Two kinds of site share this one class (as a mixin), so the autograd op never asks which it serves:
  * a **module site**: the user's own `nn.Conv1d/2d/3d` / `nn.Linear` object (or a subclass that keeps
    their forward), whose class is swapped in place for its twin `Int8Conv2d(Int8Layer, nn.Conv2d)` (see
    `int8fx.nn.twins`). Parameters, hooks, attributes and identity stay the user's; `isinstance(m,
    nn.Conv2d)` still holds.
  * an **`Int8Function`**: a small module that stands for one `F.conv*d` / `F.linear` call in a module's
    own code (`int8fx.passes.rewrite` installs it) or in code torch.fx cannot trace (`int8fx.nn.scope`
    routes the call to it). Weight, bias and geometry arrive with each call.
Either way the computation is `int8_functional(input, weight, bias, stride, padding, dilation, groups)`.
Quantizer state lives in buffers of the site and of its `grad_quantizer` child; they are optional when
loading, so an FP32 checkpoint loads strictly.

`Int8Config.quantize=False` makes every site compute exactly what the original call computes (the
module's own forward, or the original function): the pass-through that proves a conversion exact.
"""
from __future__ import annotations

import re
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Proxy

from ..config import Int8Config
from ..kernels.im2col import GemmSpec
from ..quant.grad import Float32State, PolicyParams, make_grad_quantizer, optional_buffers_on_load
from .functional import int8_gemm, out_channels, spec_to_ints
from .state import PendingState, track, untrack
from .twins import refuse_torchscript, traced_call

CONV_TYPES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
TRANSPOSED_TYPES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
SITE_TYPES = (nn.Linear,) + tuple(CONV_TYPES) + tuple(TRANSPOSED_TYPES)
# state every Int8Layer adds beyond the original parameters; loading tolerates its absence
QUANT_BUFFERS = ("step", "act_clip", "act_clip_ema", "deviation")
FORWARD_STATE = ("act_clip", "act_clip_ema")  # the state the forward updates (the op's backward returns the rest)
QUANT_STATE_KEY = re.compile(r"(^|\.)(grad_quantizer\.[^.]+|step|act_clip|act_clip_ema|deviation|calls)$")
# the torch function a site stands for, by its spatial dims (0: a linear); the rewrite's list of calls too
FUNCTIONS_BY_DIMS = {0: F.linear, 1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TRANSPOSED_BY_DIMS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
INT8_ATTRS = ("dims", "is_transposed", "config", "site_name", "index", "source", "backend_choice",
               "tracks_deviation", "rounding_stream", "owns_params")


def _tuple(v, n: int) -> tuple:
    """Python ints, whatever integers the module holds: libraries compute geometry in numpy (pytorchvideo's
    Conv3d strides are np.int64), and a spec is a key (compiled passes, the direct conv's decisions)."""
    return tuple(map(int, v)) if isinstance(v, (tuple, list)) else (int(v),) * n


def make_spec(dims: int, kernel: tuple, stride, padding, dilation, groups: int) -> GemmSpec:
    """Resolve conv arguments (ints, tuples, 'same', 'valid') to a GemmSpec with explicit zero padding. Not
    cached: it is a few tuple operations, and torch.compile traces it (a cache would only be bypassed)."""
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
    return GemmSpec(dims, tuple(map(int, kernel)), stride, pads, dilation, int(groups))


def site_op(module: nn.Module) -> str | None:
    """"linear" / "conv1d" ... "conv3d" / "conv_transpose1d" ... "conv_transpose3d" for conv and linear
    modules (subclasses included), else None."""
    return type_op(type(module))


def type_op(cls: type) -> str | None:
    """`site_op` of a module class."""
    if issubclass(cls, nn.Linear):
        return "linear"
    for types, kind in ((CONV_TYPES, "conv"), (TRANSPOSED_TYPES, "conv_transpose")):
        for t, d in types.items():
            if issubclass(cls, t):
                return f"{kind}{d}d"
    return None


def op_dims(op: str) -> int:
    return 0 if op == "linear" else int(op[-2])


def out_channels_of(module: nn.Module) -> int:
    """A conv/linear module's output channels (a transposed conv's are its weight's dim 1 times groups)."""
    w = module.weight
    return w.shape[1] * module.groups if isinstance(module, tuple(TRANSPOSED_TYPES)) else w.shape[0]


class Int8Layer(Float32State):
    """The INT8-training state and computation of one conv/linear site (a mixin; see the module docstring).

    Never constructed directly: `setup_int8` gives an existing module its state (module sites), and
    `Int8Function.__init__` calls it for functional sites. State: the buffers `step` (committed training
    steps with finite gradients), `act_clip`, `act_clip_ema` (activation clips of training batches),
    `deviation` (DCLRS) and those of `grad_quantizer`, staged in `pending` until an optimizer steps
    (int8fx.nn.state); `calls` counts calls with autograd on and keys stochastic rounding.
    """

    __prepare_scriptable__ = refuse_torchscript

    def setup_int8(self, *, op: str, out_channels: int, config: Int8Config, name: str, index: int, source: str,
                   owns_params: bool) -> None:
        self.dims = op_dims(op)
        self.is_transposed = op.startswith("conv_transpose")
        self.config, self.site_name, self.index, self.source = config, name, index, source
        self.backend_choice = config.backend
        self.tracks_deviation = False
        self.rounding_stream = 0  # set per DDP rank by int8fx.distributed.QuantStateSync (plain attribute)
        self.owns_params = owns_params
        device = next((t.device for t in self.parameters(recurse=False)), None)
        self.grad_quantizer = make_grad_quantizer(config.grad_quant, out_channels, config).to(device)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        for b in QUANT_BUFFERS[1:]:
            self.register_buffer(b, torch.zeros((), device=device))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64, device=device))
        self._reset_pending()
        self.register_load_state_dict_post_hook(_resync_pending)
        track(self)

    float32_buffers = QUANT_BUFFERS  # (Float32State: the site's own quantizer state stays fp32 in a cast model)

    def _apply(self, fn, recurse=True):
        """As Float32State's, and state materialised from the meta device (`to_empty` after a meta-device
        init) starts fresh: `to_empty` leaves memory uninitialised, and garbage clips, counters and running
        averages would be used as they are."""
        was_meta = "step" in self._buffers and self._buffers["step"].is_meta
        super()._apply(fn, recurse)
        if was_meta and not self._buffers["step"].is_meta:
            self._fresh_state()
        return self

    def _fresh_state(self) -> None:
        """The state of a site that never ran, on the device it is on."""
        with torch.no_grad():
            for b in QUANT_BUFFERS + ("calls",):
                self._buffers[b].zero_()
        q = self.grad_quantizer
        self.grad_quantizer = make_grad_quantizer(self.config.grad_quant, q.num_channels, self.config).to(self.step.device)
        self._reset_pending()

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        track(self)  # a copy or an unpickled site commits with the others

    def remove_int8(self) -> None:
        """Drop everything `setup_int8` added (used by `int8fx.to_float`)."""
        for b in QUANT_BUFFERS + ("calls",):
            self._buffers.pop(b, None)
        self._modules.pop("grad_quantizer", None)
        self._modules.pop("pending", None)
        for k in [k for k, h in self._load_state_dict_post_hooks.items() if h is _resync_pending]:
            del self._load_state_dict_post_hooks[k]
        for a in INT8_ATTRS:
            self.__dict__.pop(a, None)
        untrack(self)  # a float module has nothing to commit when an optimizer steps

    @property
    def site_op(self) -> str:
        if self.dims == 0:
            return "linear"
        return f"conv_transpose{self.dims}d" if self.is_transposed else f"conv{self.dims}d"

    # ----------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, Tensor]:
        """The committed state, {name: tensor}: this site's buffers and "grad_quantizer.<name>"."""
        own = {b: self._buffers[b] for b in QUANT_BUFFERS}
        return {**own, **{f"grad_quantizer.{k}": v for k, v in self.grad_quantizer.state().items()}}

    def commit(self) -> None:
        """Make the pending state (what the last forward/backward computed) this site's state."""
        state = self.state_tensors()
        with torch.no_grad():
            torch._foreach_copy_(list(state.values()), self.pending_tensors(list(state)))

    def _reset_pending(self) -> None:
        self.pending = PendingState(self.state_tensors())

    def pending_tensors(self, names) -> list[Tensor]:
        """The staged state tensors of `names` (a buffer added to the state since they were made, e.g. by a
        user's policy, gets them made anew from the committed state)."""
        try:
            return self.pending.tensors(names)
        except KeyError:
            self._reset_pending()
            return self.pending.tensors(names)

    def pending_deviation(self) -> Tensor:
        """The DCLRS deviation of the last backward, before the step that commits it."""
        return self.pending_tensors(["deviation"])[0]

    def _sized_for(self, channels: int) -> bool:
        """A site whose weight is computed from the model input learns its channel count at its first call;
        a later call with another count (a smaller last batch) is quantized statelessly (False)."""
        if self.grad_quantizer.num_channels == channels:
            return True
        if self.grad_quantizer.num_channels == 0:
            self.grad_quantizer = make_grad_quantizer(self.config.grad_quant, channels, self.config).to(self.step.device)
            self._reset_pending()
            return True
        return False

    # ----------------------------------------------------------------- the computation
    def int8_functional(self, input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                        dilation=1, groups=1, output_padding=0) -> Tensor:
        """`F.conv{dims}d(input, weight, bias, stride, padding, dilation, groups)` (or `F.linear(input, weight,
        bias)`, or for a transposed conv site `F.conv_transpose{dims}d` with `output_padding`) in INT8; with
        `Int8Config.quantize=False`, or an empty weight (nothing to quantize: a functional site's, which convert
        cannot see), that very call."""
        if not self.config.quantize or weight.numel() == 0:
            return float_call(self.dims, self.is_transposed, input, weight, bias, stride, padding, dilation, groups,
                              output_padding)
        if torch.jit.is_tracing():  # (it failed deep inside torch with "Expected bool, got Tensor")
            raise RuntimeError(f"{self.site_name}: torch.jit.trace cannot record int8fx's INT8 op; use int8fx.export_onnx "
                               "for ONNX, torch.export or torch.compile for a traced model")
        if self.dims and input.dim() == self.dims + 1 and input.dim() > 1:  # unbatched, as nn.Conv*d takes it
            return self.int8_functional(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups,
                                        output_padding).squeeze(0)
        self._check_input(input, weight, groups)
        spec = call_spec(self, weight, (stride, padding, dilation, groups, output_padding))
        if self.is_transposed:
            self._check_transposed(spec, input)
        elif self.dims and any(o < 1 for o in spec.out_size(tuple(input.shape[2:]))):  # as torch's own conv refuses
            padded = tuple(n + lo + hi for n, (lo, hi) in zip(input.shape[2:], spec.padding))
            raise ValueError(f"{self.site_name}: padded input size {padded} is smaller than the dilated kernel "
                             f"{tuple(d * (k - 1) + 1 for k, d in zip(spec.kernel, spec.dilation))} "
                             f"(input {tuple(input.shape)})")
        channels = out_channels(weight.shape, spec)
        if self._sized_for(channels):
            committed = self.state_tensors()
            names = [n for n in committed if n not in FORWARD_STATE]
            state, pending = [committed[n] for n in names], self.pending_tensors(names)
        else:  # stateless: fresh state in, results discarded
            names = [n for n in self.state_tensors() if n not in FORWARD_STATE]
            fresh = make_grad_quantizer(self.config.grad_quant, channels, self.config).to(input.device)
            scratch = {**{n: t.clone() for n, t in self.state_tensors().items() if not n.startswith("grad_quantizer.")},
                       **{f"grad_quantizer.{k}": v for k, v in fresh.state().items()}}
            state, pending = [scratch[n] for n in names], [scratch[n].clone() for n in names]
        static = not self.training and self.config.eval_act_clip == "ema"
        y, s_x = int8_gemm(input, weight, bias, self.act_clip_ema, state, pending, self.calls.clone(), spec_to_ints(spec),
                           static, self.backend_choice, _output_dtype(input), self.config.grad_quant, ",".join(names),
                           [float(v) for v in PolicyParams.of(self.config)], self.config.rounding == "stochastic",
                           self._key_base(), self.tracks_deviation)
        if torch.is_grad_enabled():
            with torch.no_grad():
                self.calls.add_(1)  # the next call draws from new streams
        if input.numel():  # an empty batch carries no statistics
            self._observe_forward(s_x)
        return y

    def _check_transposed(self, spec: GemmSpec, x: Tensor) -> None:
        """A transposed conv call's arguments, checked as torch's own op checks them."""
        if any(p >= max(s, d) for p, s, d in zip(spec.output_padding, spec.stride, spec.dilation)):
            raise ValueError(f"{self.site_name}: output padding {spec.output_padding} must be smaller than either "
                             f"stride {spec.stride} or dilation {spec.dilation}")
        if any(o < 1 for o in spec.out_size(tuple(x.shape[2:]))):
            raise ValueError(f"{self.site_name}: the transposed conv's output size "
                             f"{spec.out_size(tuple(x.shape[2:]))} would be smaller than 1 (input {tuple(x.shape)})")

    def _key_base(self) -> int:
        """The per-site constant of its rounding streams: (seed, site index, DDP rank)."""
        return (self.config.seed * 1_000_003 + self.index * 7_919 + self.rounding_stream * 0x9E3779B1) % 2**63

    def _check_input(self, x: Tensor, weight: Tensor, groups: int) -> None:
        want = self.dims + 2
        if self.dims and x.dim() != want:
            raise ValueError(f"{self.site_name}: Conv{self.dims}d expects a {want - 1}-d or {want}-d input, got shape "
                             f"{tuple(x.shape)}")
        k_in = weight.shape[0] if self.is_transposed else weight.shape[1] * (groups if self.dims else 1)
        c = x.shape[1] if self.dims else x.shape[-1]
        if c != k_in:
            raise ValueError(f"{self.site_name}: expected {k_in} input channels/features, got {c} (input {tuple(x.shape)})")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{self.site_name}: INT8 training needs a floating-point input, got {x.dtype}")

    def eval_act_clip(self) -> Tensor | None:
        """The activation clip this layer quantizes with in eval mode, None for each batch's own absmax
        (`Int8Config.eval_act_clip`); ONNX export's default calibration takes the same. A layer that never
        trained has act_clip_ema 0, which means the batch absmax too (picked on the device, no host sync)."""
        return self.act_clip_ema if self.config.eval_act_clip == "ema" else None

    def _observe_forward(self, s_x: Tensor) -> None:
        """Stage a training forward's activation clip and its running average. Device-side (a non-finite
        clip keeps the old values), and not while a backward pass recomputes the forward (activation
        checkpointing): that forward was already counted."""
        if not self.training or (not torch.compiler.is_compiling() and in_backward()):
            return
        with torch.no_grad():  # (`out=` writes: a few scalar ops a site and step, each one a dispatch)
            clip = s_x.detach() * 127
            ok = torch.isfinite(clip)
            ema = self.act_clip_ema
            new_ema = torch.where(ema == 0, clip, 0.9 * ema + 0.1 * clip)
            torch.where(ok, new_ema, ema, out=self.pending.get("act_clip_ema"))
            torch.where(ok, clip, self.act_clip, out=self.pending.get("act_clip"))

    # ----------------------------------------------------------------- state_dict compatibility
    _load_from_state_dict = optional_buffers_on_load(nn.Module._load_from_state_dict)

    def int8_repr(self) -> str:
        return f"int8: site={self.site_name!r}, grad_quant={self.config.grad_quant!r}, source={self.source}"


def _resync_pending(module: Int8Layer, incompatible_keys) -> None:
    """After a load, the pending state starts from the loaded state (a step before the next backward must
    not put back what was there before)."""
    module._reset_pending()


def _output_dtype(x: Tensor) -> torch.dtype:
    """What a conv would return: autocast's dtype where autocast is on for x's device, else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and dev in ("cpu", "cuda", "xpu", "mps"):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def call_spec(layer: Int8Layer, weight: Tensor, geometry: tuple) -> GemmSpec:
    """The GemmSpec of one call of a site with `geometry` = (stride, padding, dilation, groups, output_padding)
    as the call gives them."""
    stride, padding, dilation, groups, output_padding = geometry
    spec = resolve_spec(layer.dims, tuple(weight.shape[2:]), stride, padding, dilation, groups)
    if not layer.is_transposed:
        return spec
    return replace(spec, transposed=True, output_padding=_tuple(_hashable(output_padding), layer.dims))


def resolve_spec(dims: int, kernel: tuple, stride, padding, dilation, groups) -> GemmSpec:
    return make_spec(dims, kernel, _hashable(stride), _hashable(padding), _hashable(dilation), groups) if dims \
        else make_spec(0, (), 1, 0, 1, 1)


class ModuleSite(Int8Layer):
    """The role of a module site (mixed into the twin of nn.Conv*d / nn.Linear): its forward is the conv/linear
    of its own parameters and geometry, read from the module's attributes at each call as the original does."""

    def forward(self, input: Tensor, *args, **kwargs) -> Tensor:
        # (`args`, `kwargs`: a transposed conv's `output_size`; a conv or linear refuses any, as torch's does)
        if isinstance(input, Proxy):
            return traced_call(self, (input, *args), kwargs)
        if not self.config.quantize or ((args or kwargs) and not self.is_transposed):
            return self._int8fx_base.forward(self, input, *args, **kwargs)
        if self.is_transposed:
            return self._transposed_forward(input, *args, **kwargs)
        if self.dims == 0:
            return self.int8_functional(input, self.weight, self.bias)
        padding = self.padding
        if self.padding_mode != "zeros":  # as _ConvNd: pad in floating point, then a zero-padding-free conv
            input, padding = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return self.int8_functional(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def _transposed_forward(self, input: Tensor, output_size=None) -> Tensor:
        """nn.ConvTranspose*d's forward: the output padding that gives `output_size`, then the INT8 op."""
        if self.padding_mode != "zeros":
            raise ValueError(f"Only \"zeros\" padding mode is supported for {self._int8fx_base.__name__}")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              self.dims, self.dilation)
        return self.int8_functional(input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                    self.groups, output_padding)

    def extra_repr(self) -> str:
        return f"{self._int8fx_base.extra_repr(self)}, {self.int8_repr()}"


class Int8Function(Int8Layer):
    """One functional conv/linear call site (`F.conv2d(x, w, ...)` in a module's own code, or a call that
    `int8fx.nn.scope` routes here): a module without parameters, called with the call's own arguments."""

    def __init__(self, op: str, out_channels: int, *, config: Int8Config, name: str, index: int,
                 source: str = "function") -> None:
        super().__init__()
        self.out_channels = out_channels
        self.setup_int8(op=op, out_channels=out_channels, config=config, name=name, index=index, source=source,
                        owns_params=False)

    def forward(self, input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                groups=1, output_padding=0) -> Tensor:
        if isinstance(input, Proxy):
            return traced_call(self, (input, weight, bias, stride, padding, dilation, groups, output_padding))
        return self.int8_functional(input, weight, bias, stride, padding, dilation, groups, output_padding)

    def extra_repr(self) -> str:
        return f"{self.site_op}, out={self.out_channels}, {self.int8_repr()}"


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def float_call(dims: int, transposed: bool, input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1,
               padding=0, dilation=1, groups=1, output_padding=0) -> Tensor:
    """The torch call a site stands for (`F.linear`, `F.conv*d` or `F.conv_transpose*d`), given the arguments
    in `Int8Layer.int8_functional`'s order; unrouted (calls from inside a routed scope must not be routed
    again)."""
    from .scope import ORIGINAL

    if transposed:
        f = ORIGINAL[TRANSPOSED_BY_DIMS[dims].__name__]
        return f(input, weight, bias, stride, padding, output_padding, groups, dilation)
    f = ORIGINAL[FUNCTIONS_BY_DIMS[dims].__name__]
    return f(input, weight, bias) if dims == 0 else f(input, weight, bias, stride, padding, dilation, groups)


def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (e.g. checkpointing recomputes a forward)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def int8_clashes(module: nn.Module) -> list[str]:
    """Names `Int8Layer.setup_int8` would add that `module` already uses for something of its own (a user's
    subclass with a `step` or `config` of its own): such a module is left in FP32 rather than overwritten."""
    taken = set(module.__dict__) | set(module._parameters) | set(module._buffers) | set(module._modules)
    return sorted(n for n in INT8_ATTRS + QUANT_BUFFERS + ("grad_quantizer", "pending", "calls")
                  if n in taken or (hasattr(type(module), n) and not hasattr(Int8Layer, n)))


def float_state_dict(qmodel: nn.Module) -> dict:
    """The converted model's state_dict without int8fx's quantizer state: loads strictly into the FP32 model."""
    layers = {f"{n}." if n else "" for n, m in qmodel.named_modules() if isinstance(m, Int8Layer)}
    site_children = {f"{n}." for n, m in qmodel.named_modules() if isinstance(m, Int8Function)}

    def int8fx_own(key: str) -> bool:
        # the key's module prefixes ("", "a.", "a.b.", ...): a look-up each, not a scan of every site (a
        # model of thousands of keys and hundreds of sites)
        for p in ("", *(key[:i + 1] for i, c in enumerate(key) if c == ".")):
            if p in site_children or (p in layers and QUANT_STATE_KEY.search(key[len(p):])):
                return True
        return False

    return {k: v for k, v in qmodel.state_dict().items() if not int8fx_own(k)}
