"""Training-step time on CPU: FP32 vs torch.ao FX QAT vs int8fx, measured in the same run.

FX QAT (`prepare_qat_fx`: fake-quant forward, FP32 backward) is what most users reach for today; int8fx
runs real INT8 GEMMs in the forward and in both backward GEMMs. Steps of the three variants are
interleaved (A B C A B C ...) so that load from other processes hits all of them alike; the table shows
medians and ratios to FP32.

    python benchmarks/cpu_step.py                       # resnet18 and mobilenet_v2, batch 16, 64x64
    python benchmarks/cpu_step.py --models resnet18 --reps 20 --policy per-tensor dsgc --threads 1
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
import torchvision

import int8fx


def fx_qat(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (example,))


def step_fn(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def bench(name: str, batch: int, size: int, reps: int, policies: list[str]) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).train()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    variants = {
        "fp32": model,
        "fx-qat": fx_qat(model, x),
        **{f"int8fx {p}": int8fx.convert(model, int8fx.Int8Config(grad_quant=p)).train() for p in policies},
    }
    steps = {k: step_fn(m, x, y) for k, m in variants.items()}
    for s in steps.values():  # warm-up: allocator, oneDNN primitive caches
        s(), s()
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    for _ in range(reps):
        for k, s in steps.items():
            t, c = time.perf_counter(), time.process_time()
            s()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {"wall": {k: statistics.median(v) for k, v in wall.items()},
            "cpu": {k: statistics.median(v) for k, v in cpu.items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--policy", nargs="+", default=[int8fx.Int8Config().grad_quant, "per-tensor"],
                    help="gradient policies to time (one int8fx row each)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  batch {args.batch}  {args.size}x{args.size}  median of {args.reps}")
    print("| model | variant | wall ms | CPU ms | wall / FP32 | CPU / FP32 | CPU / FX QAT |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        r = bench(name, args.batch, args.size, args.reps, args.policy)
        w, c = r["wall"], r["cpu"]
        for k in w:
            print(f"| {name} | {k} | {w[k]*1e3:.0f} | {c[k]*1e3:.0f} | {w[k]/w['fp32']:.2f}x | {c[k]/c['fp32']:.2f}x | "
                  f"{c[k]/c['fx-qat']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
