"""GEMM backends. Each has `name`, `operand_dtype` and `bmm(a, b)` -> exact integer accumulators:
"reference" (fp32 GEMMs on K-chunks, any device), "torch" (`torch._int_mm`, CPU and CUDA), "cupy" (the
CUDA kernels).

`resolve_backend(choice, device)` is the one place that maps a config choice and a tensor's device to
a backend; the autograd op calls it per call, so a module moved between devices follows along.
"""
from __future__ import annotations

import torch

from .probe import cpu_choice
from .reference import ReferenceBackend

_BACKENDS: dict[str, object] = {"reference": ReferenceBackend()}


def _register_builtin() -> None:
    """"torch" (torch._int_mm, CPU and CUDA) always; "cupy" when CuPy is installed (found, not imported:
    importing int8fx never needs CuPy)."""
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
    """The backend a call on `device` runs. "auto": on the CPU, whichever exact GEMM a one-time probe
    measured faster on this CPU (int8fx.kernels.probe); on CUDA "torch" (cuBLASLt's int8 GEMM), the
    fastest of the exact backends verified on a GPU (H200: 2.2x the CuPy kernel's GEMM at 8192^3, the
    fastest training step of the three; benchmarks/RESULTS.md). "cupy" runs on CUDA devices of compute
    capability >= 8.0 (older GPUs get "torch", CPU tensors the reference)."""
    if choice == "auto":
        return _BACKENDS[cpu_choice().backend if device.type == "cpu" else "torch" if device.type == "cuda"
                         else "reference"]
    try:
        backend = _BACKENDS[choice]
    except KeyError:
        raise RuntimeError(f"backend {choice!r} is not available here; available: {', '.join(_BACKENDS)}") from None
    if choice == "cupy" and device.type != "cuda":
        return _BACKENDS["reference"]
    if choice == "cupy":
        from .cupy_backend import runs_on

        return backend if runs_on(device) else _BACKENDS["torch"]
    if choice == "torch" and device.type == "cpu":
        from .torch_backend import cpu_int_mm_wrong

        wrong = cpu_int_mm_wrong()
        if wrong:
            raise RuntimeError(f"int8fx: backend='torch' is not exact on this CPU ({wrong}); use backend='auto', "
                               "which takes the exact reference GEMM here, or 'reference'")
    return backend


def cpu_report() -> str:
    """What `backend="auto"` runs on this CPU and why, with the CPU model and its ISA flags, and which form of
    the direct conv is in use (`int8fx inspect` and `int8fx bench` print it)."""
    from . import direct  # (here, not in probe: direct times its choices with probe.best_of)

    c = cpu_choice()
    form = direct.FORMS.get(c.backend)
    conv = (f"; oneDNN's direct {form} conv (K <= {direct.exact_k(form)})"
            + (" and fp32 weight gradient (by chunks of images)" if direct.exact("fp32") else "")
            + " exact here: taken per conv geometry where measured faster than im2col + GEMM"
            if form and direct.exact(form) else "")
    return f"{c.cpu} [{', '.join(c.flags) or 'no int8 dot-product flags'}]: {c.reason}{conv}"
