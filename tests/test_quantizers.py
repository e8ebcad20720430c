"""Gradient clip policies (int8fx/quant/policies.py) held to the known answers of ALGORITHMS.md."""
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import int8fx
from int8fx.data import real_batch
from int8fx.nn.modules import Int8Layer
from int8fx.quant import grad_quantizer_names, make_grad_quantizer
from int8fx.quant.policies import magnitude_weight, magnitude_weighted_error, mcs_gaussian

POLICIES = ("per-tensor", "gvq", "mcs", "gvq-mcs", "gvq-mcs-search", "dsgc")
STATEFUL = ("mcs", "gvq-mcs", "gvq-mcs-search", "dsgc")


def draw(kind: str, n: int, scale: float = 1.0) -> torch.Tensor:
    if kind == "outliers":  # Gaussian plus a few huge elements: absmax would round most of it to zero
        return torch.cat([draw("gauss", n - 8), torch.tensor([300.0, -250.0, 280.0, 0, 0, 0, 0, 0])]) * scale
    dist = {"gauss": torch.distributions.Normal(0.0, 1.0), "laplace": torch.distributions.Laplace(0.0, 1.0),
            "t3": torch.distributions.StudentT(3.0), "t2": torch.distributions.StudentT(2.0)}[kind]
    return dist.sample((n,)) * scale


def quantizer(policy: str, channels: int, **cfg):
    return make_grad_quantizer(policy, channels, int8fx.Int8Config(grad_quant=policy, **cfg))


def real_output_grad() -> torch.Tensor:
    """dY of the first conv of a small CNN on real Fashion-MNIST images, as rows [M, O]: sparse and
    long-tailed like the first layers of real networks."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    x, y, _ = real_batch(8, 32, 3)
    grads = []
    net[0].register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0]))
    F.cross_entropy(net(x.requires_grad_(True)), y).backward()
    return grads[0].permute(0, 2, 3, 1).reshape(-1, 16).detach()


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def cosine_distance64(g: torch.Tensor, clip: float) -> float:
    """Independent float64 reference of d(c) for the brute-force minimum."""
    g = g.double().flatten()
    s = clip / 127
    q = (g / s).round().clamp(-127, 127) * s
    return float(1 - g @ q / (g.norm() * q.norm()))


def test_policies_registered_and_default_is_gvq_mcs():
    assert set(POLICIES) <= set(grad_quantizer_names())
    assert int8fx.Int8Config().grad_quant == "gvq-mcs"


def test_family_test_separates_gaussian_from_laplace_and_student_t():
    # scale-free: gradients live at 1e-6 as often as at 1e3
    g = torch.stack([draw("gauss", 100_000), draw("gauss", 100_000, 1e-6), draw("laplace", 100_000),
                     draw("laplace", 100_000, 1e3), draw("t3", 100_000)], 1)
    assert mcs_gaussian(g, 0.3).tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("k,a", [(1.0, 0.8), (0.5, 0.6)])
def test_inverted_t_update_follows_formula(k, a):
    q = quantizer("gvq-mcs", 4, mcs_k=k, mcs_a=a)
    expected = None
    for step, scales in enumerate([(1, 1, 1, 1), (3, 0.5, 2, 1), (0.2, 4, 1, 1), (1, 1, 5, 0.1), (2, 2, 2, 2)]):
        # columns 0, 1: Laplace (inverted-T); columns 2, 3: Gaussian
        g = torch.stack([draw(kind, 20_000, s) for kind, s in zip(("laplace", "laplace", "gauss", "gauss"), scales)], 1)
        amax = g.abs().amax(0)
        clip_w, clip_x = q.clips(g, g)
        if expected is None:
            expected = amax.clone()
        else:
            expected = torch.cat([(1 - k * a) * expected[:2] + a * amax[:2], amax[2:]])
        torch.testing.assert_close(clip_w, expected, rtol=1e-6, atol=0)
        assert q.w_gaussian.tolist() == [0.0, 0.0, 1.0, 1.0]
        assert int(q.steps) == step + 1
    torch.testing.assert_close(q.w_clip, expected, rtol=1e-6, atol=0)


def test_mcs_is_one_per_tensor_clip():
    q = quantizer("mcs", 3)
    g1, g2 = draw("laplace", 30_000).view(-1, 3), 2 * draw("laplace", 30_000).view(-1, 3)
    first, _ = q.clips(g1, g1)
    second, _ = q.clips(g2, g2)
    assert first.shape == (3,) and torch.all(first == g1.abs().max())
    torch.testing.assert_close(second, (0.2 * g1.abs().max() + 0.8 * g2.abs().max()).expand(3))


@pytest.mark.parametrize("alpha", [0.0, 2.0, 5.0])
def test_search_variant_within_2pct_of_brute_force(alpha):
    g = torch.stack([draw("gauss", 4_000), draw("laplace", 4_000), draw("t3", 4_000, 1e-4),
                     draw("gauss", 4_000) * (torch.rand(4_000) < 0.2)], 1)
    clip = quantizer("gvq-mcs-search", 4, mcs_alpha=alpha).weight_grad_clip(g)
    amax = g.abs().amax(0)
    w = magnitude_weight(g, amax, alpha)
    brute = torch.stack([magnitude_weighted_error(g, r * amax, w) for r in torch.linspace(1e-3, 1, 400)]).min(0).values
    found = magnitude_weighted_error(g, clip, w)
    assert torch.all(found <= 1.02 * brute), (found / brute)
    if alpha == 0:  # unweighted, the long-tailed column's optimum is far below absmax: a no-op search fails
        assert magnitude_weighted_error(g, amax, w)[2] > 1.3 * brute[2]


@pytest.mark.parametrize("kind", ["gauss", "laplace", "t2", "outliers", "real"])
def test_dsgc_clip_within_1e3_of_brute_force_minimum(kind):
    g = real_output_grad() if kind == "real" else draw(kind, 24_000).view(-1, 8)
    q = quantizer("dsgc", g.shape[1])
    clip_w, clip_x = q.clips(g, g)
    assert torch.all(clip_w == clip_x)  # one per-tensor clip for both GEMMs
    amax = float(g.abs().max())
    brute = min(cosine_distance64(g, r * amax) for r in torch.logspace(-3, 0, 300).tolist())
    found = cosine_distance64(g, float(clip_x))
    assert found <= brute + 1e-3
    # the spec's 1e-3 is loose for INT8 (d ~ 1e-4 here), so hold it tighter too; absmax misses this bound
    # on every one of these inputs (by 7% on t2 up to 30% with outliers), so a search that did nothing fails
    assert found <= 1.01 * brute + 1e-7


def test_dsgc_searches_every_period_and_reuses_the_ratio_in_between():
    q = quantizer("dsgc", 8, clip_update_period=3)
    ratios, searched = [], {}
    for step in range(7):
        g = draw("outliers" if step == 3 else "t2" if step == 6 else "gauss", 24_000, scale=1 + step).view(-1, 8)
        _, clip_x = q.clips(g, g)
        ratios.append(float(q.x_ratio))
        assert float(clip_x) == pytest.approx(ratios[-1] * float(g.abs().max()), rel=1e-6)
        if step % 3 == 0:  # what a fresh search on this step's data gives
            searched[step] = float(quantizer("dsgc", 8).input_grad_clip(g) / g.abs().max())
    assert ratios[0] == ratios[1] == ratios[2] and ratios[3] == ratios[4] == ratios[5]
    assert [ratios[0], ratios[3], ratios[6]] == pytest.approx([searched[0], searched[3], searched[6]], rel=1e-6)
    assert len(set(searched.values())) == 3
    q.steps.zero_()  # e.g. a user restarting the schedule: the next step searches again
    q.clips(g := draw("outliers", 24_000).view(-1, 8), g)
    assert float(q.x_ratio) == pytest.approx(float(quantizer("dsgc", 8).input_grad_clip(g) / g.abs().max()), rel=1e-6)
    assert float(q.x_ratio) != pytest.approx(ratios[6], rel=1e-3)


@pytest.mark.parametrize("policy", ["gvq", "gvq-mcs", "gvq-mcs-search"])
def test_gvq_scales_per_channel_dequantize_within_half_a_step(policy):
    scales = torch.tensor([1e-4, 1e-2, 1.0, 1e3])
    g = draw("gauss", 8_000).view(-1, 4) * scales
    q = quantizer(policy, 4)
    clip_w = q.weight_grad_clip(g)
    assert clip_w.shape == (4,) and q.input_grad_clip(g * 3).shape == ()
    s = clip_w / 127
    deq = (g / s).round().clamp(-127, 127) * s
    inside = g.abs() <= clip_w  # the search variant may clip; rounding error bound holds inside the clip
    assert torch.all((g - deq).abs()[inside] <= (s / 2 * (1 + 1e-5)).expand_as(g)[inside])
    if policy == "gvq":  # absmax: nothing clipped, and the small channel keeps its resolution
        assert inside.all()
        per_tensor = quantizer("per-tensor", 4).weight_grad_clip(g)
        assert torch.all(per_tensor == g.abs().max())
        assert (clip_w[0] / per_tensor[0]) < 1e-5


@pytest.mark.parametrize("policy", POLICIES)
def test_zero_channel_and_zero_tensor_give_zeros_not_nan(policy):
    layer = int8fx.convert(nn.Sequential(nn.Linear(6, 4)), int8fx.Int8Config(grad_quant=policy))
    x = torch.randn(32, 6, requires_grad=True)
    q = layer.get_submodule("0").grad_quantizer
    for dy in (torch.randn(32, 4), torch.randn(32, 4) * torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.zeros(32, 4)):
        x.grad = None
        layer.zero_grad()
        layer(x).backward(dy)
        dw = layer.get_submodule("0").weight.grad
        assert torch.isfinite(dw).all() and torch.isfinite(x.grad).all()
        zero_rows = dy.abs().sum(0) == 0
        assert torch.all(dw[zero_rows] == 0)
        if q.channelwise or not dy.any():  # a zero-range channel (or tensor) gets clip 0, i.e. scale 0
            assert torch.all(q.last_clip_w[zero_rows] == 0)
        if not dy.any():
            assert not x.grad.any() and not dw.any() and float(q.last_clip_x) == 0


@pytest.mark.parametrize("policy", STATEFUL)
def test_nonfinite_gradient_propagates_and_leaves_state_alone(policy):
    q = quantizer(policy, 4)
    g = draw("laplace", 4_000).view(-1, 4)
    q.clips(g, g)
    before = {k: v.clone() for k, v in q.state_dict().items() if k not in ("steps", "last_clip_w", "last_clip_x")}
    assert any(v.any() for v in before.values())
    for bad in (float("inf"), float("nan")):
        g_bad = g.clone()
        g_bad[5, 1] = bad
        q.clips(g_bad, g_bad)
        for k, v in before.items():
            assert torch.equal(q.state_dict()[k], v), k
    layer = int8fx.convert(nn.Sequential(nn.Linear(4, 4)), int8fx.Int8Config(grad_quant=policy))
    x = torch.randn(8, 4, requires_grad=True)
    dy = torch.randn(8, 4)
    dy[0, 0] = float("inf")
    layer(x).backward(dy)
    assert not torch.isfinite(layer.get_submodule('0').weight.grad).any() and not torch.isfinite(x.grad).any()


@pytest.mark.parametrize("policy", ["gvq-mcs", "dsgc"])
def test_running_state_survives_save_and_load(policy):
    cfg = int8fx.Int8Config(grad_quant=policy, clip_update_period=2)
    x, y, _ = real_batch(8, 16, 3)

    def step(m):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        return [p.grad.clone() for p in m.parameters()]

    torch.manual_seed(1)
    a = int8fx.convert(tiny_net(), cfg)
    for _ in range(3):
        step(a)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = int8fx.convert(tiny_net(), cfg)
    step(b)  # b has its own history (and step count) before loading a's
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for _ in range(2):  # for dsgc: one reuse step and one search step, in a's phase
        for ga, gb in zip(step(a), step(b)):
            assert torch.equal(ga, gb)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    names = a.state_dict().keys()
    assert "3.grad_quantizer.steps" in names and ("3.grad_quantizer.w_clip" in names or "3.grad_quantizer.x_ratio" in names)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_trains_a_converted_model_close_to_fp32(policy):
    torch.manual_seed(0)
    fp = tiny_net()
    qm = int8fx.convert(fp, int8fx.Int8Config(grad_quant=policy))
    x, y, _ = real_batch(16, 16, 3)
    for m in (fp, qm):
        F.cross_entropy(m(x), y).backward()
    for (name, p), q in zip(fp.named_parameters(), qm.parameters()):
        if p.dim() > 1:  # conv/linear weights (a conv bias before BatchNorm has a ~0 gradient: no direction)
            cos = F.cosine_similarity(p.grad.flatten(), q.grad.flatten(), 0)
            assert cos > 0.99, (name, float(cos))
    assert all(l.grad_quantizer.policy == policy for l in qm.modules() if isinstance(l, Int8Layer))


def test_stochastic_rounding_is_seeded_with_every_policy_state():
    x, y, _ = real_batch(8, 16, 3)

    def grads(seed):
        torch.manual_seed(0)
        qm = int8fx.convert(tiny_net(), int8fx.Int8Config(grad_quant="gvq-mcs", rounding="stochastic", seed=seed))
        F.cross_entropy(qm(x), y).backward()
        return torch.cat([p.grad.flatten() for p in qm.parameters()])

    assert torch.equal(grads(1), grads(1))
    assert not torch.equal(grads(1), grads(2))


def test_overrides_choose_a_policy_per_layer():
    cfg = int8fx.Int8Config(overrides={"7": {"grad_quant": "per-tensor"}, "3": {"grad_quant": "dsgc"}})
    qm = int8fx.convert(tiny_net(), cfg)
    assert [qm.get_submodule(n).grad_quantizer.policy for n in ("0", "3", "7")] == ["gvq-mcs", "dsgc", "per-tensor"]
    assert math.isclose(int8fx.inspect(qm).to_dict()["config"]["mcs_a"], 0.8)


def test_stochastic_rounding_is_unbiased_and_keyed():
    """E[q] = x/s (to within 2^-16 of a step plus sampling noise), the draws follow the key, the 15-bit
    draws are uniform and independent of the element's position, and they equal an independent scalar
    implementation of the stream (lowbias32 of i * golden + key), the function the CUDA kernel computes."""
    from int8fx.quant.core import quantize, stream_key, uniform_bits15

    n = 200_000
    for v in (0.1, 0.5, 0.9, -0.3, -2.7, 126.4):
        q = quantize(torch.full((n,), v * 0.02), torch.tensor(0.02), "stochastic", 7, torch.float32)
        frac = v - math.floor(v)
        assert set(q.unique().tolist()) <= {math.floor(v), math.floor(v) + 1}
        assert abs(q.double().mean().item() - v) < 4 * math.sqrt(frac * (1 - frac) / n) + 2.0 ** -16 + 1e-6, v
    ints = torch.arange(-127.0, 128.0).repeat(400)  # u < 1 always: values on the grid never move
    assert torch.equal(quantize(ints * 0.02, torch.tensor(0.02), "stochastic", 3, torch.float32), ints)
    x = torch.randn(1000)
    a, b, c = (quantize(x, torch.tensor(0.1), "stochastic", k) for k in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="key"):
        quantize(x, torch.tensor(0.1), "stochastic")
    r = uniform_bits15((4 * 50_000,), 11, "cpu")
    assert int(r.min()) >= 0 and int(r.max()) == 32767
    lanes = r.view(-1, 4).float()  # by position mod 4 (and so mod 2): no pattern in the index
    assert torch.allclose(lanes.mean(0), torch.full((4,), 16383.5), atol=4 * 9459 / math.sqrt(50_000))
    assert torch.allclose(lanes.std(0), torch.full((4,), 9459.0), rtol=0.02)  # sd of U{0..32767}
    mask = (1 << 32) - 1

    def lowbias32(z):
        z = ((z ^ (z >> 16)) * 0x7FEB352D) & mask
        z = ((z ^ (z >> 15)) * 0x846CA68B) & mask
        return z ^ (z >> 16)

    key = int(stream_key(12345, torch.tensor(9), 1)) & mask
    want = [(lowbias32((i * 0x9E3779B9 + key) & mask) >> 17) & 0x7FFF for i in range(64)]
    assert uniform_bits15((64,), stream_key(12345, torch.tensor(9), 1), "cpu").tolist() == want
    assert not torch.equal(stream_key(12345, torch.tensor(9), 0), stream_key(12345, torch.tensor(9), 1))