"""Bad input: every strange tensor and model from issue 8, each with the behaviour it must produce.

The rule (DESIGN.md, numerical contract): a correct result or a clear error; never a NaN made by the
quantizer from finite input; an Inf/NaN that arrives stays visible, so `torch.amp.GradScaler` skips the
step exactly as in FP32 and the quantizer state comes out of that step unharmed.

Value regimes are checked by scale invariance where possible: symmetric quantization commutes with
scaling, so the INT8 result for 1e-30 * x must be 1e-30 times the result for x up to fp32 rounding of
the scales (relative 1e-5), whatever the policy. That is a sharp test (a policy that clips differently
at another scale is off by O(1)) without needing a tolerance against FP32.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import int8fx
from int8fx.passes import sites_of
from int8fx.nn.modules import Int8Layer
from int8fx.quant import grad_quantizer_names, quantize, quantize_per_channel, quantize_per_tensor

POLICIES = grad_quantizer_names()


def conv_pair(bias: bool = True, policy: str = "gvq-mcs", **kw):
    torch.manual_seed(0)
    fp = nn.Conv2d(3, 8, 3, padding=1, bias=bias, **kw)
    return fp, int8fx.convert(copy.deepcopy(fp), int8fx.Int8Config(grad_quant=policy))


def run(model: nn.Module, x: torch.Tensor, dy: torch.Tensor | None = None):
    """(y, dx, dweight, dbias) of one forward/backward with upstream gradient dy (default: ones)."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(torch.ones_like(y) if dy is None else dy)
    w = model.weight if hasattr(model, "weight") else None
    b = getattr(model, "bias", None)
    return (y.detach(), x.grad, None if w is None else w.grad, None if b is None else b.grad)


def layer_of(model: nn.Module) -> Int8Layer:
    """The (first) INT8 layer of a converted model (a bare converted conv is one itself)."""
    return next(m for m in model.modules() if isinstance(m, Int8Layer))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def quant_buffers(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "grad_quantizer" in k or k.endswith(
        ("act_clip", "act_clip_ema", "deviation", "step"))}


def assert_finite_state(model: nn.Module) -> None:
    for k, v in quant_buffers(model).items():
        assert torch.isfinite(v.float()).all(), k


X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
DY = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(2))


# ------------------------------------------------------------------------------------- quantizer primitives
def test_quantizer_zero_range_gives_zeros_not_nan():
    """All-zero tensor, all-zero channel, zero scale: q = 0 and scale = 0, never NaN."""
    q, s = quantize_per_tensor(torch.zeros(5, 4))
    assert float(s) == 0.0 and torch.equal(q, torch.zeros(5, 4, dtype=torch.int8))
    w = torch.randn(3, 7)
    w[1] = 0
    q, s = quantize_per_channel(w, 0)
    assert s[1] == 0 and (q[1] == 0).all() and (s[[0, 2]] > 0).all()
    assert torch.equal(quantize(torch.randn(4), torch.zeros(()), "stochastic", key=0),
                       torch.zeros(4, dtype=torch.int8))


# ------------------------------------------------------------------------------------- zero and constant values
def test_all_zero_activation():
    """X = 0: scale 0, y = bias exactly, dW = 0 exactly (FP32 gives the same), dX finite and nonzero."""
    fp, qm = conv_pair()
    y, dx, dw, db = run(qm, torch.zeros_like(X), DY)
    assert torch.equal(y, fp.bias.detach().view(1, -1, 1, 1).expand_as(y))
    assert torch.equal(dw, torch.zeros_like(dw))
    assert torch.isfinite(dx).all() and dx.abs().max() > 0
    assert rel(dx, run(fp, torch.zeros_like(X), DY)[1]) < 0.03


@pytest.mark.parametrize("policy", POLICIES)
def test_all_zero_gradient(policy):
    """dY = 0: dX = dW = db = 0 exactly, and the policy's running state is not moved by an empty signal."""
    _, qm = conv_pair(policy=policy)
    run(qm, X, DY)
    before = quant_buffers(layer_of(qm).grad_quantizer)
    _, dx, dw, db = run(qm, X, torch.zeros_like(DY))
    for t in (dx, dw, db):
        assert torch.equal(t, torch.zeros_like(t))
    after = quant_buffers(layer_of(qm).grad_quantizer)
    for k in before:
        if k.endswith(("_clip", "_ratio", "_gaussian")):
            assert torch.equal(before[k], after[k]), k


def test_constant_activation_and_gradient_are_exact():
    """A constant tensor quantizes exactly (every element -> 127), so forward and dW equal FP32 computed
    with the dequantized weights, to fp32 rounding."""
    fp, qm = conv_pair(bias=False)
    x, dy = torch.full_like(X, -0.37), torch.full_like(DY, 2.5)
    y, dx, dw, _ = run(qm, x, dy)
    w2 = fp.weight.detach().reshape(8, -1)
    s_w = w2.abs().amax(1) / 127
    w_deq = (torch.round(w2 / s_w[:, None]) * s_w[:, None]).view_as(fp.weight)
    ref = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    ref.weight.data.copy_(w_deq)
    y_ref, _, dw_ref, _ = run(ref, x, dy)
    assert rel(y, y_ref) < 1e-6
    assert rel(dw, dw_ref) < 1e-6
    assert rel(dx, run(fp, x, dy)[1]) < 0.02  # dX uses the INT8 weights: quantization error only


# ------------------------------------------------------------------------------------- tiny and huge values
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("which,scale", [("x", 1e-30), ("x", 1e30), ("dy", 1e-30), ("dy", 1e30)])
def test_tiny_and_huge_values_scale_exactly(policy, which, scale):
    """Activations or gradients of magnitude 1e-30 / 1e30: the result is the scaled result of magnitude
    1, to relative 1e-5 (and finite), for every policy."""
    _, qm = conv_pair(bias=False, policy=policy)
    base = run(copy.deepcopy(qm), X, DY)
    xs, gs = (scale, 1.0) if which == "x" else (1.0, scale)
    y, dx, dw, _ = run(qm, X * xs, DY * gs)
    for got, ref, factor in ((y, base[0], xs), (dx, base[1], gs), (dw, base[2], xs * gs)):
        assert torch.isfinite(got).all()
        assert rel(got / factor, ref) < 1e-5


def test_tiny_activation_times_tiny_gradient_weight_grad():
    """X ~ 1e-20 and dY ~ 1e-20: the product of their scales (~6e-45) underflows, dW (~1e-39) does not.
    dW must still be the scaled dW of magnitude 1 to float precision (it was 5e-3 off before the op
    applied the two scales one at a time)."""
    _, qm = conv_pair(bias=False, policy="per-tensor")
    base = run(copy.deepcopy(qm), X, DY)
    dw = run(qm, X * 1e-20, DY * 1e-20)[2]
    assert rel(dw.double() * 1e40, base[2]) < 1e-4  # subnormal-range result: ~23 - 6 bits left


# ------------------------------------------------------------------------------------- Inf / NaN
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_activation_stays_visible(bad):
    """An Inf/NaN input gives a non-finite output at least wherever FP32's output is non-finite (here:
    everywhere, as the per-tensor scale is non-finite), and the activation-clip EMA is not poisoned."""
    fp, qm = conv_pair()
    x = X.clone()
    x[1, 2, 3, 3] = bad
    y = qm(x)
    y_fp = fp(x)
    assert (~torch.isfinite(y_fp)).any()
    assert (~torch.isfinite(y))[~torch.isfinite(y_fp)].all()
    assert torch.isfinite(layer_of(qm).act_clip_ema)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_gradient_stays_visible_and_state_survives(policy, bad):
    """One Inf/NaN in dY: dX and dW are non-finite wherever FP32's are (the op poisons the scales), and
    the policy's running state is unchanged, so the next finite step is unaffected."""
    fp, qm = conv_pair(policy=policy)
    run(qm, X, DY)
    before = quant_buffers(layer_of(qm).grad_quantizer)
    dy = DY.clone()
    dy[0, 1, 2, 2] = bad
    _, dx, dw, _ = run(qm, X, dy)
    _, dx_fp, dw_fp, _ = run(fp, X, dy)
    assert (~torch.isfinite(dx_fp)).any() and (~torch.isfinite(dx))[~torch.isfinite(dx_fp)].all()
    assert (~torch.isfinite(dw_fp)).any() and (~torch.isfinite(dw))[~torch.isfinite(dw_fp)].all()
    after = quant_buffers(layer_of(qm).grad_quantizer)
    for k in before:
        assert torch.isfinite(after[k].float()).all(), k
        if k.endswith(("_clip", "_ratio", "_gaussian")):
            assert torch.equal(before[k], after[k]), k


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, groups=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


def small_net(policy="gvq-mcs") -> nn.Module:
    torch.manual_seed(0)
    return int8fx.convert(SmallNet(), int8fx.Int8Config(grad_quant=policy))


@pytest.mark.parametrize("policy", ["per-tensor", "gvq-mcs"])
def test_grad_scaler_skips_nonfinite_step_and_leaves_no_trace(policy):
    """GradScaler (CPU) sees the Inf/NaN the op let through: it skips the step (parameters unchanged,
    bit for bit) and halves the scale. The following finite step then gives exactly the parameters of a
    run that never saw the bad batch (scales are powers of two, which INT8 quantization commutes with),
    except that the rounding streams advance with every call: the reference makes one call too."""
    labels = torch.tensor([0, 1, 2, 3])

    def step(model, opt, scaler, poison=None):
        opt.zero_grad()
        out = model(X)
        if poison is not None:
            out.register_hook(lambda g: g * poison)
        scaler.scale(F.cross_entropy(out, labels)).backward()
        scaler.step(opt)
        scaler.update()

    qm, ref = small_net(policy), small_net(policy)
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    scaler, ref_scaler = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    p0 = [p.detach().clone() for p in qm.parameters()]
    step(qm, opt, scaler, poison=float("inf"))
    assert all(torch.equal(a, b) for a, b in zip(p0, qm.parameters()))
    assert scaler.get_scale() == ref_scaler.get_scale() / 2
    assert_finite_state(qm)
    step(qm, opt, scaler)
    ref(X)  # the call the skipped step made (no backward): the rounding streams are where qm's are
    step(ref, ref_opt, ref_scaler)
    changed = [not torch.equal(a, b) for a, b in zip(p0, qm.parameters())]
    assert all(changed)
    assert all(torch.equal(a, b) for a, b in zip(qm.parameters(), ref.parameters()))


def test_overflow_in_part_of_the_model_leaves_no_trace_in_any_layer():
    """The case a real overflow makes: the gradient turns Inf at one layer, so the layers the backward
    reached before it (closer to the loss) saw finite, if huge, gradients. GradScaler skips the step, and
    no layer's quantizer state moves (their updates were staged, and only an optimizer step commits)."""
    qm = small_net("gvq-mcs")
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    labels = torch.tensor([0, 1, 2, 3])
    scaler.scale(F.cross_entropy(qm(X), labels)).backward()  # a first, finite step: state is set
    scaler.step(opt)
    scaler.update()
    before = quant_buffers(qm)
    opt.zero_grad()
    h = qm.c1(X)
    h.register_hook(lambda g: g * float("inf"))  # overflow below c2: c2 and fc saw finite gradients
    out = qm.fc(F.relu(qm.c2(F.relu(h))).mean((2, 3)))
    scaler.scale(F.cross_entropy(out, labels)).backward()
    assert int(qm.fc.pending.get("step")) == int(qm.fc.step) + 1  # fc did compute new state ...
    scaler.step(opt)
    scaler.update()
    after = quant_buffers(qm)
    assert all(torch.equal(before[k], after[k]) for k in before)  # ... but the skipped step left none of it


# ------------------------------------------------------------------------------------- empty batch
@pytest.mark.parametrize("kind", ["conv2d", "conv1d_1x1", "linear"])
def test_empty_batch(kind):
    """Batch of 0: output of the right shape, zero parameter gradients (as FP32), state untouched."""
    torch.manual_seed(0)
    fp, x = {"conv2d": (nn.Conv2d(3, 8, 3, stride=2), torch.zeros(0, 3, 7, 7)),
             "conv1d_1x1": (nn.Conv1d(4, 6, 1, groups=2), torch.zeros(0, 4, 5)),
             "linear": (nn.Linear(5, 3), torch.zeros(0, 5))}[kind]
    qm = int8fx.convert(copy.deepcopy(fp))
    before = quant_buffers(qm)
    y, dx, dw, db = run(qm, x)
    y_fp, dx_fp, dw_fp, db_fp = run(fp, x)
    assert y.shape == y_fp.shape and dx.shape == dx_fp.shape
    assert torch.equal(dw, dw_fp) and torch.equal(db, db_fp) and not dw.abs().any()
    after = quant_buffers(qm)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_empty_batch_whole_model():
    qm = small_net()
    out = qm(torch.zeros(0, 3, 8, 8))
    assert out.shape == (0, 5)
    out.sum().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in qm.parameters())


# ------------------------------------------------------------------------------------- dtypes and autocast
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_half_precision_model_equals_fp32_model_rounded(dtype, kind):
    """A model in fp16/bf16: the INT8 op computes in INT8 with fp32 scales, so its output and gradients
    are exactly the fp32 model's (same, low-precision-representable values) rounded to the dtype."""
    torch.manual_seed(0)
    fp = nn.Conv2d(3, 8, 3, padding=1) if kind == "conv" else nn.Linear(6, 8)
    low = int8fx.convert(copy.deepcopy(fp).to(dtype))
    ref = int8fx.convert(copy.deepcopy(fp).to(dtype).float())  # identical values, fp32 storage
    x = (X if kind == "conv" else X[:, 0, 0]).to(dtype)
    with torch.no_grad():  # (a call with autograd on would advance ref's rounding streams)
        dy = torch.randn(ref(x.float()).shape).to(dtype)
    y, dx, dw, db = run(low, x, dy)
    y_r, dx_r, dw_r, db_r = run(ref, x.float(), dy.float())
    assert y.dtype == dx.dtype == dw.dtype == dtype
    for a, b in ((y, y_r), (dx, dx_r), (dw, dw_r), (db, db_r)):
        assert torch.equal(a, b.to(dtype))


def test_half_input_to_fp32_model_keeps_input_dtype():
    """fp16 input into an fp32 model: PyTorch's conv refuses the mix; the INT8 op needs no common dtype
    (both operands become INT8), so it returns the fp32-input result in the input's dtype."""
    _, qm = conv_pair()
    ref = copy.deepcopy(qm)
    y, dx, dw, _ = run(qm, X.half(), DY.half())
    y_r, dx_r, dw_r, _ = run(ref, X.half().float(), DY.half().float())
    assert y.dtype == dx.dtype == torch.float16 and dw.dtype == torch.float32
    assert torch.equal(y, y_r.half()) and torch.equal(dx, dx_r.half()) and torch.equal(dw, dw_r)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_output_follows_autocast_inside_stays_exact(dtype, device):
    """Under autocast an INT8 layer returns autocast's dtype, as a conv does, so AMP training composes;
    inside, the integer GEMMs stay exact (run in bf16 they were off by 3e-3 in the output and 4e-2 in dW):
    the result is the fp32 result rounded to the dtype, and with an upstream gradient the dtype can hold,
    dX and dW are the fp32 ones exactly. On CUDA the same holds within the GPU (backend "auto")."""
    fp, qm = conv_pair(policy="per-tensor")
    fp, qm = fp.to(device), qm.to(device)
    ref = copy.deepcopy(qm)
    dy = DY.to(dtype).float().to(device)
    x, x_r = X.clone().to(device).requires_grad_(), X.clone().to(device).requires_grad_()
    with torch.autocast(device, dtype=dtype):
        y = qm(x)
        with torch.no_grad():
            y_fp = fp(X.to(device))
    y.backward(dy.to(dtype))
    y_r = ref(x_r)
    y_r.backward(dy)
    assert y.dtype == y_fp.dtype == dtype and y_r.dtype == torch.float32
    assert torch.equal(y, y_r.to(dtype))
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, x_r.grad)
    assert torch.equal(qm.weight.grad, ref.weight.grad) and torch.equal(qm.bias.grad, ref.bias.grad)


# ------------------------------------------------------------------------------------- memory layout
@pytest.mark.parametrize("layout", ["channels_last", "strided", "transposed", "channels_last_weights"])
def test_memory_layout_does_not_change_results(layout):
    """channels_last / non-contiguous inputs, upstream gradients and weights give bit-identical y, dX and
    dW. The bias gradient is an FP32 sum over dY whose order follows dY's memory layout (as in FP32
    PyTorch), so it is held to fp32 rounding instead."""
    _, qm = conv_pair()
    ref = run(copy.deepcopy(qm), X, DY)
    x, dy = X, DY
    if layout == "channels_last":
        x, dy = X.to(memory_format=torch.channels_last), DY.to(memory_format=torch.channels_last)
    elif layout == "strided":
        big_x, big_dy = torch.zeros(4, 6, 12, 12), torch.zeros(4, 16, 12, 12)
        big_x[:, ::2, ::2, 1::2] = X
        big_dy[:, 1::2, 1::2, ::2] = DY
        x, dy = big_x[:, ::2, ::2, 1::2], big_dy[:, 1::2, 1::2, ::2]
    elif layout == "transposed":
        x, dy = X.transpose(2, 3).contiguous().transpose(2, 3), DY.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        qm = qm.to(memory_format=torch.channels_last)
    assert layout == "channels_last_weights" or not (x.is_contiguous() and dy.is_contiguous())
    got = run(qm, x, dy)
    for a, b in zip(got[:3], ref[:3]):
        assert torch.equal(a, b)
    assert rel(got[3], ref[3]) < 1e-6


def test_conv3d_channels_last_3d_and_conv1d_noncontiguous():
    torch.manual_seed(0)
    c3 = int8fx.convert(nn.Conv3d(2, 4, 3, padding=1))
    x3 = torch.randn(2, 2, 4, 5, 3)
    ref = run(copy.deepcopy(c3), x3)
    got = run(c3, x3.to(memory_format=torch.channels_last_3d))
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    c1 = int8fx.convert(nn.Conv1d(3, 4, 3))
    x1 = torch.randn(3, 9, 2).permute(2, 0, 1)  # [2, 3, 9], non-contiguous
    ref = run(copy.deepcopy(c1), x1.contiguous())
    assert all(torch.equal(a, b) for a, b in zip(run(c1, x1), ref))


# ------------------------------------------------------------------------------------- zero output channel
def test_weight_with_zero_output_channel():
    """A dead (all-zero) output channel has weight scale 0: its output is exactly the bias, nothing is
    NaN, and it still receives a weight gradient (close to FP32's) so it can recover."""
    fp, qm = conv_pair()
    with torch.no_grad():
        fp.weight[3] = 0
        qm.weight[3] = 0
    y, dx, dw, db = run(qm, X, DY)
    y_fp, dx_fp, dw_fp, _ = run(fp, X, DY)
    assert torch.equal(y[:, 3], fp.bias[3].detach().expand_as(y[:, 3]))
    assert all(torch.isfinite(t).all() for t in (y, dx, dw, db))
    assert dw[3].abs().max() > 0 and rel(dw[3], dw_fp[3]) < 0.03
    assert rel(dx, dx_fp) < 0.03


def test_all_zero_weight():
    fp, qm = conv_pair()
    with torch.no_grad():
        qm.weight.zero_()
    y, dx, dw, _ = run(qm, X, DY)
    assert torch.equal(y, fp.bias.detach().view(1, -1, 1, 1).expand_as(y))
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.isfinite(dw).all() and dw.abs().max() > 0


# ------------------------------------------------------------------------------------- unsupported / untraceable
class DataDependent(nn.Module):
    """Python control flow on tensor values: torch.fx cannot trace the root."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))

    def forward(self, x):
        y = self.a(x) if x.sum() > 0 else self.b(x)
        return self.head(y)


class MyConv(nn.Conv2d):
    def forward(self, x):  # not a plain conv: int8fx must not pretend it is
        return super().forward(x) * 2


class StepCountingConvTranspose(nn.ConvTranspose2d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step = 0  # its own attribute, which int8fx's state of the same name would overwrite


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = StepCountingConvTranspose(4, 4, 2, stride=2)
        self.custom = MyConv(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.custom(self.up(F.relu(self.conv(x))))
        x = F.conv2d(x, self.fc.weight.new_ones(4, 4, 1, 1), stride=x.shape[0] % 2 + 1)  # run-time stride
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_converts_its_children_and_trains():
    torch.manual_seed(0)
    fp = DataDependent()
    qm = int8fx.convert(fp)
    rep = int8fx.inspect(qm)
    assert [o.name for o in rep.opaque] == ["(root)"] and "TraceError" in rep.opaque[0].reason
    assert {r.name for r in rep.converted} == {"a", "b", "head.2"}
    x = X[:, :, :6, :6].abs()  # sum > 0: branch `a`
    y, y_fp = qm(x), fp(x)
    assert rel(y, y_fp) < 0.05
    y.sum().backward()
    assert qm.a.weight.grad is not None and qm.b.weight.grad is None and torch.isfinite(qm.a.weight.grad).all()


def _fx_traces_a_run_time_stride() -> bool:
    class RunTimeStride(nn.Module):
        def forward(self, x, w):
            return F.conv2d(x, w, stride=x.shape[0] % 2 + 1)

    try:
        torch.fx.symbolic_trace(RunTimeStride())
    except TypeError:
        return False
    return True


def test_unsupported_sites_stay_fp32_and_run_time_geometry_is_taken_per_call():
    """What int8fx does not convert keeps its FP32 computation and still trains: a transposed conv with an
    attribute of its own named like int8fx's state (listed as a site kept in FP32). A Conv2d subclass with its own forward has that forward traced, so its inner F.conv2d call is
    converted (the site carries the module's name); a functional conv whose stride is computed at run time
    is converted too, with the stride of each call."""
    torch.manual_seed(0)
    fp = Mixed()
    with pytest.warns(UserWarning, match="up: has attributes of its own named step"):
        qm = int8fx.convert(fp)
    rep = int8fx.inspect(qm)
    rows = {r.name: r for r in rep.layers}
    assert rows["conv"].converted and rows["fc"].converted
    assert rows["custom"].converted and rows["custom"].source == "function"
    if _fx_traces_a_run_time_stride():
        assert rows["conv2d"].converted and rows["conv2d"].source == "function"
        assert set(rows) == {"conv", "custom", "fc", "conv2d", "up"}
    else:  # torch 2.5: F.conv2d refuses a Proxy stride, so the root's own code is kept as it is (and said so)
        assert [o.name for o in rep.opaque] == ["(root)"] and "TypeError" in rep.opaque[0].reason
        assert set(rows) == {"conv", "custom", "fc", "up"}
    assert not rows["up"].converted and rows["up"].op == "conv_transpose2d" and "step" in rows["up"].reason
    assert type(qm.get_submodule("up")) is StepCountingConvTranspose
    x = X[:, :, :5, :5]
    y, y_fp = qm(x), fp(x)
    assert rel(y, y_fp) < 0.05
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0 for p in qm.parameters())


def test_clear_errors_for_wrong_inputs():
    _, qm = conv_pair()
    assert torch.equal(qm.eval()(X[0]), qm(X[:1])[0])  # unbatched input, as nn.Conv2d takes it
    with pytest.raises(ValueError, match="expects a 3-d or 4-d input"):
        qm(X[0, 0])
    with pytest.raises(ValueError, match="expected 3 input channels"):
        qm(torch.randn(1, 5, 6, 6))
    with pytest.raises(TypeError, match="floating-point input"):
        qm(torch.ones(1, 3, 6, 6, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):  # what FP32 says ...
        nn.Conv2d(3, 8, 5)(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"padded input size \(4, 4\) is smaller than the dilated kernel \(5, 5\)"):
        int8fx.convert(nn.Conv2d(3, 8, 5))(torch.randn(1, 3, 4, 4))  # ... and INT8, not an unfold's message
    with pytest.raises(TypeError, match="takes an nn.Module"):
        int8fx.convert(lambda x: x)
    with pytest.raises(int8fx.ConfigError, match="grad_quant"):
        int8fx.Int8Config(grad_quant="nope")


def test_lazy_module_is_reported_not_crashed():
    """An uninitialised lazy conv cannot be converted (its shape is unknown): it stays FP32, initialises
    on the first forward as usual, and the conversion records why."""
    qm = int8fx.convert(nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU()))
    site = sites_of(qm)[0]
    assert not site.converted and "lazy" in site.reason
    assert qm(X).shape == (4, 4, 4, 4)
    assert not any(isinstance(m, Int8Layer) for m in qm.modules())


@pytest.mark.parametrize("module, x", [(nn.Linear(0, 4), torch.randn(3, 0)), (nn.Linear(16, 0), torch.randn(3, 16)),
                                       (nn.Conv2d(0, 4, 3), torch.randn(2, 0, 5, 5))], ids=["K=0", "O=0", "C=0"])
def test_an_empty_weight_stays_in_full_precision(module, x):
    """A layer whose weight has a dimension of size 0 has nothing to quantize: its first call failed with
    "amax(): Expected reduction dim 1 to have non-zero size". It is listed with the reason and computes as
    before, forward and backward."""
    with pytest.warns(UserWarning, match="an empty weight"):
        qm = int8fx.convert(module)
    (site,) = sites_of(qm)
    assert not site.converted and "empty weight" in site.reason
    x.requires_grad_()
    y = qm(x)
    assert torch.equal(y, module(x))
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_a_functional_site_with_an_empty_weight_computes_the_float_call():
    """A weight only the forward's call shows (F.linear(x, self.w)) is not checked at convert time; an empty one
    failed in the weight quantizer at the first call. It computes the float call (exact: nothing to round)."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(4, 0)), nn.Parameter(torch.randn(4))

        def forward(self, x):
            return F.linear(x, self.w, self.b)

    model = Functional()
    qm = int8fx.convert(model)
    x = torch.randn(3, 0, requires_grad=True)
    y = qm(x)
    assert torch.equal(y, model(x))
    y.sum().backward()
    assert torch.equal(qm.b.grad, torch.full((4,), 3.0))


def test_inspect_of_uninitialised_lazy_module():
    qm = int8fx.convert(nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU()))
    row = int8fx.inspect(qm).layers[0]
    assert not row.converted and "lazy" in row.reason


class _ScriptedParts(nn.Module):
    """A TorchScript conv stack, a TorchScript module with a weight of its own, and a plain conv."""

    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4) / 2)

        def forward(self, x):
            return F.linear(x.mean((2, 3)), self.w)

    def __init__(self):
        super().__init__()
        self.a = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
        self.b = nn.Conv2d(4, 4, 1)
        self.c = torch.jit.script(self.Mix())

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_torchscript_submodules_are_listed_in_full_precision_not_crashed():
    """A scripted submodule's code cannot be traced or changed, and a scripted conv is no nn.Conv2d: convert
    failed with "'_CachedForward' object has no attribute '__getattr__'". Now the scripted conv is a site
    kept in full precision with the reason, the scripted module with its own weight is listed as opaque, the
    rest converts, and the scripted parts compute as before and train: convert's copy makes their
    parameters leaves again (torch's deepcopy of a ScriptModule gives clones, which got no gradient)."""
    torch.manual_seed(0)
    model = _ScriptedParts()
    with pytest.warns(UserWarning, match=r"a\.0: a TorchScript module"):
        qm = int8fx.convert(model)
    by_name = {s.name: s for s in sites_of(qm)}
    assert set(by_name) == {"a.0", "b"}
    assert not by_name["a.0"].converted and "TorchScript" in by_name["a.0"].reason
    assert by_name["b"].converted and isinstance(qm.b, Int8Layer)
    rep = int8fx.inspect(qm, X)  # (with an example input: its shape hooks skip what cannot be hooked)
    assert [(o.name, o.type, o.weights) for o in rep.opaque] == [("c", "Mix", ("w",))]
    assert {r.name: r.input_shape for r in rep.layers} == {"a.0": (), "b": (4, 4, 4, 4)}
    assert torch.equal(qm.a(X), model.a(X))
    qm(X).sum().backward()  # the copy's scripted parts train (torch's deepcopy makes their parameters clones)
    assert all(p.is_leaf and p.grad is not None for p in qm.parameters())
    before = model.a(X)
    torch.optim.SGD(qm.parameters(), lr=0.1).step()  # the copy moves, the user's model does not
    assert not torch.equal(qm.a(X), before) and torch.equal(model.a(X), before)
    assert sum(isinstance(m, Int8Layer) for m in int8fx.to_float(qm).modules()) == 0


@pytest.mark.parametrize("script", [torch.jit.script, lambda m: torch.jit.trace(m, X)], ids=["script", "trace"])
def test_converting_a_torchscript_model_is_a_clear_error(script):
    with pytest.raises(TypeError, match="TorchScript module .* convert the nn.Module before scripting it"):
        int8fx.convert(script(nn.Sequential(nn.Conv2d(3, 4, 3))))


_EMPTY_AFTER_ONE = """
import torch, torch.nn as nn, int8fx
torch.manual_seed(0)
m = nn.Conv2d(32, 32, 3, padding=1)
qm = int8fx.convert(m)
for b in (2, 1, 0, 2):
    x = torch.randn(b, 32, 16, 16, requires_grad=True)
    y = qm(x)
    y.sum().backward()
    print(tuple(y.shape), tuple(x.grad.shape), bool(torch.isfinite(qm.weight.grad).all()), end="; ")
"""


def test_an_empty_batch_after_a_batch_of_one():
    """A site called with batch 1, then with an empty batch, crashed the process (segfault): the fused passes'
    dynamic variants were keyed on which dims are at most 1, so the empty batch ran the variant traced for
    batch 1, which indexed past the empty tensor (detectors meet empty batches of boxes). In a subprocess,
    as the crash would take the test run with it."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _EMPTY_AFTER_ONE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.split("; ")[:4] == [f"({b}, 32, 16, 16) ({b}, 32, 16, 16) True" for b in (2, 1, 0, 2)]


def test_torch_jit_trace_of_a_converted_model_is_a_clear_error():
    """TorchScript tracing cannot record the INT8 op (it failed inside torch with "Expected bool, got
    Tensor"); the error names what to use instead, and int8fx's own export still traces its stand-ins."""
    _, qm = conv_pair()
    with pytest.raises(RuntimeError, match="torch.jit.trace cannot record int8fx's INT8 op; use int8fx.export_onnx"):
        torch.jit.trace(qm.eval(), X)


def test_vmap_over_an_int8_site_is_a_clear_error():
    from torch.func import functional_call, grad, vmap

    _, qm = conv_pair()
    params = {k: v.detach() for k, v in qm.named_parameters()}

    def loss(p, xi):
        return functional_call(qm, p, (xi.unsqueeze(0),)).sum()

    with pytest.raises(RuntimeError, match="vmap over an INT8 conv/linear site .* is not supported"):
        vmap(grad(loss), in_dims=(None, 0))(params, X)


@pytest.mark.parametrize("functional", [False, True])
def test_torch_jit_script_of_a_converted_model_is_a_clear_error(functional):
    """TorchScript compilation failed with a type error about torch.fx's Proxy in a site's forward; it now
    names what to use instead, for module sites and for modules whose own code was rewritten."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.w)

    qm = int8fx.convert(nn.Sequential(Functional()) if functional else conv_pair()[0])
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile a converted model .*int8fx.export_onnx"):
        torch.jit.script(qm)
