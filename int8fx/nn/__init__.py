"""The INT8 training op, the sites that call it, and the twin classes that carry them in a user's model."""
from .functional import gemm_op, int8_gemm, quantized_forward
from .modules import Int8Function, Int8Layer, ModuleSite, float_state_dict, make_spec
from .state import commit
from .twins import Rewritten, Routed

__all__ = ["Int8Function", "Int8Layer", "ModuleSite", "Rewritten", "Routed", "commit", "float_state_dict", "gemm_op",
           "int8_gemm", "make_spec", "quantized_forward"]
