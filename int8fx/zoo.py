"""Small CNNs sized for 28x28 grayscale images, and any torchvision classifier adapted to them.

Why our own models: the ImageNet models in torchvision downsample 32x at the stem, which leaves almost
nothing of a 28x28 image and wastes a CPU's time. The CIFAR-style nets here keep full resolution in the
first stage, so a few epochs reach the data set's usual accuracy (DATA.md: simple CNNs 91-93%, ResNets
94-95% on Fashion-MNIST) on a 2-core CPU.

    build_model("resnet20")              # CIFAR-style ResNet-20 (He et al. 2016, option-B shortcuts)
    build_model("resnet20", width=8)     # narrower: a quarter of the multiply-adds
    build_model("mobilenetv2")           # MobileNetV2-style inverted residuals, sized for 28x28
    build_model("mobilenetv2-s2")        # the same with the paper's stride-2 stem: a quarter of the cost
    build_model("tv:resnet18")           # any torchvision classification model by name

`build_model` returns a `ZooModel`: the module plus the input size and channel count it wants, so the
data pipeline can resize or replicate channels for models that cannot take 28x28x1 directly.
"""
from __future__ import annotations

import inspect as _inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------- ResNet-20


class BasicBlock(nn.Module):
    """3x3-3x3 residual block; a 1x1 conv+BN shortcut when the shape changes (option B)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet-(6n+2): a 3x3 stem and three stages of n blocks at widths w, 2w, 4w.

    For 28x28 inputs the stages run at 28, 14 and 7 pixels. depth=20, width=16 is the ResNet-20 of the
    paper (0.27 M parameters); smaller `width` cuts compute quadratically.
    """

    def __init__(self, depth: int = 20, width: int = 16, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(width: int = 16, in_channels: int = 1, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, width, in_channels, num_classes)


# ------------------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; identity shortcut when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNetV2S(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) shrunk for 28x28: stride-1 stem, downsampling 28 -> 14 -> 7.

    Rows of (expansion t, channels c, repeats n, first stride s) as in the paper's Table 2, fewer and
    narrower; `width_mult` scales every channel count. `stem_stride=2` downsamples in the stem as the
    paper's ImageNet network does, so the blocks run at 14, 7 and 4 pixels: why it exists is cost, since
    the 6x-expanded blocks at 28x28 dominate a CPU step (w1.0, batch 128, one thread: ~2.5 s with the
    stride-1 stem, ~0.5 s with the stride-2 stem).
    """

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1))

    def __init__(self, width_mult: float = 1.0, in_channels: int = 1, num_classes: int = 10, last: int = 256,
                 stem_stride: int = 1) -> None:
        super().__init__()

        def ch(c: float) -> int:
            return max(8, int(round(c * width_mult / 8)) * 8)

        cin = ch(32)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, cin, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(cin),
                                   nn.ReLU6(inplace=True)]
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, ch(c), s if i == 0 else 1, t))
                cin = ch(c)
        last = ch(last)
        layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenetv2(width_mult: float = 1.0, in_channels: int = 1, num_classes: int = 10) -> MobileNetV2S:
    return MobileNetV2S(width_mult, in_channels, num_classes)


def mobilenetv2_s2(width_mult: float = 1.0, in_channels: int = 1, num_classes: int = 10) -> MobileNetV2S:
    """`mobilenetv2` with a stride-2 stem (blocks at 14, 7, 4 px): the depthwise network of `int8fx train`'s
    CPU-sized presets."""
    return MobileNetV2S(width_mult, in_channels, num_classes, stem_stride=2)


# ------------------------------------------------------------------------------------ small CNN


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU-pool stages and a two-layer head: the 'simple CNN' of the Fashion-MNIST
    benchmark page (91-93%), cheap enough to train many runs on a CPU."""

    def __init__(self, width: int = 32, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 7 * 7, 128), nn.ReLU(inplace=True),
                                        nn.Dropout(0.2), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def smallcnn(width: int = 32, in_channels: int = 1, num_classes: int = 10) -> SmallCNN:
    return SmallCNN(width, in_channels, num_classes)


# ------------------------------------------------------------------------------------ registry


@dataclass
class ZooModel:
    """A model and the input it wants: `size` x `size` pixels with `channels` channels."""

    module: nn.Module
    name: str
    size: int = 28
    channels: int = 1
    note: str = ""


OWN_MODELS = {"resnet20": resnet20, "mobilenetv2": mobilenetv2, "mobilenetv2-s2": mobilenetv2_s2, "smallcnn": smallcnn}
_WIDTH_ARG = {"resnet20": "width", "smallcnn": "width", "mobilenetv2": "width_mult", "mobilenetv2-s2": "width_mult"}


def model_names() -> tuple[str, ...]:
    """int8fx's own models; any torchvision classification model is also accepted as 'tv:NAME' or 'NAME'."""
    return tuple(OWN_MODELS)


def build_model(name: str, num_classes: int = 10, in_channels: int = 1, width: float | None = None,
                size: int | None = None) -> ZooModel:
    """Build `name` for `in_channels` x 28 x 28 inputs and `num_classes` classes.

    name: one of `model_names()`, or a torchvision classification model ('resnet18', 'tv:resnet18').
    width: channel width of our own models (ResNet/small CNN: base channels; MobileNetV2: multiplier).
    size: input resolution; torchvision models default to the smallest of 28/32/64/.../224 they accept.
    """
    key = name.lower()
    if key in OWN_MODELS:
        kwargs = {"in_channels": in_channels, "num_classes": num_classes}
        if width is not None:
            kwargs[_WIDTH_ARG[key]] = width if _WIDTH_ARG[key] == "width_mult" else int(width)
        return ZooModel(OWN_MODELS[key](**kwargs), key, size or 28, in_channels)
    return torchvision_model(key.removeprefix("tv:"), num_classes, in_channels, size)


def check_model_name(name: str) -> None:
    """ValueError unless `build_model` knows `name`, without building it (the CLI asks before any run)."""
    key = name.lower()
    if key not in OWN_MODELS:
        _torchvision_models_with(key.removeprefix("tv:"))


def _torchvision_models_with(name: str):
    """torchvision.models, or ValueError if it has no classification model `name` (or is not installed)."""
    try:
        import torchvision.models as tvm
    except ImportError as e:  # pragma: no cover - torchvision is a dev dependency
        raise ValueError(f"model {name!r} is not one of int8fx's ({', '.join(OWN_MODELS)}) and torchvision is not "
                         f"installed: {e}") from None
    available = tvm.list_models(module=tvm)
    if name not in available:
        raise ValueError(f"unknown model {name!r}: choose one of int8fx's ({', '.join(OWN_MODELS)}) or a torchvision "
                         f"classification model ({', '.join(available[:8])}, ... {len(available)} in all)")
    return tvm


def torchvision_model(name: str, num_classes: int = 10, in_channels: int = 1, size: int | None = None) -> ZooModel:
    """A torchvision classification model with random weights, `num_classes` outputs and its first conv
    rebuilt for `in_channels` (so grayscale images go in as they are). If the model has no 3-channel
    first conv to rebuild, it keeps 3 channels and `ZooModel.channels` says the data must be replicated."""
    tvm = _torchvision_models_with(name)
    builder = tvm.get_model_builder(name)
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    params = _inspect.signature(builder).parameters
    # Inception-style models: auxiliary heads return tuples in training mode and need big inputs.
    if "aux_logits" in params or name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    model = tvm.get_model(name, **kwargs)
    channels, note = in_channels, ""
    if in_channels != 3 and not _replace_first_conv(model, in_channels):
        channels, note = 3, "no 3-channel first conv found: grayscale is replicated to 3 channels"
    if size is None:
        size = _smallest_input(model, channels)
        if size != 28:
            note = (note + "; " if note else "") + f"needs inputs of at least {size}px: images are resized"
    return ZooModel(model, name, size, channels, note)


def _replace_first_conv(model: nn.Module, in_channels: int) -> bool:
    """Swap the first Conv2d that reads 3 channels for one that reads `in_channels` (weights summed over
    the RGB channels, the usual grayscale adaptation). Returns whether one was found."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.in_channels == 3 and mod.groups == 1:
            new = nn.Conv2d(in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                            1, mod.bias is not None, mod.padding_mode)
            with torch.no_grad():
                new.weight.copy_(mod.weight.sum(1, keepdim=True).expand_as(new.weight) / max(in_channels, 1))
                if mod.bias is not None:
                    new.bias.copy_(mod.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
            return True
    return False


def _smallest_input(model: nn.Module, channels: int, candidates=(28, 32, 64, 96, 128, 160, 224, 299)) -> int:
    """The smallest resolution the model runs on (ViTs want exactly 224, Inception 75+, AlexNet 63+)."""
    was = model.training
    model.eval()
    try:
        for s in candidates:
            try:
                with torch.no_grad():
                    model(torch.zeros(1, channels, s, s))
                return s
            except (RuntimeError, ValueError, AssertionError):
                continue
    finally:
        model.train(was)
    raise ValueError(f"{type(model).__name__} ran on none of the input sizes {candidates}")


def logits(out) -> torch.Tensor:
    """The class scores from a model output: a tensor, or the `.logits` / first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find class scores in a model output of type {type(out).__name__}")
