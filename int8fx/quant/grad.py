"""Gradient quantizers: the pluggable piece that decides the clip values of the output gradient dY.

A quantizer sees dY as a matrix g[M, O] (rows: batch x positions, columns: output channels) and
answers two questions, because the two backward GEMMs allow different granularities (ALGORITHMS.md):
  * `weight_grad_clip(g)` -> clip per output channel, shape [O], for dW = dY^T Xcol (o is free there);
  * `input_grad_clip(g)`  -> one clip, shape [], for dXcol = dY W (o is the reduction index there).
    Its argument is dY * s_W[o] in whatever layout the op keeps it (not necessarily [M, O]): only
    statistics of the whole tensor are meaningful there.
Running state (previous clips, families, counters) lives in registered buffers so it is saved in
`state_dict`, reduced across DDP ranks and shown by `inspect`. A new policy is one subclass here or in a
sibling module, registered with `@register_grad_quantizer("name")`.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from .core import absmax, nonfinite_poison, scale_from_clip, stream_key
from .fused import quantize_gradient
from ..fusing import fused

_REGISTRY: dict[str, type["GradQuantizer"]] = {}


def register_grad_quantizer(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"gradient quantizer {name!r} is already registered by {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls.policy = name
        return cls

    return deco


def grad_quantizer_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def grad_quantizer_class(name: str) -> type["GradQuantizer"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown gradient quantizer {name!r}; registered: {', '.join(_REGISTRY)}") from None


def make_grad_quantizer(name: str, num_channels: int, config) -> "GradQuantizer":
    return grad_quantizer_class(name)(num_channels, config)


def optional_buffers_on_load(load):
    """Wrap `_load_from_state_dict` so that this module's own buffers may be missing from a checkpoint.

    Quantizer state is int8fx's addition to a model: an FP32 checkpoint lacks it and must still load
    with strict=True (the state then starts fresh). Parameters stay mandatory.
    """

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        before = len(missing_keys)
        load(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        optional = {prefix + b for b in self._buffers}
        missing_keys[before:] = [k for k in missing_keys[before:] if k not in optional]

    return _load_from_state_dict


class Float32State(nn.Module):
    """A module whose quantizer state buffers (`float32_buffers`, None for every buffer of its own) stay fp32
    through an `_apply` (what `.to(dtype)`, `.half()`, `.bfloat16()` run) that casts the model: clips and
    running averages in bf16 would lose what they track (a bf16 EMA stops moving once 0.1 x a new clip is
    below its half-ulp), and the INT8 op computes its scales in fp32 whatever the model's dtype. Device moves
    apply as usual. (A mixin: site twins put it before the user's conv/linear class.)"""

    float32_buffers: tuple[str, ...] | None = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in (self._buffers if self.float32_buffers is None else self.float32_buffers):
            t = self._buffers.get(name)
            if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                self._buffers[name] = t.float()
        return self


_optional_load = optional_buffers_on_load(nn.Module._load_from_state_dict)
_OPERANDS: dict[type, Callable] = {}
OPERANDS_COMPILED = 1024  # dY elements from which a fusable policy's `operands` runs compiled


def _operands(cls, rows, s_w, state, params, stochastic, counter, key_base, need_x, need_w, x_dtype, dq_columns):
    cw, cx, new, poison = cls.statistics(rows, s_w, state, params)
    s_gx, s_gw = scale_from_clip(cx + poison), scale_from_clip(cw + poison)
    gq = quantize_gradient(rows, s_w, s_gx, stochastic, stream_key(key_base, counter, 0)).to(x_dtype) \
        if need_x else None
    dq = quantize_gradient(rows, torch.ones_like(s_gw), s_gw, stochastic, stream_key(key_base, counter, 1)) \
        if need_w else None
    if dq is not None and dq_columns:  # (compiled: the quantizing loop's store writes it transposed)
        dq = dq.t().contiguous().t()
    return cw, cx, new, s_gx, s_gw, gq, dq


class PolicyParams(NamedTuple):
    """The config values a policy reads, as plain numbers: they travel into the backward op as a list of
    floats (`Int8Config` itself is not something a torch.library op can take)."""

    mcs_lambda: float = 0.3
    mcs_k: float = 1.0
    mcs_a: float = 0.8
    mcs_alpha: float = 2.0
    clip_update_period: int = 10

    @classmethod
    def of(cls, config) -> "PolicyParams":
        return cls(config.mcs_lambda, config.mcs_k, config.mcs_a, config.mcs_alpha, config.clip_update_period)

    @classmethod
    def from_floats(cls, values) -> "PolicyParams":
        *floats, period = values
        return cls(*floats, int(period))


class GradQuantizer(Float32State):
    """Base class: the buffers of one site's gradient quantizer, and its policy as a pure function.

    `compute(g, g_input, state, params)` is the policy: from dY as rows [M, O] and the dX operand, and the
    state as a {buffer name: tensor} dict, it returns (clip per channel [O], clip for dX [], new state),
    without touching any buffer and without reading a value on the host, so the backward op can run it
    on any device inside a compiled graph. The module holds the state (in `state_dict`, reduced across
    DDP ranks, shown by `inspect`); `clips()` applies the policy to it in place (tests, tools).

    `channelwise` tells reports whether the weight-gradient clip varies per channel. Every policy keeps
    `last_clip_w` (the per-channel clips of the last step) and `last_clip_x`, so all read the same way.
    """

    policy = "base"
    channelwise = False

    def __init__(self, num_channels: int, config) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.params = PolicyParams.of(config)
        self.register_buffer("last_clip_w", torch.zeros(num_channels))
        self.register_buffer("last_clip_x", torch.zeros(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A quantizer not sized yet (its site learns its channel count at the first call) takes the sizes of
        the checkpoint it loads."""
        if self.num_channels == 0:
            for name, buf in list(self._buffers.items()):
                saved = state_dict.get(prefix + name)
                if buf is not None and saved is not None and buf.shape != saved.shape:
                    self._buffers[name] = torch.zeros(saved.shape, dtype=buf.dtype, device=buf.device)
            self.num_channels = self.last_clip_w.numel()
        _optional_load(self, state_dict, prefix, *args, **kwargs)

    def state(self) -> dict[str, Tensor]:
        return dict(self._buffers)

    @classmethod
    def compute(cls, g: Tensor, g_input: Tensor, state: dict[str, Tensor], params: PolicyParams):
        """(clip per channel for dW from g [M, O], clip for dX from g_input, new state); see the class
        docstring. `last_clip_*` record the clips (non-finite ones as 0, so the state stays finite)."""
        cw, cx, new = cls.compute_clips(g, g_input, state, params)
        return cls.finish(cw, cx, new, g.shape[-1])

    @staticmethod
    def finish(cw: Tensor, cx: Tensor, new: dict, channels: int):
        """Record the clips in the state (non-finite ones as 0, so the state stays finite)."""
        new["last_clip_w"] = torch.nan_to_num(cw.detach().float().expand(channels), nan=0.0, posinf=0.0)
        new["last_clip_x"] = torch.nan_to_num(cx.detach().float(), nan=0.0, posinf=0.0)
        return cw, cx, new

    @classmethod
    def compute_clips(cls, g, g_input, state, params):  # pragma: no cover - interface
        raise NotImplementedError

    fusable = False  # whether `operands` may run as one compiled function (no Python logic on values/shapes)

    @classmethod
    def statistics(cls, rows: Tensor, s_w: Tensor, state: dict[str, Tensor], params: PolicyParams):
        """(clip_w, clip_x, new state, poison) from dY as rows [M, O]: `compute` on (rows, rows * s_W[o]),
        and poison 0 for a finite dY, NaN otherwise (`nonfinite_poison`). Policies may compute it faster."""
        cw, cx, new = cls.compute(rows, rows * s_w, state, params)
        return cw, cx, new, nonfinite_poison(rows)

    @classmethod
    def operands(cls, rows: Tensor, s_w: Tensor, state: dict[str, Tensor], params: PolicyParams, stochastic: bool,
                 counter: Tensor, key_base: Tensor, need_x: bool, need_w: bool, x_dtype: torch.dtype = torch.int8,
                 dq_columns: bool = False):
        """Everything the backward op takes from dY [M, O]: (clip_w, clip_x, new state, s_gx, s_gw, gq, dq),
        gq = quantize(dY s_W, s_gx) for the dX GEMM and dq = quantize(dY, s_gw) for the dW GEMM (int8
        [M, O], None where not needed), rounded from the streams keyed on (key_base, counter, role). One
        fused call for `fusable` policies (int8fx.fusing). `x_dtype`: gq's dtype, the same integers (a
        depthwise conv's dX runs in fp32: written so in the same pass, not converted after it).
        `dq_columns`: dq stored column-major (an [M, O] view of [O, M] contiguous), as the dW GEMM reads it
        on a GPU (reduced along M: cuBLASLt and the CuPy GEMM read both operands K-major); written so by the
        quantizing pass, not copied after it (the backward's transposing copies took 7.3 ms of an INT8
        resnet18 step's 62 ms of kernels on an H200, batch 256)."""
        fn = _OPERANDS.get(cls)
        if fn is None:
            # dozens of ops: compiled from OPERANDS_COMPILED elements (eagerly, 0.6 ms at 16k elements against
            # 0.13 ms for the compiled call, measured on one thread)
            compiled = fused(min_elements=OPERANDS_COMPILED)
            fn = _OPERANDS[cls] = (compiled if cls.fusable else lambda f: f)(functools.partial(_operands, cls))
        return fn(rows, s_w, state, params, stochastic, counter, key_base, need_x, need_w, x_dtype, dq_columns)

    # ------------------------------------------------------------------ stateful conveniences
    def clips(self, g: Tensor, g_input: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the policy to this module's state in place; (clip for dW, clip for dX)."""
        cw, cx, new = self.compute(g, g_input, self.state(), self.params)
        self._write(new)
        return cw, cx

    def weight_grad_clip(self, g: Tensor) -> Tensor:
        """The dW clips of g [M, O] alone (only the dW slot's state moves)."""
        cw, _, new = self.compute(g, g.new_zeros(1), self.state(), self.params)
        self._write({k: v for k, v in new.items() if k.startswith("w_") or k == "last_clip_w"})
        return cw

    def input_grad_clip(self, g: Tensor) -> Tensor:
        """The dX clip of g alone (only the dX slot's state moves)."""
        _, cx, new = self.compute(g.new_zeros(1, self.num_channels), g, self.state(), self.params)
        self._write({k: v for k, v in new.items() if k.startswith("x_") or k == "last_clip_x"})
        return cx

    def _write(self, new: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, value in new.items():
                self._buffers[name].copy_(value)

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}, channels={self.num_channels}"


@register_grad_quantizer("per-tensor")
class PerTensorAbsmax(GradQuantizer):
    """Baseline: one clip = max|g| for the whole tensor, for both GEMMs."""

    fusable = True

    @classmethod
    def compute_clips(cls, g, g_input, state, params):
        return absmax(g).expand(g.shape[-1]), absmax(g_input), {}
