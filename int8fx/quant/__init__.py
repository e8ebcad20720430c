"""Pure tensor math of INT8 quantization: scales, (de)quantize, rounding, gradient clip policies."""
from .core import (QMAX, absmax, cosine_distance, dequantize, nonfinite_poison, quantize, quantize_per_channel,
                   quantize_per_tensor, scale_from_clip)
from .grad import GradQuantizer, grad_quantizer_class, grad_quantizer_names, make_grad_quantizer, register_grad_quantizer
from . import policies  # noqa: F401  (registers gvq, mcs, gvq-mcs, gvq-mcs-search, dsgc)

__all__ = [
    "QMAX", "absmax", "cosine_distance", "dequantize", "nonfinite_poison", "quantize", "quantize_per_channel",
    "quantize_per_tensor", "scale_from_clip", "GradQuantizer", "grad_quantizer_class", "grad_quantizer_names", "make_grad_quantizer",
    "register_grad_quantizer",
]
