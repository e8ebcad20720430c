"""One transposed conv site, forward + backward: FP32 against int8fx, measured in the same run (CPU).

On CPU transposed convs run the channels-last pipeline of conv sites with roles exchanged
(int8fx/nn/transposed.py), so this says what that costs next to the FP32 layer, per layer shape:
    python benchmarks/transposed_sites.py                 # one thread, median of 15 interleaved steps
    python benchmarks/transposed_sites.py --threads 2 --reps 25
Prints a table: FP32 ms, INT8 ms, INT8 / FP32.
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

import int8fx
from int8fx.kernels import cpu_report

LAYERS = {  # name: (module, input shape)
    "mask head 256->256 k2 s2 @14x14, batch 8": (lambda: nn.ConvTranspose2d(256, 256, 2, stride=2), (8, 256, 14, 14)),
    "U-Net up 128->64 k2 s2 @32x32, batch 8": (lambda: nn.ConvTranspose2d(128, 64, 2, stride=2), (8, 128, 32, 32)),
    "decoder 64->32 k3 s2 op1 @16x16, batch 16": (
        lambda: nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1), (16, 64, 16, 16)),
    "1d 64->32 k4 s2 @256, batch 16": (lambda: nn.ConvTranspose1d(64, 32, 4, stride=2, padding=1), (16, 64, 256)),
    "64->32 k2 s2 @16x16, batch 16": (lambda: nn.ConvTranspose2d(64, 32, 2, stride=2), (16, 64, 16, 16)),
    "128->64 k4 s2 p1 @8x8, batch 16": (lambda: nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), (16, 128, 8, 8)),
    "32->16 k3 s1 p1 @32x32, batch 16": (lambda: nn.ConvTranspose2d(32, 16, 3, padding=1), (16, 32, 32, 32)),
    "depthwise 32 k4 s2 p1 @16x16, batch 16": (lambda: nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1, groups=32),
                                               (16, 32, 16, 16)),
}


def step(m: nn.Module, x: torch.Tensor) -> float:
    t = time.perf_counter()
    m(x).square().mean().backward()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--policy", default="gvq-mcs")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# torch {torch.__version__}, threads {a.threads}, median of {a.reps} interleaved steps, policy {a.policy}")
    print(f"# CPU {cpu_report()}")
    print("| layer | FP32 ms | INT8 ms | INT8 / FP32 |\n|---|---:|---:|---:|")
    for name, (make, shape) in LAYERS.items():
        torch.manual_seed(0)
        fp32 = make()
        int8 = int8fx.convert(copy.deepcopy(fp32), int8fx.Int8Config(grad_quant=a.policy))
        x = torch.randn(shape, requires_grad=True)
        for _ in range(3):  # warm-up: compiled passes, allocator
            step(fp32, x), step(int8, x)
        times = {"fp32": [], "int8": []}
        for _ in range(a.reps):
            times["fp32"].append(step(fp32, x))
            times["int8"].append(step(int8, x))
        f, q = (statistics.median(times[k]) * 1e3 for k in ("fp32", "int8"))
        print(f"| {name} | {f:.2f} | {q:.2f} | {q / f:.2f}x |")


if __name__ == "__main__":
    main()
