"""Checks on an exported graph before it is written, and what a runtime makes of it.

`full_check`: the ONNX checker with shape inference. Each form checks its own per-site Q/DQ structure
where it finds it (`faithful.annotate`, `deploy._annotate`): a site call without it fails the export.
`runs_in_onnxruntime`: one run of the deploy graph in a child process, which a runtime crash cannot take
down with the export.
`runtime_ops`: the op types onnxruntime runs after its graph optimizations, and for each INT8 site the
op its compute node became (QLinearConv, QGemm, ...): how tests and the benchmark show that the
convolutions of a deploy file run in INT8.
`tie_flip_sensitivity`: how far one-step flips of activations on rounding ties move a model's output, the
yardstick a faithful file's distance from `qmodel.eval()` is judged by (tests, `benchmarks/onnx_models.py`).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import warnings

from .errors import OnnxExportError


def full_check(model) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # the graph is not valid ONNX: say so, naming what the checker names
        raise OnnxExportError(f"the exported graph fails onnx.checker: {e}") from e


_RUN_ONCE = """
import os
import sys
import numpy as np
import onnxruntime as ort
so = ort.SessionOptions()
if (os.cpu_count() or 1) < 2:
    so.intra_op_num_threads = 2  # (onnxruntime's own default elsewhere: the crash below needed two threads)
so.log_severity_level = 3
session = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
feed = np.load(sys.argv[2])
session.run(None, {name: feed[name] for name in feed.files})
"""
RUN_TIMEOUT = 900  # seconds the run-once check waits for onnxruntime before it gives up (with a warning)


def runs_in_onnxruntime(model, feed: dict) -> None:
    """Run the graph once on `feed` with onnxruntime's full optimizations, in a child process, or raise
    `OnnxExportError`: a file that crashes the runtime is worse than no file. Why a child process: the
    crash this guards against is a segfault inside onnxruntime's kernels (1.32: QLinearMul on an empty
    tensor, a detector's image without detections, with two threads or more), which would take the
    exporting process with it."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="int8fx-run-") as d:
        path, inputs = os.path.join(d, "model.onnx"), os.path.join(d, "feed.npz")
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        np.savez(inputs, **feed)
        try:
            done = subprocess.run([sys.executable, "-c", _RUN_ONCE, path, inputs], capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            warnings.warn(f"int8fx.export_onnx: onnxruntime did not finish one run of the graph in {RUN_TIMEOUT} s; "
                          "the file is written unchecked by a run", stacklevel=4)
            return
    if done.returncode < 0:
        raise OnnxExportError(f"onnxruntime crashed ({signal.Signals(-done.returncode).name}) running the exported "
                              "graph once on the first calibration batch; no file is written")
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise OnnxExportError(f"onnxruntime cannot run the exported graph on the first calibration batch: {last}")


INT8_KERNELS = ("QLinearConv", "ConvInteger", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul")


def runtime_ops(model_or_path, *, threads: int = 1, level: str = "all") -> dict[str, str]:
    """{node name: op type} of the graph onnxruntime runs (CPU) after its optimizations at `level`
    ("basic", "extended", "all"). Fused nodes keep the name of the node they replace, so an INT8 site's
    "<site>/compute" node shows the kernel it runs in (QLinearConv, QGemm, ...) or stays "Conv"."""
    import onnx
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else os.fspath(model_or_path)
    with tempfile.TemporaryDirectory(prefix="int8fx-ort-") as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[level]
        so.intra_op_num_threads = threads
        so.log_severity_level = 3  # (a warning that an ORT_ENABLE_ALL graph is machine-specific: we only read it)
        so.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(so.optimized_model_filepath)
    return {re.sub(r"_token_\d+$", "", n.name): n.op_type for n in optimized.graph.node}


def int8_sites(meta: dict, ops: dict[str, str]) -> dict[str, list[str]]:
    """{site: [the op each of its calls runs as]} from `runtime_ops` and the file's metadata."""
    return {site: [ops.get(call["compute"], "removed") for call in entry.get("onnx") or []]
            for site, entry in meta["layers"].items()}


def tie_flip_sensitivity(qmodel, x, trials: int = 16, output=None):
    """(eval output, the largest change of it under ~32 ulps of noise on the input and on every INT8 site's
    input); `output` picks the tensor compared from what the model returns (a transformers ModelOutput's
    logits), by default all of it.

    A faithful file computes `qmodel.eval()`'s integers, but onnxruntime sums in another order, so a value
    on a rounding tie can land one step away; how far such flips carry to the output is the model's own
    property, measured here by perturbing the values that are rounded. 8 ulps x 8 trials of input noise
    proved too few: on mobilenet_v2 it found no flip (sensitivity 0) while onnxruntime's own summation order
    flipped one activation; and input noise alone found none on transformers' RegNet, whose first site's
    codes it never moved, while the file's float sums flipped codes of its second site (0.2 of the output)."""
    import torch

    from ..nn.modules import Int8Layer

    pick = output or (lambda out: out)
    g = torch.Generator().manual_seed(1)

    def jitter(t):
        return t * (1 + 2.0 ** -19 * torch.randn(t.shape, generator=g).to(t.device, t.dtype))

    def perturb_input(module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            return (jitter(args[0]), *args[1:])
        return None

    with torch.no_grad():
        ref = pick(qmodel(x))
        sites = [m for m in qmodel.modules() if isinstance(m, Int8Layer)]
        worst = max((pick(qmodel(jitter(x))) - ref).abs().max().item() for _ in range(trials))
        hooks = [m.register_forward_pre_hook(perturb_input) for m in sites]
        try:
            worst = max([worst] + [(pick(qmodel(jitter(x))) - ref).abs().max().item() for _ in range(trials)])
        finally:
            for h in hooks:
                h.remove()
    return ref, worst
