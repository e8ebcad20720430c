"""`Int8Config`: every knob of the conversion, with defaults that work and validation that explains.

Why a frozen dataclass: a config is shared by every converted layer and stored in reports and ONNX
metadata, so it must be hashable, printable and impossible to mutate behind a layer's back.
Per-layer variation goes through `exclude` (keep in full precision) and `overrides` (field changes by
module-name pattern), resolved once at conversion time by `for_layer`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch.nn as nn

ROUNDINGS = ("nearest", "stochastic")
EVAL_ACT_CLIPS = ("ema", "batch")
BACKENDS = ("auto", "reference", "torch", "cupy")


class ConfigError(ValueError):
    """A config field holds a value int8fx does not know; the message lists the valid ones."""


def _choice(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(f"Int8Config.{name}={value!r} is not valid; choose one of: {', '.join(map(repr, valid))}")


@dataclass(frozen=True)
class Int8Config:
    """How to convert a model to INT8 training.

    grad_quant: gradient quantizer policy, a name registered in `int8fx.quant` (see
        `int8fx.quant.grad_quantizer_names()`): "gvq-mcs" (default), "gvq", "mcs", "gvq-mcs-search",
        "dsgc", "per-tensor".
    rounding: rounding of gradients, "stochastic" (default; seeded by `seed`, so runs are reproducible)
        or "nearest" (round half to even). Why stochastic by default: with one clip per tensor (dX) or
        per channel (dW), nearest rounding zeroes every entry below half a step, so the samples whose
        gradients are small stop contributing; on Fashion-MNIST that alone cost ~1.8 points of top-1,
        and stochastic rounding removes the gap (benchmarks/RESULTS.md, section train). The forward
        always rounds to nearest.
    clip_update_period: DSGC recomputes its clip every this many steps and reuses it in between.
    mcs_lambda, mcs_k, mcs_a: MCS family threshold and inverted-T update constants (ALGORITHMS.md).
    mcs_alpha: magnitude weight exponent of the MCS search variant.
    exclude: module-name glob patterns (e.g. "conv1", "fc", "layer4.*") or module types to keep in
        full precision.
    overrides: {glob pattern or nn.Module type: {field: value}} applied, in order, to the layers whose name
        matches the pattern or whose original module is an instance of the type (e.g. another policy).
    backend: "auto" (on a CPU whichever exact path a one-time probe measures faster there: "torch"
        where oneDNN has int8 dot products, "reference" elsewhere, see `int8fx.kernels.probe`; on CUDA
        "torch", cuBLASLt's int8 GEMM, verified on an H200), "reference" (fp32 GEMMs on K-chunks, any
        device), "torch" (`torch._int_mm`, CPU and CUDA), "cupy" (CUDA). All compute the same integers.
    seed: seeds stochastic rounding so that runs are reproducible.
    quantize: False turns quantization off: every converted site then computes exactly what the original
        conv/linear call computes (the pass-through that proves a conversion changes nothing else).
    eval_act_clip: the activation clip of eval-mode forwards: "ema" (default) is the running clip of the
        training batches (`act_clip_ema`), so a prediction does not depend on the rest of its batch and
        equals the ONNX export's; "batch" takes each batch's own absmax. Training forwards always use
        the batch absmax; a layer that never trained falls back to it too.
    """

    grad_quant: str = "gvq-mcs"
    rounding: str = "stochastic"
    clip_update_period: int = 10
    mcs_lambda: float = 0.3
    mcs_k: float = 1.0
    mcs_a: float = 0.8
    mcs_alpha: float = 2.0
    exclude: tuple = ()
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    backend: str = "auto"
    seed: int = 0
    eval_act_clip: str = "ema"
    quantize: bool = True

    def __post_init__(self) -> None:
        from .quant import grad_quantizer_names  # late: quant registers policies on import

        object.__setattr__(self, "exclude", _patterns(self.exclude))
        _choice("grad_quant", self.grad_quant, grad_quantizer_names())
        _choice("rounding", self.rounding, ROUNDINGS)
        _choice("backend", self.backend, BACKENDS)
        _choice("eval_act_clip", self.eval_act_clip, EVAL_ACT_CLIPS)
        if not isinstance(self.quantize, bool):
            raise ConfigError(f"Int8Config.quantize must be True or False, got {self.quantize!r}")
        if not isinstance(self.clip_update_period, int) or self.clip_update_period < 1:
            raise ConfigError(f"Int8Config.clip_update_period must be a positive int, got {self.clip_update_period!r}")
        if not 0.0 < self.mcs_lambda < 1.0:
            raise ConfigError(f"Int8Config.mcs_lambda must lie in (0, 1), got {self.mcs_lambda!r}")
        if not 0.0 < self.mcs_a <= 1.0 or not 0.0 <= self.mcs_k * self.mcs_a <= 1.0:
            raise ConfigError(f"Int8Config needs 0 < mcs_a <= 1 and 0 <= mcs_k*mcs_a <= 1, got k={self.mcs_k}, A={self.mcs_a}")
        for item in self.exclude:
            if not isinstance(item, str) and not (isinstance(item, type) and issubclass(item, nn.Module)):
                raise ConfigError(f"Int8Config.exclude holds name patterns (str) or nn.Module types, got {item!r}")
        known = {f.name for f in dataclasses.fields(self)} - {"exclude", "overrides"}
        for pattern, changes in dict(self.overrides).items():
            if not isinstance(pattern, str) and not (isinstance(pattern, type) and issubclass(pattern, nn.Module)):
                raise ConfigError(f"Int8Config.overrides keys are name patterns (str) or nn.Module types, got {pattern!r}")
            bad = set(changes) - known
            if bad:
                raise ConfigError(
                    f"Int8Config.overrides[{pattern!r}] names unknown fields {sorted(bad)}; valid: {sorted(known)}"
                )
            dataclasses.replace(self, overrides={}, **changes)  # validates the values too
        object.__setattr__(self, "overrides", dict(self.overrides))

    def __hash__(self) -> int:
        return hash(self.to_json())

    def excludes(self, name: str, module: nn.Module | None) -> bool:
        """Whether the layer called `name` is kept in full precision."""
        for item in self.exclude:
            if isinstance(item, str) and fnmatch.fnmatchcase(name, item):
                return True
            if isinstance(item, type) and module is not None and isinstance(module, item):
                return True
        return False

    def for_layer(self, name: str, module: nn.Module | None = None) -> "Int8Config":
        """The config one layer sees: this one with every matching override applied, in order. `module` is
        the site's original module (None for functional sites, which only name patterns can match)."""
        changes: dict[str, Any] = {}
        for pattern, fields in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern) if isinstance(pattern, str) else isinstance(module, pattern):
                changes.update(fields)
        return dataclasses.replace(self, overrides={}, exclude=(), **changes) if changes else self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exclude"] = [e if isinstance(e, str) else f"{e.__module__}.{e.__qualname__}" for e in self.exclude]
        d["overrides"] = {k if isinstance(k, str) else f"{k.__module__}.{k.__qualname__}": dict(v)
                          for k, v in self.overrides.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _patterns(exclude) -> tuple:
    """`exclude` as a tuple: one pattern or type given alone is one item, not (for a string) one pattern
    per character, which would exclude nothing without a word."""
    if exclude is None:
        return ()
    if isinstance(exclude, (str, type)):
        return (exclude,)
    try:
        return tuple(exclude)
    except TypeError:
        raise ConfigError(f"Int8Config.exclude holds name patterns (str) or nn.Module types, got {exclude!r}") from None
