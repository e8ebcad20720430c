"""When quantizer state takes effect: staged by forward and backward, committed when an optimizer steps.

A site's quantizer state (activation clips, gradient clips and families, DSGC ratios, the DCLRS
deviation, the step counter) changes with every training forward and backward. Those changes are written
to a *pending* copy of the state (`PendingState`, a child of the site) and become the site's state only
when an optimizer takes a step (`torch.optim`'s step post-hook, installed once, calls `commit_all`).
Why: `torch.amp.GradScaler` skips `optimizer.step()` when it finds an Inf/NaN gradient anywhere in the
model, but the sites that the backward reached before the overflow saw finite (if huge) gradients; had
they updated their running clips, one skipped step would poison those clips for many steps. Staging makes
a skipped step leave no trace. With gradient accumulation, state advances once per optimizer step, from
the last micro-batch. A training loop that steps without `torch.optim` calls `int8fx.commit(model)`.

Between a backward and the step, the pending values are what is current for that step: the DCLRS
scaler reads the pending deviation, and `QuantStateSync` reduces the pending state across DDP ranks.
"""
from __future__ import annotations

import weakref

import torch.nn as nn
from torch import Tensor

from ..quant.grad import Float32State

_LIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # every Int8Layer that exists
_hook_installed = False


def _key(name: str) -> str:
    return name.replace(".", "__")


class PendingState(Float32State):
    """The staged copy of a site's state: one non-persistent buffer per state tensor (named with `__` for
    `.`), so it moves with the model (`.to()`), is not saved, and is re-synchronised to the committed state
    after a load, a commit, or a structural change."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__()
        for name, t in state.items():
            self.register_buffer(_key(name), t.detach().clone(), persistent=False)

    def get(self, name: str) -> Tensor:
        return self._buffers[_key(name)]

    def tensors(self, names) -> list[Tensor]:
        return [self._buffers[_key(n)] for n in names]


def track(layer: nn.Module) -> None:
    """Remember `layer` for `commit_all` and make sure the optimizer hook that calls it is installed."""
    global _hook_installed
    _LIVE.add(layer)
    if not _hook_installed:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda optimizer, args, kwargs: commit_all())
        _hook_installed = True


def untrack(layer: nn.Module) -> None:
    """Forget `layer` (it stops being a site: `int8fx.to_float`)."""
    _LIVE.discard(layer)


def commit_all() -> None:
    """Commit the pending state of every site in the process (called after every optimizer step)."""
    for layer in list(_LIVE):
        layer.commit()


def commit(model: nn.Module) -> None:
    """Make the state that the last forward/backward computed current in every site of `model`: what an
    optimizer step does automatically; call it in a loop that updates parameters without `torch.optim`."""
    for m in model.modules():
        if m in _LIVE:  # the sites `track` registered (every Int8Layer does when built)
            m.commit()
