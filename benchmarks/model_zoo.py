"""Convert every torchvision classification and video model and run one training step on CPU.

Prints one row per model: conv/linear sites, how many converted, whether the INT8 step gave finite
gradients for every parameter, and the time. Usage:
    python benchmarks/model_zoo.py                 # all models (about 80; tens of minutes on 2 cores)
    python benchmarks/model_zoo.py resnet18 r3d_18 # a subset
    python benchmarks/model_zoo.py --convert-only  # coverage only, no forward/backward
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torchvision

import int8fx

# smallest input each family accepts (keeps the step cheap on CPU)
MIN_SIZE = {"inception_v3": 299,  # its training-mode auxiliary head needs 17x17 features for its 5x5 conv
            "googlenet": 32, "vit": 224, "swin": 224, "maxvit": 224, "regnet": 64}


def model_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models)) + sorted(
        torchvision.models.list_models(module=torchvision.models.video))


# (frames, size) each video family needs (its final pooling window); other video models take 4 x 32 x 32
VIDEO_INPUT = {"mvit": (16, 224), "s3d": (16, 224), "swin3d": (8, 224)}


def example_input(name: str, batch: int = 2) -> torch.Tensor:
    if name in torchvision.models.list_models(module=torchvision.models.video):
        frames, size = next((v for k, v in VIDEO_INPUT.items() if name.startswith(k)), (4, 32))
        return torch.randn(batch, 3, frames, size, size)
    size = next((v for k, v in MIN_SIZE.items() if name.startswith(k)), 64)
    return torch.randn(batch, 3, size, size)


def build(name: str) -> torch.nn.Module:
    kwargs = {"weights": None}
    if name in ("inception_v3", "googlenet"):
        kwargs["init_weights"] = False
    return torchvision.models.get_model(name, **kwargs)


def check(name: str, step: bool = True) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build(name)
    qm = int8fx.convert(model)
    rep = int8fx.inspect(qm)
    row = {"model": name, "sites": len(rep.layers), "converted": len(rep.converted),
           "skipped": [(r.name, r.reason) for r in rep.skipped], "finite": None}
    if step:
        x = example_input(name)
        out = qm(x)
        outputs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
        sum(o.float().logsumexp(-1).mean() for o in outputs).backward()  # every head (e.g. inception's aux)
        grads = [p.grad for p in qm.parameters() if p.requires_grad and p.grad is not None]
        row["finite"] = all(bool(torch.isfinite(g).all()) for g in grads)
        row["no_grad"] = [n for n, p in qm.named_parameters() if p.requires_grad and p.grad is None]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="model names (default: all)")
    ap.add_argument("--convert-only", action="store_true")
    args = ap.parse_args(argv)
    names = args.models or model_names()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{'model':28s} {'sites':>5s} {'int8':>5s} {'step':>6s} {'s':>6s}  notes", flush=True)
    bad = 0
    for name in names:
        try:
            r = check(name, step=not args.convert_only)
        except Exception as e:  # report and continue: one broken model must not hide the rest
            print(f"{name:28s} ERROR {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            bad += 1
            continue
        ok = r["converted"] == r["sites"] and r["finite"] in (True, None)
        bad += not ok
        notes = "; ".join(f"{n}: {why}" for n, why in r["skipped"][:3])
        step = {True: "finite", False: "NONFIN", None: "-"}[r["finite"]]
        print(f"{name:28s} {r['sites']:5d} {r['converted']:5d} {step:>6s} {r['seconds']:6.1f}  {notes}", flush=True)
    print(f"{len(names) - bad}/{len(names)} models fully converted" + ("" if args.convert_only else " with finite gradients"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
