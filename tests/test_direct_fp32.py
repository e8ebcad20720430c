"""oneDNN's fp32 convolution as an exact integer conv (int8fx.kernels.direct, form "fp32"): what the
reference backend runs on a CPU without int8 dot products, and dW on either CPU backend. It runs on every
CPU, so these tests do too; the site test covers the int8 form as well where it is exact
(tests/test_cpu_backend.py has the int8 form's other tests).

Every product of two codes is at most 127^2, so a sum of at most 1040 of them is exact in fp32 in any order:
the forward is taken within K <= 1040, dW by chunks of the batch of at most 1040 output positions. The
tests hold the direct results to the GEMM's bits and to float64 convs at the bounds.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from int8fx.kernels import direct
from int8fx.kernels.im2col import GemmSpec
from int8fx.kernels.torch_backend import cpu_int_mm_wrong
from sites import SITES, assert_same, count_direct_calls, direct_kinds, run_site

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def test_the_fp32_form_passes_its_worst_cases_here():
    """oneDNN's fp32 conv is exact wherever torch has oneDNN: its one-time probe (`direct.exact`) passes."""
    assert direct.exact("fp32")

_INT8_FORM = pytest.mark.skipif(not direct.exact("int8") or bool(cpu_int_mm_wrong()),
                                reason="this CPU's oneDNN int8 kernels are not exact (no VNNI/AMX)")


@pytest.mark.parametrize("backend,form", [("reference", "fp32"), pytest.param("torch", "int8", marks=_INT8_FORM)])
@pytest.mark.parametrize("site", sorted(SITES))
def test_direct_paths_equal_the_reference_gemm(site, backend, form, monkeypatch):
    """Forced on ("always"), a backend's direct forward and stride-1 dX (the reference's fp32 form, the
    "torch" backend's int8 form) and the fp32 dW give the bits of the reference's im2col + GEMM ("never"),
    on exactly the plain conv sites."""
    make, shape = SITES[site]
    monkeypatch.setattr(direct, "MODE", "never")
    gemm = run_site(make, shape, "reference", "gvq-mcs", "stochastic")
    monkeypatch.setattr(direct, "MODE", "always")
    calls = count_direct_calls(monkeypatch)
    assert_same(gemm, run_site(make, shape, backend, "gvq-mcs", "stochastic"))
    assert {kind for kind, _ in calls} == direct_kinds(site)
    assert all(f == (form if kind == "conv" else "fp32") for kind, f in calls), calls


def _codes(shape, gen) -> torch.Tensor:
    """int8 codes at +-127 only: every product at the bound 127^2."""
    return (torch.randint(0, 2, shape, generator=gen) * 254 - 127).to(torch.int8)


@pytest.mark.parametrize("dims,stride,padding", [(2, 1, 1), (2, 2, 1), (1, 1, 1), (3, 2, 0)])
def test_fp32_conv_integers_are_exact_at_the_bound(dims, stride, padding):
    """K = window x C at 1040 (as near as the window allows) and every code at +-127: the fp32 conv's sums
    equal float64 conv of the codes, and the largest reaches 127^2 x K (beyond 2^23: one rounding would show)."""
    kernel = 2 if dims == 3 else 3
    c = direct.EXACT_K_FP32 // kernel**dims
    gen = torch.Generator().manual_seed(dims)
    x, w = _codes((2, c) + (7,) * dims, gen), _codes((2, c) + (kernel,) * dims, gen)
    x[0], w[0] = 127, 127
    w[0].view(-1)[0] = 126  # an odd sum
    spec = GemmSpec(dims, (kernel,) * dims, (stride,) * dims, ((padding, padding),) * dims, (1,) * dims, 1)
    assert direct._ordinary(spec, x.shape[2:])
    w_gemm = w.movedim(1, -1).reshape(1, 2, -1).transpose(1, 2)  # [g, K, O], (kernel, channel) order
    got = direct.conv(x.movedim(1, -1).contiguous(), w_gemm, spec, "fp32")
    want = (F.conv1d, F.conv2d, F.conv3d)[dims - 1](x.double(), w.double(), None, stride, padding).movedim(1, -1)
    assert got.dtype == torch.float32 and torch.equal(got.double(), want)
    assert float(want.abs().max()) == 127 * 127 * (c * kernel**dims - 1) + 127 * 126 > 2**23


@pytest.mark.parametrize("batch,size,stride", [(5, (26, 40), 1), (3, (9, 13), 2), (1, (32, 32), 1)])
def test_fp32_weight_gradient_is_exact_beyond_one_chunk(batch, size, stride):
    """dW sums over batch x positions, far beyond what fp32 holds (here up to 5 x 1040 x 127^2 > 2^26): the
    chunks of at most 1040 output positions, added in fp64, equal float64's weight gradient exactly."""
    gen = torch.Generator().manual_seed(batch)
    spec = GemmSpec(2, (3, 3), (stride,) * 2, ((1, 1),) * 2, (1, 1), 1)
    x = _codes((batch, 3) + size, gen)
    x[:, :, 2:] = 127
    out = spec.out_size(size)
    dq = _codes((batch * out[0] * out[1], 4), gen)
    dq[:, 0] = 127
    x_cl = x.movedim(1, -1).contiguous().movedim(-1, 1)  # the saved activation's channels-last storage
    got = direct.grad_weight(dq, x_cl, spec, (4, 3, 3, 3))
    dy = dq.view(batch, *out, 4).movedim(-1, 1).double()
    want = torch.ops.aten.convolution_backward(dy, x.double(), x.double().new_empty(4, 3, 3, 3), None, [stride] * 2,
                                               [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])[1]
    assert torch.equal(got.double(), want)
    assert batch * out[0] * out[1] <= direct.EXACT_K_FP32 or float(want.abs().max()) > 2**24


def test_weight_gradient_not_where_an_image_has_more_positions_than_one_chunk():
    """An output map of more than 1040 positions cannot be cut by images: dW keeps the GEMM."""
    from int8fx.kernels import resolve_backend

    be = resolve_backend("reference", torch.device("cpu"))
    spec = GemmSpec(2, (3, 3), (1, 1), ((1, 1),) * 2, (1, 1), 1)
    assert direct.weight_grad_usable(be, torch.zeros(2, 4, 32, 32, dtype=torch.int8), spec)  # 1024 positions
    assert not direct.weight_grad_usable(be, torch.zeros(2, 4, 33, 32, dtype=torch.int8), spec)  # 1056


_CAPPED = """
import sys
sys.path.insert(0, {tests!r})
import torch
from int8fx.kernels import direct
from sites import SITES, assert_same, run_site
print("INT8:" + str(direct.exact("int8")), "FP32:" + str(direct.exact("fp32")))
calls = []
real_conv, real_dw = direct.conv, direct.grad_weight
direct.conv = lambda *a: calls.append(a[3]) or real_conv(*a)
direct.grad_weight = lambda *a: calls.append("dW") or real_dw(*a)
for site in ("conv2d", "conv2d-1x1-no-bias"):
    make, shape = SITES[site]
    direct.MODE = "never"
    gemm = run_site(make, shape, "auto", "gvq-mcs", "stochastic")
    direct.MODE = "always"
    assert_same(gemm, run_site(make, shape, "auto", "gvq-mcs", "stochastic"))
print("CALLS:" + ",".join(sorted(set(calls))))
"""


def test_a_cpu_without_int8_dot_products_takes_the_exact_fp32_form():
    """oneDNN capped to AVX2 (what a CPU without VNNI/AMX runs; tests/test_cpu_backend.py): its int8 conv is
    not exact and is never taken, while its fp32 conv and weight gradient, other kernels than this CPU's
    own, give the GEMM's bits on the backend "auto" picks there (the reference)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    code = _CAPPED.format(tests=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(":", 1) for line in out.stdout.split())
    assert lines["FP32"] == "True"
    assert set(lines["CALLS"].split(",")) == {"fp32", "dW"}  # never "int8"


def test_a_direct_conv_that_fails_leaves_its_geometry_to_the_gemm(monkeypatch):
    """oneDNN refusing a geometry when it is timed (never seen; a build could) costs a warning, not the
    training step: the geometry keeps the GEMM, and every step's numbers are the GEMM's."""
    monkeypatch.setattr(direct, "MODE", "never")
    make, shape = SITES["conv2d"]
    want = run_site(make, shape, "reference", "per-tensor", "nearest")
    monkeypatch.setattr(direct, "MODE", "measure")
    monkeypatch.setattr(direct.CHOICES, "decided", {})
    monkeypatch.setattr(direct.CHOICES, "calls", {})

    def refuse(*a):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(direct, "conv", refuse)
    monkeypatch.setattr(direct, "grad_weight", refuse)
    with pytest.warns(UserWarning, match="direct conv failed .* keeps the GEMM"):
        runs = [run_site(make, shape, "reference", "per-tensor", "nearest") for _ in range(2)]  # 4 calls each
    assert len(direct.decisions()) == 3 and not any(direct.decisions().values())
    for r in runs:
        assert_same(want, r)
