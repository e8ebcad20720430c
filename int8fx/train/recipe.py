"""What a training run is: the `Recipe` shared by every run of an experiment, and the `RunSpec` (policy,
seed, DCLRS) that tells its runs apart; `parse_runs` reads them from 'fp32,gvq-mcs,dsgc+dclrs'.

Why a module of its own: the recipe is an experiment's identity (it is written into results.json and
decides whether a stored run can be reused), so it stays a plain frozen dataclass that every other part
of `int8fx.train` imports without pulling in the training loop.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FP32 = "fp32"
DCLRS_SUFFIX = "+dclrs"


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a run except the policy and the seed.

    train_subset: number of training images (a fixed, class-balanced selection shared by all runs and
        seeds), None for all 60,000. test_subset: likewise for the 10,000 test images (None: all; only
        for smoke tests, reported numbers use the full test set). evals: test evaluations per run,
        evenly spaced, the last at the end; eval_subset limits the intermediate ones (the final one
        always uses the whole test set) to keep the curves cheap.
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
    rounding: str = "stochastic"  # Int8Config.rounding of the INT8 runs' gradients

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunSpec:
    """One training run: `policy` None is FP32; otherwise a registered gradient quantizer name."""

    policy: str | None
    seed: int = 0
    dclrs: bool = False

    @property
    def label(self) -> str:
        return FP32 if self.policy is None else self.policy + (DCLRS_SUFFIX if self.dclrs else "")


def parse_runs(items, dclrs: bool = False) -> list[tuple[str | None, bool]]:
    """'fp32,gvq-mcs,dsgc+dclrs' (or a list) -> [(policy or None, dclrs)], validated against the
    registered gradient quantizers; `dclrs` adds DCLRS to every INT8 run."""
    from ..quant import grad_quantizer_names

    if isinstance(items, str):
        items = [s for s in items.replace(" ", "").split(",") if s]
    names = grad_quantizer_names()
    out: list[tuple[str | None, bool]] = []
    for item in items:
        base, plus = (item[: -len(DCLRS_SUFFIX)], True) if item.endswith(DCLRS_SUFFIX) else (item, False)
        if base.lower() == FP32:
            if plus:
                raise ValueError("DCLRS scales INT8 layers' learning rates; 'fp32+dclrs' means nothing")
            out.append((None, False))
            continue
        if base not in names:
            raise ValueError(f"unknown run {item!r}: use 'fp32' or a gradient quantizer ({', '.join(names)}), "
                             f"optionally with '{DCLRS_SUFFIX}'")
        if (plus or dclrs) and not dclrs_available():
            raise ValueError("DCLRS is not available in this int8fx (no int8fx.DeviationLRScaler)")
        out.append((base, plus or dclrs))
    if not out:
        raise ValueError("no runs given")
    return list(dict.fromkeys(out))


def dclrs_available() -> bool:
    import int8fx

    return hasattr(int8fx, "DeviationLRScaler")
