"""Both ONNX forms (and the deploy form with target="onnxruntime") load and run in an older onnxruntime
(1.17, the last release that refuses IR version 10), installed from PyPI into a side directory and run in a
subprocess, so the suite's own onnxruntime is untouched. Slow: it downloads two wheels (onnxruntime 1.17 is
built against NumPy 1.x, hence numpy<2).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import int8fx

ort = pytest.importorskip("onnxruntime")

OLD = "1.17.3"

@pytest.mark.slow
def test_onnxruntime_1_17_loads_and_runs_both_forms(tmp_path):
    from test_onnx_deploy import _trained  # noqa: E402 - the deploy tests' model: residuals, fan-outs, SiLU, SE

    qm = _trained()
    torch.manual_seed(1)
    calib = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    x = calib[0].numpy()
    files = {"faithful": {"form": "faithful"}, "deploy": {"form": "deploy"},
             "deploy_onnxruntime": {"form": "deploy", "target": "onnxruntime"}}
    for name, kwargs in files.items():
        int8fx.export_onnx(qm, calib[0], tmp_path / f"{name}.onnx", calibration_data=calib[1:], **kwargs)
        out = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"input": x})[0]
        np.save(tmp_path / f"{name}.npy", out)
    np.save(tmp_path / "x.npy", x)

    side = tmp_path / "ort117"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(side),
                          f"onnxruntime=={OLD}", "numpy<2"], capture_output=True, text=True)
    if pip.returncode and any(w in pip.stderr for w in ("Could not find a version", "ConnectionError",
                                                        "Temporary failure", "No matching distribution")):
        pytest.skip(f"cannot install onnxruntime {OLD} from the package index: {pip.stderr.strip()[-300:]}")
    assert pip.returncode == 0, pip.stderr

    script = textwrap.dedent(f"""
        import json, os, numpy as np, onnxruntime as ort
        d = {str(tmp_path)!r}
        x = np.load(os.path.join(d, "x.npy"))
        result = {{"version": ort.__version__}}
        for form in {list(files)!r}:
            so = ort.SessionOptions()
            so.optimized_model_filepath = os.path.join(d, form + ".opt.onnx")
            sess = ort.InferenceSession(os.path.join(d, form + ".onnx"), so, providers=["CPUExecutionProvider"])
            out = sess.run(None, {{"input": x}})[0]
            want = np.load(os.path.join(d, form + ".npy"))
            result[form] = float(np.abs(out - want).max() / np.abs(want).max())
        print(json.dumps(result))
    """)
    env = dict(os.environ, PYTHONPATH=str(side))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["version"] == OLD
    # same graph, another release's kernels: the faithful file agrees to float rounding; the deploy file's
    # integer kernels agree up to a rare rounding-tie flip of one INT8 step
    assert result["faithful"] < 1e-5, result
    assert result["deploy"] < 0.02 and result["deploy_onnxruntime"] < 0.02, result

    import onnx

    n_sites = sum(1 for _ in int8fx.passes.sites_of(qm))
    for name in ("deploy", "deploy_onnxruntime"):
        ops = [n.op_type for n in onnx.load(tmp_path / f"{name}.opt.onnx").graph.node]
        assert ops.count("QLinearConv") + ops.count("QGemm") + ops.count("QLinearMatMul") == n_sites, (name, ops)
