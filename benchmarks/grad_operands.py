"""The gradient quantizers' per-site call on CPU: statistics, clips and both int8 backward operands of one
dY, as the backward op runs it (`GradQuantizer.operands`, compiled where the machine can), timed against
one plain read pass over the same dY measured in the same run:
    python benchmarks/grad_operands.py                        # one thread, gvq-mcs and per-tensor
    python benchmarks/grad_operands.py --policy gvq mcs --threads 2
Shapes are dY as rows [M, O] of mobilenet_v2 at batch 16, 64x64 (its largest, a mid-sized and the small
pointwise gradients that most of its sites have). Prints a table: us per call, and the ratio to the pass.
"""
import argparse
import statistics
import time

import torch

import int8fx
from int8fx.kernels import cpu_report
from int8fx.quant.grad import PolicyParams, make_grad_quantizer

SHAPES = ((16384, 96), (4096, 144), (1024, 192), (256, 384), (64, 1280))


def timed(fn, reps: int) -> float:
    for _ in range(5):  # warm-up: compilation, allocator
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", nargs="+", default=["gvq-mcs", "per-tensor"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=200)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# torch {torch.__version__}, threads {a.threads}, median of {a.reps} calls")
    print(f"# CPU {cpu_report()}")
    print("| dY rows | policy | rounding | us per call | read pass us | call / pass |\n|---|---|---|---:|---:|---:|")
    config = int8fx.Int8Config()
    for m, o in SHAPES:
        gen = torch.Generator().manual_seed(0)
        rows = torch.randn(m, o, generator=gen) * torch.logspace(-4, -1, o)  # channels of different scales
        s_w = torch.rand(o, generator=gen) * 1e-2
        counter, key = torch.zeros((), dtype=torch.int64), torch.tensor(12345, dtype=torch.int64)
        read = timed(lambda: rows.abs().amax(), a.reps)
        for policy in a.policy:
            q = make_grad_quantizer(policy, o, config)
            state, params = q.state(), PolicyParams.of(config)
            for stochastic in (True, False):
                us = timed(lambda: type(q).operands(rows, s_w, state, params, stochastic, counter, key, True, True),
                           a.reps)
                print(f"| {m} x {o} | {policy} | {'stochastic' if stochastic else 'nearest'} | {us:.0f} | {read:.0f} "
                      f"| {us / read:.1f}x |")


if __name__ == "__main__":
    main()
