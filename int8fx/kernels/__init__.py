"""GEMM backends. Each has `name`, `operand_dtype` and `bmm(a, b)` -> exact integer accumulators.

`resolve_backend(choice, device)` is the one place that maps a config choice and a tensor's device to
a backend; the autograd op calls it per call, so a module moved between devices follows along.
"""
from __future__ import annotations

import torch

from .reference import ReferenceBackend

_BACKENDS: dict[str, object] = {"reference": ReferenceBackend()}


def _register_builtin() -> None:
    """"torch" (torch._int_mm) always; "cupy" when CuPy is installed (found, not imported: importing
    int8fx never needs CuPy). Neither is picked by "auto" until the GPU tests have verified them."""
    import importlib.util

    from .torch_backend import TorchBackend

    _BACKENDS["torch"] = TorchBackend()
    if importlib.util.find_spec("cupy") is not None:
        from .cupy_backend import CupyBackend

        _BACKENDS["cupy"] = CupyBackend()


_register_builtin()


def register_backend(backend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def resolve_backend(choice: str, device: torch.device):
    """"auto" is the reference on every device until the CuPy kernels are verified on a GPU."""
    if choice == "auto":
        return _BACKENDS["reference"]
    try:
        backend = _BACKENDS[choice]
    except KeyError:
        raise RuntimeError(f"backend {choice!r} is not available here; available: {', '.join(_BACKENDS)}") from None
    if choice != "reference" and device.type != "cuda":
        return _BACKENDS["reference"]
    return backend
