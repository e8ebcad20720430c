"""INT8 training with DistributedDataParallel: every rank keeps identical quantizer state.

    # 2 CPU processes (gloo):
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --steps 300
    # one process per GPU (NCCL):
    torchrun --standalone --nproc_per_node=8 examples/train_ddp.py --backend nccl
    # without torchrun it runs as a single process
    python examples/train_ddp.py --steps 100

The recipe, in the order it matters:
  1. init_process_group, then convert the model (same seed on every rank) and move it to the device;
  2. wrap it in DistributedDataParallel; build `QuantStateSync(ddp)` once;
  3. each step: backward, then `sync()` (one collective for all layers' quantizer state), then
     `optimizer.step()` (DeviationLRScaler reads the synced deviations, so its factors agree too).
Real data: Fashion-MNIST from the Debian package `dataset-fashion-mnist` (see README), else
scikit-learn's bundled digits. `--save` writes a checkpoint (model + optimizer + DCLRS state) from rank 0;
`--resume` continues from one exactly. The NCCL path is the same code on CUDA tensors; it has not been
run on GPUs by the int8fx test suite (gloo on CPU is).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import int8fx
from int8fx.data import DataNotFound, load_fashion_mnist, normalize_images
from int8fx.distributed import QuantStateSync


def small_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def load_data(path):
    """(train x, train y, test x, test y, name): Fashion-MNIST if installed, else sklearn digits (28x28)."""
    try:
        xtr, ytr = load_fashion_mnist("train", path)
        xte, yte = load_fashion_mnist("test", path)
        return normalize_images(xtr), ytr, normalize_images(xte), yte, "fashion-mnist"
    except DataNotFound:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy(d.images).float().div(16).sub(0.3).div(0.4).unsqueeze(1)
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
        y = torch.from_numpy(d.target).long()
        return x[:1500], y[:1500], x[1500:], y[1500:], "sklearn-digits"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--policy", default="gvq-mcs", help=f"one of {', '.join(int8fx.quant.grad_quantizer_names())}")
    p.add_argument("--rounding", default="stochastic", choices=["nearest", "stochastic"])
    p.add_argument("--no-dclrs", action="store_true", help="plain SGD instead of DeviationLRScaler(SGD)")
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    p.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--save", default=None, help="checkpoint path written by rank 0 at the end")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    args = p.parse_args()

    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = torch.cuda.is_available() and args.backend != "gloo"
    if distributed:
        backend = args.backend if args.backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    xtr, ytr, xte, yte, source = load_data(args.data)
    torch.manual_seed(0)  # identical model on every rank (DDP also broadcasts rank 0's weights)
    cfg = int8fx.Int8Config(grad_quant=args.policy, rounding=args.rounding, seed=0)
    qm = int8fx.convert(small_cnn(), cfg).to(device)
    ddp = nn.parallel.DistributedDataParallel(qm, device_ids=[local_rank] if use_cuda else None) if distributed else qm
    sync = QuantStateSync(ddp)
    sgd = torch.optim.SGD(qm.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    opt = sgd if args.no_dclrs else int8fx.DeviationLRScaler(sgd, qm)
    start = 0
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=True)
        qm.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
    if rank == 0:
        print(f"{source}: {len(ytr)} train / {len(yte)} test images; world size {world} on {device}; {sync}")

    # every rank draws the same permutation per epoch and takes its own slice of each global batch
    per_epoch = len(ytr) // (args.batch_size * world)
    t0 = time.time()
    for step in range(start, args.steps):
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(epoch))
        lo = (i * world + rank) * args.batch_size
        idx = perm[lo:lo + args.batch_size]
        x, y = xtr[idx].to(device), ytr[idx].to(device)
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        sync()  # after backward, before step
        opt.step()
        if rank == 0 and (step + 1) % 50 == 0:
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.3f}  {time.time() - t0:.1f}s")

    divergence = sync.divergence()  # 0.0: every rank holds the same quantizer state
    params = torch.cat([q.detach().reshape(-1) for q in qm.parameters()])
    if distributed:
        all_params = [torch.empty_like(params) for _ in range(world)]
        dist.all_gather(all_params, params)
        param_divergence = max(float((a - params).abs().max()) for a in all_params)
    else:
        param_divergence = 0.0
    if rank == 0:
        qm.eval()
        with torch.no_grad():
            pred = torch.cat([qm(xte[j:j + 512].to(device)).argmax(1).cpu() for j in range(0, len(yte), 512)])
        print(f"test top-1 {100 * (pred == yte).float().mean():.2f}%  quantizer-state divergence across ranks "
              f"{divergence}  parameter divergence {param_divergence}")
        if args.save:
            torch.save({"model": qm.state_dict(), "optimizer": opt.state_dict(), "step": args.steps}, args.save)
            print(f"saved {args.save}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
