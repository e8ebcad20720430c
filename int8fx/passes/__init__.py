"""The conversion pipeline: trace -> rewrite -> lower. `convert` is their composition."""
from __future__ import annotations

import copy

import torch.nn as nn

from ..config import Int8Config
from .lower import lower
from .rewrite import Site, census, rewrite
from .trace import OpaqueModule, trace_partitioned


def convert(model: nn.Module, config: Int8Config | None = None) -> nn.Module:
    """Return an INT8-training copy of `model`; the input model is left untouched.

    The result is a `torch.fx.GraphModule` when the model traces as a whole; otherwise it is a copy of the
    model (same class, same API) whose traceable submodules are GraphModules and whose remaining
    conv/linear modules are swapped in place. `int8fx.inspect(result)` lists every site and reason.
    Tracing happens in training mode (the mode INT8 training runs in); the model's mode is kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes an nn.Module, got {type(model).__name__}")
    config = Int8Config() if config is None else config
    if not isinstance(config, Int8Config):
        raise TypeError(f"config must be an Int8Config, got {type(config).__name__}")
    was_training = model.training
    work = copy.deepcopy(model).train()
    weights = census(work)
    root, opaque = trace_partitioned(work)
    root, sites = rewrite(root, config, weights)
    root = lower(root, config.backend)
    root.train(was_training)
    root._int8fx_sites = sites  # read by inspect(); plain attributes are not part of state_dict
    root._int8fx_opaque = opaque
    root._int8fx_config = config
    return root


__all__ = ["OpaqueModule", "Site", "convert", "lower", "rewrite", "trace_partitioned"]
