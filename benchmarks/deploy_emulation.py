"""The deploy file emulated in PyTorch (`int8fx.deploy_numerics`), and fine-tuning through its rounding.

For each model trained by benchmarks/onnx_runtime.py (its --out directory holds `<model>.pt` and
`<model>.deploy.onnx`), on the Fashion-MNIST test images:
  * top-1 of `qmodel.eval()`, of the deploy file (onnxruntime, CPU) and of `qmodel.eval()` inside
    `int8fx.deploy_numerics(qmodel, file)`, and how often their predictions agree: the emulation should
    agree with the file (nearly) always, which says that the roundings it adds are the whole difference;
  * with --finetune N: N more SGD steps from the checkpoint, once plain and once inside
    `deploy_numerics` (training through the file's roundings), each followed by a new deploy export
    (recalibrated) and the same measurements;
  * with --by-rounding: instead, the agreement with `qmodel.eval()` of the emulation making one kind of the
    file's rounding at a time (`deploy_numerics(..., roundings=kind)`: site outputs, int32 biases, residual
    Adds, average poolings, site inputs saturating at -128), then all: what each costs.

    python benchmarks/onnx_runtime.py --steps 1200 --out runs/onnx_runtime_1200
    python benchmarks/deploy_emulation.py --out runs/onnx_runtime_1200 --finetune 300
    python benchmarks/deploy_emulation.py --out runs/onnx_runtime_1200 --by-rounding
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from onnx_runtime import calibration_batches, images, predict_onnx, predict_torch, session  # noqa: E402

import int8fx  # noqa: E402
from int8fx.data import load_fashion_mnist  # noqa: E402
from int8fx.onnx.emulate import ROUNDING_KINDS  # noqa: E402


def emulate(qm, path: str, x_test, size: int, roundings=ROUNDING_KINDS) -> np.ndarray:
    """qmodel.eval()'s predictions inside `int8fx.deploy_numerics` of the deploy file at `path`."""
    with int8fx.deploy_numerics(qm.eval(), path, roundings):
        return predict_torch(qm, x_test, size)


def by_rounding(args, x_test, y) -> None:
    """One row per model: agreement with qmodel.eval() when the emulation rounds one kind at a time."""
    print("| model | top-1 qmodel.eval() | agreement with qmodel.eval(), rounding only: " +
          " | ".join(ROUNDING_KINDS) + " | all (the emulation) | the deploy file |")
    print("|---|---:|" + "---:|" * (len(ROUNDING_KINDS) + 2))
    for name in args.models.split(","):
        tag = name.replace(":", "_")
        saved = torch.load(os.path.join(args.out, f"{tag}.pt"), weights_only=False)
        qm, path, ref = saved["model"].eval(), os.path.join(args.out, f"{tag}.deploy.onnx"), saved["eval_predictions"]
        ref = ref[:args.images]
        agree = [100 * np.mean(emulate(qm, path, x_test, args.size, (kind,)) == ref) for kind in ROUNDING_KINDS]
        agree.append(100 * np.mean(emulate(qm, path, x_test, args.size) == ref))
        agree.append(100 * np.mean(predict_onnx(session(path, 2), x_test, args.size) == ref))
        print(f"| {name} | {100 * np.mean(ref == y):.2f} | " + " | ".join(f"{a:.2f}%" for a in agree) + " |",
              flush=True)


def export_deploy(qm, path: str, size: int, n: int = 256) -> None:
    """The deploy file, calibrated as benchmarks/onnx_runtime.py does (256 training images)."""
    calib = calibration_batches(n, size)
    int8fx.export_onnx(qm.eval(), calib[0], path, form="deploy", calibration_data=calib[1:])


def finetune(qm, steps: int, lr: float, size: int, seed: int, rounding_from: str | None):
    """More SGD steps (cosine from `lr`), inside `int8fx.deploy_numerics(qm, rounding_from)` when given."""
    x_train, y_train = load_fashion_mnist("train")
    opt = torch.optim.SGD(qm.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-5)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout and stochastic depth draw from the global generator
    qm.train()
    with int8fx.deploy_numerics(qm, rounding_from) if rounding_from else contextlib.nullcontext():
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
            idx = torch.randint(0, len(y_train), (32,), generator=g)
            loss = F.cross_entropy(qm(images(x_train[idx], size)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return qm.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="onnx_runtime.py's --out directory")
    p.add_argument("--models", default="resnet18,mobilenet_v2,efficientnet_b0,timm:regnetx_002")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--finetune", type=int, default=0,
                   help="also: N more steps without and with the file's roundings, re-export, measure again")
    p.add_argument("--lr", type=float, default=0.002, help="peak SGD learning rate of --finetune")
    p.add_argument("--by-rounding", action="store_true",
                   help="instead: agreement with qmodel.eval() rounding one kind of the file's rounding at a time")
    args = p.parse_args()
    x_test, y_test = load_fashion_mnist("test")
    x_test, y = x_test[:args.images], y_test[:args.images].numpy()
    if args.by_rounding:
        return by_rounding(args, x_test, y)
    print("| model | steps | top-1 qmodel.eval() | top-1 deploy | top-1 emulation | emulation vs deploy file "
          "| emulation vs qmodel.eval() | deploy file vs qmodel.eval() |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        tag = name.replace(":", "_")
        ckpt = os.path.join(args.out, f"{tag}.pt")
        runs = [("trained", None)]
        if args.finetune:
            runs += [(f"+{args.finetune} plain", False), (f"+{args.finetune} through the file's roundings", True)]
        for label, rounded in runs:
            saved = torch.load(ckpt, weights_only=False)
            qm, path = saved["model"].eval(), os.path.join(args.out, f"{tag}.deploy.onnx")
            if rounded is None:
                ref = saved["eval_predictions"][:args.images]
            else:
                qm = finetune(qm, args.finetune, args.lr, args.size, 7, path if rounded else None)
                path = os.path.join(args.out, f"{tag}.deploy.{'rounded' if rounded else 'plain'}.onnx")
                export_deploy(qm, path, args.size)
                ref = predict_torch(qm, x_test, args.size)
            emulated = emulate(qm, path, x_test, args.size)
            deployed = predict_onnx(session(path, 2), x_test, args.size)
            top = [100 * np.mean(v == y) for v in (ref, deployed, emulated)]
            print(f"| {name} | {label} | {top[0]:.2f} | {top[1]:.2f} | {top[2]:.2f} "
                  f"| {100 * np.mean(emulated == deployed):.2f}% | {100 * np.mean(emulated == ref):.2f}% "
                  f"| {100 * np.mean(deployed == ref):.2f}% |", flush=True)


if __name__ == "__main__":
    main()
