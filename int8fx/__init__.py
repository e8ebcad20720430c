"""int8fx: train any PyTorch CNN in INT8 (forward and both backward GEMMs), built on torch.fx."""
from .config import ConfigError, Int8Config
from .nn.modules import float_state_dict
from .nn.state import commit
from .optim import DeviationLRScaler
from .passes import convert, to_float
from .onnx import deploy_numerics, export_onnx, read_onnx_metadata
from .report import inspect
from .fusing import STATIC_AFTER as _STATIC_AFTER
from .kernels import direct as _direct, windows as _windows

# Eager training steps after which an INT8 model runs the same kernels step after step: by a shape's third
# call int8fx has measured its per-shape choices (oneDNN's direct conv, the GPU's im2col copies) and compiled
# its exact-shape passes, which a CUDA graph's capture must not contain (README, "CUDA graphs"); two to spare.
WARMUP_STEPS = max(_STATIC_AFTER, _direct.DECIDE_AT, _windows.DECIDE_AT) + 2

__version__ = "0.1.0"
__all__ = ["ConfigError", "DeviationLRScaler", "Int8Config", "commit", "convert", "deploy_numerics", "export_onnx", "float_state_dict", "inspect",
           "read_onnx_metadata", "to_float", "WARMUP_STEPS", "__version__"]
