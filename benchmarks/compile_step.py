"""torch.compile on INT8 training: graph breaks, compile time, eager vs compiled step time.

For each model: `torch._dynamo.explain` (graph breaks), then the training step (forward, backward, SGD
step) eager and `torch.compile(model, fullgraph=True)` (inductor by default), interleaved, with
`error_on_recompile` on after the first compiled step. Prints a table; `--json` writes it.

    python benchmarks/compile_step.py                      # resnet18, mobilenet_v2; batch 16 at 64x64, 1 thread
    python benchmarks/compile_step.py --backend aot_eager --models resnet18
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

import int8fx


def measure(name: str, batch: int, size: int, reps: int, backend: str) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    torch._dynamo.reset()
    eager = int8fx.convert(torchvision.models.get_model(name, num_classes=10))
    breaks = torch._dynamo.explain(eager)(x).graph_break_count
    torch._dynamo.reset()
    compiled_model = int8fx.convert(torchvision.models.get_model(name, num_classes=10))
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in
            (("eager", eager), ("compiled", compiled_model))}
    fns = {"eager": eager, "compiled": compiled}

    def step(kind):
        t = time.perf_counter()
        opts[kind].zero_grad()
        F.cross_entropy(fns[kind](x), y).backward()
        opts[kind].step()
        return time.perf_counter() - t

    first = step("compiled")
    step("eager")
    torch._dynamo.config.error_on_recompile = True
    times = {"eager": [], "compiled": []}
    try:
        for _ in range(reps):
            for kind in times:
                times[kind].append(step(kind))
    finally:
        torch._dynamo.config.error_on_recompile = False
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {"model": name, "backend": backend, "batch": batch, "size": size, "graph_breaks": breaks,
            "compile_s": first - compiled_s, "eager_ms": 1e3 * eager_s, "compiled_ms": 1e3 * compiled_s,
            "compiled_vs_eager": compiled_s / eager_s, "recompiles_after_first_step": 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(m, args.batch, args.size, args.reps, args.backend) for m in args.models]
    print("| model | backend | graph breaks | recompiles after step 1 | compile s | eager ms | compiled ms | compiled / eager |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['backend']} | {r['graph_breaks']} | {r['recompiles_after_first_step']} | "
              f"{r['compile_s']:.0f} | {r['eager_ms']:.0f} | {r['compiled_ms']:.0f} | {r['compiled_vs_eager']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
