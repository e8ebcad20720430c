"""The training data of `int8fx train`: Fashion-MNIST as normalised tensors on the training device, the
fixed class-balanced subsets every run shares, and the seeded augmentation of each batch.

Why seeded from the run's generator: runs with the same seed must see the same batches, so that FP32
and INT8 differ only in their arithmetic (int8fx.data reads the files; this module shapes them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .recipe import Recipe


@dataclass
class Data:
    """Fashion-MNIST as normalised float tensors [N, 1, 28, 28] on the training device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str = "fashion-mnist"


def balanced_subset(labels: torch.Tensor, n: int | None, seed: int = 1234) -> torch.Tensor:
    """Indices of n samples with (nearly) equal counts per class, the same for every run and seed."""
    if n is None or n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    classes = labels.unique()
    per = [perm[labels[perm] == c] for c in classes]
    take = [p[: n // len(classes) + (1 if i < n % len(classes) else 0)] for i, p in enumerate(per)]
    return torch.cat(take).sort().values


def load_data(recipe: Recipe, path=None, device="cpu") -> Data:
    from ..data import load_fashion_mnist, normalize_images

    tx, ty = load_fashion_mnist("train", path)
    vx, vy = load_fashion_mnist("test", path)
    ti = balanced_subset(ty, recipe.train_subset)
    vi = balanced_subset(vy, recipe.test_subset)
    dev = torch.device(device)
    return Data(normalize_images(tx[ti]).to(dev), ty[ti].to(dev), normalize_images(vx[vi]).to(dev), vy[vi].to(dev))


def fit_input(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Resize/replicate a [B, 1, 28, 28] batch to what the model wants (torchvision models)."""
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, channels, -1, -1) if channels != x.shape[1] else x


def augment(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """Per-sample random horizontal flip and, for 'flip+crop', a random shift of up to 2 pixels (zero
    padding then a 28x28 crop), drawn from `g` so that runs with the same seed see the same batches."""
    if kind == "none":
        return x
    b, _, h, w = x.shape
    flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if kind == "flip+crop":
        p = 2
        xp = F.pad(x, (p, p, p, p))  # zeros (background after normalisation is negative: fine)
        oy = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
        rows = (oy.view(-1, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (ox.view(-1, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        ci = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        x = xp[bi, ci, rows, cols]
    elif kind != "flip":
        raise ValueError(f"augment must be 'none', 'flip' or 'flip+crop', got {kind!r}")
    return x
