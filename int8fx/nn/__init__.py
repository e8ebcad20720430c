"""The INT8 training op, the sites that call it, and the twin classes that carry them in a user's model."""
from .functional import Int8GemmFunction, quantized_forward
from .modules import Int8Function, Int8Layer, ModuleSite, float_state_dict, make_spec
from .twins import Rewritten, Routed

__all__ = ["Int8Function", "Int8GemmFunction", "Int8Layer", "ModuleSite", "Rewritten", "Routed", "float_state_dict",
           "make_spec", "quantized_forward"]
