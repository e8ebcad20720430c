"""Models from libraries users build on besides torchvision and timm, by name: `benchmarks/model_zoo.py` and
`benchmarks/onnx_models.py` take them as `PREFIX:NAME`. None of these packages is a dependency of int8fx:
a name needs its package installed (`pip install segmentation-models-pytorch transformers monai ultralytics
pytorchvideo efficientnet_pytorch effdet
pretrainedmodels facenet-pytorch diffusers open_clip_torch ftfy kornia kornia-rs pytorchcv spandrel einops
dynamic-network-architectures vit-pytorch`), random init, nothing downloaded.

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
  diffusers:NAME     diffusers' small UNet2DModel, AutoencoderKL and UNet2DConditionModel (DIFFUSERS_MODELS)
  openclip:NAME      open_clip's image towers (RN50, convnext_tiny, MobileCLIP-S1, ...) at `size` (default 64)
  kornia:NAME        kornia.feature's CNNs (KORNIA_MODELS: HardNet, TFeat, SOSNet, HyNet, OriNet, KeyNet, DISK, ...)
  pcv:NAME           pytorchcv's networks (revnet38, sharesnet18, octresnet10_ad2, NAME_cifar10 at 32 px, ...)
  nnunet:NAME        dynamic_network_architectures' nnU-Net networks (NNUNET_MODELS: PlainConvUNet2d, ResEncUNet3d, ...)
  spandrel:NAME      spandrel's image-restoration networks, small widths (SPANDREL_MODELS: ESRGAN, SPAN, NAFNet, ...)
  vitpt:NAME         vit-pytorch's vision transformers with convolutions (VITPT_MODELS: CvT, LeViT, MobileViT, ...)
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


def _listed(prefix: str, family: str, table: dict, package: str, pip: str, name: str) -> Case:
    """A model of `table` (name -> (builder over the imported `package`, its inputs)), random init. Its inputs:
    a function of the training flag giving the forward's arguments, or one input shape, or a tuple of them."""
    if name not in table:
        raise SystemExit(f"{prefix}:{name}: one of {', '.join(table)}")
    make, given = table[name]

    def build() -> nn.Module:
        return make(_needs(package, f"{prefix}:{name}", pip))

    if callable(given):
        return Case(f"{prefix}:{name}", family, build, given)
    shapes = given if isinstance(given[0], tuple) else (given,)
    return Case(f"{prefix}:{name}", family, build, lambda train: tuple(torch.randn(s) for s in shapes))


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
    return _listed("monai", "monai", MONAI_MODELS, "monai.networks.nets", "monai", name)


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


# diffusers models: name -> (builder over the diffusers module, inputs); widths 32/64, GroupNorm of 8 groups,
# a timestep per image (and a UNet2DConditionModel's encoder states: 7 tokens of 32)
_UNET = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
             norm_num_groups=8)
_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=8, latent_channels=4, sample_size=32)
_T = lambda: torch.randint(0, 1000, (2,))  # noqa: E731
DIFFUSERS_MODELS: dict[str, tuple[Callable, Callable]] = {
    "UNet2D": (lambda d: d.UNet2DModel(**_UNET, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
               lambda train: (torch.randn(2, 3, 32, 32), _T())),
    "UNet2D-attn": (lambda d: d.UNet2DModel(**_UNET, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                            up_block_types=("AttnUpBlock2D", "UpBlock2D")),
                    lambda train: (torch.randn(2, 3, 32, 32), _T())),
    "AutoencoderKL": (lambda d: d.AutoencoderKL(**_VAE), lambda train: (torch.randn(2, 3, 32, 32),)),
    "AutoencoderKL-sample": (lambda d: d.AutoencoderKL(**_VAE), lambda train: (torch.randn(2, 3, 32, 32), True)),
    "UNet2DCondition": (lambda d: d.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8),
        lambda train: (torch.randn(2, 4, 16, 16), _T(), torch.randn(2, 7, 32))),
}


def diffusers_case(name: str, size: int | None = None) -> Case:
    """A diffusers model of DIFFUSERS_MODELS (random init), its extra forward arguments passed positionally;
    it returns its output dataclass (`.sample`)."""
    return _listed("diffusers", "diffusers", DIFFUSERS_MODELS, "diffusers", "diffusers", name)


def openclip_case(name: str, size: int | None = None) -> Case:
    """The image tower (`.visual`) of an open_clip model (random init, no weights) built for `size` px
    (default 64; ModifiedResNet's attention pool needs a multiple of 32)."""
    open_clip = _needs("open_clip", f"openclip:{name}", "open_clip_torch ftfy")
    size = size or 64

    def build() -> nn.Module:
        return open_clip.create_model(name, pretrained=None, force_image_size=size).visual

    return Case(f"openclip:{name}", "open_clip", build, random_images(2, size))


# kornia.feature networks: name -> (builder over kornia.feature, input shape); patch descriptors on 32 px
# grey patches, detectors on 64 px images
KORNIA_MODELS: dict[str, tuple[Callable, tuple]] = {
    "HardNet": (lambda KF: KF.HardNet(pretrained=False), (4, 1, 32, 32)),
    "HardNet8": (lambda KF: KF.HardNet8(pretrained=False), (4, 1, 32, 32)),
    "TFeat": (lambda KF: KF.TFeat(pretrained=False), (4, 1, 32, 32)),
    "SOSNet": (lambda KF: KF.SOSNet(pretrained=False), (4, 1, 32, 32)),
    "HyNet": (lambda KF: KF.HyNet(pretrained=False), (4, 1, 32, 32)),
    "OriNet": (lambda KF: KF.OriNet(pretrained=False), (4, 1, 32, 32)),
    "KeyNet": (lambda KF: KF.KeyNet(pretrained=False), (2, 1, 64, 64)),
    "DISK": (lambda KF: KF.DISK().unet, (2, 3, 64, 64)),  # (its forward returns keypoint lists after NMS)
    "XFeatModel": (lambda KF: KF.XFeatModel(), (2, 1, 64, 64)),
    "SOLD2_detector": (lambda KF: KF.SOLD2_detector(pretrained=False), (2, 1, 64, 64)),
    "DeFMO": (lambda KF: KF.DeFMO(pretrained=False), (2, 6, 64, 64)),
}


def kornia_case(name: str, size: int | None = None) -> Case:
    """A kornia.feature network of KORNIA_MODELS (random init) at its listed input shape."""
    return _listed("kornia", "kornia", KORNIA_MODELS, "kornia.feature", "kornia kornia-rs", name)


def pcv_case(name: str, size: int | None = None) -> Case:
    """A pytorchcv network (random init, its own class count) at its input size: 32 px for the CIFAR/SVHN
    ones, else 224 (most end in a fixed 7x7 average pool), or `size`."""
    provider = _needs("pytorchcv.model_provider", f"pcv:{name}", "pytorchcv")
    size = size or (32 if name.endswith(("_cifar10", "_cifar100", "_svhn")) else 224)

    def build() -> nn.Module:
        return provider.get_model(name, pretrained=False)

    return Case(f"pcv:{name}", "pytorchcv", build, random_images(2, size))



def _class_in(module: str, cls: str, **kwargs) -> Callable:
    """A builder (for `_listed`) of the class `cls` of the module `module` with `kwargs`."""
    import importlib

    return lambda package: getattr(importlib.import_module(module), cls)(**kwargs)


def _spandrel(module: str, cls: str, **kwargs) -> Callable:
    """A builder of the class `cls` of `spandrel.architectures.<module>` with `kwargs`."""
    return _class_in(f"spandrel.architectures.{module}", cls, **kwargs)


# spandrel architectures: name -> (builder, input shape or shapes); 2x super-resolution where the network
# upscales, widths 16-32, 32 px inputs (LaMa, RealCUGAN: their defaults)
SPANDREL_MODELS: dict[str, tuple[Callable, tuple]] = {
    "ESRGAN": (_spandrel("ESRGAN.__arch.RRDB", "RRDBNet", num_filters=16, num_blocks=2, scale=2), (2, 3, 32, 32)),
    "Compact": (_spandrel("Compact.__arch.SRVGG", "SRVGGNetCompact", num_feat=16, num_conv=4, upscale=2),
                (2, 3, 32, 32)),
    "SPAN": (_spandrel("SPAN.__arch.span", "SPAN", num_in_ch=3, num_out_ch=3, feature_channels=16, upscale=2),
             (2, 3, 32, 32)),
    "NAFNet": (_spandrel("NAFNet.__arch.NAFNet_arch", "NAFNet", width=16, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1]),
               (2, 3, 32, 32)),
    "PLKSR": (_spandrel("PLKSR.__arch.PLKSR", "PLKSR", dim=16, n_blocks=2, upscaling_factor=2), (2, 3, 32, 32)),
    "RCAN": (_spandrel("RCAN.__arch.rcan_arch", "RCAN", scale=2, n_resgroups=1, n_resblocks=2, n_feats=16),
             (2, 3, 32, 32)),
    "DRUNet": (_spandrel("DRUNet.__arch.network_unet", "DRUNet", in_nc=4, out_nc=3, nc=[16, 32, 64, 128], nb=1),
               (2, 4, 32, 32)),
    "KBNet": (_spandrel("KBNet.__arch.kbnet_s", "KBNet_s", width=16, middle_blk_num=1, enc_blk_nums=[1, 1],
                        dec_blk_nums=[1, 1]), (2, 3, 32, 32)),
    "RealCUGAN": (_spandrel("RealCUGAN.__arch.upcunet_v3", "UpCunet2x"), (2, 3, 64, 64)),
    "LaMa": (_spandrel("LaMa.__arch.LaMa", "LaMa", in_nc=4), ((2, 3, 64, 64), (2, 1, 64, 64))),  # (image, mask)
}


def spandrel_case(name: str, size: int | None = None) -> Case:
    """A spandrel architecture of SPANDREL_MODELS (random init) at its listed input shape (or shapes)."""
    return _listed("spandrel", "spandrel", SPANDREL_MODELS, "spandrel", "spandrel einops", name)


def _nnunet(N, cls: str, dims: int, deep_supervision: bool = False, **kwargs) -> nn.Module:
    """An nnU-Net network of 4 stages (16 to 128 features) as nnU-Net's planner configures them: instance
    norm, leaky ReLU, convs of 3, strided convs down, transposed convs up, 2 classes."""
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dims == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    return getattr(N, cls)(1, 4, (16, 32, 64, 128), conv, 3, (1, 2, 2, 2), num_classes=2, n_conv_per_stage_decoder=2,
                           conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
                           nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision,
                           **kwargs)


NNUNET_MODELS: dict[str, tuple[Callable, tuple]] = {
    "PlainConvUNet2d": (lambda N: _nnunet(N, "PlainConvUNet", 2, n_conv_per_stage=2), (2, 1, 64, 64)),
    "PlainConvUNet3d-ds": (lambda N: _nnunet(N, "PlainConvUNet", 3, True, n_conv_per_stage=2), (2, 1, 32, 32, 32)),
    "ResEncUNet2d": (lambda N: _nnunet(N, "ResidualEncoderUNet", 2, n_blocks_per_stage=(1, 2, 2, 2)), (2, 1, 64, 64)),
    "ResEncUNet3d-ds": (lambda N: _nnunet(N, "ResidualEncoderUNet", 3, True, n_blocks_per_stage=(1, 2, 2, 2)),
                        (2, 1, 32, 32, 32)),
}


def nnunet_case(name: str, size: int | None = None) -> Case:
    """An nnU-Net network of NNUNET_MODELS (random init; `-ds`: deep supervision, a list of outputs) at its
    listed input shape."""
    return _listed("nnunet", "nnunet", NNUNET_MODELS, "dynamic_network_architectures.architectures.unet",
                   "dynamic-network-architectures", name)


def _vitpt(module: str, cls: str, **kwargs) -> Callable:
    return _class_in(f"vit_pytorch.{module}", cls, **kwargs)


# vit-pytorch's (lucidrains) vision transformers with convolutions (conv stems, token mixers, positional
# convs, MBConv blocks), small widths and depths, 64 or 128 px
VITPT_MODELS: dict[str, tuple[Callable, tuple]] = {
    "CvT": (_vitpt("cvt", "CvT", num_classes=10, s1_emb_dim=16, s2_emb_dim=32, s3_emb_dim=64, s3_depth=1),
            (2, 3, 64, 64)),
    "LeViT": (_vitpt("levit", "LeViT", image_size=64, num_classes=10, stages=3, dim=(32, 48, 64), depth=1,
                     heads=(2, 3, 4), mlp_mult=2, dropout=0.1), (2, 3, 64, 64)),
    "PiT": (_vitpt("pit", "PiT", image_size=64, patch_size=8, dim=32, num_classes=10, depth=(1, 1, 1), heads=2,
                   mlp_dim=64), (2, 3, 64, 64)),
    "MobileViT": (_vitpt("mobile_vit", "MobileViT", image_size=(64, 64), dims=[32, 40, 48],
                         channels=[8, 8, 16, 16, 24, 24, 32, 32, 40, 40, 96], num_classes=10), (2, 3, 64, 64)),
    "MaxViT": (_vitpt("max_vit", "MaxViT", num_classes=10, dim_conv_stem=16, dim=16, dim_head=8, depth=(1, 1),
                      window_size=4, mbconv_expansion_rate=2, mbconv_shrinkage_rate=0.25, dropout=0.1),
               (2, 3, 64, 64)),
    "CCT": (_vitpt("cct", "CCT", img_size=(64, 64), embedding_dim=32, n_conv_layers=2, kernel_size=7, stride=2,
                   padding=3, pooling_kernel_size=3, pooling_stride=2, pooling_padding=1, num_layers=1, num_heads=2,
                   mlp_ratio=2., num_classes=10, positional_embedding="learnable"), (2, 3, 64, 64)),
    "CrossFormer": (_vitpt("crossformer", "CrossFormer", num_classes=10, dim=(32, 64, 128, 256), depth=(1, 1, 1, 1),
                           global_window_size=(4, 2, 1, 1), local_window_size=2, ff_dropout=0.1), (2, 3, 128, 128)),
    "RegionViT": (_vitpt("regionvit", "RegionViT", dim=(16, 32, 64, 128), depth=(1, 1, 1, 1), window_size=2,
                         num_classes=10, tokenize_local_3_conv=False, use_peg=True), (2, 3, 64, 64)),
    "TwinsSVT": (_vitpt("twins_svt", "TwinsSVT", num_classes=10, s1_emb_dim=16, s2_emb_dim=32, s3_emb_dim=64,
                        s4_emb_dim=64, s3_depth=1, s4_depth=1, s1_local_patch_size=4, s2_local_patch_size=2,
                        s3_local_patch_size=2, s4_local_patch_size=1, s1_global_k=4, s2_global_k=2, s3_global_k=2,
                        s4_global_k=1), (2, 3, 128, 128)),
    "ScalableViT": (_vitpt("scalable_vit", "ScalableViT", num_classes=10, dim=16, heads=(1, 2, 4, 8),
                           depth=(1, 1, 1, 1), reduction_factor=(4, 2, 2, 1), window_size=(4, 4, None, None),
                           dropout=0.1), (2, 3, 128, 128)),
    "NesT": (_vitpt("nest", "NesT", image_size=64, patch_size=4, dim=16, heads=2, num_hierarchies=3,
                    block_repeats=(1, 1, 1), num_classes=10), (2, 3, 64, 64)),
    "RvT": (_vitpt("rvt", "RvT", image_size=64, patch_size=8, num_classes=10, dim=32, depth=1, heads=2, mlp_dim=64,
                   use_rotary=True, use_ds_conv=True, use_glu=True), (2, 3, 64, 64)),
    "SimpleViT": (_vitpt("simple_vit", "SimpleViT", image_size=64, patch_size=8, num_classes=10, dim=32, depth=1,
                         heads=2, mlp_dim=64), (2, 3, 64, 64)),
    "T2TViT": (_vitpt("t2t", "T2TViT", dim=32, image_size=64, depth=1, heads=2, mlp_dim=64, num_classes=10,
                      t2t_layers=((7, 4), (3, 2), (3, 2))), (2, 3, 64, 64)),
}


def vitpt_case(name: str, size: int | None = None) -> Case:
    """A vit-pytorch network of VITPT_MODELS (random init) at its listed input shape."""
    return _listed("vitpt", "vit_pytorch", VITPT_MODELS, "vit_pytorch", "vit-pytorch einops", name)


BY_PREFIX = {"smp:": smp_case, "hf:": hf_case, "monai:": monai_case, "yolo:": yolo_case, "ptv:": ptv_case,
             "effnet_pt:": effnet_pt_case, "effdet:": effdet_case, "pm:": pm_case, "facenet:": facenet_case,
             "diffusers:": diffusers_case, "openclip:": openclip_case, "kornia:": kornia_case,
             "pcv:": pcv_case, "nnunet:": nnunet_case, "spandrel:": spandrel_case, "vitpt:": vitpt_case}
