"""What one call of a fused pass costs on CPU, eager, compiled through torch.compile and traced without dynamo
(`int8fx.precompiled`), measured in the same run:
    python benchmarks/fused_calls.py                 # one thread
    python benchmarks/fused_calls.py --threads 2 --reps 500
Each pass is wrapped afresh for each path and forced to compile at every size, so the table shows where
compiling pays (what `fusing.SMALL`, `SMALL_TRACED` and `EXACT_TRACED` encode). Shapes are mobilenet_v2's
at batch 16, 64x64 (a small and a large site) and a tiny one. Prints us per call and the ratios to eager.
"""
import argparse
import statistics
import time

import torch

import int8fx
from int8fx import fusing, precompiled
from int8fx.kernels import cpu_report
from int8fx.quant import fused
from int8fx.quant.grad import PolicyParams, _operands, make_grad_quantizer


def timed(fn, args, reps: int) -> float:
    for _ in range(5):  # warm-up: compilation, allocator
        fn(*args)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def cases():
    """(pass name, shape label, eager function, exact shapes only, arguments)."""
    gen = torch.Generator().manual_seed(0)
    config = int8fx.Int8Config()
    for n, c, hw in ((2, 8, 2), (16, 64, 4), (16, 96, 16)):
        x, w = torch.randn(n, c, hw, hw, generator=gen), torch.randn(2 * c, c, generator=gen)
        acc = torch.randint(-2**20, 2**20, (n, hw, hw, 2 * c), dtype=torch.int32, generator=gen)
        out = torch.empty(n, 2 * c, hw, hw).movedim(1, -1)
        s_x, s_w = torch.tensor(0.01), torch.rand(2 * c, generator=gen)
        dy = torch.randn(n, 2 * c, hw, hw, generator=gen)
        rows = dy.movedim(1, -1).reshape(-1, 2 * c).contiguous()
        q = make_grad_quantizer("gvq-mcs", 2 * c, config)
        counter, key = torch.zeros((), dtype=torch.int64), torch.tensor(12345, dtype=torch.int64)
        label = f"{n}x{c}x{hw}x{hw}"
        yield "quantize_operands", label, fused.quantize_operands.eager, False, (x, None, "channels_last", w)
        yield "scale_accumulators", label, fused.scale_accumulators.eager, True, (acc, s_x, s_w, out)
        yield "gradient_rows", label, fused.gradient_rows.eager, True, (dy,)
        yield ("operands gvq-mcs", label, lambda *a: _operands(type(q), *a), False,
               (rows, s_w, q.state(), PolicyParams.of(config), True, counter, key, True, True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=300)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# torch {torch.__version__}, threads {a.threads}, median of {a.reps} calls; traced path "
          f"{'available' if precompiled.AVAILABLE else 'NOT available (this torch): its column repeats torch.compile'}")
    print(f"# CPU {cpu_report()}")
    print("| pass | x shape | eager us | torch.compile us | traced us | torch.compile / eager | traced / eager |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    fusing.STATIC_AFTER = 1  # an exact-shape variant at the first call
    available = precompiled.AVAILABLE
    for name, label, eager, exact, args in cases():
        us = {"eager": timed(eager, args, a.reps)}
        for path, traced in (("torch.compile", False), ("traced", True)):
            precompiled.AVAILABLE = traced and available
            f = fusing.fused(eager, dynamic=not exact, min_elements=1)
            us[path] = timed(f, args, a.reps)
        precompiled.AVAILABLE = available
        print(f"| {name} | {label} | {us['eager']:.0f} | {us['torch.compile']:.0f} | {us['traced']:.0f} | "
              f"{us['torch.compile'] / us['eager']:.2f} | {us['traced'] / us['eager']:.2f} |")


if __name__ == "__main__":
    main()
