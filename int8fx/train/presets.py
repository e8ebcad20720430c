"""Named experiments of `int8fx train`: a recipe plus the runs, seeds and parallel jobs it is meant to be
trained with. Any command-line option overrides a preset's value.

    quick        smallcnn, 2 epochs on 20k images: the README's quick-start comparison (~1.5 min idle)
    full         smallcnn, 5 epochs on all 60k images, 3 seeds (~45 min idle)
    resnet20     the CIFAR ResNet-20 of He et al. 2016 (0.27 M parameters) at 28x28
    mobilenetv2  a MobileNetV2 (inverted residuals, depthwise convs) with a stride-2 stem

The two architecture presets are the papers' networks sized for a 2-core CPU: one FP32 run costs
~6 minutes on one idle core, so that a 3-seed ablation grid (int8fx.train.ablation) fits in hours.
Their FP32 recipe is the ResNet paper's CIFAR-10 recipe (SGD, momentum 0.9, batch 128, peak LR 0.1,
flip + pad-and-crop augmentation) scaled down to a few epochs: cosine decay after a 5% linear
warmup replaces the step schedule (a step schedule needs its long plateaus), weight decay 5e-4 as
usual for short schedules, and a 2-pixel pad for 28-pixel images (the paper pads 4 of 32). The
accuracies these recipes reach are measured in the README (section Train, "Ablation").
"""
from __future__ import annotations

from .recipe import FP32, Recipe

RESNET20 = Recipe(model="resnet20", width=16, epochs=3, train_subset=None, batch_size=128, lr=0.1,
                  weight_decay=5e-4, augment="flip", evals=6, eval_subset=2_000)
MOBILENETV2 = Recipe(model="mobilenetv2-s2", width=1.0, epochs=3, train_subset=None, batch_size=128, lr=0.1,
                     weight_decay=5e-4, augment="flip", evals=6, eval_subset=2_000)

PRESETS: dict[str, dict] = {
    # fp32 + 2 INT8 policies, two runs at a time with one thread each (see run_experiment for why)
    "quick": dict(recipe=Recipe(), runs=(FP32, "gvq-mcs", "per-tensor"), seeds=(0,), jobs=2),
    # 12 runs; sized from measured step times (benchmarks/RESULTS.md, section train)
    "full": dict(recipe=Recipe(epochs=5, train_subset=None, evals=5, eval_subset=None),
                 runs=(FP32, "gvq-mcs", "dsgc", "per-tensor"), seeds=(0, 1, 2), jobs=2),
    # the papers' architectures; `--ablation resnet20` trains the whole grid on the same recipe
    "resnet20": dict(recipe=RESNET20, runs=(FP32, "gvq-mcs", "per-tensor"), seeds=(0,), jobs=2),
    "mobilenetv2": dict(recipe=MOBILENETV2, runs=(FP32, "gvq-mcs", "per-tensor"), seeds=(0,), jobs=2),
}


def available(runs) -> tuple[str, ...]:
    """The runs whose policy this int8fx has registered (a policy still in development is skipped);
    'gvq-mcs+dclrs:nearest' counts as its policy, 'gvq-mcs'."""
    from ..quant import grad_quantizer_names
    from .recipe import DCLRS_SUFFIX, ROUNDING_SEP

    names = grad_quantizer_names()

    def policy(run: str) -> str:
        return run.partition(ROUNDING_SEP)[0].removesuffix(DCLRS_SUFFIX)

    return tuple(r for r in runs if r == FP32 or policy(r) in names)


def preset_runs(preset: str) -> tuple[str, ...]:
    """The preset's runs that this int8fx has registered."""
    return available(PRESETS[preset]["runs"])
