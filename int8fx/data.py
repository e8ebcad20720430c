"""Real data that ships with a package, so nothing is downloaded at run time (DATA.md).

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (IDX files); scikit-learn's digits
ship inside its wheel. Where Fashion-MNIST is read from: an explicit path, else $INT8FX_DATA, else the Debian location.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
# per-pixel statistics of the Fashion-MNIST training set, for normalisation
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


class DataNotFound(FileNotFoundError):
    pass


def find_fashion_mnist(path: str | os.PathLike | None = None) -> Path:
    """The folder holding the four IDX files: in `path` if given, else in $INT8FX_DATA if set, else in the
    Debian package's folder. A folder the user named is the only one looked in: a copy elsewhere would be
    other data than the one asked for, trained on without a word."""
    named = path or os.environ.get("INT8FX_DATA")
    root = Path(named) if named else DEBIAN_FASHION_MNIST
    for d in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw"):
        if all((d / f).exists() for f in _FILES["train"] + _FILES["test"]):
            return d
    where = ("--data" if path else "$INT8FX_DATA") if named else "the Debian package's folder"
    raise DataNotFound(
        f"Fashion-MNIST not found in {root} ({where}): it needs the four IDX .gz files ("
        + ", ".join(_FILES["train"] + _FILES["test"]) + "). Install them with\n"
        "    apt-get update && apt-get install -y dataset-fashion-mnist\n"
        "or pass --data / set INT8FX_DATA to a folder holding them.")


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_fashion_mnist(split: str = "train", path=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the 'train' (60,000) or 'test' (10,000) split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = find_fashion_mnist(path)
    img_f, lab_f = _FILES[split]
    images = _read_idx(root / img_f, 16).reshape(-1, 28, 28)
    labels = _read_idx(root / lab_f, 8).astype(np.int64)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def normalize_images(images: torch.Tensor, size: int | None = None, channels: int = 1) -> torch.Tensor:
    """uint8 [N, H, W] -> float [N, channels, size, size], standardised with the Fashion-MNIST statistics."""
    x = (images.float().div(255) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    x = x.unsqueeze(1)
    if size is not None and size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, channels, -1, -1).contiguous() if channels != 1 else x


def real_batch(n: int = 16, size: int = 64, channels: int = 3, path=None, seed: int = 0):
    """A small batch of real images for fidelity checks: Fashion-MNIST when installed, else scikit-learn's
    digits (8x8, upsampled). Returns (x float [n, channels, size, size], y int64 [n], source name)."""
    g = torch.Generator().manual_seed(seed)
    try:
        images, labels = load_fashion_mnist("train", path)
        source = "fashion-mnist"
        idx = torch.randperm(len(labels), generator=g)[:n]
        return normalize_images(images[idx], size, channels), labels[idx], source
    except DataNotFound:
        from sklearn.datasets import load_digits

        d = load_digits()
        idx = torch.randperm(len(d.target), generator=g)[:n]
        img = torch.from_numpy(d.images[idx.numpy()]).float()
        x = ((img / 16.0) - 0.3).unsqueeze(1) / 0.4
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.expand(-1, channels, -1, -1).contiguous(), torch.from_numpy(d.target[idx.numpy()]).long(), "sklearn-digits"
