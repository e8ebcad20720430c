"""What a training run is: the `Recipe` shared by every run of an experiment, and the `RunSpec` (policy,
seed, DCLRS, gradient rounding) that tells its runs apart; `parse_runs` reads them from
'fp32,gvq-mcs,dsgc+dclrs,gvq:nearest'.

Why a module of its own: the recipe is an experiment's identity (it is written into results.json and
decides whether a stored run can be reused), so it stays a plain frozen dataclass that every other part
of `int8fx.train` imports without pulling in the training loop.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

FP32 = "fp32"
DCLRS_SUFFIX = "+dclrs"
ROUNDING_SEP = ":"
AUGMENTS = ("none", "flip", "flip+crop")
TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000  # Fashion-MNIST's splits


class RecipeError(ValueError):
    """A recipe no run can train. `problems`: (field, value, what it takes) for each bad field, so that the
    command line can name its own options (`--batch-size`) where the API names the fields."""

    def __init__(self, problems: list[tuple[str, object, str]]) -> None:
        self.problems = problems
        super().__init__("a recipe no run can train: " + "; ".join(f"{name} {value!r} (takes {takes})"
                                                                    for name, value, takes in problems))


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a run except the policy and the seed.

    train_subset: number of training images (a fixed, class-balanced selection shared by all runs and
        seeds), None for all 60,000. test_subset: likewise for the 10,000 test images (None: all; only
        for smoke tests, reported numbers use the full test set). evals: test evaluations per run,
        evenly spaced, the last at the end; eval_subset limits the intermediate ones (the final one
        always uses the whole test set) to keep the curves cheap.
    fp32_ends: keep the first and the last conv/linear layer (in execution order) in FP32 in INT8 runs,
        as both papers do; False converts them too (int8fx's default).
    end_bn: False removes the BatchNorm that directly follows the first or the last conv/linear layer
        (in int8fx's ResNet-20 and MobileNetV2 that is the stem's BN; their last layer, the FC, has none).
    """

    model: str = "smallcnn"
    width: float | None = 16
    size: int | None = None
    epochs: float = 2
    train_subset: int | None = 20_000
    test_subset: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.05  # fraction of the steps with a linear LR ramp, then cosine to 0
    label_smoothing: float = 0.0
    augment: str = "flip"  # "none" | "flip" | "flip+crop"
    evals: int = 5
    eval_subset: int | None = 2_000
    log_every: int = 10
    max_steps: int | None = None  # cap on optimizer steps (smoke tests); the schedule spans the cap
    rounding: str = "stochastic"  # Int8Config.rounding of the INT8 runs' gradients (a RunSpec may override it)
    fp32_ends: bool = False
    end_bn: bool = True

    def __post_init__(self) -> None:
        """Refuse a recipe no run can train, naming the field and what it takes, before any run starts (a
        batch size of 0 or a negative learning rate would otherwise fail inside every run, and a negative
        epoch count would train nothing and report it)."""
        from ..config import ROUNDINGS

        def number(v, low, high=math.inf, low_open=False, high_open=False):
            return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and (v > low if low_open else v >= low) and (v < high if high_open else v <= high))

        def whole(v, low, high=math.inf):
            return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

        checks = (
            ("width", self.width is None or number(self.width, 0, low_open=True), "a number > 0"),
            ("size", self.size is None or whole(self.size, 1), "a whole number >= 1"),
            ("epochs", number(self.epochs, 0, low_open=True), "a number > 0"),
            ("train_subset", self.train_subset is None or whole(self.train_subset, 1, TRAIN_IMAGES),
             f"1 to {TRAIN_IMAGES} images"),
            ("test_subset", self.test_subset is None or whole(self.test_subset, 1, TEST_IMAGES),
             f"1 to {TEST_IMAGES} images"),
            ("batch_size", whole(self.batch_size, 1), "a whole number >= 1"),
            ("lr", number(self.lr, 0), "a number >= 0"),
            ("momentum", number(self.momentum, 0, 1, high_open=True), "a number in [0, 1)"),
            ("weight_decay", number(self.weight_decay, 0), "a number >= 0"),
            ("warmup", number(self.warmup, 0, 1), "a fraction of the steps in [0, 1]"),
            ("label_smoothing", number(self.label_smoothing, 0, 1, high_open=True), "a number in [0, 1)"),
            ("augment", self.augment in AUGMENTS, " or ".join(AUGMENTS)),
            ("evals", whole(self.evals, 1), "a whole number >= 1"),
            ("eval_subset", self.eval_subset is None or whole(self.eval_subset, 1, TEST_IMAGES),
             f"1 to {TEST_IMAGES} images"),
            ("log_every", whole(self.log_every, 1), "a whole number >= 1"),
            ("max_steps", self.max_steps is None or whole(self.max_steps, 1),
             "a whole number >= 1"),
            ("rounding", self.rounding in ROUNDINGS, " or ".join(ROUNDINGS)),
        )
        bad = [(name, getattr(self, name), takes) for name, ok, takes in checks if not ok]
        if bad:
            raise RecipeError(bad)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RunKind(NamedTuple):
    """A run without its seed, as `parse_runs` reads it: `policy` None is FP32; `rounding` None takes the
    recipe's."""

    policy: str | None
    dclrs: bool = False
    rounding: str | None = None

    @property
    def label(self) -> str:
        """'fp32', 'gvq-mcs', 'dsgc+dclrs', 'gvq:nearest': the name of the run in tables and files; the
        rounding appears only when the run sets its own."""
        if self.policy is None:
            return FP32
        return (self.policy + (DCLRS_SUFFIX if self.dclrs else "")
                + (ROUNDING_SEP + self.rounding if self.rounding else ""))


@dataclass(frozen=True)
class RunSpec:
    """One training run: `policy` None is FP32; otherwise a registered gradient quantizer name.
    `rounding` None uses `Recipe.rounding`; 'nearest' or 'stochastic' overrides it for this run."""

    policy: str | None
    seed: int = 0
    dclrs: bool = False
    rounding: str | None = None

    @property
    def kind(self) -> RunKind:
        return RunKind(self.policy, self.dclrs, self.rounding)

    @property
    def label(self) -> str:
        return self.kind.label


def parse_runs(items, dclrs: bool = False) -> list[RunKind]:
    """'fp32,gvq-mcs,dsgc+dclrs,gvq:nearest' (or a list) -> [RunKind(policy or None, dclrs, rounding)],
    validated against the registered gradient quantizers and roundings; `dclrs` adds DCLRS to every
    INT8 run. Duplicates are dropped, the order is kept."""
    from ..config import ROUNDINGS
    from ..quant import grad_quantizer_names

    if isinstance(items, str):
        items = [s for s in items.replace(" ", "").split(",") if s]
    names = grad_quantizer_names()
    out: list[RunKind] = []
    for item in items:
        name, sep, rounding = item.partition(ROUNDING_SEP)
        base, plus = (name[: -len(DCLRS_SUFFIX)], True) if name.endswith(DCLRS_SUFFIX) else (name, False)
        if sep and rounding not in ROUNDINGS:
            raise ValueError(f"run {item!r}: the rounding after '{ROUNDING_SEP}' must be one of {', '.join(ROUNDINGS)}")
        if base.lower() == FP32:
            if plus:
                raise ValueError("DCLRS scales INT8 layers' learning rates; 'fp32+dclrs' means nothing")
            if sep:
                raise ValueError(f"run {item!r}: rounding applies to INT8 gradients; FP32 has none")
            out.append(RunKind(None))
            continue
        if base not in names:
            raise ValueError(f"unknown run {item!r}: use 'fp32' or a gradient quantizer ({', '.join(names)}), "
                             f"optionally with '{DCLRS_SUFFIX}' and '{ROUNDING_SEP}nearest' or "
                             f"'{ROUNDING_SEP}stochastic'")
        if (plus or dclrs) and not dclrs_available():
            raise ValueError("DCLRS is not available in this int8fx (no int8fx.DeviationLRScaler)")
        out.append(RunKind(base, plus or dclrs, rounding or None))
    if not out:
        raise ValueError("no runs given")
    return list(dict.fromkeys(out))


def dclrs_available() -> bool:
    import int8fx

    return hasattr(int8fx, "DeviationLRScaler")
