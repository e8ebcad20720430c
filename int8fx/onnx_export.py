"""Former home of the ONNX export, kept so that existing imports work: the code is the package `int8fx.onnx`."""
from .onnx import OnnxExportError, OnnxMetadataError, export_onnx, read_onnx_metadata

__all__ = ["OnnxExportError", "OnnxMetadataError", "export_onnx", "read_onnx_metadata"]
