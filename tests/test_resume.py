"""Checkpoint/resume is exact: model state_dict + optimizer (+ DeviationLRScaler) state saved after N1
steps and loaded into a freshly converted model gives bit-identical parameters, quantizer buffers and
optimizer state after N2 more steps, compared with a run that never stopped.

Bit-identity holds because everything a step depends on is in the checkpoint: parameters, BatchNorm
statistics, every quantizer buffer (running clips, families, DSGC ratio and its step counter), the
optimizer's momentum/moments, and for stochastic rounding the layer `step` buffer that seeds the noise.
A control shows the quantizer buffers matter: resuming from the parameters alone diverges.
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import int8fx
from int8fx.quant import grad_quantizer_names

N1, N2 = 3, 2  # DSGC below searches every 2 steps: resume mid-period, then one search


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


DATA = None


def data(t: int):
    global DATA
    if DATA is None:
        g = torch.Generator().manual_seed(7)
        DATA = torch.randn(N1 + N2, 6, 3, 8, 8, generator=g), torch.randint(0, 5, (N1 + N2, 6), generator=g)
    return DATA[0][t], DATA[1][t]


def make_opt(qm: nn.Module, kind: str):
    if kind == "adam":
        return torch.optim.Adam(qm.parameters(), lr=1e-2)
    return int8fx.DeviationLRScaler(torch.optim.SGD(qm.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4), qm)


def train(qm: nn.Module, opt, start: int, steps: int) -> None:
    for t in range(start, start + steps):
        x, y = data(t)
        opt.zero_grad()
        F.cross_entropy(qm(x), y).backward()
        opt.step()


def roundtrip(obj):
    """Through torch.save/torch.load, as a real checkpoint goes (and so no tensor is shared)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def optimizer_tensors(opt) -> dict:
    sd = opt.state_dict()
    sd = sd.get("optimizer", sd)
    return {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}


# every policy with nearest rounding; seeded stochastic rounding with a running-clip and a periodic policy
CASES = [(p, "nearest", "sgd-dclrs") for p in grad_quantizer_names()] + [
    ("gvq-mcs", "stochastic", "sgd-dclrs"), ("dsgc", "stochastic", "adam")]


@pytest.mark.parametrize("policy,rounding,opt_kind", CASES)
def test_resume_is_bit_identical(policy, rounding, opt_kind):
    cfg = int8fx.Int8Config(grad_quant=policy, rounding=rounding, clip_update_period=2, seed=5)
    qm = int8fx.convert(make_model(), cfg)
    opt = make_opt(qm, opt_kind)
    train(qm, opt, 0, N1)
    ckpt = roundtrip({"model": qm.state_dict(), "opt": opt.state_dict()})
    train(qm, opt, N1, N2)

    fresh = int8fx.convert(make_model(seed=1), cfg)  # different init: everything must come from the checkpoint
    fresh.load_state_dict(ckpt["model"], strict=True)
    opt2 = make_opt(fresh, opt_kind)
    opt2.load_state_dict(ckpt["opt"])
    train(fresh, opt2, N1, N2)

    assert_same(qm.state_dict(), fresh.state_dict())
    assert_same(optimizer_tensors(opt), optimizer_tensors(opt2))
    assert int(fresh.get_submodule("0").step) == N1 + N2


def test_resume_without_quantizer_state_diverges():
    """Control: the same resume from the FP32 part of the checkpoint only (`float_state_dict`, which loads
    strictly because quantizer buffers are optional) does not reproduce the run, for the stateful
    default policy with stochastic rounding: the running clips and the rounding seeds restart."""
    cfg = int8fx.Int8Config(grad_quant="gvq-mcs", rounding="stochastic", seed=5)
    qm = int8fx.convert(make_model(), cfg)
    opt = make_opt(qm, "sgd-dclrs")
    train(qm, opt, 0, N1)
    ckpt = roundtrip({"model": int8fx.float_state_dict(qm), "opt": opt.state_dict()})
    train(qm, opt, N1, N2)
    fresh = int8fx.convert(make_model(seed=1), cfg)
    fresh.load_state_dict(ckpt["model"], strict=True)
    opt2 = make_opt(fresh, "sgd-dclrs")
    opt2.load_state_dict(ckpt["opt"])
    train(fresh, opt2, N1, N2)
    assert not torch.equal(qm.get_submodule("0").weight, fresh.get_submodule("0").weight)
