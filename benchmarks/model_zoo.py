"""Every torchvision model (classification and its quantizable variants, video, detection, segmentation,
optical flow) and a broad set of timm CNNs:
a conversion must change the conv/linear sites and nothing else.

Per model, two checks:
  pass-through  `Int8Config(quantize=False)`: the converted model equals the original bit for bit, outputs
                and every gradient, in train mode (same seed, so dropout and drop-path draw the same), in
                eval mode, and again in train mode after the switch (train -> eval -> train).
  INT8          every conv/linear site converted; eval forward deterministic (two passes equal); running
                statistics untouched by eval forwards; output types as the original's in both modes;
                finite gradients from a training step, for every parameter that the FP32 model's same step
                gives one; eval-mode weight-gradient cosine against the FP32 model, per layer (mean and
                minimum over conv/linear weights).
Detection models give no differentiable eval output, so their cosine is taken on the training losses.

Usage:
    python benchmarks/model_zoo.py                       # everything (an hour or more on 2 cores)
    python benchmarks/model_zoo.py resnet18 timm:tf_mixnet_s
    python benchmarks/model_zoo.py timm:nfnet_l0 timm:resnet50_gn  # any timm model, listed or not (--size)
    python benchmarks/model_zoo.py --family timm --json zoo.json
    python benchmarks/model_zoo.py smp:Unet/resnet18 hf:ConvNextForImageClassification  # other libraries'
    python benchmarks/model_zoo.py monai:UNet3d yolo:yolo11n ptv:x3d_xs                # models, where installed
Names: torchvision names as `list_models()` gives them, timm names prefixed `timm:`, and where those packages
are installed models of segmentation_models_pytorch, transformers, MONAI, ultralytics and pytorchvideo
(`benchmarks/other_libraries.py` says how each is named).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torchvision
from torch.utils._pytree import tree_flatten, tree_structure

import int8fx
from int8fx.nn.modules import Int8Layer

from cases import Case, random_images

# smallest input each torchvision family accepts (keeps the step cheap on CPU)
MIN_SIZE = {"inception_v3": 299,  # its training-mode auxiliary head needs 17x17 features for its 5x5 conv
            "googlenet": 32, "vit": 224, "swin": 224, "maxvit": 224, "regnet": 64}
# (frames, size) each video family needs (its final pooling window); other video models take 4 x 32 x 32
VIDEO_INPUT = {"mvit": (16, 224), "s3d": (16, 224), "swin3d": (8, 224)}
# timm CNNs, one or more per family: norm-act layers, Conv2dSame (tf_*), weight standardisation (resnetv2 bit,
# nf_*), mixed and conditional convs, reparameterisable blocks, drop-path, attention hybrids
TIMM = ("resnet18 resnet26d resnet10t seresnext26d_32x4d resnext26ts ecaresnet26t resnetv2_50x1_bit resnetv2_18 "
        "nf_resnet26 nf_regnet_b0 efficientnet_b0 tf_efficientnet_b0 efficientnetv2_rw_t tf_efficientnetv2_b0 "
        "mobilenetv3_small_100 tf_mobilenetv3_small_100 mobilenetv2_050 mixnet_s tf_mixnet_s fbnetc_100 "
        "spnasnet_100 lcnet_050 hardcorenas_a ghostnet_100 ghostnetv2_100 rexnet_100 densenet121 dpn68 "
        "ese_vovnet19b_dw repvgg_a0 regnetx_002 regnety_002 cspresnet50 cs3darknet_focus_s convnext_atto "
        "res2net50_14w_8s skresnet18 selecsls42b dla34 hrnet_w18_small inception_v3 gernet_s botnet26t_256 "
        "mobilevit_xxs tinynet_a resnest14d edgenext_xx_small fastvit_t8 mobileone_s0 repghostnet_050 "
        "poolformer_s12 efficientnet_cc_b0_4e xception41 darknet17 efficientvit_b0 mobilenetv4_conv_small "
        "convnextv2_atto inception_next_tiny").split()
TIMM_SIZE = {"botnet26t_256": 256, "mobilevit_xxs": 256, "inception_v3": 299, "edgenext_xx_small": 256,
             "fastvit_t8": 256, "efficientvit_b0": 224, "hrnet_w18_small": 128}
TIMM_KWARGS = {"drop_rate": 0.2, "drop_path_rate": 0.1}  # dropout and drop-path on, as users train them


def _detection_inputs(name: str) -> Callable[[bool], tuple]:
    def make(train: bool):
        images = [torch.rand(3, 128, 160), torch.rand(3, 144, 128)]
        if not train:
            return (images,)
        targets = []
        for i in range(2):
            boxes = torch.tensor([[10.0 + i, 20.0, 90.0, 110.0], [30.0, 30.0 + i, 100.0, 80.0]])
            t = {"boxes": boxes, "labels": torch.tensor([1, 1] if "keypoint" in name else [1, 2])}  # keypoint: 2 classes
            if "mask" in name:
                t["masks"] = torch.zeros(2, images[i].shape[1], images[i].shape[2], dtype=torch.uint8)
                t["masks"][:, 30:80, 30:80] = 1
            if "keypoint" in name:
                t["keypoints"] = torch.tensor([[[40.0, 50.0, 1.0]] * 17, [[60.0, 50.0, 1.0]] * 17])
            targets.append(t)
        return images, targets

    return make


def torchvision_cases() -> list[Case]:
    cases = []
    # with the quantizable variants (QuantStub/DeQuantStub, FloatFunctional adds), as users bring them for
    # eager-mode quantization: float models until torch.ao converts them
    quantizable = torchvision.models.list_models(module=torchvision.models.quantization)
    for name in sorted(torchvision.models.list_models(module=torchvision.models)) + sorted(quantizable):
        base = name.removeprefix("quantized_")
        kwargs = {"weights": None, **({"quantize": False} if name in quantizable else {}),
                  **({"init_weights": False} if base in ("inception_v3", "googlenet") else {})}
        size = next((v for k, v in MIN_SIZE.items() if base.startswith(k)), 64)
        cases.append(Case(name, "classification", lambda n=name, k=kwargs: torchvision.models.get_model(n, **k),
                          random_images(2, size)))
    for name in sorted(torchvision.models.list_models(module=torchvision.models.video)):
        frames, size = next((v for k, v in VIDEO_INPUT.items() if name.startswith(k)), (4, 32))
        cases.append(Case(name, "video", lambda n=name: torchvision.models.get_model(n, weights=None),
                          random_images(2 if size < 100 else 1, size, frames)))
    for name in sorted(torchvision.models.list_models(module=torchvision.models.detection)):
        kwargs = {"weights": None, "weights_backbone": None, "num_classes": 3}
        if "keypoint" in name:
            kwargs.pop("num_classes")
        if not name.startswith("ssd"):
            kwargs.update(min_size=128, max_size=160)
        cases.append(Case(name, "detection", lambda n=name, k=kwargs: torchvision.models.get_model(n, **k),
                          _detection_inputs(name)))
    for name in sorted(torchvision.models.list_models(module=torchvision.models.segmentation)):
        aux = {} if name.startswith("lraspp") else {"aux_loss": True}
        cases.append(Case(name, "segmentation", lambda n=name, a=aux: torchvision.models.get_model(
            n, weights=None, weights_backbone=None, num_classes=3, **a), random_images(2, 64)))
    for name in sorted(torchvision.models.list_models(module=torchvision.models.optical_flow)):
        cases.append(Case(name, "optical_flow", lambda n=name: torchvision.models.get_model(n, weights=None),
                          _frame_pair(2, 128, updates=3)))
    return cases


def _frame_pair(batch: int, size: int, updates: int) -> Callable[[bool], tuple]:
    """RAFT's inputs: two frames (at least 128 px: its correlation pyramid halves 1/8 of the size three
    times) and the number of flow updates, 3 of its default 12 (each repeats the same recurrent block)."""
    return lambda train: (torch.rand(batch, 3, size, size), torch.rand(batch, 3, size, size), updates)


def timm_case(name: str, size: int | None = None) -> Case:
    """Any timm model by name (random init, 10 classes), at `size` (default: TIMM_SIZE's, else 64)."""
    import timm

    def build() -> nn.Module:
        """With dropout and drop-path where the model takes them (densenet, dpn, ghostnet, ... have no drop-path)."""
        for drop in (TIMM_KWARGS, {"drop_rate": TIMM_KWARGS["drop_rate"]}):
            try:
                return timm.create_model(name, pretrained=False, num_classes=10, **drop)
            except TypeError as e:
                if "drop_path_rate" not in str(e):
                    raise
        raise AssertionError("unreachable")

    return Case(f"timm:{name}", "timm", build, random_images(2, size or TIMM_SIZE.get(name, 64)))


def case_beyond_lists(name: str, size: int | None) -> Case | None:
    """A model no list holds, built by name: `timm:NAME` (any timm model), or a model of another library
    (`benchmarks/other_libraries.py`: `smp:`, `hf:`, `monai:`, `yolo:`, `ptv:`, `effnet_pt:`, `effdet:`, `pm:`,
    `facenet:`); None for another name."""
    if name.startswith("timm:"):
        return timm_case(name[len("timm:"):], size)
    from other_libraries import BY_PREFIX  # (here: the packages it builds from are optional)

    for prefix, make in BY_PREFIX.items():
        if name.startswith(prefix):
            return make(name[len(prefix):], size)
    return None


def timm_cases() -> list[Case]:
    import timm  # noqa: F401  (without timm, no timm cases)

    return [timm_case(n) for n in TIMM]


def all_cases() -> list[Case]:
    try:
        extra = timm_cases()
    except ImportError:
        extra = []
    return torchvision_cases() + extra


# ----------------------------------------------------------------------------------------------- running
def output_tensors(out) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _loss(out) -> torch.Tensor:
    """A scalar that depends on every floating output (losses of a detector in training, logits, masks...):
    a fixed random projection plus the mean square. The projection keeps gradients non-zero where an output
    is zero at initialisation (torchvision's ViT heads start at zero)."""
    parts = []
    for t in output_tensors(out):
        if t.is_floating_point() and t.numel():
            r = torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel()))
            parts.append((t.float() * r).mean() + t.float().square().mean())
    return sum(parts) if parts else torch.zeros((), requires_grad=True)


def _seed(seed: int) -> None:
    """Every random stream a model's forward may draw from: torch's, numpy's and Python's (pytorchcv's
    FractalNet drops paths with numpy's generator)."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def step(model: nn.Module, case: Case, train: bool, seed: int, backward: bool = True):
    """(output, {parameter name: gradient}) of one forward (+ backward) in the given mode."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    _seed(seed)
    args = case.inputs(train)
    _seed(seed + 1)
    out = model(*args)
    if backward:
        loss = _loss(out)
        if loss.requires_grad:
            loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _equal(a, b) -> bool:
    ta, tb = output_tensors(a), output_tensors(b)
    return tree_structure(a) == tree_structure(b) and len(ta) == len(tb) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb))


def passthrough(case: Case) -> dict:
    """The converted model with quantization off equals the original bit for bit (module docstring).

    Where it does not on several threads, the comparison runs again on one: some FP32 backward kernels
    accumulate in a thread-dependent order, and their gradients differ between two runs of the original
    model itself (torchvision's mvit_v2_s: the relative-position tables). A model exact on one thread and
    not on several is reported exact, with the parameters named in `threads_note`."""
    mismatches = _passthrough_mismatches(case)
    threads = torch.get_num_threads()
    if not mismatches or threads == 1:
        return {"exact": not mismatches, "mismatches": mismatches}
    torch.set_num_threads(1)
    try:
        single = _passthrough_mismatches(case)
    finally:
        torch.set_num_threads(threads)
    if single:
        return {"exact": False, "mismatches": single}
    return {"exact": True, "mismatches": [], "threads_note": f"exact on one thread; on {threads}: {mismatches}"}


def _passthrough_mismatches(case: Case) -> list[str]:
    torch.manual_seed(0)
    original = case.build()
    converted = int8fx.convert(original, int8fx.Int8Config(quantize=False))
    mismatches = []
    for phase, train in (("train", True), ("eval", False), ("train again", True)):
        out_a, grads_a = step(original, case, train, seed=len(mismatches) + (0 if train else 7))
        out_b, grads_b = step(converted, case, train, seed=len(mismatches) + (0 if train else 7))
        if not _equal(out_a, out_b):
            mismatches.append(f"{phase}: outputs")
        bad = [n for n in grads_a if n not in grads_b or not torch.equal(grads_a[n], grads_b[n])]
        if bad or set(grads_b) - set(grads_a):
            mismatches.append(f"{phase}: gradients of {len(bad)} parameters, e.g. {bad[:2]}")
    after = int8fx.float_state_dict(converted)
    states = [n for n, v in original.state_dict().items() if not torch.equal(v, after[n])]
    if states:
        mismatches.append(f"state after the steps differs: {states[:3]}")
    return mismatches


def _model_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in int8fx.float_state_dict(model).items()
            if k not in dict(model.named_parameters())}


def quantized(case: Case) -> dict:
    """The INT8 checks of the module docstring."""
    torch.manual_seed(0)
    fp32 = case.build()
    qm = int8fx.convert(fp32)
    rep = int8fx.inspect(qm)
    row = {"sites": len(rep.layers), "converted": len(rep.converted), "skipped": [(r.name, r.reason) for r in rep.skipped]}
    # gradient fidelity at random init, per conv/linear weight (eval mode; detectors: training losses; train
    # mode too where eval mode gives no gradient to compare: kornia's KeyNet ends in a ReLU dead at init)
    train = case.family == "detection"
    _, g_fp = step(fp32, case, train, seed=9)
    _, g_q = step(qm, case, train, seed=9)
    cos = _cosines(g_fp, g_q, _site_weights(qm))
    if not cos and not train:
        train = True
        _, g_fp = step(fp32, case, train, seed=9)
        _, g_q = step(qm, case, train, seed=9)
        cos = _cosines(g_fp, g_q, _site_weights(qm))
    if _cos_mean(cos) < 0.9:  # how much of it is the forward's quantization, amplified by this network?
        row["cos_int8_forward_only"] = _cos_mean(_cosines(g_fp, _fake_quant_forward_grads(fp32, case, train),
                                                          _site_weights(qm)))
    # training step: finite gradients, and the output type of training mode; a parameter without a gradient
    # is a failure where the FP32 model gives it one (a backbone's unused final norm and head get none)
    out_fp, g_fp = step(fp32, case, True, seed=3)
    out_q, grads = step(qm, case, True, seed=3)
    row["train_types_match"] = tree_structure(out_fp) == tree_structure(out_q)
    row["finite"] = all(bool(torch.isfinite(g).all()) for g in grads.values())
    row["no_grad"] = [n for n, p in qm.named_parameters() if p.requires_grad and n not in grads and n in g_fp]
    # eval: deterministic, no state change, same output type
    before = _model_buffers(qm)
    with torch.no_grad():
        e1, _ = step(qm, case, False, seed=5, backward=False)
        e2, _ = step(qm, case, False, seed=5, backward=False)
        e_fp, _ = step(fp32, case, False, seed=5, backward=False)
    after = _model_buffers(qm)
    row["eval_deterministic"] = _equal(e1, e2)
    row["eval_state_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
    row["eval_types_match"] = tree_structure(e1) == tree_structure(e_fp)
    row["cos_layers"] = len(cos)
    row["cos_mean"] = sum(cos) / len(cos) if cos else math.nan
    row["cos_min"] = min(cos) if cos else math.nan
    row["cos_mode"] = "train" if train else "eval"
    return row


def _fake_quant_forward_grads(fp32: nn.Module, case: Case, train: bool) -> dict:
    """Gradients of a copy of the FP32 model whose conv/linear modules see INT8-rounded weights (per output
    channel) and inputs (per tensor, straight-through), with an exact FP32 backward: the part of the gradient
    error that the forward quantization alone causes in this network (what fake-quant QAT computes)."""
    from int8fx.quant import dequantize, quantize_per_channel, quantize_per_tensor

    model = copy.deepcopy(fp32)
    sites = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    with torch.no_grad():
        for m in sites:
            q, s = quantize_per_channel(m.weight.reshape(m.weight.shape[0], -1), 0)
            m.weight.copy_(dequantize(q, s.view(-1, 1)).view_as(m.weight))

    def fake_quant_input(mod, args):
        x = args[0]
        return (x + (dequantize(*quantize_per_tensor(x.detach())) - x).detach(),) + tuple(args[1:])

    for m in sites:
        m.register_forward_pre_hook(fake_quant_input)
    return step(model, case, train, seed=9)[1]


def _cosines(ga: dict, gb: dict, names: list[str]) -> list[float]:
    out = []
    for n in names:
        a, b = ga.get(n), gb.get(n)
        if a is not None and b is not None and a.abs().max() > 0 and b.abs().max() > 0:
            out.append(cosine(a, b))
    return out


def _cos_mean(cos: list[float]) -> float:
    return sum(cos) / len(cos) if cos else math.nan


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity that does not depend on scale: gradients of an untrained network in eval mode can
    be ~1e-20, where F.cosine_similarity's eps (on the product of the norms) would make it 0."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a / a.abs().max(), b / b.abs().max()
    return float(a @ b / (a.norm() * b.norm()))


def _site_weights(qm: nn.Module) -> list[str]:
    """Names of the weight parameters of the INT8 sites (module sites' own weights, and the parameters a
    functional site's owner computes its weight from)."""
    names = []
    for path, m in qm.named_modules():
        if isinstance(m, Int8Layer) and m.owns_params:
            names.append(f"{path}.weight" if path else "weight")
        elif isinstance(m, Int8Layer):
            owner = path.rpartition(".")[0]
            parent = qm.get_submodule(owner) if owner else qm
            if isinstance(getattr(parent, "weight", None), nn.Parameter):
                names.append(f"{owner}.weight" if owner else "weight")
    return sorted(set(names))


def check(case: Case, run_quantized: bool = True) -> dict:
    t0 = time.perf_counter()
    row = {"model": case.name, "family": case.family, **passthrough(case)}
    if run_quantized:
        row.update(quantized(case))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def ok(row: dict) -> bool:
    return row["exact"] and ("sites" not in row or (
        row["converted"] == row["sites"] and row["finite"] and not row["no_grad"] and row["eval_deterministic"]
        and row["eval_state_unchanged"] and row["eval_types_match"] and row["train_types_match"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="model names (default: all)")
    ap.add_argument("--family", choices=("classification", "video", "detection", "segmentation", "optical_flow",
                                         "timm", "hf", "monai", "ultralytics", "pytorchvideo", "efficientnet_pytorch",
                                         "effdet", "pretrainedmodels", "facenet_pytorch", "diffusers", "open_clip",
                                         "kornia", "pytorchcv", "nnunet", "spandrel", "vit_pytorch"))
    ap.add_argument("--passthrough-only", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="write every row as JSON")
    ap.add_argument("--size", type=int, help="input size of timm/smp/hf/yolo models outside the lists (default 64)")
    args = ap.parse_args(argv)
    cases = [c for c in all_cases() if (not args.models or c.name in args.models)
             and (args.family is None or c.family == args.family)]
    # models beyond the lists (models no sweep has met): built by name, at --size
    listed = {c.name for c in all_cases()}
    for name in args.models:
        if name in listed:
            continue
        case = case_beyond_lists(name, args.size)
        if case is None:
            from other_libraries import BY_PREFIX

            ap.error(f"unknown model {name!r}: torchvision names as list_models() gives them, timm names as "
                     f"timm:NAME, other libraries' as benchmarks/other_libraries.py names them "
                     f"({', '.join(p + 'NAME' for p in BY_PREFIX)})")
        if args.family in (None, case.family):
            cases.append(case)
    if args.models:  # in the order given
        cases.sort(key=lambda c: args.models.index(c.name))
    print(f"{'model':32s} {'family':14s} {'exact':>5s} {'int8':>9s} {'cos mean/min':>13s} {'s':>6s}  notes", flush=True)
    rows, bad = [], 0
    for case in cases:
        try:
            r = check(case, not args.passthrough_only)
        except Exception as e:  # report and continue: one broken model must not hide the rest
            print(f"{case.name:32s} ERROR {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}",
                  flush=True)
            rows.append({"model": case.name, "family": case.family, "error": f"{type(e).__name__}: {e}"})
            bad += 1
            continue
        rows.append(r)
        save(rows, args.json)
        bad += not ok(r)
        sites = f"{r['converted']}/{r['sites']}" if "sites" in r else "-"
        cos = f"{r['cos_mean']:.3f}/{r['cos_min']:.2f}" if "cos_mean" in r else "-"
        if "cos_int8_forward_only" in r:
            cos += f" (INT8 fwd only {r['cos_int8_forward_only']:.3f})"
        flags = [k for k in ("finite", "eval_deterministic", "eval_state_unchanged", "eval_types_match",
                             "train_types_match") if k in r and not r[k]]
        notes = "; ".join(r["mismatches"] + ([r["threads_note"]] if "threads_note" in r else []) + [f"not {f}" for f in flags] + [f"{n}: {w}" for n, w in r.get("skipped", [])[:2]])
        print(f"{case.name:32s} {case.family:14s} {str(r['exact']):>5s} {sites:>9s} {cos:>13s} {r['seconds']:6.1f}  {notes}",
              flush=True)
    print(f"{len(cases) - bad}/{len(cases)} models pass every check")
    save(rows, args.json)
    return 1 if bad else 0


def save(rows: list[dict], path: str | None) -> None:
    """Write the rows so far (after every model: a long run stopped early keeps what it measured)."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
