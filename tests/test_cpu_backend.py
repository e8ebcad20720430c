"""The CPU's fast path (backend "torch": oneDNN's int8 GEMM, channels-last operands, fused passes) against
the exact reference: the same bits for every kind of site, and "auto" choosing between them by measurement.

Speed is not asserted here (benchmarks/cpu_step.py measures it); what is asserted is that choosing the
fast path never changes a number.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import int8fx
from int8fx import fusing
from int8fx.kernels import direct
from int8fx.kernels import geometry as geo
from int8fx.kernels import resolve_backend
from int8fx.kernels import cpu_report
from int8fx.kernels.probe import cpu_choice
from int8fx.kernels.torch_backend import TorchBackend, cpu_int_mm_wrong, int_mm_exact
from sites import SITES, assert_same, count_direct_calls, run_site

# backend "torch" is refused on a CPU whose torch._int_mm is not exact (the next tests say why)
pytestmark = pytest.mark.skipif(bool(cpu_int_mm_wrong()), reason=f"torch._int_mm not exact here: {cpu_int_mm_wrong()}")

_NO_VNNI = """
import torch
from int8fx.kernels import resolve_backend
from int8fx.kernels.probe import cpu_choice
from int8fx.kernels.torch_backend import cpu_int_mm_wrong
a, b = torch.full((64, 1024), 127, dtype=torch.int8), torch.full((1024, 64), 127, dtype=torch.int8)
print("EXACT" if torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()) else "INEXACT")
print("WRONG:" + cpu_int_mm_wrong())
print("AUTO:" + cpu_choice().backend)
try:
    resolve_backend("torch", torch.device("cpu"))
    print("TORCH:allowed")
except RuntimeError as e:
    print("TORCH:refused " + str(e))
"""


def test_a_cpu_without_int8_dot_products_never_runs_the_inexact_int_mm():
    """oneDNN capped to AVX2 (ONEDNN_MAX_CPU_ISA, read at process start: what a CPU without VNNI/AMX runs)
    saturates 16-bit pair sums: torch._int_mm got every sum of codes 127 wrong, and "auto" still took it
    when it timed faster (1.2x). Now the check finds it, "auto" takes the reference, and an explicit
    backend="torch" is refused with an error."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _NO_VNNI], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines()[1:])
    if out.stdout.startswith("EXACT"):
        pytest.skip("torch._int_mm stays exact on this CPU even with oneDNN capped to AVX2: nothing to show")
    assert "sums of a" in lines["WRONG"] and "saturates" in lines["WRONG"]
    assert lines["AUTO"] == "reference"
    assert lines["TORCH"].startswith("refused int8fx: backend='torch' is not exact on this CPU")

# ----------------------------------------------------------------------------- the GEMM itself

@pytest.mark.parametrize("M,K,N", [(1, 1, 2), (4, 1, 1), (1, 5, 1), (2, 1, 3), (7, 33, 5), (64, 300, 48)])
@pytest.mark.parametrize("a_major,b_major", [("row", "row"), ("col", "row"), ("row", "col"), ("col", "col")])
def test_int_mm_exact_any_layout(M, K, N, a_major, b_major):
    """Size-1 dims with odd strides made torch._int_mm return garbage (torch 2.14 CPU: [1, 2] with strides
    (1, 1), which `w.t()` of a [2, 1] weight is); int_mm_exact must be exact for every layout."""
    gen = torch.Generator().manual_seed(M * 100 + K * 10 + N)
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (K, N), dtype=torch.int8, generator=gen)
    a = a if a_major == "row" else a.t().contiguous().t()
    b = b if b_major == "row" else b.t().contiguous().t()
    want = a.long() @ b.long()
    for _ in range(3):  # garbage came from uninitialised memory: repeat
        assert torch.equal(int_mm_exact(a, b).long(), want)
    assert torch.equal(int_mm_exact(a, torch.tensor([[-127, 50]] * K, dtype=torch.int8).t().t()).long(),
                       a.long() @ torch.tensor([[-127, 50]] * K).long())


def test_int_mm_exact_size_one_weight_transpose():
    w = torch.tensor([[-127], [50]], dtype=torch.int8)  # [O=2, K=1]: w.t() has strides (1, 1)
    a = torch.tensor([[3]], dtype=torch.int8)
    for _ in range(5):
        assert int_mm_exact(a, w.t()).tolist() == [[-381, 150]]


def test_long_k_accumulates_in_int64():
    K = 140_000  # 127 * 127 * K > 2**31 - 1: the sum itself needs int64
    assert K > geo.MAX_K_PER_SPLIT
    a = torch.full((2, K), 127, dtype=torch.int8)
    b = torch.full((K, 3), 127, dtype=torch.int8)
    out = TorchBackend.bmm(a[None], b[None])
    assert out.dtype == torch.int64 and torch.equal(out[0], torch.full((2, 3), 127 * 127 * K, dtype=torch.int64))


def test_depthwise_weight_gradient_sums_in_int64_where_int32_could_overflow():
    """A depthwise dW sums 127^2 x (batch x positions) at most: int32 up to 2^31 (16 images at 32x32 and far
    beyond; int64 on a torch whose inductor cannot compile int32 sums: `fusing.SUM_DTYPE`), int64 past it, both
    exact (here every product is 127^2, so the sums are known)."""
    from int8fx.kernels.nhwc import _dw_grad_weight

    for side, dtype in ((64, fusing.SUM_DTYPE), (366, torch.int64)):  # 127^2 x 366^2 > 2^31 - 1
        dy = torch.full((1, side, side, 2), 127, dtype=torch.int8)
        x = torch.full((1, side, side, 2), -127, dtype=torch.int8)
        dw = _dw_grad_weight(dy, x, (1, 1), (1, 1), (1, 1))
        assert dw.dtype == dtype and torch.equal(dw.long(), torch.full((2, 1, 1), -127 * 127 * side * side))


# ----------------------------------------------------------------------------- whole sites, both backends

@pytest.mark.parametrize("site", sorted(SITES))
@pytest.mark.parametrize("grad_quant,rounding", [("per-tensor", "nearest"), ("gvq-mcs", "stochastic")])
def test_torch_backend_equals_reference(site, grad_quant, rounding):
    make, shape = SITES[site]
    assert_same(run_site(make, shape, "reference", grad_quant, rounding), run_site(make, shape, "torch", grad_quant, rounding))


@pytest.mark.skipif(not fusing.COMPILE, reason="INT8FX_COMPILE=0: only the eager forms run")
@pytest.mark.parametrize("site", ["conv2d-strided-grouped", "conv2d-dilated-asym", "conv2d-depthwise", "linear-3d-input"])
def test_passes_compiled_for_exact_shapes_equal_reference(site, monkeypatch):
    """A real model's big tensors take every pass compiled for their exact shapes (int8fx.fusing.STATIC), the
    im2col gather included; here every tensor does, and the bits are still the reference's."""
    monkeypatch.setattr(fusing, "SMALL", 1)
    monkeypatch.setattr(fusing, "STATIC", 1)
    monkeypatch.setattr(fusing, "STATIC_AFTER", 1)  # (a model compiles them at a shape's third call)
    make, shape = SITES[site]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="int8fx: .* runs eagerly")  # a compile that fell back: fail
        fast = run_site(make, shape, "torch", "gvq-mcs", "stochastic")
    monkeypatch.setattr(fusing, "COMPILE", False)
    assert_same(run_site(make, shape, "reference", "gvq-mcs", "stochastic"), fast)


@pytest.mark.skipif(not fusing.COMPILE, reason="INT8FX_COMPILE=0: only the eager forms run")
def test_geometry_given_as_numpy_integers_computes_its_own_values(monkeypatch):
    """Libraries compute conv geometry in numpy (pytorchvideo's R(2+1)D builds Conv3d strides of np.int64).
    Two sites on one input whose strides differ only in such values each compute their own conv, the same
    bits as with Python ints. The compiled im2col was keyed on those values' type alone, so the second site
    ran the first one's stride (pytorchvideo's r2plus1d_r50 failed with "shape '[2, 4, 4, 4, 1024]' is
    invalid"; where the output sizes agreed it would have been silently wrong)."""
    import numpy as np

    monkeypatch.setattr(fusing, "SMALL", 1)
    monkeypatch.setattr(fusing, "STATIC", 1)
    monkeypatch.setattr(fusing, "EXACT_TRACED", 1)
    monkeypatch.setattr(fusing, "STATIC_AFTER", 1)

    class TwoStrides(nn.Module):
        def __init__(self, to_int):
            super().__init__()
            self.a = nn.Conv3d(8, 16, 1, stride=tuple(map(to_int, (1, 2, 2))))
            self.b = nn.Conv3d(8, 16, 1, stride=tuple(map(to_int, (2, 2, 2))))

        def forward(self, x):
            return torch.cat([self.a(x).flatten(1), self.b(x).flatten(1)], 1)

    x = torch.randn(2, 8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    runs = []
    for to_int in (int, np.int64):
        torch.manual_seed(0)
        qm = int8fx.convert(TwoStrides(to_int), int8fx.Int8Config(backend="torch"))
        torch.manual_seed(1)
        out = qm(x)
        out.square().sum().backward()
        runs.append([out] + [p.grad for p in qm.parameters()])
    assert runs[1][0].shape == (2, 16 * (4 * 4 * 4 + 2 * 4 * 4))
    for a, b in zip(*runs):
        assert torch.equal(a, b)

@pytest.mark.parametrize("grad_quant", ["dsgc", "mcs", "gvq", "gvq-mcs-search"])
def test_torch_backend_equals_reference_every_policy(grad_quant):
    make, shape = SITES["conv2d-strided-grouped"]
    assert_same(run_site(make, shape, "reference", grad_quant, "stochastic"),
                 run_site(make, shape, "torch", grad_quant, "stochastic"))


@pytest.mark.parametrize("site", ["conv2d", "conv2d-depthwise", "conv2d-dilated-asym"])
def test_channels_last_input_and_double(site):
    make, shape = SITES[site]
    ref = run_site(make, shape, "reference", "gvq-mcs", "stochastic")
    assert_same(ref, run_site(make, shape, "torch", "gvq-mcs", "stochastic", channels_last=True))
    assert_same(run_site(make, shape, "reference", "per-tensor", "nearest", dtype=torch.float64),
                 run_site(make, shape, "torch", "per-tensor", "nearest", dtype=torch.float64))


@pytest.mark.parametrize("site", ["conv2d", "conv2d-depthwise", "conv3d"])
def test_fast_path_layouts_follow_torch_and_outputs_are_not_views(site):
    """Output and dX layouts as torch's own conv gives them: contiguous for a contiguous input (so user code
    such as `y.view(n, -1)` on a conv output works), channels-last for a channels-last input or weight; the
    output a tensor of its own: in-place ops on it (ReLU(inplace=True)) must not touch anything else."""
    make, shape = SITES[site]
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    qm = int8fx.convert(make(), int8fx.Int8Config(backend="torch"))
    fp = make()
    for channels_last in (False, True):
        x = torch.randn(shape)
        if channels_last:
            x = x.to(memory_format=fmt)
        x.requires_grad_()
        y, y_fp = qm(x), fp(x)
        assert y.stride() == y_fp.stride() and y._base is None
        (y.reshape if channels_last else y.view)(y.shape[0], -1).sum().backward()  # view: raised before
        dx = x.grad
        x.grad = None
        y_fp.sum().backward()
        assert dx.stride() == x.grad.stride()
        qm(x.detach()).relu_()  # allowed: not a view of a tensor autograd saved
    fp_cl = make().to(memory_format=fmt)  # a channels-last weight, a contiguous input
    qm_cl = int8fx.convert(fp_cl, int8fx.Int8Config(backend="torch"))
    x = torch.randn(shape)
    assert qm_cl(x).stride() == fp_cl(x).stride()


def test_whole_model_steps_agree(monkeypatch):
    """A small CNN with BN, residual-free depthwise layers and pooling, three SGD steps on both backends. The
    sites compute the same bits (tests above), but the fast path hands conv outputs on channels-last, and
    BatchNorm / pooling reduce a channels-last tensor in another order: the model's float ops may round
    differently in the last bit. So: the same losses, and every gradient that is not rounding noise (the
    bias of a conv in front of a BN has a zero gradient up to rounding) at cosine 1 - 1e-6. The fused passes
    run eagerly (compiling them was ~50 s of a cold cache): compiled, they give the same bits, site by site
    (test_passes_compiled_for_exact_shapes_equal_reference, tests/test_fused.py)."""
    def model():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                             nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                             nn.Conv2d(16, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))

    monkeypatch.setattr(fusing, "COMPILE", False)
    runs = []
    for backend in ("reference", "torch"):
        qm = int8fx.convert(model(), int8fx.Int8Config(backend=backend))
        opt = torch.optim.SGD(qm.parameters(), lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        steps = []
        for _ in range(3):
            x, t = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(qm(x), t)
            loss.backward()
            steps.append((loss.item(), [p.grad.clone() for p in qm.parameters()]))
            opt.step()
        runs.append(steps)
    for (loss_ref, g_ref), (loss_fast, g_fast) in zip(*runs):
        assert loss_fast == pytest.approx(loss_ref, rel=1e-6)
        for a, b in zip(g_ref, g_fast):
            if a.norm() > 1e-6:
                assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 1 - 1e-6


# ----------------------------------------------------------------------------- "auto"

def test_auto_follows_the_measured_choice():
    choice = cpu_choice()
    assert choice.backend in ("torch", "reference")
    assert resolve_backend("auto", torch.device("cpu")).name == choice.backend
    if choice.speedup:  # measured (0 only where this torch build has no CPU _int_mm)
        assert len(choice.timings) > 0 and all(t["int_mm_s"] > 0 and t["reference_s"] > 0 for t in choice.timings.values())
        assert (choice.backend == "torch") == (choice.speedup >= 1.1)
    report = cpu_report()
    assert choice.cpu in report and choice.reason in report


# ------------------------------------------------- oneDNN's direct conv (int8 form; fp32: test_direct_fp32.py)

needs_direct = pytest.mark.skipif(not direct.exact(), reason="this CPU's oneDNN int8 conv is not exact (no VNNI/AMX)")


@needs_direct
@pytest.mark.parametrize("dims,stride,padding", [(2, 1, 1), (2, 2, 1), (1, 1, 1), (3, 2, 0)])
def test_direct_conv_integers_are_exact_at_the_bound(dims, stride, padding):
    """K = window x C/g at EXACT_K and every code at +-127, the worst case for fp32 and for saturating
    16-bit pair sums: the integers equal float64 conv of the codes."""
    from int8fx.kernels.im2col import GemmSpec

    kernel, groups, dilation = 2 if dims == 3 else 3, 1, 1
    c = direct.EXACT_K // kernel**dims
    o = 2
    gen = torch.Generator().manual_seed(dims)
    x = (torch.randint(0, 2, (2, c) + (7,) * dims, generator=gen) * 254 - 127).to(torch.int8)
    x[0] = 127
    w = (torch.randint(0, 2, (o, c // groups) + (kernel,) * dims, generator=gen) * 254 - 127).to(torch.int8)
    w[0] = 127
    spec = GemmSpec(dims, (kernel,) * dims, (stride,) * dims, ((padding, padding),) * dims, (dilation,) * dims, groups)
    assert direct._ordinary(spec, x.shape[2:])  # a geometry the direct path takes
    xq_cl = x.movedim(1, -1).contiguous()
    w_gemm = w.movedim(1, -1).reshape(groups, o // groups, -1).transpose(1, 2)  # [g, K/g, O/g], (kernel, channel)
    got = direct.conv(xq_cl, w_gemm, spec)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    want = conv(x.double(), w.double(), None, stride, padding, dilation, groups).movedim(1, -1)
    assert got.dtype == torch.float32 and torch.equal(got.double(), want)
    assert float(want.abs().max()) == 127 * 127 * (c // groups) * kernel**dims  # the bound was reached


def test_direct_conv_only_where_exact(monkeypatch):
    """Never past EXACT_K (fp32 would round the unsigned sums), never the int8 form on the reference backend,
    nothing where `exact()` failed (a CPU whose int8 conv saturates)."""
    monkeypatch.setattr(direct, "MODE", "always")
    calls = count_direct_calls(monkeypatch)
    long_k = lambda: nn.Conv2d(64, 64, 3, padding=1)  # K = 9 x 64 = 576 > EXACT_K, for dX's conv too
    monkeypatch.setattr(direct, "weight_grad_usable", lambda *a: False)
    assert_same(run_site(long_k, (2, 64, 5, 5), "reference", "per-tensor", "nearest"),
                run_site(long_k, (2, 64, 5, 5), "torch", "per-tensor", "nearest"))
    assert ("conv", "int8") not in calls  # (the reference's fp32 form takes K <= 1040)
    make, shape = SITES["conv2d"]
    calls.clear()
    run_site(make, shape, "reference", "per-tensor", "nearest")
    assert calls and all(form == "fp32" for _, form in calls)
    calls.clear()
    monkeypatch.setattr(direct, "exact", lambda form="int8": False)
    run_site(make, shape, "torch", "per-tensor", "nearest")
    run_site(make, shape, "reference", "per-tensor", "nearest")
    assert calls == []


@needs_direct
def test_direct_conv_not_where_onednn_is_wrong(monkeypatch):
    """An output one position wide (oneDNN's sums were wrong for some such geometries) keeps the GEMM, and
    a geometry whose direct sums disagree with the GEMM's when it is timed keeps the GEMM, with a warning."""
    monkeypatch.setattr(direct, "MODE", "always")
    calls = count_direct_calls(monkeypatch)
    one_wide = lambda: nn.Conv2d(2, 3, 3, stride=(1, 3))
    assert_same(run_site(one_wide, (3, 2, 9, 4), "reference", "per-tensor", "nearest"),
                run_site(one_wide, (3, 2, 9, 4), "torch", "per-tensor", "nearest"))
    assert calls == []
    monkeypatch.setattr(direct, "MODE", "measure")
    monkeypatch.setattr(direct.CHOICES, "decided", {})
    monkeypatch.setattr(direct.CHOICES, "calls", {})
    real_conv, real_dw = direct.conv, direct.grad_weight
    monkeypatch.setattr(direct, "conv", lambda *a: real_conv(*a) + 1)  # wrong sums
    monkeypatch.setattr(direct, "grad_weight", lambda *a: real_dw(*a) + 1)
    make, shape = SITES["conv2d"]
    with pytest.warns(UserWarning, match="keeps the GEMM"):
        runs = [run_site(make, shape, "torch", "per-tensor", "nearest") for _ in range(3)]
    assert direct.decisions() and not any(direct.decisions().values())
    for r in runs[1:]:
        assert_same(runs[0], r)


@needs_direct
@pytest.mark.parametrize("make, shape", [
    # 8 groups of 24 channels at 28x28: oneDNN's int8 conv got 131,712 of 150,528 sums wrong (visformer_tiny)
    (lambda: nn.Conv2d(192, 192, 3, padding=1, groups=8), (1, 192, 28, 28)),
    # dilation 2: oneDNN's int8 conv corrupted the heap for this one (the process aborted)
    (lambda: nn.Conv2d(50, 47, 3, padding=2, dilation=2), (1, 50, 9, 45)),
])
def test_direct_conv_never_runs_grouped_or_dilated_convs(make, shape, monkeypatch):
    """Forced on ("always"), the direct conv still leaves grouped and dilated convs to the GEMM, whose
    integers are the reference's."""
    monkeypatch.setattr(direct, "MODE", "always")
    calls = count_direct_calls(monkeypatch)
    assert_same(run_site(make, shape, "reference", "per-tensor", "nearest"),
                run_site(make, shape, "torch", "per-tensor", "nearest"))
    assert calls == []


@needs_direct
@pytest.mark.parametrize("direct_faster", [True, False])
def test_direct_conv_chosen_by_measurement_once_per_geometry(direct_faster, monkeypatch):
    """The first DECIDE_AT - 1 calls of a geometry take the GEMM; the DECIDE_AT-th times both and keeps the
    faster for every later call; the numbers are the same whichever runs."""
    monkeypatch.setattr(direct.CHOICES, "decided", {})
    monkeypatch.setattr(direct.CHOICES, "calls", {})
    timed = []

    def fake_best_of(fn, reps=2, warmup=False):
        out = fn()
        is_direct = fn.__code__ is not None and "direct" in fn.__code__.co_names
        timed.append(is_direct)
        return (1.0 if is_direct == direct_faster else 2.0), out

    monkeypatch.setattr(direct, "best_of", fake_best_of)
    calls = count_direct_calls(monkeypatch)
    make, shape = SITES["conv2d"]
    ref = run_site(make, shape, "reference", "per-tensor", "nearest")
    runs = [run_site(make, shape, "torch", "per-tensor", "nearest") for _ in range(3)]  # 2 steps each: forward, dX
    for r in runs:
        assert_same(ref, r)
    assert sorted(timed) == [False] * 3 + [True] * 3  # forward's, dX's and dW's geometry, each timed once
    assert len(direct.decisions()) == 3 and all(v == direct_faster for v in direct.decisions().values())
    # third call of each geometry decided; later calls of the direct-faster geometries run it
    assert (len(calls) > 3) == direct_faster  # (3: the timings)


@pytest.mark.parametrize("mode", ["always", "never"])
@pytest.mark.parametrize("cin,cout,k,stride,groups,size,batch,pad", [
    (8, 48, 3, 1, 2, 3, 2, 1),  # fewer im2col rows than output channels (a late layer)
    (16, 16, 3, 1, 1, 12, 4, 1),  # a large map with few channels: the direct conv's forward and dX
    (6, 12, 3, 2, 3, 7, 2, 1),  # strided, grouped
    (4, 40, 3, 1, 1, 2, 1, 1),  # both at once
    (1, 16, 3, 1, 1, 9, 3, 1),  # one input channel (a grayscale stem): the im2col's per-position copies
    (2, 8, 3, 2, 1, 7, 2, 1),  # two, strided
    (4, 8, 2, 2, 2, 6, 2, 0),  # windows that tile the input (a patchify conv): dX's col2im is a permutation
    (3, 8, 4, 4, 1, 8, 2, 0),  # the same, 4x4
])
def test_site_integers_equal_float64_conv(mode, cin, cout, k, stride, groups, size, batch, pad, monkeypatch):
    """The CPU pipeline's integers against float64 autograd of torch's conv (exact at these magnitudes),
    not against another run of the same pipeline: codes whose absmax is 127 per tensor (x, dY) and per
    output channel (W) make every scale 1, so the outputs are the integer sums themselves."""
    from test_property import int_tensor

    monkeypatch.setattr(direct, "MODE", mode)
    gen = torch.Generator().manual_seed(cin + cout)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups, bias=False)
    x, w = int_tensor((batch, cin, size, size), gen), int_tensor(tuple(conv.weight.shape), gen, absmax_rows=1)
    with torch.no_grad():
        conv.weight.copy_(w.float())
    layer = int8fx.convert(conv, int8fx.Int8Config(grad_quant="per-tensor", rounding="nearest", backend="torch"))
    xf = x.float().requires_grad_()
    y = layer(xf)
    dy = int_tensor(tuple(y.shape), gen)
    y.backward(dy.float())
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    yd = F.conv2d(xd, wd, None, stride, pad, 1, groups)
    yd.backward(dy.double())
    assert torch.equal(y.detach().double(), yd.detach())
    assert torch.equal(xf.grad.double(), xd.grad) and torch.equal(layer.weight.grad.double(), wd.grad)


ROW_WINDOW_CASES = [  # dims, kernel, stride, padding, dilation, channels, input size
    (2, (7, 7), 2, 3, 1, 3, (23, 19)),  # a ResNet stem
    (2, (3, 3), 1, 1, 1, 5, (9, 8)),
    (2, (3, 1), (2, 1), (1, 0), (2, 1), 4, (11, 7)),  # dilation along the first dim only
    (2, (2, 3), 1, "same", 1, 2, (6, 7)),  # asymmetric padding
    (1, (5,), 3, 2, 1, 3, (17,)),
    (3, (3, 3, 3), (1, 2, 2), 1, 1, 3, (5, 7, 6)),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("case", ROW_WINDOW_CASES, ids=lambda c: f"{c[0]}d-k{c[1]}-c{c[5]}")
def test_row_window_im2col_equals_the_gather(case, device):
    """The GPU's alternative im2col (one strided view of the padded rows, `windows.row_windows`) makes the same
    bytes as the gather, and `_measured` returns them whichever candidate it picks."""
    from int8fx.kernels import windows
    from int8fx.nn.modules import make_spec

    dims, kernel, stride, padding, dilation, c, sizes = case
    spec = make_spec(dims, kernel, stride, padding, dilation, 1)
    xq = torch.randint(-127, 128, (2, *sizes, c), dtype=torch.int8, device=device)
    want = windows.gather_windows.eager(xq, spec.kernel, spec.stride, spec.padding, spec.dilation, 1)
    got = windows.row_windows(xq, spec, spec.out_size(sizes))
    assert got.shape == want.shape and torch.equal(got, want)
    for _ in range(windows.DECIDE_AT + 1):  # before, at and after the shape's measurement
        assert torch.equal(windows.im2col(xq, spec)[0], want)


def test_faster_of_trusts_its_first_candidate_until_measured_and_against_a_disagreement():
    """`probe.FasterOf`: the trusted candidate until a key's `decide_at`-th call, which times both and keeps
    the faster; a candidate whose result differs, or that fails, is never kept, with a warning."""
    from int8fx.kernels.probe import FasterOf

    times = {"trusted": 2.0, "other": 1.0}
    ran = []

    def timer(fn, key):
        out = fn()
        return times[out[0]], out

    def candidate(name, value):
        return lambda: ran.append(name) or (name, value)

    choose = FasterOf(("trusted", "other"), timer, decide_at=3, same=lambda a, b: a[1] == b[1])
    trusted, other = candidate("trusted", 1), candidate("other", 1)
    assert [choose("k", trusted, other) for _ in range(3)] == [("trusted", 1)] * 3
    assert ran == ["trusted", "trusted", "trusted", "other"] and choose.decided == {"k": 1}
    assert choose("k", trusted, other) == ("other", 1)
    times["trusted"] = 0.5  # a slower candidate is not kept
    choose("j", trusted, other), choose("j", trusted, other), choose("j", trusted, other)
    assert choose.decided["j"] == 0
    with pytest.warns(UserWarning, match="other gave other numbers than trusted"):
        for _ in range(3):
            assert choose("d", trusted, candidate("other", 2)) == ("trusted", 1)
    assert choose.decided["d"] == 0

    def fails():
        raise RuntimeError("refused")
    with pytest.warns(UserWarning, match="other failed .* keeps trusted"):
        for _ in range(3):
            assert choose("f", trusted, fails) == ("trusted", 1)
    assert choose.decided["f"] == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("case", ROW_WINDOW_CASES, ids=lambda c: f"{c[0]}d-k{c[1]}-c{c[5]}")
def test_transposed_im2col_equals_the_rows_transposed(case, groups, device):
    """The weight gradient's B operand on CUDA (`windows.im2col_transposed`, [g, K/g, M] contiguous): the rows'
    im2col transposed, written so by the gather, and on every call before, at and after the measured choice."""
    from int8fx.kernels import windows
    from int8fx.nn.modules import make_spec

    dims, kernel, stride, padding, dilation, c, sizes = case
    spec = make_spec(dims, kernel, stride, padding, dilation, groups)
    xq = torch.randint(-127, 128, (2, *sizes, c * groups), dtype=torch.int8, device=device)
    want = windows.gather_windows.eager(xq, spec.kernel, spec.stride, spec.padding, spec.dilation, groups)
    gathered = windows.gather_windows.eager(xq, spec.kernel, spec.stride, spec.padding, spec.dilation, groups, True)
    assert torch.equal(gathered, want.transpose(1, 2))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="int8fx: .* that geometry keeps")
        for _ in range(windows.DECIDE_AT + 1):
            got = windows.im2col_transposed(xq, spec)
            assert got.is_contiguous() and torch.equal(got, want.transpose(1, 2))


@pytest.mark.parametrize("policy", [("per-tensor", "nearest"), ("gvq-mcs", "stochastic")])
@pytest.mark.parametrize("site", sorted(SITES))
def test_gpu_operand_layouts_equal_reference_on_the_cpu(site, policy, monkeypatch):
    """The forms only CUDA sites take (`windows.gpu_layouts`: dW from the transposed im2col and from dY
    quantized column-major, the im2col variant measured per shape), run here through the CPU's GEMMs,
    oneDNN's direct conv off: every output and gradient equals the reference's, on the steps before, at and
    after the measurement, with nearest and with stochastic rounding (whose draws follow dY's row-major index
    whatever the layout it is stored in). The reference runs before the forms are switched on: on the CPU
    it shares the channels-last pipeline, and would take them too."""
    from int8fx.kernels import windows

    monkeypatch.setattr(direct, "MODE", "never")
    make, shape = SITES[site]
    want = run_site(make, shape, "reference", *policy)
    monkeypatch.setattr(windows, "gpu_layouts", lambda t: True)
    for chooser in (windows.ROWS, windows.TRANSPOSED):
        monkeypatch.setattr(chooser, "decided", {})
        monkeypatch.setattr(chooser, "calls", {})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="int8fx: .* that geometry keeps")  # a copy the measurement dropped
        for _ in range(windows.DECIDE_AT):
            assert_same(want, run_site(make, shape, "torch", *policy))


def test_cupy_backend_is_for_capable_gpus_and_says_so_elsewhere():
    """The "cupy" backend resolves to the reference for CPU tensors; called on them directly, it says what it
    needs instead of falling back silently."""
    from int8fx.kernels import available_backends
    from int8fx.kernels.cupy_backend import CupyBackend

    if "cupy" in available_backends():
        assert resolve_backend("cupy", torch.device("cpu")).name == "reference"
    a = torch.zeros(1, 20, 16, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="compute capability >= 8.0"):
        CupyBackend().bmm(a, a.transpose(1, 2))
