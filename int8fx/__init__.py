"""int8fx: train any PyTorch CNN in INT8 (forward and both backward GEMMs), built on torch.fx."""
from .config import ConfigError, Int8Config
from .nn.modules import float_state_dict
from .nn.state import commit
from .optim import DeviationLRScaler
from .passes import convert, to_float
from .onnx import deploy_numerics, export_onnx, read_onnx_metadata
from .report import inspect

__version__ = "0.1.0"
__all__ = ["ConfigError", "DeviationLRScaler", "Int8Config", "commit", "convert", "deploy_numerics", "export_onnx", "float_state_dict", "inspect",
           "read_onnx_metadata", "to_float", "__version__"]
