"""The first and the last layer of a network, for the papers' setting and its ablations.

Both papers keep the first conv and the last FC in full precision; int8fx converts them by default.
`end_layers` names them so that `Int8Config(exclude=...)` can keep them in FP32, and
`remove_end_batchnorm` takes out the BatchNorm right after them (a layer whose output is not
re-normalised is the harder case for quantization). "First" and "last" are in execution order, found
by one eval-mode forward with hooks, not in module-registration order, which need not be the same.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nn.modules import SITE_TYPES  # conv (transposed too) and linear modules

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def call_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the conv/linear and BatchNorm modules in the order one forward first calls them (eval
    mode, so running statistics are not touched; the model's mode is restored)."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name))
             for name, m in model.named_modules() if isinstance(m, SITE_TYPES + BN_TYPES)]
    was = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def end_layers(model: nn.Module, example: torch.Tensor) -> tuple[str, str]:
    """(first, last) conv/linear module names in execution order."""
    modules = dict(model.named_modules())
    sites = [n for n in call_order(model, example) if isinstance(modules[n], SITE_TYPES)]
    if not sites:
        raise ValueError(f"{type(model).__name__} calls no conv/linear module: it has no first or last layer")
    return sites[0], sites[-1]


def remove_end_batchnorm(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Replace the BatchNorm called right after the first and after the last conv/linear layer (when it
    normalises that layer's channels) by nn.Identity; returns the names replaced."""
    modules = dict(model.named_modules())
    order = call_order(model, example)
    first, last = end_layers(model, example)
    removed = []
    for site in dict.fromkeys((first, last)):
        i = order.index(site) + 1
        if i < len(order) and isinstance(modules[order[i]], BN_TYPES):
            bn, layer = modules[order[i]], modules[site]
            channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            if bn.num_features == channels:
                parent, _, leaf = order[i].rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
                removed.append(order[i])
    return removed
