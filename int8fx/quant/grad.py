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

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from .core import absmax

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


def make_grad_quantizer(name: str, num_channels: int, config) -> "GradQuantizer":
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown gradient quantizer {name!r}; registered: {', '.join(_REGISTRY)}") from None
    return cls(num_channels, config)


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


_optional_load = optional_buffers_on_load(nn.Module._load_from_state_dict)


class GradQuantizer(nn.Module):
    """Base class. Subclasses override the two clip methods and may register state buffers.

    `channelwise` tells reports whether the weight-gradient clip varies per channel. The base class
    keeps `last_clip_w` (the per-channel clips of the last step) so every policy can be inspected
    the same way.
    """

    policy = "base"
    channelwise = False

    def __init__(self, num_channels: int, config) -> None:
        super().__init__()
        self.num_channels = num_channels
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

    def weight_grad_clip(self, g: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def input_grad_clip(self, g: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def clips(self, g: Tensor, g_input: Tensor) -> tuple[Tensor, Tensor]:
        """(clip per channel for dW from g, clip for dX from g_input); records them for inspection."""
        cw = self.weight_grad_clip(g)
        cx = self.input_grad_clip(g_input)
        with torch.no_grad():
            self.last_clip_w.copy_(torch.nan_to_num(cw.detach().float().expand(self.num_channels), nan=0.0, posinf=0.0))
            self.last_clip_x.copy_(torch.nan_to_num(cx.detach().float(), nan=0.0, posinf=0.0))
        return cw, cx

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}, channels={self.num_channels}"


@register_grad_quantizer("per-tensor")
class PerTensorAbsmax(GradQuantizer):
    """Baseline: one clip = max|g| for the whole tensor, for both GEMMs."""

    def weight_grad_clip(self, g: Tensor) -> Tensor:
        return absmax(g).expand(g.shape[-1])

    def input_grad_clip(self, g: Tensor) -> Tensor:
        return absmax(g)
