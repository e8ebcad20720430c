"""Models from libraries users build on besides torchvision and timm, by name: `benchmarks/model_zoo.py` and
`benchmarks/onnx_models.py` take them as `PREFIX:NAME`. None of these packages is a dependency of int8fx:
a name needs its package installed (`pip install segmentation-models-pytorch transformers monai ultralytics
pytorchvideo efficientnet_pytorch effdet
pretrainedmodels facenet-pytorch`), random init, nothing downloaded.

  smp:ARCH/ENCODER   segmentation_models_pytorch (Unet/resnet18, FPN/tu-efficientnet_b0, Segformer/mit_b0)
  hf:CLASS           transformers vision models from their default config (hf:ResNetForImageClassification)
  monai:NAME         MONAI's 2-d and 3-d medical networks (MONAI_MODELS: UNet3d, SegResNet3d, SwinUNETR, ...)
  yolo:CONFIG        ultralytics YOLO models from the package's own configs (yolov8n, yolo11n-seg,
                     yolo11n-pose, yolo11n-cls, yolo11n-obb: the task from the name's suffix)
  ptv:NAME           pytorchvideo's video networks (PTV_MODELS: x3d_xs, slow_r50, csn_r50, r2plus1d_r50,
                     slowfast_r50)
  effnet_pt:NAME     efficientnet_pytorch's EfficientNets (efficientnet-b0; `NAME/dynamic` for its
                     dynamic same-padding convs, `NAME/plain-swish` without its custom-autograd Swish)
  effdet:NAME        effdet's EfficientDets (efficientdet_d0, tf_efficientdet_d0: BiFPN, TF same padding)
  pm:NAME            pretrainedmodels (Cadene) ImageNet networks at their own input size (xception,
                     inceptionv4, nasnetamobile, se_resnext50_32x4d, dpn68, bninception, polynet, ...)
  facenet:NAME       facenet_pytorch's InceptionResnetV1 and MTCNN's PNet, RNet, ONet
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from cases import Case, random_images


def _needs(package: str, name: str, pip: str):
    """The package, or a one-line exit naming what to install."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise SystemExit(f"{name} needs {package}: pip install {pip} ({e})") from None


def smp_case(spec: str, size: int | None = None) -> Case:
    """A segmentation_models_pytorch model named `ARCH/ENCODER` (random init, 3 classes) at `size` (default
    64): the dense-prediction models users build on timm encoders."""
    smp = _needs("segmentation_models_pytorch", f"smp:{spec}", "segmentation-models-pytorch")
    arch, _, encoder = spec.partition("/")
    if not hasattr(smp, arch) or not encoder:
        raise SystemExit(f"smp:{spec}: give ARCH/ENCODER, ARCH a model class of segmentation_models_pytorch "
                         f"(Unet, FPN, DeepLabV3Plus, Segformer, ...)")

    def build() -> nn.Module:
        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=3)

    return Case(f"smp:{spec}", "segmentation", build, random_images(2, size or 64))


def hf_case(cls_name: str, size: int | None = None) -> Case:
    """A Hugging Face transformers vision model by class name (ResNetForImageClassification,
    SegformerForSemanticSegmentation, DPTForDepthEstimation), built from its default config (random init;
    10 labels for a classifier or segmenter; the config's image size set to `size` where it is one number) at
    `size` (default 64)."""
    transformers = _needs("transformers", f"hf:{cls_name}", "transformers")
    model_cls = getattr(transformers, cls_name, None)
    if model_cls is None or not hasattr(model_cls, "config_class"):
        raise SystemExit(f"hf:{cls_name}: not a transformers model class (e.g. hf:ResNetForImageClassification)")
    size = size or 64

    def build() -> nn.Module:
        labels = {"num_labels": 10} if cls_name.endswith(("ForImageClassification", "ForSemanticSegmentation")) else {}
        config = model_cls.config_class(**labels)
        if isinstance(getattr(config, "image_size", None), int):
            config.image_size = size
        return model_cls(config)

    return Case(f"hf:{cls_name}", "hf", build, random_images(2, size))


# MONAI networks: name -> (builder over monai.networks.nets, input shape [N, C, *S]); small widths, sizes the
# networks accept (SwinUNETR's five halvings need 64 voxels a side)
MONAI_MODELS: dict[str, tuple[Callable, tuple]] = {
    "UNet3d": (lambda N: N.UNet(3, 1, 2, (8, 16, 32, 64), (2, 2, 2), num_res_units=2), (2, 1, 32, 32, 32)),
    "UNet2d": (lambda N: N.UNet(2, 1, 2, (8, 16, 32, 64), (2, 2, 2), num_res_units=2, norm="batch"), (2, 1, 64, 64)),
    "BasicUNet3d": (lambda N: N.BasicUNet(3, 1, 2, features=(8, 8, 16, 32, 64, 8)), (2, 1, 32, 32, 32)),
    "SegResNet3d": (lambda N: N.SegResNet(3, init_filters=8, in_channels=1, out_channels=2), (2, 1, 32, 32, 32)),
    "SegResNetVAE": (lambda N: N.SegResNetVAE((32, 32, 32), spatial_dims=3, init_filters=8, in_channels=1,
                                              out_channels=2), (2, 1, 32, 32, 32)),
    # (at 32 voxels a side its last block's BatchNorms normalize one voxel of a few volumes: training-mode
    # gradients grow 600x through that block in FP32, and more in INT8, which then diverges in two steps)
    "DenseNet121_3d": (lambda N: N.DenseNet121(spatial_dims=3, in_channels=1, out_channels=3), (2, 1, 64, 64, 64)),
    "AttentionUnet2d": (lambda N: N.AttentionUnet(2, 1, 2, (8, 16, 32), (2, 2)), (2, 1, 64, 64)),
    "VNet3d": (lambda N: N.VNet(3, 1, 2), (2, 1, 32, 32, 32)),
    "DynUNet3d": (lambda N: N.DynUNet(3, 1, 2, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2]), (2, 1, 32, 32, 32)),
    "HighResNet3d": (lambda N: N.HighResNet(3, 1, 2), (2, 1, 24, 24, 24)),
    "UNETR": (lambda N: N.UNETR(1, 2, (32, 32, 32), feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4),
              (2, 1, 32, 32, 32)),
    "SwinUNETR": (lambda N: N.SwinUNETR(in_channels=1, out_channels=2, feature_size=12), (2, 1, 64, 64, 64)),
    "EfficientNetBN_b0_2d": (lambda N: N.EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2,
                                                        in_channels=3, num_classes=5), (2, 3, 64, 64)),
    "SEResNet50_3d": (lambda N: N.SEResNet50(spatial_dims=3, in_channels=1, num_classes=3), (2, 1, 32, 32, 32)),
    "ResNet18_3d": (lambda N: N.resnet18(spatial_dims=3, n_input_channels=1, num_classes=3), (2, 1, 32, 32, 32)),
    "FlexibleUNet": (lambda N: N.FlexibleUNet(3, 2, "efficientnet-b0", pretrained=False, spatial_dims=2),
                     (2, 3, 64, 64)),
    "AutoEncoder": (lambda N: N.AutoEncoder(2, 1, 1, (4, 8, 16), (2, 2, 2)), (2, 1, 32, 32)),
}


def monai_case(name: str, size: int | None = None) -> Case:
    """A MONAI network of MONAI_MODELS (random init) at its listed input shape."""
    if name not in MONAI_MODELS:
        raise SystemExit(f"monai:{name}: one of {', '.join(MONAI_MODELS)}")
    make, shape = MONAI_MODELS[name]

    def build() -> nn.Module:
        return make(_needs("monai.networks.nets", f"monai:{name}", "monai"))

    return Case(f"monai:{name}", "monai", build, lambda train: (torch.randn(shape),))


def yolo_case(config: str, size: int | None = None) -> Case:
    """An ultralytics YOLO model built from the package's config `config` (yolov8n, yolo11n-seg, ...: its
    `.yaml`; random init) at `size` (default 64). Checked in eval mode, as a classifier: its eval output (the
    decoded boxes and scores) is differentiable, its training output is raw maps before the loss."""
    tasks = _needs("ultralytics.nn.tasks", f"yolo:{config}", "ultralytics")
    kinds = {"-seg": tasks.SegmentationModel, "-pose": tasks.PoseModel, "-cls": tasks.ClassificationModel,
             "-obb": tasks.OBBModel}
    model_cls = next((c for suffix, c in kinds.items() if config.endswith(suffix)), tasks.DetectionModel)

    def build() -> nn.Module:
        return model_cls(config if config.endswith(".yaml") else f"{config}.yaml", verbose=False)

    return Case(f"yolo:{config}", "ultralytics", build, random_images(2, size or 64))


# pytorchvideo networks: name -> (builder over pytorchvideo.models, clip length); 64 px clips, 5 classes
PTV_MODELS: dict[str, tuple[Callable, int]] = {
    "x3d_xs": (lambda m: m.x3d.create_x3d(input_clip_length=4, input_crop_size=64, model_num_class=5,
                                          head_activation=None), 4),
    "slow_r50": (lambda m: m.resnet.create_resnet(model_num_class=5, model_depth=50, head_pool_kernel_size=(2, 2, 2),
                                                  head_activation=None), 8),
    "csn_r50": (lambda m: m.csn.create_csn(model_num_class=5, model_depth=50, head_pool_kernel_size=(1, 2, 2),
                                           head_activation=None), 8),
    "r2plus1d_r50": (lambda m: m.r2plus1d.create_r2plus1d(model_num_class=5, head_pool_kernel_size=(1, 2, 2),
                                                          head_activation=None, dropout_rate=0.1), 8),
    "slowfast_r50": (lambda m: m.slowfast.create_slowfast(model_num_class=5, head_activation=None,
                                                          head_pool_kernel_sizes=((2, 2, 2), (8, 2, 2))), 8),
}


def ptv_case(name: str, size: int | None = None) -> Case:
    """A pytorchvideo network of PTV_MODELS (random init, 5 classes) on clips of 64 px (SlowFast: its slow
    and fast pathways, 2 and 8 frames)."""
    if name not in PTV_MODELS:
        raise SystemExit(f"ptv:{name}: one of {', '.join(PTV_MODELS)}")
    make, frames = PTV_MODELS[name]

    def build() -> nn.Module:
        _needs("pytorchvideo.models", f"ptv:{name}", "pytorchvideo")
        import pytorchvideo.models.csn  # noqa: F401  (the submodules the builders name)
        import pytorchvideo.models.r2plus1d  # noqa: F401
        import pytorchvideo.models.resnet  # noqa: F401
        import pytorchvideo.models.slowfast  # noqa: F401
        import pytorchvideo.models.x3d  # noqa: F401

        return make(pytorchvideo.models)

    if name.startswith("slowfast"):
        inputs = lambda train: ([torch.randn(2, 3, frames // 4, 64, 64), torch.randn(2, 3, frames, 64, 64)],)  # noqa: E731
    else:
        inputs = random_images(2, 64, frames)
    return Case(f"ptv:{name}", "pytorchvideo", build, inputs)


def effnet_pt_case(spec: str, size: int | None = None) -> Case:
    """An efficientnet_pytorch EfficientNet (`efficientnet-b0`, random init, 10 classes) at `size` (default 64).
    Built for that size, its convs pad TF-style with static padding modules; `NAME/dynamic` builds it without
    an image size (padding computed in each forward), `NAME/plain-swish` with torch's SiLU instead of its
    custom-autograd memory-efficient Swish."""
    efficientnet_pytorch = _needs("efficientnet_pytorch", f"effnet_pt:{spec}", "efficientnet_pytorch")
    name, _, variant = spec.partition("/")
    if variant not in ("", "dynamic", "plain-swish"):
        raise SystemExit(f"effnet_pt:{spec}: NAME, NAME/dynamic or NAME/plain-swish (NAME: efficientnet-b0 ...)")
    size = size or 64

    def build() -> nn.Module:
        model = efficientnet_pytorch.EfficientNet.from_name(
            name, num_classes=10, **({} if variant == "dynamic" else {"image_size": size}))
        if variant == "plain-swish":
            model.set_swish(memory_efficient=False)
        return model

    return Case(f"effnet_pt:{spec}", "efficientnet_pytorch", build, random_images(2, size))


def effdet_case(name: str, size: int | None = None) -> Case:
    """An effdet EfficientDet (random init, backbone too; 5 classes) on `size` px images (default 128: five
    halvings of the backbone and two of the BiFPN); it returns its class and box maps per level."""
    effdet = _needs("effdet", f"effdet:{name}", "effdet pycocotools")
    size = size or 128

    def build() -> nn.Module:
        return effdet.create_model(name, pretrained=False, pretrained_backbone=False, num_classes=5,
                                   image_size=(size, size))

    return Case(f"effdet:{name}", "effdet", build, random_images(2, size))


def pm_case(name: str, size: int | None = None) -> Case:
    """A pretrainedmodels network (random init, 1000 classes) at its own ImageNet input size (its pooling
    before the classifier has a fixed window: 224, 299 or 331 px), or `size`."""
    pm = _needs("pretrainedmodels", f"pm:{name}", "pretrainedmodels munch")
    if name not in pm.model_names:
        raise SystemExit(f"pm:{name}: one of {', '.join(pm.model_names)}")
    settings = pm.pretrained_settings[name]
    size = size or next(iter(settings.values()))["input_size"][-1]

    def build() -> nn.Module:
        return pm.__dict__[name](num_classes=1000, pretrained=None)

    return Case(f"pm:{name}", "pretrainedmodels", build, random_images(2, size))


FACENET_MODELS = {"InceptionResnetV1": 96, "PNet": 48, "RNet": 24, "ONet": 48}  # name -> input size


def facenet_case(name: str, size: int | None = None) -> Case:
    """A facenet_pytorch network (random init): InceptionResnetV1 as a 10-class classifier, MTCNN's three
    stages at the sizes they read (RNet and ONet: 24 and 48 px crops, fixed by their linear layers)."""
    models = _needs("facenet_pytorch.models.mtcnn", f"facenet:{name}", "facenet-pytorch")
    if name not in FACENET_MODELS:
        raise SystemExit(f"facenet:{name}: one of {', '.join(FACENET_MODELS)}")

    def build() -> nn.Module:
        if name == "InceptionResnetV1":
            from facenet_pytorch import InceptionResnetV1

            return InceptionResnetV1(pretrained=None, classify=True, num_classes=10)
        return getattr(models, name)(pretrained=False)

    return Case(f"facenet:{name}", "facenet_pytorch", build, random_images(2, size or FACENET_MODELS[name]))


BY_PREFIX = {"smp:": smp_case, "hf:": hf_case, "monai:": monai_case, "yolo:": yolo_case, "ptv:": ptv_case,
             "effnet_pt:": effnet_pt_case, "effdet:": effdet_case, "pm:": pm_case, "facenet:": facenet_case}
