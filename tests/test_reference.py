"""The exact integer path: GEMM and im2col/col2im equal a naive int64 computation element for element."""
import itertools

import pytest
import torch

from int8fx.kernels.im2col import fold, from_cols, to_cols, unfold
from int8fx.kernels.reference import EXACT_K, exact_int_bmm, exact_sum_dtype, naive_int64_bmm
from int8fx.nn.modules import make_spec


def _ints(*shape, lo=-127, hi=127):
    return torch.randint(lo, hi + 1, shape, dtype=torch.int8)


@pytest.mark.parametrize("g,m,k,n", [(1, 7, 5, 3), (3, 33, 1039, 9), (2, 17, 1040, 5), (1, 9, 1041, 4), (2, 5, 4000, 6)])
def test_exact_bmm_equals_int64(g, m, k, n):
    a, b = _ints(g, m, k), _ints(g, k, n)
    got = exact_int_bmm(a, b)
    assert torch.equal(got.to(torch.int64), naive_int64_bmm(a, b))


def test_exact_bmm_worst_case_magnitudes():
    """All products at the extreme +-127*127: the chunk boundary at K = 1040 is exactly where fp32
    would start to round, so this fails if EXACT_K is raised by one chunk or accumulation goes fp32."""
    for k in (EXACT_K, EXACT_K + 1, 3 * EXACT_K + 7):
        a = torch.full((1, 2, k), 127, dtype=torch.int8)
        b = torch.full((1, k, 2), 127, dtype=torch.int8)
        b[0, :, 1] = -127
        got = exact_int_bmm(a, b).to(torch.int64)
        assert got[0, 0, 0].item() == 127 * 127 * k and got[0, 0, 1].item() == -127 * 127 * k


def test_exact_bmm_ignores_global_tf32_or_bf16_precision():
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        a, b = _ints(1, 64, 1000), _ints(1, 1000, 64)
        assert torch.equal(exact_int_bmm(a, b).to(torch.int64), naive_int64_bmm(a, b))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(prev)


def test_exact_bmm_transposed_views():
    a, b = _ints(2, 40, 30), _ints(2, 50, 40)
    got = exact_int_bmm(a.float().transpose(1, 2), b.float().transpose(1, 2))
    assert torch.equal(got.to(torch.int64), naive_int64_bmm(a.transpose(1, 2), b.transpose(1, 2)))


def _naive_conv_int64(x, w, stride, padding, dilation, groups):
    """Direct definition of a grouped N-d convolution, in int64, by looping over kernel offsets."""
    nd = x.dim() - 2
    n, c = x.shape[:2]
    o, cg = w.shape[:2]
    xp = torch.nn.functional.pad(x.to(torch.int64), [p for lohi in reversed(padding) for p in lohi])
    out = [(xp.shape[2 + i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1 for i in range(nd)]
    y = torch.zeros((n, o, *out), dtype=torch.int64)
    og = o // groups
    for offs in itertools.product(*(range(k) for k in w.shape[2:])):
        sl = tuple(slice(f * d, f * d + s * (m - 1) + 1, s) for f, d, s, m in zip(offs, dilation, stride, out))
        patch = xp[(slice(None), slice(None)) + sl]  # [n, c, *out]
        for gi in range(groups):
            wg = w[(slice(gi * og, (gi + 1) * og), slice(None)) + offs].to(torch.int64)  # [og, cg]
            pg = patch[:, gi * cg:(gi + 1) * cg]
            y[:, gi * og:(gi + 1) * og] += torch.einsum("oc,nc...->no...", wg, pg)
    return y


CONV_CASES = [
    # dims, x shape, out channels, kernel, stride, padding, dilation, groups
    (1, (2, 6, 17), 9, (3,), (2,), 2, (2,), 3),
    (2, (2, 4, 9, 11), 6, (3, 3), (1, 1), 1, (1, 1), 1),
    (2, (3, 8, 10, 7), 8, (3, 2), (2, 1), "same_ok", (1, 2), 8),  # depthwise, odd sizes
    (2, (1, 5, 8, 8), 7, (1, 1), (2, 2), 0, (1, 1), 1),
    (2, (2, 4, 6, 6), 4, (2, 3), (1, 1), "same", (1, 1), 2),  # asymmetric 'same' padding
    (3, (2, 4, 5, 6, 7), 6, (3, 2, 3), (1, 2, 1), 1, (1, 1, 2), 2),
    (2, (2, 6, 8, 6), 4, (2, 3), (2, 3), 0, (1, 1), 2),  # windows that tile the input: col2im is a permutation
    (3, (1, 2, 4, 2, 6), 3, (2, 1, 3), (2, 1, 3), 0, (1, 1, 1), 1),
    (2, (2, 3, 7, 6), 4, (2, 2), (2, 2), 0, (1, 1), 1),  # kernel = stride, but a row left out: not a tiling
]


@pytest.mark.parametrize("dims,xs,o,k,s,p,d,g", CONV_CASES)
def test_im2col_gemm_equals_naive_conv(dims, xs, o, k, s, p, d, g):
    """Forward integer accumulators of the shared im2col + exact GEMM == the direct int64 definition."""
    p = 1 if p == "same_ok" else p
    spec = make_spec(dims, k, s, p, d, g)
    x = _ints(*xs)
    w = _ints(o, xs[1] // g, *k)
    cols, out = to_cols(x.float(), spec)
    acc = exact_int_bmm(cols, w.float().view(g, o // g, -1).transpose(1, 2))  # [g, M, O/g]
    y = acc.to(torch.int64).reshape(g, xs[0], *out, o // g).movedim(-1, 1)  # [g, O/g, N, *out]
    y = y.movedim(2, 0).reshape(xs[0], o, *out)
    assert torch.equal(y, _naive_conv_int64(x, w, spec.stride, spec.padding, spec.dilation, g))


@pytest.mark.parametrize("dims,xs,o,k,s,p,d,g", CONV_CASES)
def test_col2im_is_exact_adjoint_of_im2col(dims, xs, o, k, s, p, d, g):
    """<im2col(x), c> == <x, col2im(c)> in exact integers, for every geometry (the dX path)."""
    p = 1 if p == "same_ok" else p
    spec = make_spec(dims, k, s, p, d, g)
    x = _ints(*xs).to(torch.int64)
    cols, _ = to_cols(x, spec)
    c = torch.randint(-2**20, 2**20, cols.shape, dtype=torch.int64)
    back = from_cols(exact_sum_dtype(c.double(), 2**40), spec, x.shape)
    assert back.shape == x.shape
    assert (cols * c).sum().item() == (x.double() * back).sum().item()


@pytest.mark.parametrize("dims,xs,o,k,s,p,d,g", CONV_CASES + [(2, (2, 6, 5, 7), 4, (1, 1), (1, 1), 0, (1, 1), 2)])
def test_channel_major_unfold_gemm_equals_naive_conv(dims, xs, o, k, s, p, d, g):
    """The CPU op's layout: W[g] @ cols[n, g] is the convolution, and fold is its exact adjoint."""
    p = 1 if p == "same_ok" else p
    spec = make_spec(dims, k, s, p, d, g)
    x, w = _ints(*xs), _ints(o, xs[1] // g, *k)
    cols, out = unfold(x.float(), spec)  # [N, g, K, L]
    y = torch.einsum("gok,ngkl->ngol", w.view(g, o // g, -1).to(torch.int64), cols.to(torch.int64))
    assert torch.equal(y.reshape(xs[0], o, *out), _naive_conv_int64(x, w, spec.stride, spec.padding, spec.dilation, g))
    c = torch.randint(-2**20, 2**20, cols.shape, dtype=torch.int64)
    back = fold(c.double(), spec, x.shape)
    assert (cols.double() * c).sum().item() == (x.double() * back).sum().item()


DEPTHWISE_CASES = [(2, (2, 6, 9, 8), 6, (3, 3), (2, 1), 1, (1, 2), 6), (1, (3, 4, 11), 4, (5,), (1,), "same", (2,), 4),
                   (3, (1, 3, 4, 5, 6), 3, (3, 3, 2), (1, 1, 2), 1, (1, 1, 1), 3)]


@pytest.mark.parametrize("dims,xs,o,k,s,p,d,g", CONV_CASES + DEPTHWISE_CASES)
def test_every_layout_gives_the_same_integers(dims, xs, o, k, s, p, d, g):
    """The op picks a layout per call for speed; forward, dX and dW integers must not depend on it."""
    from int8fx.kernels import layouts
    from int8fx.kernels.reference import ReferenceBackend

    p = 1 if p == "same_ok" else p
    spec = make_spec(dims, k, s, p, d, g)
    x, w = _ints(*xs).float(), _ints(o, xs[1] // g, *k).float()
    w2 = w.reshape(o, -1)
    want_y = _naive_conv_int64(x.to(torch.int8), w.to(torch.int8), spec.stride, spec.padding, spec.dilation, g)
    dy = _ints(*want_y.shape).float()
    candidates = ["rows", "samples"] + (["direct"] if g == xs[1] == o else [])
    results = {}
    for layout in candidates:
        y, _ = layouts.forward(ReferenceBackend, x, w2, spec, layout)
        dx = layouts.grad_input(ReferenceBackend, dy, w2, spec, tuple(x.shape), layout)
        dw = layouts.grad_weight(ReferenceBackend, dy.movedim(1, -1).reshape(-1, o), x, spec, layout)
        results[layout] = (y.to(torch.int64), dx.to(torch.int64), dw.to(torch.int64).reshape(w.shape))
        assert torch.equal(results[layout][0], want_y), layout
    # dX and dW against autograd of the exact int64 convolution (float64 is exact at these magnitudes)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    conv = [None, torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d][dims]
    xpad = torch.nn.functional.pad(xd, [q for lohi in reversed(spec.padding) for q in lohi])
    conv(xpad, wd, None, spec.stride, 0, spec.dilation, g).backward(dy.double())
    for layout, (_, dx, dw) in results.items():
        assert torch.equal(dx, xd.grad.to(torch.int64)), layout
        assert torch.equal(dw, wd.grad.to(torch.int64)), layout
