"""Deployable INT8 ONNX in onnxruntime: INT8 kernels, latency vs FP32, agreement with the trained model.

For each model: INT8-train it (int8fx, a few hundred steps on Fashion-MNIST resized to --size px), then
  * export the deploy form (`int8fx.export_onnx(..., form="deploy")`, calibrated on 256 training images),
    the same with `target="onnxruntime"` (uint8 activations, ReLUs on codes), the FP32 ONNX of the same
    trained weights (`int8fx.to_float`, torch.export-based exporter), and
    onnxruntime's own static quantization of that FP32 file (`quant_pre_process` + `quantize_static`, QDQ,
    uint8 activations, int8 per-channel weights: onnxruntime's recommended CPU setting), calibrated on the
    same images;
  * count, in onnxruntime's optimized graph (ORT_ENABLE_ALL, CPU), the conv sites whose node runs as
    QLinearConv / ConvInteger;
  * top-1 of each file on the 10,000 test images (--images), and agreement of the deploy files'
    predictions with `qmodel.eval()` (int8fx's own eval-mode forward), beside the model's own sensitivity:
    the agreement of `qmodel.eval()` with itself on inputs moved by Gaussian noise of 1/100 grey level;
  * latency at batch 1 and 16, 1 and 2 intra-op threads: all four sessions timed in interleaved rounds
    (the median of per-round means), reported as ratios to FP32 measured in the same rounds.

Trained models and their eval-mode predictions are cached in --out, so a rerun only re-exports and re-times.

    python benchmarks/onnx_runtime.py                       # the four models of RESULTS.md (~1 h on 2 cores)
    python benchmarks/onnx_runtime.py --models resnet18 --steps 100 --rounds 5
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import int8fx
from int8fx.data import FASHION_MNIST_STD, load_fashion_mnist, normalize_images
from int8fx.onnx.check import INT8_KERNELS, int8_sites, runtime_ops
from int8fx.passes import sites_of

MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "timm:regnetx_002")
# The optimizer and peak learning rate per model (default: SGD at --lr). EfficientNet from scratch with plain
# SGD diverges at 0.05 in its first 50 steps, and at 0.02 trains slowly (1200 steps: FP32 78.4%, INT8
# 82.4% top-1; 3600: INT8 85.3%); AdamW, as EfficientNets are usually trained, reaches 84.6% and 88.4% in INT8
# (RESULTS.md, session 28).
RECIPES = {"efficientnet_b0": ("adamw", 2e-3)}
# One grey level of an 8-bit image in the normalized units the models read. The agreement bar is read
# against the model's own sensitivity: qmodel.eval() against itself on inputs moved by 1/100 of one level
# (Gaussian), far below anything a camera or a file format can hold, flips the predictions of the images
# whose top two logits nearly tie; a deploy file cannot be expected to agree better than that.
GREY_LEVEL = 1 / 255 / FASHION_MNIST_STD
NOISE_FLOOR_LEVELS = 0.01


def build(name: str) -> torch.nn.Module:
    """A 1-channel, 10-class model with random weights (nothing downloaded)."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False, num_classes=10, in_chans=1)
    from int8fx.zoo import torchvision_model

    return torchvision_model(name, num_classes=10, in_channels=1, size=64).module


def images(x_uint8: torch.Tensor, size: int) -> torch.Tensor:
    return normalize_images(x_uint8, size)


def optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-5)


def train(name: str, steps: int, batch: int, size: int, recipe: tuple[str, float], seed: int,
          log) -> torch.nn.Module:
    """`recipe`: (optimizer, peak lr), with 5% linear warm-up and cosine decay."""
    torch.manual_seed(seed)
    x_train, y_train = load_fashion_mnist("train")
    qm = int8fx.convert(build(name))
    kind, lr = recipe
    opt = optimizer(kind, qm.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    qm.train()
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up over 5%, cosine decay
            warm = min(1.0, (step + 1) / max(1, steps // 20))
            group["lr"] = lr * warm * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, len(y_train), (batch,), generator=g)
        loss = F.cross_entropy(qm(images(x_train[idx], size)), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"  {name} step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    return qm.eval()


def calibration_batches(n: int, size: int) -> list[torch.Tensor]:
    """`n` training images drawn with a fixed seed, in batches of 64: every file's calibration data."""
    x_train, _ = load_fashion_mnist("train")
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))[:n]
    return list(images(x_train[idx], size).split(64))


def predict_torch(qm, x_test: torch.Tensor, size: int, bs: int = 250, noise: float = 0.0) -> np.ndarray:
    """Eval-mode predictions; `noise` > 0 adds Gaussian noise of that std (in grey levels, fixed seed) to
    every input pixel first."""
    out = []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(0, len(x_test), bs):
            x = images(x_test[i:i + bs], size)
            if noise:
                x = x + torch.randn(x.shape, generator=g) * (noise * GREY_LEVEL)
            out.append(qm(x).argmax(1).numpy())
    return np.concatenate(out)


def predict_onnx(session, x_test: torch.Tensor, size: int, bs: int = 250) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images(x_test[i:i + bs], size).numpy()})[0].argmax(1)
                           for i in range(0, len(x_test), bs)])


def session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def export_fp32(qm, x: torch.Tensor, path: str) -> None:
    """The FP32 ONNX of the same trained weights, by torch's default exporter."""
    fm = int8fx.to_float(qm).eval()
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(fm, (x,), path, dynamo=True, external_data=False, input_names=["input"],
                          output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch")},))


def ort_quantize_static(fp32: str, out: str, calib: list[torch.Tensor]) -> None:
    """onnxruntime's recommended static quantization for CPU, on the same calibration images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": b.numpy()} for b in calib])

        def get_next(self):
            return next(self.it, None)

    pre = out + ".pre.onnx"
    quant_pre_process(fp32, pre)
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    os.remove(pre)


def conv_kernels(path: str) -> int:
    return sum(op in ("QLinearConv", "ConvInteger") for op in runtime_ops(path).values())


def latency(paths: dict[str, str], size: int, threads: int, batch: int, rounds: int) -> dict[str, float]:
    """Median over interleaved rounds of the mean time per call (s), per file."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((batch, 1, size, size), dtype=np.float32)
    reps = max(1, 16 // batch) * 4
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, {"input": x})
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            for _ in range(reps):
                s.run(None, {"input": x})
            times[k].append((time.perf_counter() - t) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def run_model(name: str, args, log) -> dict:
    tag = name.replace(":", "_")
    ckpt = os.path.join(args.out, f"{tag}.pt")
    x_test, y_test = load_fashion_mnist("test")
    x_test, y_test = x_test[:args.images], y_test[:args.images]
    if os.path.exists(ckpt):
        saved = torch.load(ckpt, weights_only=False)
        qm, ref = saved["model"], saved["eval_predictions"][:args.images]
        if len(ref) < len(x_test):  # (cached by a run on fewer test images)
            ref = predict_torch(qm, x_test, args.size)
        log(f"{name}: trained model and its eval-mode predictions from {ckpt}")
    else:
        t = time.time()
        qm = train(name, args.steps, args.batch_size, args.size, RECIPES.get(name, ("sgd", args.lr)), args.seed,
                   log)
        train_s = time.time() - t
        t = time.time()
        ref = predict_torch(qm, x_test, args.size)
        log(f"{name}: trained in {train_s:.0f} s; qmodel.eval() on {len(x_test)} test images in "
            f"{time.time() - t:.0f} s")
        torch.save({"model": qm, "eval_predictions": ref, "train_seconds": train_s}, ckpt)
    calib = calibration_batches(args.calibration_images, args.size)
    paths = {k: os.path.join(args.out, f"{tag}.{k}.onnx")
             for k in ("fp32", "deploy", "deploy_onnxruntime", "ort_static")}
    t = time.time()
    metas, ran = {}, {}
    for key, target in (("deploy", "portable"), ("deploy_onnxruntime", "onnxruntime")):
        metas[key] = int8fx.export_onnx(qm, calib[0], paths[key], form="deploy", target=target,
                                        calibration_data=calib[1:])
        ran[key] = int8_sites(metas[key], runtime_ops(paths[key]))
    log(f"{name}: deploy exports (both targets) in {time.time() - t:.0f} s")
    export_fp32(qm, calib[0][:1], paths["fp32"])
    ort_quantize_static(paths["fp32"], paths["ort_static"], calib)
    conv_sites = [s.name for s in sites_of(qm) if s.converted and s.op.startswith("conv")]
    in_int8 = {key: sum(all(op in INT8_KERNELS for op in ops.get(s) or ["missing"]) for s in conv_sites)
               for key, ops in ran.items()}
    row = {"model": name, "conv_sites": len(conv_sites), "deploy_int8_conv_sites": in_int8["deploy"],
           "deploy_onnxruntime_int8_conv_sites": in_int8["deploy_onnxruntime"],
           "relus_on_codes": metas["deploy_onnxruntime"]["deploy"]["relus_on_codes"],
           "deploy_conv_ops": {s: ran["deploy"].get(s) for s in conv_sites},
           "ort_static_qlinearconv": conv_kernels(paths["ort_static"]),
           "fp32_file_mb": os.path.getsize(paths["fp32"]) / 2**20,
           "deploy_file_mb": os.path.getsize(paths["deploy"]) / 2**20,
           "deploy_fan_outs": metas["deploy"]["deploy"]["fan_outs"]}
    preds = {k: predict_onnx(session(p, 2), x_test, args.size) for k, p in paths.items()}
    y = y_test.numpy()
    row["top1"] = {"qmodel.eval()": float((ref == y).mean() * 100), **{k: float((v == y).mean() * 100)
                                                                        for k, v in preds.items()}}
    row["agreement"] = {k: float((v == ref).mean() * 100) for k, v in preds.items()}  # with qmodel.eval()
    row["agreement"]["qmodel.eval(), inputs +-1/100 grey level"] = float(
        (predict_torch(qm, x_test, args.size, noise=NOISE_FLOOR_LEVELS) == ref).mean() * 100)
    row["latency"] = []
    for threads in args.threads:
        for batch in args.batches:
            lat = latency(paths, args.size, threads, batch, args.rounds)
            row["latency"].append({"threads": threads, "batch": batch, "seconds": lat})
            log(f"{name}: {threads} thread(s), batch {batch}: FP32 {lat['fp32'] * 1e3:.2f} ms, deploy "
                f"{lat['deploy'] / lat['fp32']:.2f}x, deploy target onnxruntime "
                f"{lat['deploy_onnxruntime'] / lat['fp32']:.2f}x, onnxruntime static "
                f"{lat['ort_static'] / lat['fp32']:.2f}x")
    return row


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| model | deploy: conv sites in QLinearConv/ConvInteger (target onnxruntime) "
             "| quantize_static: QLinearConv | top-1 qmodel.eval() | top-1 deploy (diff) "
             "| top-1 deploy, target onnxruntime (diff) | agreement with qmodel.eval(): deploy "
             "| deploy, target onnxruntime | FP32 ONNX | quantize_static "
             "| qmodel.eval(), inputs moved 1/100 grey level |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t, a = r["top1"], r["agreement"]
        lines.append(f"| {r['model']} | {r['deploy_int8_conv_sites']} ({r['deploy_onnxruntime_int8_conv_sites']}) "
                     f"/ {r['conv_sites']} | {r['ort_static_qlinearconv']} / {r['conv_sites']} "
                     f"| {t['qmodel.eval()']:.2f} | {t['deploy']:.2f} ({t['deploy'] - t['qmodel.eval()']:+.2f}) "
                     f"| {t['deploy_onnxruntime']:.2f} ({t['deploy_onnxruntime'] - t['qmodel.eval()']:+.2f}) "
                     f"| {a['deploy']:.2f}% | {a['deploy_onnxruntime']:.2f}% | {a['fp32']:.2f}% "
                     f"| {a['ort_static']:.2f}% | {a['qmodel.eval(), inputs +-1/100 grey level']:.2f}% |")
    lines += ["", "| model | threads | batch | FP32 ms | deploy / FP32 | deploy, target onnxruntime / FP32 "
              "| quantize_static / FP32 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for m in r["latency"]:
            s = m["seconds"]
            lines.append(f"| {r['model']} | {m['threads']} | {m['batch']} | {s['fp32'] * 1e3:.2f} "
                         f"| {s['deploy'] / s['fp32']:.2f}x | {s['deploy_onnxruntime'] / s['fp32']:.2f}x "
                         f"| {s['ort_static'] / s['fp32']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated; timm models as timm:NAME")
    p.add_argument("--steps", type=int, default=300, help="INT8 training steps per model")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05,
                   help="peak SGD learning rate (efficientnet_b0: AdamW at 2e-3, RECIPES)")
    p.add_argument("--size", type=int, default=64, help="input resolution (Fashion-MNIST resized)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-images", type=int, default=256)
    p.add_argument("--images", type=int, default=10000, help="test images for top-1 and agreement (first N)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per row")
    p.add_argument("--out", default="runs/onnx_runtime", help="checkpoints, ONNX files, results.json/.md")
    args = p.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)

    def log(msg):
        print(msg, flush=True)

    import onnxruntime

    header = (f"{time.strftime('%Y-%m-%d')}, {cpu_name()} ({os.cpu_count()} cores), torch "
              f"{torch.__version__.split('+')[0]}, onnxruntime {onnxruntime.__version__}; `python benchmarks/"
              f"onnx_runtime.py {' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}`".rstrip())
    rows = [run_model(name, args, log) for name in args.models.split(",")]
    text = markdown(rows, header)
    print(text)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"header": header, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
