"""DeviationLRScaler (DCLRS): the factor, its product with schedulers, exactness for any optimizer, resume."""
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import int8fx
from int8fx.data import real_batch
from int8fx.nn.modules import Int8Layer
from int8fx.optim import deviation_factor

# forced deviations per layer: factor e^-1, the floor 0.1, and 1 (d = 0)
FORCED = {"0": 0.05, "3": 0.5, "7": 0.0}


def tiny_qnet(policy: str = "gvq-mcs") -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return int8fx.convert(net, int8fx.Int8Config(grad_quant=policy))


def backward(qm: nn.Module, step: int = 0, force: bool = True) -> None:
    x, y, _ = real_batch(8, 16, 3, seed=step)
    F.cross_entropy(qm(x), y).backward()
    if force:  # the backward just measured real deviations (~1e-4); force distinct factors
        for name, d in FORCED.items():
            qm.get_submodule(name).pending.get("deviation").fill_(d)  # staged until the step commits it


def test_phi_known_values_and_monotone():
    assert deviation_factor(0.0) == 1.0
    assert deviation_factor(0.05) == pytest.approx(math.exp(-1))
    assert deviation_factor(1.0) == 0.1
    assert deviation_factor(math.log(10) / 20) == pytest.approx(0.1)
    d = torch.linspace(0, 1, 201)
    phi = deviation_factor(d)
    assert torch.all(phi[1:] <= phi[:-1]) and torch.all(phi[:24] > 0.1) and torch.all(phi[24:] == 0.1)
    assert phi[10].item() == pytest.approx(deviation_factor(0.05))


def test_scaler_turns_on_deviation_tracking_and_reads_real_deviations():
    qm = tiny_qnet()
    scaler = int8fx.DeviationLRScaler(torch.optim.SGD(qm.parameters(), lr=0.1), qm)
    layers = [m for m in qm.modules() if isinstance(m, Int8Layer)]
    assert all(m.tracks_deviation for m in layers)
    backward(qm, force=False)
    d = torch.stack([m.pending_deviation() for m in layers])
    assert torch.all(d > 0) and torch.all(d < 0.01)  # INT8 gradients: small but measured
    assert scaler.factors() == pytest.approx({n: math.exp(-20 * float(v)) for n, v in zip(scaler.layers, d)})


def test_scheduler_and_scaler_multiply():
    qm = tiny_qnet()
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = int8fx.DeviationLRScaler(opt, qm)
    groups = opt.param_groups
    owner = {id(p): n for n, m in qm.named_modules() if isinstance(m, Int8Layer) for p in m.parameters()}
    for step in range(3):
        scaler.zero_grad()
        backward(qm, step)
        lr = sched.get_last_lr()[0]
        assert lr == pytest.approx(0.1 * 0.5**step)
        before = {p: (p.detach().clone(), p.grad.clone()) for p in qm.parameters()}
        scaler.step()
        for p, (old, grad) in before.items():
            phi = deviation_factor(FORCED[owner[id(p)]]) if id(p) in owner else 1.0  # BatchNorm: 1
            torch.testing.assert_close(p.detach(), old - lr * phi * grad, rtol=1e-6, atol=1e-9)
        assert opt.param_groups is groups and len(groups) == 1 and groups[0]["lr"] == pytest.approx(lr)
        sched.step()


@pytest.mark.parametrize("make_opt", [
    lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=1e-3, nesterov=True),
    lambda ps, lr: torch.optim.Adam(ps, lr=lr),
    lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1),
    lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, momentum=0.5),
], ids=["sgd-nesterov-wd", "adam", "adamw", "rmsprop"])
def test_equals_an_optimizer_built_with_per_layer_learning_rates(make_opt):
    """Scaling each layer's step by phi after the optimizer's step is the step with per-layer learning rates
    lr * phi, to within fp32 rounding of the update, optimizer state included; the user's param groups
    stay as they were."""
    a, b = tiny_qnet(), tiny_qnet()
    scaler = int8fx.DeviationLRScaler(make_opt(a.parameters(), 0.01), a)
    layer_params = {n: list(b.get_submodule(n).parameters()) for n in FORCED}
    in_layers = {id(p) for ps in layer_params.values() for p in ps}
    rest = [p for p in b.parameters() if id(p) not in in_layers]
    phi = {n: deviation_factor(float(torch.tensor(d))) for n, d in FORCED.items()}  # d as the fp32 buffer holds it
    groups = [{"params": ps, "lr": 0.01 * phi[n]} for n, ps in layer_params.items()]
    ref = make_opt(groups + [{"params": rest, "lr": 0.01}], 0.01)
    for step in range(2):  # the second step has momentum / moments from the first
        for m, opt in ((a, scaler), (b, ref)):
            opt.zero_grad()
            backward(m, step)
            opt.step()
        # compare one step from identical parameters: INT8 rounding of a later forward would amplify the
        # fp32 rounding difference into a different trajectory, which is not what is being tested
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-8)
            with torch.no_grad():
                pb.copy_(pa)
    for pa, pb in zip(a.parameters(), b.parameters()):
        sa, sb = scaler.optimizer.state[pa], ref.state[pb]
        assert set(sa) == set(sb)
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-8)
    assert len(scaler.optimizer.param_groups) == 1


def test_state_dict_round_trip_resumes_exactly():
    def train(qm, scaler, steps):
        for step in steps:
            scaler.zero_grad()
            backward(qm, step, force=False)
            scaler.step()

    a = tiny_qnet()
    sa = int8fx.DeviationLRScaler(torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9), a)
    train(a, sa, range(2))
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": sa.state_dict()}, buf)
    b = tiny_qnet()
    sb = int8fx.DeviationLRScaler(torch.optim.SGD(b.parameters(), lr=0.5, momentum=0.9), b, alpha=5.0)
    ckpt = torch.load(io.BytesIO(buf.getvalue()))
    b.load_state_dict(ckpt["model"])
    sb.load_state_dict(ckpt["opt"])
    assert (sb.alpha, sb.beta) == (20.0, 0.1) and sb.factors() == sa.factors()
    train(a, sa, range(2, 4))
    train(b, sb, range(2, 4))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("policy", ["per-tensor", "gvq", "mcs", "gvq-mcs", "gvq-mcs-search", "dsgc"])
def test_usable_with_every_policy(policy):
    qm = tiny_qnet(policy)
    scaler = int8fx.DeviationLRScaler(torch.optim.SGD(qm.parameters(), lr=0.1), qm)
    before = [p.detach().clone() for p in qm.parameters()]
    backward(qm, force=False)
    scaler.step()
    assert all(0.1 <= f <= 1.0 for f in scaler.factors().values())
    assert all(torch.isfinite(p).all() for p in qm.parameters())
    assert all(not torch.equal(p, b) for p, b in zip(qm.parameters(), before) if p.dim() > 1)


def test_a_model_without_int8_layers_is_refused():
    net = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="no Int8Layer"):
        int8fx.DeviationLRScaler(torch.optim.SGD(net.parameters(), lr=0.1), net)


def test_an_optimizer_of_the_unconverted_model_is_refused():
    """`convert` returns a copy: an optimizer built on the original model's parameters would never train the
    converted one, and the steps would pass without a word. Holding some of them (others frozen or left to
    another optimizer) is fine."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 10))
    qm = int8fx.convert(net)
    with pytest.raises(ValueError, match="holds none of the INT8 layers' parameters.*returns a copy"):
        int8fx.DeviationLRScaler(torch.optim.SGD(net.parameters(), lr=0.1), qm)
    int8fx.DeviationLRScaler(torch.optim.SGD(qm[2].parameters(), lr=0.1), qm)
