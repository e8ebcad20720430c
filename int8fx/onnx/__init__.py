"""ONNX export of a converted model: a faithful QDQ graph or a deployable INT8 graph, with metadata.

    export.py        export_onnx(): calibrate, build the form, check, attach metadata, write
    calibrate.py     static activation scales and INT8 weights per site, found by running the model
    standins.py      the modules that replace INT8 sites in the copy torch exports
    qdq_op.py        the faithful site as one torch op and its ONNX form for both exporters
    torch_export.py  torch.export-based or TorchScript exporter, errors that name the node
    batch_size.py    no symbolic batch for a model that computes an input differently alone
    faithful.py      the QDQ graph equal to qmodel.eval()
    deploy.py        the graph runtimes run in INT8 (BatchNorm folded, int8/int32 initializers): how it is built
    emulate.py       deploy_numerics(): the model computes (and trains through) what its deploy file computes
    roundings.py     what a deploy file rounds beyond qmodel.eval(), read from the file for deploy_numerics
    float_nodes.py   which nodes of the deploy graph stay float, as int8fx computes them
    int8_ops.py      ops without an INT8 kernel rewritten into equal ones that have one
    quantized.py     the quantizer's graph made what onnxruntime fuses and what int8fx computes
    graphs.py        reading a graph; finding each site's node by its INT8 weights
    check.py         verification of a built graph; what onnxruntime runs
    metadata.py      the metadata schema, validation, read_onnx_metadata
    cli.py           `int8fx export`
"""
from .emulate import DeployNumericsError, deploy_numerics
from .errors import OnnxExportError
from .export import export_onnx
from .metadata import METADATA_KEY, SCHEMA, SCHEMA_VERSION, OnnxMetadataError, read_onnx_metadata, tensor_from_json
from .torch_export import DEFAULT_OPSET

__all__ = ["DEFAULT_OPSET", "DeployNumericsError", "METADATA_KEY", "OnnxExportError", "OnnxMetadataError", "SCHEMA", "SCHEMA_VERSION",
           "deploy_numerics", "export_onnx", "read_onnx_metadata", "tensor_from_json"]
