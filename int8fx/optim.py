"""Deviation Counteractive LR Scaling (DCLRS, Zhu et al. 2020; ALGORITHMS.md).

Where a layer's quantized gradient still points away from the true one, a full step would move the
weights in a wrong direction; DCLRS shortens that layer's step by phi(d) = max(exp(-alpha d), beta),
d being the cosine distance the INT8 op measured between dY and its quantized version on the last
backward (the `deviation` of each Int8Layer, measured once `tracks_deviation` is on).

How, without per-layer param groups and without a host sync: the wrapped optimizer takes its step as
usual, then each INT8 layer's parameters are moved back to `old + phi * (new - old)` (`torch.lerp`, phi a
device tensor). For every optimizer whose update is proportional to its learning rate (all of torch.optim
but LBFGS: SGD with momentum, Nesterov and weight decay, Adam, AdamW, RMSprop, ...) that is the step the
optimizer would have taken with `lr * phi`, to within one fp32 rounding; the optimizer's own state does
not depend on lr, so it is the same too. The user's optimizer, param groups and schedulers are untouched
(the factor multiplies whatever a scheduler set), and no learning rate ever needs phi on the host.
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
        for name, m in qmodel.named_modules():
            if isinstance(m, Int8Layer):
                m.tracks_deviation = True
                if m.owns_params:
                    self.layers.setdefault(name, m)
        if not self.layers:
            raise ValueError("DeviationLRScaler found no Int8Layer in the model: pass the model returned by int8fx.convert()")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trained = [p for m in self.layers.values() for p in m.parameters(recurse=False) if p.requires_grad]
        if trained and not any(id(p) in held for p in trained):  # (some frozen or left out on purpose: fine)
            raise ValueError("the optimizer holds none of the INT8 layers' parameters of this model, so neither it "
                             "nor DeviationLRScaler would train them: build it on the converted model's parameters "
                             "(int8fx.convert returns a copy unless inplace=True)")

    def factors(self) -> dict[str, float]:
        """phi of every layer's current deviation, on the host (one transfer for all layers; for reports)."""
        names = list(self.layers)
        phi = self.device_factors()
        values = torch.stack([phi[n].float() for n in names]).cpu().tolist() if names else []
        return dict(zip(names, values))

    def device_factors(self) -> dict[str, torch.Tensor]:
        """phi of each layer's deviation of the last backward, as device tensors (no host read)."""
        return {n: deviation_factor(m.pending_deviation().detach().float(), self.alpha, self.beta)
                for n, m in self.layers.items()}

    def step(self, closure=None):
        """The wrapped optimizer's step, each INT8 layer's part of it scaled by phi(d) (module docstring).

        With a closure the backward happens inside `step`, after phi was read: the factors are then
        those of the previous backward."""
        phi = self.device_factors()
        params = [(p, phi[name]) for name, m in self.layers.items() for p in m.parameters(recurse=False)
                  if p.requires_grad]
        with torch.no_grad():
            old = [p.detach().clone() for p, _ in params]
        result = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        with torch.no_grad():
            for (p, f), o in zip(params, old):
                p.copy_(torch.lerp(o, p, f.to(p.dtype)))
        return result

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
