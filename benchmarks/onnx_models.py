"""Both ONNX export forms on many models: does each export, and is each file what it claims to be.

The unit tests export a handful of models; users bring others. Per model (random init, 10 classes, two
INT8 SGD steps on one random batch, then eval mode), with the default exporter:
  faithful  export, run in onnxruntime, and compare with `qmodel.eval()` on the same batch: the largest
            difference relative to the output's absmax, and whether it is within twice the model's own
            tie-flip sensitivity (`int8fx.onnx.check.tie_flip_sensitivity`), the bound `tests/test_onnx.py`
            holds its models to;
  deploy    export (`--target`, portable by default) calibrated on that batch, and count in onnxruntime's
            optimized graph (ORT_ENABLE_ALL, CPU) the sites whose every call runs in an INT8 kernel
            (QLinearConv, QGemm, ...); its difference from `qmodel.eval()` is shown, not judged (the
            deploy form rounds where int8fx does not), and so is the difference of `qmodel.eval()` inside
            `int8fx.deploy_numerics(qmodel, file)` (which adds the file's roundings) from the file, or why
            the emulation refused the model.
A row fails on an export error, a faithful file outside its bound, or a site left in float that the
metadata does not explain (transposed convs, which onnxruntime has no integer kernel for, convs whose
output the model returns, and weights computed from the input are listed, not failed).

    python benchmarks/onnx_models.py timm:efficientvim_m1 timm:lowformer_b0 mobilenet_v2
    python benchmarks/onnx_models.py timm:hrnet_w18_small --size 128 --json rows.json
    python benchmarks/onnx_models.py resnet18 mobilenet_v2 --target onnxruntime
Names as `benchmarks/model_zoo.py` takes them (models of one input tensor: torchvision classification, timm,
and other libraries': smp:, hf:, monai:, yolo:, ptv:, effnet_pt:, effdet:, pm:, facenet:).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_zoo import Case, all_cases, case_beyond_lists, output_tensors  # noqa: E402

import int8fx  # noqa: E402
from int8fx.onnx.check import INT8_KERNELS, int8_sites, runtime_ops, tie_flip_sensitivity  # noqa: E402


def trained(case: Case) -> tuple[torch.nn.Module, torch.Tensor]:
    """The converted model after two SGD steps (running clips committed), in eval mode, and its batch."""
    torch.manual_seed(0)
    qm = int8fx.convert(case.build())
    (x,) = case.inputs(True)
    x = torch.cat([x, x.flip(0)])  # 4 images: calibration and comparison batch
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    qm.train()
    for _ in range(2):
        opt.zero_grad()
        # (googlenet and inception return their auxiliary logits beside them in training, transformers models
        # a ModelOutput)
        sum(t.float().pow(2).mean() for t in output_tensors(qm(x))).backward()
        opt.step()
    return qm.eval(), x


def first_output(out) -> torch.Tensor:
    """The first tensor a model returns (a tuple's, a ModelOutput's logits): the file's first output."""
    return output_tensors(out)[0]


def run_file(path: str, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def check(case: Case, folder: str, target: str = "portable") -> dict:
    start = time.time()
    qm, x = trained(case)
    ref, sensitivity = tie_flip_sensitivity(qm, x, output=first_output)  # (the file's first output)
    ref = ref.numpy()
    scale = float(np.abs(ref).max()) or 1.0
    row: dict = {"model": case.name, "output_absmax": scale, "tie_flip_sensitivity": sensitivity / scale}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (exporter chatter; failures raise)
        path = os.path.join(folder, "faithful.onnx")
        int8fx.export_onnx(qm, x, path, form="faithful")
        diff = float(np.abs(run_file(path, x) - ref).max())
        row["faithful"] = diff / scale
        row["faithful_bound"] = 2 * sensitivity / scale + 1e-5  # (relative, as tests/test_onnx.py's)
        row["faithful_within_bound"] = diff / scale <= row["faithful_bound"]
        path = os.path.join(folder, "deploy.onnx")
        meta = int8fx.export_onnx(qm, x, path, form="deploy", target=target, calibration_data=[x])
    out = run_file(path, x)
    row["deploy"] = float(np.abs(out - ref).max()) / scale
    try:
        with torch.no_grad(), int8fx.deploy_numerics(qm, path):
            row["emulated"] = float(np.abs(out - first_output(qm(x)).numpy()).max()) / scale
    except (int8fx.onnx.DeployNumericsError, ValueError) as e:
        row["emulated"], row["emulation_refused"] = None, str(e)
    calls = int8_sites(meta, runtime_ops(path))
    in_int8 = {s for s, ops in calls.items() if ops and all(op in INT8_KERNELS for op in ops)}
    # explained: the metadata's list (transposed convs, convs whose output is returned), a weight computed
    # from the input, a site called in training only, an input that never changes (folded at export)
    explained = set(meta["deploy"]["sites_without_onnxruntime_int8_kernel"]) | {
        s for s, e in meta["layers"].items()
        if e["export"] in ("float", "not called", "computed at export") or e.get("fixed_input")}
    row["sites"], row["int8_sites"] = len(calls), len(in_int8)
    row["float_sites"] = sorted(set(calls) - in_int8)
    row["unexplained_float_sites"] = sorted(set(calls) - in_int8 - explained)
    row["seconds"] = round(time.time() - start, 1)
    return row


def ok(row: dict) -> bool:
    return "error" not in row and row["faithful_within_bound"] and not row["unexplained_float_sites"]


def cases_named(names: list[str], size: int | None) -> list[Case]:
    known = {c.name: c for c in all_cases() if c.family in ("classification", "timm")}
    cases = []
    for name in names:
        if name in known and (size is None or not name.startswith("timm:")):
            cases.append(known[name])
        elif (case := case_beyond_lists(name, size)) is not None:
            cases.append(case)
        else:
            raise SystemExit(f"unknown model {name!r}: torchvision classification names, timm names as timm:NAME, "
                             "other libraries' as benchmarks/other_libraries.py names them")
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model names (torchvision classification, timm:NAME)")
    ap.add_argument("--size", type=int, help="input size of timm models (default: model_zoo's, else 64)")
    ap.add_argument("--target", choices=("portable", "onnxruntime"), default="portable",
                    help="the deploy file's target (export_onnx(target=...))")
    ap.add_argument("--json", metavar="PATH", help="write every row as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cases = cases_named(args.models, args.size)
    print(f"{'model':32s} {'faithful':>9s} {'bound':>9s} {'deploy':>9s} {'emulated':>9s} {'int8 sites':>10s} {'s':>6s}  notes",
          flush=True)
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="int8fx-onnx-models-") as folder:
            try:
                row = check(case, folder, args.target)
            except Exception as e:  # report and go on: one failing model must not hide the rest
                row = {"model": case.name, "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        if "error" in row:
            print(f"{case.name:32s} ERROR {row['error'].splitlines()[0][:140]}", flush=True)
            continue
        notes = ([] if row["faithful_within_bound"] else ["faithful outside 2x tie-flip sensitivity"]) + (
            [f"float: {', '.join(row['float_sites'][:3])}{' ...' if len(row['float_sites']) > 3 else ''}"]
            if row["float_sites"] else []) + (
            [f"emulation refused: {row['emulation_refused'][:100]}"] if row.get("emulation_refused") else [])
        emulated = f"{row['emulated']:9.2e}" if row["emulated"] is not None else f"{'-':>9s}"
        print(f"{case.name:32s} {row['faithful']:9.2e} {row['faithful_bound']:9.2e} {row['deploy']:9.2e} {emulated} "
              f"{row['int8_sites']:>4d}/{row['sites']:<5d} {row['seconds']:6.1f}  {'; '.join(notes)}", flush=True)
    good = sum(ok(r) for r in rows)
    print(f"{good}/{len(rows)} models export in both forms, the faithful file within its bound, every site "
          "in INT8 kernels or explained")
    return 0 if good == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
