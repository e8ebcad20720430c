"""The exception an export raises."""


class OnnxExportError(RuntimeError):
    """The model (or a node of it) cannot be expressed in ONNX, or the written graph lacks what the model
    needs; the message names the node or the site."""
