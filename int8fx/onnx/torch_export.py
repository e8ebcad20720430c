"""Turn the export copy of a model into an ONNX ModelProto with one of torch's two exporters.

  * "dynamo": the torch.export-based exporter (`torch.onnx.export(..., dynamo=True)`), torch's default
    since 2.9. The INT8 site op reaches it as `int8fx::qdq_gemm` and is written by an onnxscript
    function (`qdq_op.ONNX_TRANSLATIONS`). Needs onnxscript, opset >= 18 and torch >= 2.6 (torch 2.5's
    takes no custom translation).
  * "torchscript": the deprecated TorchScript exporter, kept while torch ships it; `int8fx::qdq_gemm` is
    written by a registered symbolic. Any opset >= 13.
  * "auto" (default): "dynamo" where torch defaults to it (and the opset allows), else "torchscript"; when
    torch.export cannot capture the model (data-dependent Python control flow, ...) it falls back to
    the TorchScript exporter.

Either way the model comes back in memory (no temporary or external-data files), cleaned for the widest
runtime support: IR version the lowest its opsets allow (IR 8 for opset 17-18: onnxruntime >= 1.14), no
per-node metadata or doc strings (torch puts stack traces there, and node metadata forces IR 10, which
onnxruntime <= 1.17 refuses). An op torch cannot lower raises `OnnxExportError` naming the fx node or the
source line that calls it.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import linecache
import os
import re
import sys
import tempfile
import warnings

import torch
import torch.nn as nn

from ..nn.scope import no_fused_fastpath
from .errors import OnnxExportError
from .qdq_op import ONNX_TRANSLATIONS, register_torchscript_symbolic

EXPORTERS = ("auto", "dynamo", "torchscript")
DEFAULT_OPSET = 18
MIN_OPSET = 13  # per-axis DequantizeLinear
DYNAMO_MIN_OPSET = 18  # torch's onnxscript function library is written for opset 18


def max_opset() -> int:
    import onnx

    return onnx.defs.onnx_opset_version()


def dynamo_writes_int8_sites() -> bool:
    """Whether this torch's torch.export-based exporter can be given the ONNX function of `int8fx::qdq_gemm`
    (`custom_translation_table`, torch >= 2.6). torch 2.5's has no way in: it would stop at the first INT8
    site ("no ONNX function"), so that exporter is refused up front there."""
    return "custom_translation_table" in inspect.signature(torch.onnx.export).parameters


def resolve_exporter(exporter: str, opset: int) -> str:
    """The exporter `exporter` means for this torch, onnxscript and opset."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if exporter != "auto":
        if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
            raise ValueError(f"the torch.export-based exporter needs opset >= {DYNAMO_MIN_OPSET}, got {opset}")
        if exporter == "dynamo" and not dynamo_writes_int8_sites():
            raise ValueError(f"the torch.export-based exporter of torch {torch.__version__} takes no ONNX "
                             "translation for INT8 sites (that needs torch >= 2.6); use exporter='torchscript'")
        return exporter
    dynamo_default = inspect.signature(torch.onnx.export).parameters.get("dynamo")
    if dynamo_default is None or dynamo_default.default is not True or opset < DYNAMO_MIN_OPSET \
            or not dynamo_writes_int8_sites():
        return "torchscript"
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return "torchscript"
    return "dynamo"


def export_graph(module: nn.Module, args: tuple, *, exporter: str, opset: int, input_names: list[str],
                 output_names: list[str], dynamic_batch: bool):
    """(onnx.ModelProto, the exporter that wrote it) for `module(*args)` in eval mode."""
    chosen = resolve_exporter(exporter, opset)
    with no_fused_fastpath():
        return _export_with(chosen, exporter, module, args, opset, input_names, output_names, dynamic_batch)


def _export_with(chosen, exporter, module, args, opset, input_names, output_names, dynamic_batch):
    if chosen == "dynamo":
        try:
            return _dynamo(module, args, opset, input_names, output_names, dynamic_batch), "dynamo"
        except _DynamoFailed as e:
            if exporter != "auto":
                raise OnnxExportError(str(e)) from e
            try:  # where torch.export cannot capture the model, or torch's translation lacks an op it needs
                return _torchscript(module, args, opset, input_names, output_names, dynamic_batch), "torchscript"
            except OnnxExportError as e2:
                raise OnnxExportError(f"{e2} (the torch.export-based exporter failed too: {e})") from e2
    return _torchscript(module, args, opset, input_names, output_names, dynamic_batch), "torchscript"


def clean(model) -> None:
    """Lowest IR version the opsets allow; no node/value metadata or doc strings (see module docstring);
    constants as initializers, not Constant nodes (`_constants_as_initializers`); no Identity nodes but
    those that write a graph output: constants read directly from initializers, not through the Identity
    nodes torch's constant de-duplication leaves (runtimes and TensorRT want scales and zero points as
    initializers), and activations read where they are made (an Identity between a tensor
    and its readers hides a fan-out from the deploy form's quantizer, which then quantizes the tensor
    twice: timm's ghostnet); no unused initializers."""
    import onnx

    _constants_as_initializers(model.graph)
    _bypass_identities(model.graph)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    for n in model.graph.node:
        del n.metadata_props[:]
        n.doc_string = ""
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        del v.metadata_props[:]
        v.doc_string = ""
    for t in model.graph.initializer:
        del t.metadata_props[:]
    del model.graph.metadata_props[:]
    model.graph.doc_string = ""
    model.doc_string = ""
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)


def _constants_as_initializers(graph) -> None:
    """Constant nodes become initializers. The TorchScript exporter writes axes, shapes and clip bounds as
    Constant nodes, where the torch.export-based one writes initializers; the deploy form's rewrites read
    such values as initializers, so on the TorchScript graph a ReduceMean over H and W stayed a float
    ReduceMean (not an INT8 global pool) and a ReLU6's Clip kept its bounds unread."""
    import numpy as np
    from onnx import helper, numpy_helper

    outputs = {o.name for o in graph.output}
    scalars = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    for n in list(graph.node):
        if n.op_type != "Constant" or n.domain not in ("", "ai.onnx") or len(n.attribute) != 1 \
                or n.output[0] in outputs:
            continue
        a = n.attribute[0]
        if a.name == "value":
            tensor = helper.get_attribute_value(a)
            tensor.name = n.output[0]
        elif a.name in scalars:
            tensor = numpy_helper.from_array(np.array(helper.get_attribute_value(a), scalars[a.name]), n.output[0])
        else:  # sparse or string constants: left as they are
            continue
        graph.initializer.append(tensor)
        graph.node.remove(n)


def _bypass_identities(graph) -> None:
    outputs = {o.name for o in graph.output}
    alias = {}
    for n in list(graph.node):
        if n.op_type == "Identity" and n.output[0] not in outputs:
            alias[n.output[0]] = alias.get(n.input[0], n.input[0])
            graph.node.remove(n)
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]


# --------------------------------------------------------------------------- torch.export-based exporter
class _DynamoFailed(Exception):
    """The torch.export-based exporter failed: torch.export could not capture the model as a graph, or torch's
    ONNX translation of the captured graph failed (an op without an ONNX function, a failed decomposition:
    timm's BEiT). With exporter="auto", the TorchScript exporter gets its turn."""


def _dynamic_shapes(module, args: tuple, dynamic_batch: bool):
    """Dimension 0 of every tensor input with the first input's batch size is one symbolic "batch"
    (structured for the module's own signature, *args included, by torch's ShapesCollection)."""
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch")
    first = next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim()), None)
    shapes = torch.export.ShapesCollection()
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == first:
            shapes[a] = {0: batch}
    return shapes.dynamic_shapes(module, args)


def _dynamo(module, args, opset, input_names, output_names, dynamic_batch):
    """The ModelProto, with a symbolic batch named "batch" (`Dim("batch")`). Where torch.export guards that
    batch against a value, the file would be wrong (or refused) at that batch size, so it is an error with
    the ways out: torch 2.9 guards some models' batch against 1 for its layout decisions on size-1
    dimensions (later releases do not); code that branches on the batch size does it on any release."""
    try:
        return _dynamo_once(module, args, opset, input_names, output_names,
                            _dynamic_shapes(module, args, dynamic_batch))
    except _DynamoFailed as e:
        guard = _batch_constraint(e)
        if guard is None:
            raise
        raise _DynamoFailed(f"cannot export to ONNX with a dynamic batch: torch.export of torch {torch.__version__} "
                            f"restricts the batch size ({guard}); export with exporter='torchscript' (exporter='auto' "
                            "falls back to it), or with dynamic_batch=False for a file of the example's batch size") \
            from e


def _batch_constraint(e: BaseException) -> str | None:
    """The guard torch.export put on the symbolic batch, where that made the export fail."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        found = re.search(r"Constraints violated \(batch\)!.*?satisfy the generated guard ([^\n]*?)\.?$", str(e),
                          re.DOTALL | re.MULTILINE)
        if found:
            return found.group(1).strip()
        e = e.__cause__ or e.__context__
    return None


def _dynamo_once(module, args, opset, input_names, output_names, dynamic_shapes):
    from torch.onnx._internal.exporter import _errors

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_logs():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=dynamic_shapes,
                                        custom_translation_table=ONNX_TRANSLATIONS, optimize=True, report=False,
                                        verbose=False)
    except OnnxExportError:
        raise
    except Exception as e:
        cause = _root_cause(e)
        if isinstance(cause, OnnxExportError):  # raised by a stand-in while torch.export ran the model
            raise cause from None
        if isinstance(e, _errors.TorchExportError):
            raise _DynamoFailed(f"cannot export to ONNX: torch.export cannot capture the model: "
                                f"{_first_line(cause)}") from e
        raise _DynamoFailed(_explain_dynamo_failure(module, args, e, opset)) from e
    return program.model_proto


@contextlib.contextmanager
def _quiet_logs():
    """torch.export logs its specialisation decisions as warnings on the root logger; not the user's concern.
    Nor is the traceback torch's guard builder logs as an error when a batch guard violates the dynamic
    batch (torch 2.9): that failure reaches the user as `_dynamo`'s exception, which names the guard."""
    import logging

    quiet = {"torch.export": logging.ERROR, "torch._export": logging.ERROR, "torch.onnx": logging.ERROR,
             "torch.fx.experimental.symbolic_shapes": logging.ERROR, "torch._guards": logging.CRITICAL}
    loggers = [logging.getLogger(n) for n in quiet]
    levels = [lg.level for lg in loggers]
    for lg, level in zip(loggers, quiet.values()):
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


_ATEN_DOT = re.compile(r"aten\.(\w+)")


def _explain_dynamo_failure(module, args, e: Exception, opset: int) -> str:
    text = str(e)
    found = _ATEN_DOT.search(text[text.find("No ONNX function"):]) if "No ONNX function" in text else None
    if not found:  # not a missing op (a decomposition that failed: torch's own error says where)
        return f"cannot export to ONNX (opset {opset}): {_first_line(_root_cause(e))}"
    op = found.group(1)
    where = []
    try:
        with warnings.catch_warnings(), _quiet_logs(), torch.no_grad():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, args, strict=False)
        for node in ep.graph.nodes:
            if node.op == "call_function" and str(node.target).split(".")[1:2] == [op]:
                desc = _describe_stack(node.meta.get("stack_trace") or "")
                if desc and desc not in where:
                    where.append(desc)
    except Exception:  # capturing alone failed: fall back to the exporter's own words
        pass
    if where:
        return f"cannot export to ONNX (opset {opset}): {'; '.join(where)} has no ONNX form (aten::{op})"
    return f"cannot export to ONNX (opset {opset}): aten::{op} has no ONNX form ({_first_line(_root_cause(e))})"


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _describe_stack(stack: str) -> str | None:
    """The innermost frame of a node's stack trace: int8fx's generated graph code names its fx node."""
    frames = _FRAME.findall(stack)
    if not frames:
        return None
    file, lineno, fn = frames[-1]
    return _describe_line(file, int(lineno), fn)


_ASSIGN_RE = re.compile(r"^\s*(\w+)\s*=")


def _describe_line(file: str, lineno: int, scope: str = "") -> str:
    code = linecache.getline(file, lineno).strip()
    if file.startswith("<int8fx"):  # a forward int8fx rewrote with torch.fx (nn/twins.compile_graph)
        a = _ASSIGN_RE.match(code)
        label = file.strip("<>").removeprefix("int8fx ").rsplit(" #", 1)[0]
        if a:
            return f"fx node '{a.group(1)}' of {label} (`{code.split(';')[0]}`)"
    return f"code at {file}:{lineno} (`{code}`{', in ' + scope if scope else ''})"


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------- TorchScript exporter
def _torchscript(module, args, opset, input_names, output_names, dynamic_batch):
    import onnx

    register_torchscript_symbolic(opset)
    dynamic_axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
    kwargs = dict(opset_version=opset, input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                  do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), _quiet_fds():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, buf, **kwargs)
    except OnnxExportError:
        raise
    except Exception as e:
        if isinstance(e.__cause__, OnnxExportError):
            raise e.__cause__ from None
        raise OnnxExportError(_explain_torchscript_failure(module, args, e, opset)) from e
    return onnx.load_from_string(buf.getvalue())


@contextlib.contextmanager
def _quiet_fds():
    """torch's TorchScript exporter dumps its whole IR to the C++ stderr/stdout when it fails; keep that out
    of the user's terminal (the exception we raise says what went wrong)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for s in saved:
                os.close(s)


_ATEN_RE = re.compile(r"(aten|prim|onnx)::(\w+)")
_SRC_RE = re.compile(r"^(.*)\((\d+)\): (\S+)$")


def _explain_torchscript_failure(module, args, e: Exception, opset: int) -> str:
    """Name the fx node (or source line) whose op torch could not lower to ONNX."""
    text = _first_line(e)
    found = _ATEN_RE.search(str(e))
    where = []
    if found:
        kind = f"{found.group(1)}::{found.group(2)}"
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(module, args, check_trace=False, strict=False)
            nodes = [n for n in traced.inlined_graph.nodes() if n.kind() == kind]
        except Exception:  # tracing itself failed: fall back to the exporter's own message
            nodes = []
        for n in nodes:
            lines = str(n.sourceRange()).splitlines()
            m = _SRC_RE.match(lines[0].strip()) if lines else None
            if m:
                desc = _describe_line(m.group(1), int(m.group(2)))
                if desc not in where:
                    where.append(desc)
    if where:
        return (f"cannot export to ONNX (opset {opset}): {'; '.join(where)} has no ONNX form "
                f"({found.group(0)}). torch says: {text}")
    return f"cannot export to ONNX (opset {opset}): {text}"
