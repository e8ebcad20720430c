"""Bind every Int8Layer to a backend choice. The op resolves the choice against the tensor's device on
each call (see `int8fx.kernels.resolve_backend`), so moving the model between devices needs no re-lowering."""
from __future__ import annotations

import torch.nn as nn

from ..kernels import available_backends
from ..nn.modules import Int8Layer


def lower(root: nn.Module, backend: str) -> nn.Module:
    if backend not in ("auto",) + available_backends():
        raise RuntimeError(f"backend {backend!r} is not available here; available: auto, {', '.join(available_backends())}")
    for m in root.modules():
        if isinstance(m, Int8Layer):
            m.backend_choice = backend if m.config.backend == "auto" else m.config.backend
    return root
