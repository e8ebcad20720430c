"""Deviation Counteractive LR Scaling (DCLRS, Zhu et al. 2020; ALGORITHMS.md).

Where a layer's quantized gradient still points away from the true one, a full step would move the
weights in a wrong direction; DCLRS shortens that layer's step by phi(d) = max(exp(-alpha d), beta),
d being the cosine distance the INT8 op measured between dY and its quantized version on the last
backward (the `deviation` buffer of each Int8Layer, filled once `tracks_deviation` is on).

Per-layer learning rates need one param group per layer, but the user's optimizer and schedulers were
built on the user's groups. So the split exists only for the duration of `step()`: the wrapper swaps in
per-layer copies of each group with `lr * phi`, calls the real `step`, and puts the original groups back.
Schedulers (built on the wrapped optimizer) keep seeing and setting the original groups, so the factor
multiplies whatever they set, and optimizer state (keyed by parameter) is untouched by the split.
This is exact for every optimizer whose step reads `group["lr"]` (all of torch.optim except LBFGS, which
forbids more than one group).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .nn.modules import Int8Layer


def deviation_factor(d, alpha: float = 20.0, beta: float = 0.1):
    """phi(d) = max(exp(-alpha d), beta); accepts a float or a tensor."""
    if isinstance(d, torch.Tensor):
        return torch.exp(-alpha * d).clamp_min(beta)
    return max(math.exp(-alpha * d), beta)


class DeviationLRScaler:
    """Wrap `optimizer` so each INT8 layer of `qmodel` steps with its LR times phi(its deviation).

    Use it where the optimizer was used (`step`, `zero_grad`, `state_dict`, `load_state_dict`); build LR
    schedulers on the wrapped optimizer (`scaler.optimizer`, or the one you passed in). Parameters that
    belong to no INT8 layer (BatchNorm, excluded layers, functional sites' weights) step with factor 1.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, qmodel: nn.Module, alpha: float = 20.0, beta: float = 0.1):
        if not 0.0 < beta <= 1.0 or alpha < 0:
            raise ValueError(f"DeviationLRScaler needs alpha >= 0 and 0 < beta <= 1, got alpha={alpha}, beta={beta}")
        self.optimizer, self.alpha, self.beta = optimizer, float(alpha), float(beta)
        self.layers: dict[str, Int8Layer] = {}
        self._owner: dict[int, str] = {}  # id(parameter) -> layer name
        for name, m in qmodel.named_modules():
            if isinstance(m, Int8Layer):
                m.tracks_deviation = True
                if m.owns_params:
                    self.layers.setdefault(name, m)
                    for p in m.parameters(recurse=False):
                        self._owner.setdefault(id(p), name)
        if not self.layers:
            raise ValueError("DeviationLRScaler found no Int8Layer in the model: pass the model returned by int8fx.convert()")

    def factors(self) -> dict[str, float]:
        """phi of every layer's current deviation (one device sync for all layers)."""
        names = list(self.layers)
        d = torch.stack([self.layers[n].deviation.detach().float().cpu() for n in names]).tolist()
        return {n: deviation_factor(v, self.alpha, self.beta) for n, v in zip(names, d)}

    def _split_groups(self, factors: dict[str, float]) -> list[dict]:
        groups = []
        for group in self.optimizer.param_groups:
            parts: dict[float, list] = {}
            for p in group["params"]:
                parts.setdefault(factors.get(self._owner.get(id(p)), 1.0), []).append(p)
            groups += [dict(group, params=ps, lr=group["lr"] * f) for f, ps in parts.items()]
        return groups

    def step(self, closure=None):
        """One optimizer step at lr * phi(d) per layer, d from the layer's last backward.

        With a closure the backward happens inside `step`, after phi was read: the factors are then
        those of the previous backward."""
        original = self.optimizer.param_groups
        self.optimizer.param_groups = self._split_groups(self.factors())
        try:
            return self.optimizer.step() if closure is None else self.optimizer.step(closure)
        finally:
            self.optimizer.param_groups = original

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def state_dict(self) -> dict:
        """The wrapped optimizer's state plus alpha/beta. The deviations themselves are model buffers
        (saved with the model), so model + this is everything an exact resume needs."""
        return {"optimizer": self.optimizer.state_dict(), "alpha": self.alpha, "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.alpha, self.beta = float(state["alpha"]), float(state["beta"])

    def __repr__(self) -> str:
        return (f"DeviationLRScaler(alpha={self.alpha}, beta={self.beta}, layers={len(self.layers)}, "
                f"optimizer={type(self.optimizer).__name__})")
