"""What a benchmark checks a model on: how to build it, and the inputs of one forward. Its own module so that
`model_zoo.py` (torchvision and timm) and `other_libraries.py` (models of other libraries, which model_zoo
builds by name) both take it from here, neither from the other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


@dataclass
class Case:
    name: str
    family: str  # classification | video | detection | segmentation | optical_flow | timm, or the library's
    build: Callable[[], nn.Module]
    inputs: Callable[[bool], tuple]  # training mode -> forward arguments


def random_images(batch: int, size: int, frames: int | None = None) -> Callable[[bool], tuple]:
    """Inputs of one Gaussian image batch [batch, 3, size, size] (clips: [batch, 3, frames, size, size])."""
    shape = (batch, 3, size, size) if frames is None else (batch, 3, frames, size, size)
    return lambda train: (torch.randn(shape),)
