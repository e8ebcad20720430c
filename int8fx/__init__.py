"""int8fx: train any PyTorch CNN in INT8 (forward and both backward GEMMs), built on torch.fx."""
from .config import ConfigError, Int8Config
from .nn.modules import float_state_dict
from .optim import DeviationLRScaler
from .passes import convert
from .report import inspect

__version__ = "0.1.0"
__all__ = ["ConfigError", "DeviationLRScaler", "Int8Config", "convert", "float_state_dict", "inspect", "__version__"]
