"""Run a converted model for analysis and watch its INT8 sites compute: shared by `inspect` (shapes, FLOPs)
and ONNX export (calibration), which both need one eval-mode forward that sees every INT8 call and
changes nothing in the model.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch import Tensor

from .nn.modules import Int8Layer


def as_args(example_inputs) -> tuple:
    """A model's positional inputs as a tuple (a lone tensor becomes a 1-tuple)."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def to_device(args: tuple, device) -> tuple:
    """The tensors of `args` moved to `device`; other values as they are."""
    return tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without either)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode and no_grad for the duration; every module's own training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def observe_int8_calls(model: nn.Module, callback):
    """Call `callback(layer, x, weight, bias, out, geometry)` after every INT8 computation of every site of
    `model` (geometry: the call's stride, padding, dilation, groups and output_padding), however it is reached
    (a module call, a routed call, a call on a module site's weight): all go through
    `Int8Layer.int8_functional`, which is shadowed per instance for the duration. A callback that returns a
    tensor replaces the call's output with it (`deploy_numerics` adds what the deploy file computes
    differently); None keeps it. A call that makes another of the same site (an unbatched input runs as a
    batch of one) is reported once, as that inner call: inspect counted its MACs twice, calibration its calls."""
    layers = [m for m in model.modules() if isinstance(m, Int8Layer)]
    depth: dict[int, list] = {}  # id(site) -> [calls running, whether one inside another was reported]
    for m in layers:
        def int8_functional(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, output_padding=0,
                            _m=m):
            state = depth.setdefault(id(_m), [0, False])
            state[0] += 1
            try:
                out = Int8Layer.int8_functional(_m, input, weight, bias, stride, padding, dilation, groups,
                                                output_padding)
            except BaseException:
                state[0] -= 1
                state[1] = state[1] and state[0] > 0
                raise
            state[0] -= 1
            if state[1] and not state[0]:  # (the outer call of one already reported)
                state[1] = False
                return out
            state[1] = state[0] > 0
            replaced = callback(_m, input, weight, bias, out, (stride, padding, dilation, groups, output_padding))
            return out if replaced is None else replaced

        m.int8_functional = int8_functional
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop("int8_functional", None)
