"""Autograd op and modules for INT8 conv/linear training."""
from .functional import Int8GemmFunction, quantized_forward
from .modules import Int8Layer, float_state_dict, make_spec

__all__ = ["Int8GemmFunction", "Int8Layer", "float_state_dict", "make_spec", "quantized_forward"]
