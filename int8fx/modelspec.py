"""Resolve a MODEL argument of the command line to a module (and, when known, an example input).

Four forms:
  torchvision:NAME   a torchvision model built with `weights=None` (random init: nothing is downloaded),
                     e.g. torchvision:resnet50, torchvision:mobilenet_v2, torchvision:r3d_18;
  timm:NAME          a timm model built with `pretrained=False` (random init), its example input of the size
                     its pretrained config names (e.g. 1,3,224,224), e.g. timm:resnet26d, timm:efficientnet_b0;
  module:function    an importable module (or a .py file path) and an attribute in it: a function returning
                     a model, `(model, example_inputs)` or `{"model": ..., "example_inputs": ...}`; an
                     nn.Module class (built without arguments); or an nn.Module instance;
  PATH               a checkpoint written by torch.save: a whole model (FP32, or already converted by
                     int8fx), or a dict with "model" (a module) or "arch" (a MODEL string of the two forms
                     above) plus "state_dict"; optional keys "int8fx_config" (dict of Int8Config fields)
                     and "example_inputs". A bare state_dict needs --arch.
Checkpoints are unpickled (`weights_only=False`): load only files you trust.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any

import torch
import torch.nn as nn


class ModelSpecError(ValueError):
    """The MODEL argument cannot be resolved; the message says what was tried and what is accepted."""


VIDEO_SHAPE = (1, 3, 16, 112, 112)
IMAGE_SHAPE = (1, 3, 224, 224)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `inspect` and `export` share: which model, which input, which config."""
    from .config import BACKENDS, ROUNDINGS
    from .quant import grad_quantizer_names

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "MODEL is one of:\n"
        "  torchvision:NAME   torchvision model, random init (no download), e.g. torchvision:resnet50\n"
        "  timm:NAME          timm model, random init (no download), e.g. timm:resnet26d\n"
        "  module:function    importable module or file.py and a function returning a model, (model, example\n"
        "                     inputs) or {'model':..., 'example_inputs':...}; or an nn.Module class/instance\n"
        "  PATH               checkpoint from torch.save: a model, or a dict with 'model', or 'arch' (a MODEL\n"
        "                     string) + 'state_dict' [+ 'int8fx_config', 'example_inputs']; only trusted files\n"
        "                     (they are unpickled)\n"
        "examples:\n"
        "  int8fx inspect torchvision:resnet50 --exclude conv1 --exclude fc\n"
        "  int8fx export torchvision:resnet18 -o resnet18.onnx --input-shape 1,3,224,224\n")
    parser.add_argument("model", metavar="MODEL", help="the model: torchvision:NAME, timm:NAME, module:function or a "
                                                       "checkpoint path (see below)")
    parser.add_argument("--input-shape", metavar="N,C,...", default=None,
                        help="shape of the example input (random normal, seeded), comma-separated; default: "
                             "1,3,224,224 for torchvision image models, 1,3,16,112,112 for video models, a timm model's "
                             "pretrained input size, else the "
                             "example the model source provides; 'none' to skip the example forward")
    parser.add_argument("--arch", metavar="MODEL", default=None,
                        help="architecture (a torchvision:NAME, timm:NAME or module:function) for a checkpoint that "
                             "holds only a state_dict")
    parser.add_argument("--grad-quant", choices=grad_quantizer_names(), default=None,
                        help="gradient quantizer policy (default: Int8Config's default)")
    parser.add_argument("--rounding", choices=ROUNDINGS, default=None, help="rounding of gradients")
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="GEMM backend choice")
    parser.add_argument("--exclude", metavar="PATTERN", action="append", default=[],
                        help="keep layers whose name matches this glob in full precision (repeatable), "
                             "e.g. --exclude conv1 --exclude 'layer4.*'")


def parse_shape(text: str | None):
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    try:
        shape = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise ModelSpecError(f"--input-shape {text!r}: expected comma-separated integers such as 1,3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise ModelSpecError(f"--input-shape {text!r}: every dimension must be a positive integer")
    return shape


def example_from_shape(shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g)


def _torchvision(name: str) -> tuple[nn.Module, tuple | None]:
    try:
        import torchvision
    except ImportError as e:
        raise ModelSpecError(f"torchvision:{name} needs torchvision ({e})") from e
    available = torchvision.models.list_models()
    if name not in available:
        close = [m for m in available if name.lower() in m or m in name.lower()][:8]
        raise ModelSpecError(f"torchvision has no model {name!r}" + (f"; did you mean: {', '.join(close)}" if close else
                                                                      "; see torchvision.models.list_models()"))
    kwargs = {"weights": None}
    if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
        kwargs["weights_backbone"] = None  # detection/segmentation builders fetch ImageNet backbone weights otherwise
    model = torchvision.models.get_model(name, **kwargs)
    video = name in torchvision.models.list_models(module=torchvision.models.video)
    classification = name in torchvision.models.list_models(module=torchvision.models)
    shape = VIDEO_SHAPE if video else IMAGE_SHAPE if classification else None
    return model, shape


def _timm(name: str) -> tuple[nn.Module, tuple]:
    try:
        import timm
    except ImportError as e:
        raise ModelSpecError(f"timm:{name} needs timm: pip install timm ({e})") from e
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=8)
        raise ModelSpecError(f"timm has no model {name!r}" + (f"; did you mean: {', '.join(close)}" if close else
                                                               "; see timm.list_models()"))
    model = timm.create_model(name, pretrained=False)
    size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", IMAGE_SHAPE[1:]))
    return model, (1, *size)


def _import_attr(spec: str) -> Any:
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py") or os.path.sep in mod_name:
        path = os.path.abspath(mod_name)
        if not os.path.isfile(path):
            raise ModelSpecError(f"{spec}: no such file {mod_name}")
        name = f"_int8fx_user_{abs(hash(path))}"
        s = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(s)
        sys.modules[name] = module
        s.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ModelSpecError(f"{spec}: cannot import module {mod_name!r} ({e})") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"{spec}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _from_object(obj: Any, what: str) -> tuple[nn.Module, Any]:
    """(model, example_inputs or None) from what a function or checkpoint gave."""
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        obj = obj()
    elif callable(obj) and not isinstance(obj, nn.Module):
        obj = obj()
    if isinstance(obj, nn.Module):
        return obj, None
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], nn.Module):
        return obj[0], obj[1]
    if isinstance(obj, dict) and isinstance(obj.get("model"), nn.Module):
        return obj["model"], obj.get("example_inputs")
    raise ModelSpecError(f"{what} gave a {type(obj).__name__}; expected an nn.Module, (model, example_inputs) or "
                         "{'model': ..., 'example_inputs': ...}")


def load_model(spec: str, arch: str | None = None) -> tuple[nn.Module, Any, tuple | None, dict | None]:
    """MODEL string -> (module, example_inputs or None, default input shape or None, int8fx config dict or None)."""
    if spec.startswith("torchvision:"):
        model, shape = _torchvision(spec.split(":", 1)[1])
        return model, None, shape, None
    if spec.startswith("timm:"):
        model, shape = _timm(spec.split(":", 1)[1])
        return model, None, shape, None
    if os.path.isfile(spec):
        return _checkpoint(spec, arch)
    if ":" in spec:
        model, example = _from_object(_import_attr(spec), spec)
        return model, example, None, None
    raise ModelSpecError(f"cannot resolve MODEL {spec!r}: not torchvision:NAME or timm:NAME, not module:function, and "
                         "no such file")


def read_checkpoint(path: str) -> Any:
    """What torch.save wrote to `path`, or ModelSpecError if it is not such a file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelSpecError(f"{path}: not a torch.save checkpoint ({type(e).__name__}: {e})") from e


def _checkpoint(path: str, arch: str | None):
    obj = read_checkpoint(path)
    if isinstance(obj, nn.Module):
        return obj, None, None, None
    if not isinstance(obj, dict):
        raise ModelSpecError(f"{path}: holds a {type(obj).__name__}; expected a model or a dict")
    cfg = obj.get("int8fx_config")
    example = obj.get("example_inputs")
    if isinstance(obj.get("model"), nn.Module):
        return obj["model"], example, None, cfg
    state = obj.get("state_dict", obj.get("model_state_dict", obj.get("model")))
    if state is None and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    arch = arch or obj.get("arch")
    if state is None or arch is None:
        raise ModelSpecError(f"{path}: a state_dict checkpoint needs its architecture: pass --arch torchvision:NAME, "
                             "timm:NAME or module:function, or save it under the key 'arch'")
    model, ex2, shape, _ = load_model(arch)
    return _StateDictModel(model, state), example if example is not None else ex2, shape, cfg


class _StateDictModel:
    """A model whose state_dict is loaded after conversion (it may hold int8fx quantizer state)."""

    def __init__(self, model: nn.Module, state: dict) -> None:
        self.model, self.state = model, state


def _config(args, from_checkpoint: dict | None):
    from .config import Int8Config

    fields = dict(from_checkpoint or {})
    for key, value in (("grad_quant", args.grad_quant), ("rounding", args.rounding), ("backend", args.backend)):
        if value is not None:
            fields[key] = value
    if args.exclude:
        fields["exclude"] = tuple(fields.get("exclude", ())) + tuple(args.exclude)
    return Int8Config(**fields)


def load_converted(args) -> tuple[nn.Module, Any, str]:
    """(converted model, example inputs or None, a label) from parsed `add_model_arguments` options."""
    import int8fx

    model, example, default_shape, cfg_dict = load_model(args.model, getattr(args, "arch", None))
    shape = parse_shape(args.input_shape)
    if shape:
        example = example_from_shape(shape)
    elif shape is None and example is None and default_shape:
        example = example_from_shape(default_shape)
    elif shape == ():
        example = None
    state = None
    if isinstance(model, _StateDictModel):
        model, state = model.model, model.state
    from .passes import conversion_of

    if conversion_of(model) is not None:
        qm = model  # already converted (a whole converted model was saved)
    else:
        qm = int8fx.convert(model, _config(args, cfg_dict))
    if state is not None:
        try:
            qm.load_state_dict(state)
        except RuntimeError as e:
            raise ModelSpecError(f"{args.model}: its state_dict does not fit {args.arch or 'the architecture'}: "
                                 f"{str(e).splitlines()[0]}") from e
    label = args.model.split(":", 1)[1] if args.model.startswith("torchvision:") else os.path.basename(args.model)
    return qm, example, label
