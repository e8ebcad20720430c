"""INT8 kernels against the GPU's own ceilings, all measured in one run on one GPU (issue 5).

    python benchmarks/kernels.py                   # everything, ~5-8 minutes on an H100
    python benchmarks/kernels.py --quick           # fewer shapes and repeats (a smoke run)
    python benchmarks/kernels.py --sections gemm,conv
    python benchmarks/kernels.py --budget 240      # stop starting new measurements after 240 s

Sections (each prints one table; a failing section prints its error and the run goes on):
  check   exactness first: the CuPy GEMM against torch._int_mm on random operands (no timing is
          trusted from a kernel that is wrong)
  gemm    INT8 GEMM TOP/s: CuPy kernel vs torch._int_mm (cuBLASLt) vs bf16 matmul, square and
          ResNet-50 conv-as-GEMM shapes at batch 256 (forward, dX and the long-reduction dW)
  quant   fused absmax + quantize (per tensor and per channel) vs eager PyTorch, in TB/s
  conv    one conv layer forward+backward, quantization included, per ResNet-50 layer: the CuPy
          layer pipeline and the autograd op on each backend vs cuDNN bf16 channels_last and fp32
  train   training step images/s and peak memory for resnet18/resnet50/mobilenet_v2: INT8 (cupy,
          torch backends; torch also without its GPU operand forms, and the whole step replayed as a CUDA
          graph) vs fp32, tf32 (also as a CUDA graph), bf16 autocast channels_last (--models, --modes)
  profile where an INT8 resnet18 step's GPU time goes (torch.profiler): kernels grouped by kind, the top
          kernels, beside the FP32 step's; the INT8 step's Chrome trace to $OUT
  tf32    whether cuDNN's TF32 conv computes int8 products exactly (forward, dX), and its speed
  targets the issue's bars: GEMM >= 0.7x _int_mm on 8192^3; dW GEMM >= 10x one-shot _int_mm on the
          layer1 shape; ResNet-50 INT8 step faster than fp32
Timing: CUDA events around the region, warm-up first, median of the repeats; inputs are random
(never zeros). All numbers are ratios to baselines measured in the same run. With $OUT set, the full
results go to $OUT/kernels.json.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

RESULTS: dict = {}
DEADLINE = float("inf")  # time.monotonic() after which no new measurement starts (--budget)
ONLY: dict = {"conv": (), "train": (), "modes": ()}  # --conv-layers / --models / --modes: filters (empty: all)


def out_of_time(what: str) -> bool:
    """True (and says what was skipped) once the --budget is spent: a lease on a GPU is short, and a
    partial table is worth more than a run killed in the middle."""
    if time.monotonic() < DEADLINE:
        return False
    print(f"  (budget spent: skipped {what})", flush=True)
    RESULTS.setdefault("skipped", []).append(what)
    return True
RESNET50_LAYERS = [  # name, Cin, Cout, kernel, stride, H (input)
    ("layer1 3x3", 64, 64, 3, 1, 56),
    ("layer2 3x3", 128, 128, 3, 1, 28),
    ("layer3 3x3", 256, 256, 3, 1, 14),
    ("layer4 3x3", 512, 512, 3, 1, 7),
    ("layer1 1x1 exp", 64, 256, 1, 1, 56),
    ("layer4 1x1", 2048, 512, 1, 1, 7),
    ("stem 7x7/2", 3, 64, 7, 2, 224),
]


def bench(fn, warm=5, rep=20) -> float:
    """Median milliseconds of fn() over `rep` runs, CUDA events around each."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) + " |")
    sys.stdout.flush()


def section(name: str, fn, *args) -> None:
    if name != "targets" and out_of_time(f"section {name}"):
        return
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception as ex:  # a broken section must not hide the others
        print(f"\n## {name}: FAILED {type(ex).__name__}: {ex}")
        traceback.print_exc(limit=4)
        RESULTS[name] = {"error": repr(ex)}
    from int8fx.kernels.torch_backend import refused_shapes

    if refused_shapes():
        print(f"  int8 GEMMs cuBLASLt refused so far (run on the reference): {sorted(refused_shapes())}")
    print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)


def i8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda")


# ----------------------------------------------------------------------------- sections
def sec_check(quick: bool) -> None:
    from int8fx.kernels import cupy_backend as cb

    rows = []
    for G, M, N, K in [(1, 1000, 777, 1000), (2, 129, 65, 4096), (1, 64, 576, 200_000 if not quick else 50_000)]:
        a, b = i8(G, M, K), i8(G, K, N)
        got = cb.int_bmm(a, b).to(torch.int64)
        ref = torch.stack([_int_mm_exact(a[g], b[g]) for g in range(G)])
        ok = bool(torch.equal(got, ref))
        rows.append([f"{G}x{M}x{N}x{K}", str(got.dtype), "exact" if ok else "MISMATCH"])
    table("exactness (CuPy GEMM vs torch._int_mm, int64 sum of int32 chunks)", ["G x M x N x K", "dtype", "result"], rows)
    RESULTS["check"] = rows
    if any(r[2] != "exact" for r in rows):
        raise RuntimeError("the CuPy GEMM is not exact: later timings of it are meaningless")


def _int_mm_exact(a, b):
    from int8fx.kernels.torch_backend import int_mm_exact

    return int_mm_exact(a, b).to(torch.int64)


def sec_gemm(quick: bool) -> None:
    from int8fx.kernels import cupy_backend as cb
    from int8fx.kernels import geometry as geo

    shapes = [("square 8192^3", 8192, 8192, 8192), ("16384x4096x4096", 16384, 4096, 4096)]
    B = 256
    for name, cin, cout, k, s, h in RESNET50_LAYERS[:4] + RESNET50_LAYERS[5:6]:
        ho = (h + 2 * (k // 2) - k) // s + 1
        M, Kc = B * ho * ho, cin * k * k
        shapes += [(f"r50 {name} fwd", M, cout, Kc), (f"r50 {name} dX", M, Kc, cout), (f"r50 {name} dW", cout, Kc, M)]
    if quick:
        shapes = shapes[:1] + [s for s in shapes if "layer1 3x3" in s[0]]
    rows = []
    for name, M, N, K in shapes:
        if out_of_time(f"gemm {name}"):
            break
        a = i8(M, K)
        bt = i8(N, K)  # K-major B for both: the layout each wants
        sms, smem = cb.device_limits(0)
        plan = geo.plan_gemm(1, M, N, K, sms, smem_limit=smem)
        A, Bt = cb.as_kmajor(a.unsqueeze(0), plan.Kp), cb.as_kmajor(bt.unsqueeze(0), plan.Kp)
        flops = 2 * M * N * K
        rep = 5 if flops > 2e12 else 20
        t_cupy = bench(lambda: cb.gemm(A, Bt, epilogue=plan.acc_dtype, plan=plan), rep=rep)
        # baseline: one-shot torch._int_mm (as measured in the ceilings log; past K = 131008 its int32
        # accumulators could overflow, which does not change its time), best of column- and row-major B
        t_intmm, how = float("inf"), "failed"
        for layout, b_op in (("col-major B", bt.t()), ("row-major B", bt.t().contiguous())):
            try:
                t = bench(lambda: torch._int_mm(a, b_op), rep=rep)
            except RuntimeError as ex:
                print(f"  _int_mm {name} {layout}: {str(ex)[:80]}")
                continue
            if t < t_intmm:
                t_intmm, how = t, layout
        ab, bb = torch.randn(M, K, device="cuda", dtype=torch.bfloat16), torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        t_bf16 = bench(lambda: ab @ bb, rep=rep)
        del ab, bb
        tops = lambda t: flops / t / 1e9  # noqa: E731
        rows.append([name, f"{M}x{N}x{K}", f"{plan.tile.name}/{plan.splits}", tops(t_cupy), tops(t_intmm), how,
                     tops(t_bf16), t_intmm / t_cupy, t_bf16 / t_cupy])
        RESULTS.setdefault("gemm", {})[name] = {"M": M, "N": N, "K": K, "ms_cupy": t_cupy, "ms_int_mm": t_intmm,
                                                "ms_bf16": t_bf16, "tile": plan.tile.name, "splits": plan.splits}
        del a, bt, A, Bt
    table("INT8 GEMM, TOP/s (ratio > 1: CuPy kernel faster)",
          ["shape", "MxNxK", "tile/splits", "cupy", "_int_mm (one-shot)", "_int_mm best layout", "bf16 mm", "speed-up vs _int_mm", "speed-up vs bf16"],
          rows)


def sec_quant(quick: bool) -> None:
    from int8fx.kernels import cupy_backend as cb

    rows = []
    for dt in (torch.float32, torch.bfloat16):
        g = torch.randn(256, 256, 14, 14, device="cuda", dtype=dt)
        nbytes = g.numel() * (2 * g.element_size() + 1)  # absmax read + quantize read + int8 write

        def eager_pc():
            s = g.abs().amax(dim=(0, 2, 3), keepdim=True).float() / 127
            return torch.clamp(torch.round(g.float() / s), -127, 127).to(torch.int8)

        def fused_pc():
            return cb.quantize(g, cb.absmax(g, 1) / 127, axis=1)

        def eager_pt():
            s = g.abs().amax().float() / 127
            return torch.clamp(torch.round(g.float() / s), -127, 127).to(torch.int8)

        def fused_pt():
            return cb.quantize(g, cb.absmax(g) / 127)

        ok = torch.equal(fused_pc(), eager_pc())
        for name, f in (("per-channel eager", eager_pc), ("per-channel fused", fused_pc),
                        ("per-tensor eager", eager_pt), ("per-tensor fused", fused_pt)):
            t = bench(f)
            rows.append([str(dt)[6:], name, t, nbytes / t / 1e9, "same q" if ok or "eager" in name else "DIFFERENT"])
    copy = torch.empty(1 << 28, device="cuda")
    dst = torch.empty_like(copy)
    t = bench(lambda: dst.copy_(copy))
    rows.append(["fp32", "copy 1 GiB (ceiling)", t, 2 * copy.numel() * 4 / t / 1e9, ""])
    del copy, dst
    table("quantization of a 256x256x14x14 tensor (TB/s counts the minimal bytes: 2 reads + int8 write)",
          ["dtype", "kernel", "ms", "TB/s", "check"], rows)
    RESULTS["quant"] = rows


def _single_conv(cin, cout, k, s, backend):
    import int8fx

    conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False).cuda()
    return int8fx.convert(nn.Sequential(conv), int8fx.Int8Config(grad_quant="per-tensor", backend=backend))


def sec_conv(quick: bool) -> None:
    from int8fx.kernels import cupy_backend as cb
    from int8fx.nn.modules import make_spec

    B = 64 if quick else 256
    rows = []
    for name, cin, cout, k, s, h in (RESNET50_LAYERS[:1] if quick else RESNET50_LAYERS):
        if ONLY["conv"] and not any(name.startswith(p) for p in ONLY["conv"]):
            continue
        if out_of_time(f"conv {name}"):
            break
        spec = make_spec(2, (k, k), s, k // 2, 1, 1)
        x = torch.randn(B, cin, h, h, device="cuda")
        w = torch.randn(cout, cin, k, k, device="cuda") * 0.05
        ho = (h + 2 * (k // 2) - k) // s + 1
        dy = torch.randn(B, cout, ho, ho, device="cuda")
        flops = 3 * 2 * B * ho * ho * cout * cin * k * k
        times = {}

        def pipeline():
            y, saved = cb.conv_forward(x, w, spec)
            cb.conv_backward(dy, saved, spec)
        times["int8 kernels (layer pipeline)"] = bench(pipeline, rep=10)
        for backend in ("cupy", "torch", "reference"):
            if backend == "reference" and B * ho * ho * cin * k * k > 2**31:
                continue
            qm = _single_conv(cin, cout, k, s, backend)
            xr = x.clone().requires_grad_()

            def op_step():
                qm(xr).backward(dy)
            try:
                times[f"int8 op, backend={backend}"] = bench(op_step, warm=2, rep=5)
            except Exception as ex:  # e.g. a backend the op cannot use yet
                print(f"  {name} backend={backend}: {type(ex).__name__}: {str(ex)[:120]}")
        for dt, cl in ((torch.float32, False), (torch.bfloat16, True)):
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
            mf = torch.channels_last if cl else torch.contiguous_format
            xx = x.to(dt, memory_format=mf).requires_grad_()
            ww = w.to(dt, memory_format=mf).requires_grad_()
            gg = dy.to(dt, memory_format=mf)

            def cudnn_step():
                F.conv2d(xx, ww, stride=s, padding=k // 2).backward(gg)
            times[f"cuDNN {'bf16 channels_last' if cl else 'fp32'}"] = bench(cudnn_step, rep=10)
        base_bf16 = times["cuDNN bf16 channels_last"]
        base_fp32 = times["cuDNN fp32"]
        for what, t in times.items():
            rows.append([name, what, t, flops / t / 1e9, base_bf16 / t, base_fp32 / t])
        RESULTS.setdefault("conv", {})[name] = times
    table(f"conv forward+backward, quantization included, batch {B} (ratio > 1: faster than the baseline)",
          ["layer", "implementation", "ms", "TOP/s", "vs cuDNN bf16 CL", "vs cuDNN fp32"], rows)


TRAIN_MODES = ("fp32", "tf32", "bf16-amp-cl", "int8 torch", "int8 torch, CUDA graph", "int8 torch, plain layouts",
               "int8 cupy", "int8 reference", "int8 torch, eager passes", "tf32, CUDA graph")


def graphed(step, opt, warm: int):
    """`step` captured whole into a CUDA graph (PyTorch's recipe: `warm` eager steps on a side stream first,
    gradients set to None before the capture), as a function that replays it. An INT8 step is host-bound
    eagerly (the sites' Python, ~1800 launches); replayed, it costs its GPU time alone."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step(zero_grad=False)
    return graph.replay


@contextlib.contextmanager
def plain_layouts(on: bool):
    """With `on`, the CUDA sites run without the GPU's operand forms (windows.gpu_layouts: dW's im2col
    transposed, dY quantized column-major for dW, the measured im2col variant) and without the split-K route
    for long reductions: the pipeline of the second GPU lease (2026-12-04), to measure what those forms change
    in the same run."""
    from int8fx.kernels import torch_backend, windows

    saved = windows.gpu_layouts, torch_backend._splitk_gemm
    if on:
        windows.gpu_layouts, torch_backend._splitk_gemm = (lambda t: False), (lambda device: None)
    try:
        yield
    finally:
        windows.gpu_layouts, torch_backend._splitk_gemm = saved


def sec_train(quick: bool) -> None:
    import torchvision

    import int8fx
    from int8fx import fusing


    models = [("resnet18", 256), ("resnet50", 128), ("mobilenet_v2", 256)]
    if quick:
        models = [("resnet18", 64)]
    models = [m for m in models if not ONLY["train"] or m[0] in ONLY["train"]]
    modes = [m for m in TRAIN_MODES if not ONLY["modes"] or m in ONLY["modes"]]
    rows = []
    for mname, bs in models:
        x = torch.randn(bs, 3, 224, 224, device="cuda")
        tgt = torch.randint(0, 1000, (bs,), device="cuda")
        for mode in modes:
            if out_of_time(f"train {mname} {mode}"):
                continue
            torch.manual_seed(0)
            m = getattr(torchvision.models, mname)(num_classes=1000).cuda()
            xin = x
            if mode.startswith("int8"):
                m = int8fx.convert(m, int8fx.Int8Config(backend=mode.split()[1].rstrip(","))).cuda()
            if mode == "bf16-amp-cl":
                m = m.to(memory_format=torch.channels_last)
                xin = x.to(memory_format=torch.channels_last)
            tf = mode.startswith("tf32")
            torch.backends.cuda.matmul.allow_tf32 = tf
            torch.backends.cudnn.allow_tf32 = tf
            opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

            def step(zero_grad=True):
                if zero_grad:  # (not inside a CUDA graph's capture: the gradients are set to None before it)
                    opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
                    loss = F.cross_entropy(m(xin), tgt)
                loss.backward()
                opt.step()
            try:
                torch.cuda.reset_peak_memory_stats()
                with (fusing.eager_passes(mode.endswith("eager passes")),
                      plain_layouts(mode.endswith("plain layouts"))):
                    if mode.endswith("CUDA graph"):
                        ms = bench(graphed(step, opt, warm=int8fx.WARMUP_STEPS), warm=2, rep=10)
                    else:
                        ms = bench(step, warm=3, rep=10)
                peak = torch.cuda.max_memory_allocated() / 2**30
                rows.append([mname, bs, mode, ms, bs / ms * 1000, peak])
                RESULTS.setdefault("train", {})[f"{mname} {mode}"] = {"ms": ms, "img_s": bs / ms * 1000, "peak_gib": peak}
            except Exception as ex:
                rows.append([mname, bs, mode, "failed", f"{type(ex).__name__}: {str(ex)[:60]}", ""])
            del m, opt
            torch.cuda.empty_cache()
    table("training step (SGD momentum, cross entropy, 224x224)", ["model", "batch", "mode", "ms/step", "img/s", "peak GiB"],
          rows)


def sec_tf32(quick: bool) -> None:
    """A design question for the next kernels: does cuDNN's TF32 tensor-core conv compute integer products
    exactly? Int8 codes are exact in TF32 (10-bit mantissa) and each product in fp32; the sums are exact while
    they stay below 2^24 (window x Cin <= 1040 at full range) if the tensor cores accumulate in true fp32.
    Forward and dX (conv2d_input) of ResNet-50 layers on int8-valued fp32 operands, against the fp64
    conv, timed beside the same conv in fp32 and bf16."""
    B = 64 if quick else 256
    rows = []
    for name, cin, cout, k, s, h in RESNET50_LAYERS:
        if out_of_time(f"tf32 {name}"):
            break
        p = k // 2
        x = torch.randint(-127, 128, (B, cin, h, h), device="cuda").float().contiguous(memory_format=torch.channels_last)
        w = torch.randint(-127, 128, (cout, cin, k, k), device="cuda").float().contiguous(memory_format=torch.channels_last)
        y_true = F.conv2d(x.double(), w.double(), stride=s, padding=p)
        dy = torch.randint(-127, 128, y_true.shape, device="cuda").float().contiguous(memory_format=torch.channels_last)
        dx_true = torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), stride=s, padding=p)
        for tf32 in (True, False):
            torch.backends.cudnn.allow_tf32 = tf32
            y = F.conv2d(x, w, stride=s, padding=p)
            dx = torch.nn.grad.conv2d_input(x.shape, w, dy, stride=s, padding=p)
            t_f = bench(lambda: F.conv2d(x, w, stride=s, padding=p), rep=10)
            t_d = bench(lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, stride=s, padding=p), rep=10)
            rows.append([name, cin * k * k, cout * k * k, "tf32" if tf32 else "fp32",
                         float((y.double() - y_true).abs().max()), float((dx.double() - dx_true).abs().max()), t_f, t_d])
        xb, wb, dyb = x.bfloat16(), w.bfloat16(), dy.bfloat16()
        rows.append([name, cin * k * k, cout * k * k, "bf16 (bf16 output)", "", "",
                     bench(lambda: F.conv2d(xb, wb, stride=s, padding=p), rep=10),
                     bench(lambda: torch.nn.grad.conv2d_input(xb.shape, wb, dyb, stride=s, padding=p), rep=10)])
        del x, w, y_true, dy, dx_true
    torch.backends.cudnn.allow_tf32 = True
    table(f"cuDNN conv on int8-valued operands, batch {B}, channels-last: max |error| against fp64 (0: exact)",
          ["layer", "K fwd", "K dX", "math", "fwd max err", "dX max err", "fwd ms", "dX ms"], rows)
    RESULTS["tf32"] = rows


KERNEL_KINDS = (  # (kind, substrings of a CUDA kernel's name), first match wins
    ("int8 GEMM (cuBLASLt / CuPy)", ("i8", "int8", "imma", "igemm", "gemm_s8", "s8")),
    ("fp GEMM / cuDNN conv", ("gemm", "sgemm", "cutlass", "xmma", "conv", "wgrad", "dgrad", "implicit")),
    ("compiled fused passes (triton)", ("triton",)),
    ("batch norm", ("bn_", "batch_norm", "batchnorm")),
    ("copies and fills", ("copy", "fill", "memset", "memcpy", "cat", "pad")),
    ("reductions", ("reduce", "norm", "max", "sum")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


def _kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def sec_profile(quick: bool) -> None:
    """Where an INT8 training step's GPU time goes: torch.profiler over steps of resnet18 (backend "auto"),
    CUDA kernels grouped by kind and the top kernels by self time, next to the FP32 step's. With $OUT set,
    the INT8 step's Chrome trace goes to $OUT/profile_int8.json.gz."""
    import gzip
    import shutil

    import torchvision
    from torch.profiler import ProfilerActivity, profile

    import int8fx

    bs = 64 if quick else 256
    x = torch.randn(bs, 3, 224, 224, device="cuda")
    tgt = torch.randint(0, 1000, (bs,), device="cuda")
    kinds_rows, top_rows = [], []
    for mode in ("fp32", "int8"):
        if out_of_time(f"profile {mode}"):
            continue
        torch.manual_seed(0)
        m = torchvision.models.resnet18(num_classes=1000).cuda()
        if mode == "int8":
            m = int8fx.convert(m, int8fx.Int8Config()).cuda()
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), tgt).backward()
            opt.step()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        steps = 2
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        # (int8fx's passes appear twice: as their kernels and as the `int8fx.<pass>` range around them, left out)
        kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0 and e.device_type.name == "CUDA"
                   and not e.key.startswith("int8fx.")]
        total = sum(e.self_device_time_total for e in kernels) / 1000 / steps
        by_kind: dict = {}
        for e in kernels:
            k = _kernel_kind(e.key)
            t, n = by_kind.get(k, (0.0, 0))
            by_kind[k] = (t + e.self_device_time_total / 1000 / steps, n + e.count // steps)
        for k, (t, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
            kinds_rows.append([mode, k, t, t / total, n])
        kinds_rows.append([mode, "all kernels", total, 1.0, sum(e.count for e in kernels) // steps])
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25 if mode == "int8" else 8]:
            top_rows.append([mode, e.key[:90], e.self_device_time_total / 1000 / steps, e.count // steps])
        RESULTS.setdefault("profile", {})[mode] = {k: v[0] for k, v in by_kind.items()} | {"all": total}
        out = os.environ.get("OUT")
        if out and mode == "int8":
            path = os.path.join(out, "profile_int8.json")
            prof.export_chrome_trace(path)
            with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(path)
        del m, opt, prof
        torch.cuda.empty_cache()
    from int8fx.kernels import windows

    decided = [[str(key[0]), f"{key[1].kernel} s{key[1].stride}", layout, chooser.names[pick]]
               for chooser, layout in ((windows.ROWS, "[M, K]"), (windows.TRANSPOSED, "[K, M] (dW)"))
               for key, pick in chooser.decided.items()]
    table("profile: the im2col copy measured fastest per shape (int8fx.kernels.windows.ROWS, TRANSPOSED)",
          ["input [N, *S, C]", "window", "layout", "fastest"], decided)
    table(f"profile: resnet18 training step, batch {bs}, GPU time per step by kernel kind",
          ["mode", "kernel kind", "ms/step", "share", "launches/step"], kinds_rows)
    table("profile: top kernels by GPU time per step", ["mode", "kernel", "ms/step", "launches/step"], top_rows)


def sec_targets(quick: bool) -> None:
    g = RESULTS.get("gemm", {})
    rows = []
    sq = g.get("square 8192^3")
    if sq:
        r = sq["ms_int_mm"] / sq["ms_cupy"]
        rows.append(["INT8 GEMM 8192^3 >= 0.7x torch._int_mm", f"{r:.2f}x", "met" if r >= 0.7 else "MISSED"])
    dw = g.get("r50 layer1 3x3 dW")
    if dw:
        r = dw["ms_int_mm"] / dw["ms_cupy"]
        rows.append(["dW GEMM r50 layer1 >= 10x one-shot _int_mm", f"{r:.1f}x", "met" if r >= 10 else "MISSED"])
    t = RESULTS.get("train", {})
    if "resnet50 fp32" in t and "resnet50 int8 cupy" in t:
        r = t["resnet50 fp32"]["ms"] / t["resnet50 int8 cupy"]["ms"]
        rows.append(["ResNet-50 INT8 step faster than fp32", f"{r:.2f}x", "met" if r > 1 else "MISSED"])
    table("issue 5 targets (every ratio reported, met or not)", ["target", "measured", "status"], rows)
    RESULTS["targets"] = rows


# (in the order a budgeted run takes them: the whole step's numbers first, the kernel tables after)
SECTIONS = {"check": sec_check, "profile": sec_profile, "train": sec_train, "conv": sec_conv, "gemm": sec_gemm,
            "quant": sec_quant, "tf32": sec_tf32, "targets": sec_targets}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--budget", type=float, default=None, help="seconds after which no new measurement starts")
    ap.add_argument("--conv-layers", default="", help="comma-separated prefixes of the conv section's layer names")
    ap.add_argument("--models", default="", help="comma-separated models of the train section")
    ap.add_argument("--modes", default="", help="semicolon-separated modes of the train section (of TRAIN_MODES)")
    args = ap.parse_args(argv)
    ONLY["conv"] = tuple(p for p in args.conv_layers.split(",") if p)
    ONLY["train"] = tuple(p for p in args.models.split(",") if p)
    ONLY["modes"] = tuple(p.strip() for p in args.modes.split(";") if p.strip())
    if set(ONLY["modes"]) - set(TRAIN_MODES):
        ap.error(f"--modes: unknown {sorted(set(ONLY['modes']) - set(TRAIN_MODES))}; known: {'; '.join(TRAIN_MODES)}")
    global DEADLINE
    if args.budget is not None:
        DEADLINE = time.monotonic() + args.budget
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU")
        return 2
    import cupy

    props = torch.cuda.get_device_properties(0)
    print(f"# int8fx kernel benchmark, {datetime.date.today()}")
    print(f"device: {props.name} ({props.multi_processor_count} SMs, cc {props.major}.{props.minor}); torch "
          f"{torch.__version__}; cupy {cupy.__version__}; command: python benchmarks/kernels.py {' '.join(argv or sys.argv[1:])}")
    RESULTS["meta"] = {"device": props.name, "torch": torch.__version__, "cupy": cupy.__version__,
                       "date": str(datetime.date.today()), "argv": sys.argv}
    for name in args.sections.split(","):
        section(name, SECTIONS[name], args.quick)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "kernels.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
