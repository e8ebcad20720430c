"""The fused passes (int8fx.quant.fused via int8fx.fusing): compiled they compute what they compute eagerly,
bit for bit, and they match the unfused quantizers of int8fx.quant.core that the reference pipeline uses."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch

from int8fx import fusing, precompiled
from int8fx.quant import core, fused

N = fusing.SMALL * 2  # big enough to take the compiled path

pytestmark = pytest.mark.skipif(not fusing.COMPILE, reason="INT8FX_COMPILE=0: only the eager forms run")


@pytest.fixture(autouse=True)
def _exact_shapes_at_first_call(monkeypatch):
    """Big tensors take their exact-shape variant at the first call here (in a model, at the third)."""
    monkeypatch.setattr(fusing, "STATIC_AFTER", 1)


@fusing.fused
def quantize_nearest(x, scale):
    """The simplest fused pass (the forward's quantizer without its scale), for the tests of the mechanism;
    a zero scale divides by +inf and gives 0, as quant.core.quantize does."""
    s = scale.float()
    s = torch.where(s > 0, s, torch.full_like(s, float("inf")))
    return (x.float() / s).round().clamp(-core.QMAX, core.QMAX).to(torch.int8)


def _recompile_limit(n: int):
    """torch.compile's limit of compilations per code object set to n (`recompile_limit`; torch 2.5 names it
    `cache_size_limit`)."""
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    return torch._dynamo.config.patch(**{name: n})


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# The compiled passes on CUDA tensors are Triton code, on CPU tensors C++: each must equal its eager form.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _to(device, *tensors):
    return tuple(t.to(device) for t in tensors)


def _both(fn, *args):
    """(compiled result, eager result), with a check that the compiled path really ran."""
    assert fn.compiles(*args), "arguments too small for the compiled path: the test would compare eager to eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager warns: fail instead of comparing eager to eager
        got = fn(*args)
    assert fn.__name__ not in fusing.compile_status()[1]
    return got, fn.eager(*args)


def _equal(a, b):
    if isinstance(a, tuple):
        assert len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))
        return True
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return True


@pytest.mark.parametrize("device", DEVICES)
def test_quantizers_compiled_equal_eager_and_core(device):
    x = torch.randn(8, 32, 16, 16, generator=_gen()) * 3
    x[0, 0, 0, :4] = torch.tensor([0.5, -0.5, 1.5, 2.5]) * (x.abs().max() / 127)  # ties: half to even
    x, = _to(device, x)
    s = core.scale_from_clip(core.absmax(x))
    q, q_eager = _both(quantize_nearest, x, s)
    _equal(q, q_eager)
    _equal(q, core.quantize(x, s, out_dtype=torch.int8))
    for clip in (None, torch.tensor(0.0, device=device)):  # the batch's own absmax (a static clip of 0 is not set)
        (s_r, qr), eager = _both(fused.quantize_activation, x, clip, "rows")
        _equal((s_r, qr), eager)
        _equal(s_r, s)
        _equal(qr, q)
        (s_l, ql), eager = _both(fused.quantize_activation, x, clip, "channels_last")
        _equal((s_l, ql), eager)
        _equal(ql, q.permute(0, 2, 3, 1).contiguous())
        pair, pair_eager = _both(fused.quantize_activation, x, clip, "channels_last_pair")
        _equal(pair, pair_eager)
        _equal(pair[1], ql)
        _equal(pair[2], ql.float())
    static = core.absmax(x) / 2  # a static clip saturates what lies beyond it (a power of two: exact on any device)
    (s_st, q_st), eager = _both(fused.quantize_activation, x, static, "rows")
    _equal((s_st, q_st), eager)
    _equal(q_st, core.quantize(x, core.scale_from_clip(static), out_dtype=torch.int8))


def test_activation_scale_keeps_nonfinite_inputs_visible():
    """An Inf or NaN in the activation gives a non-finite scale (the numerical contract: never clamped away)."""
    for bad in (float("inf"), float("nan")):
        x = torch.randn(N, generator=_gen())
        x[N // 3] = bad
        (s, _), (s_eager, _) = _both(fused.quantize_activation, x, None, "rows")
        assert not torch.isfinite(s) and not torch.isfinite(s_eager)
        assert torch.isnan(s) == torch.isnan(s_eager)


def test_zero_scale_gives_zero():
    x = torch.randn(N, generator=_gen())
    q, q_eager = _both(quantize_nearest, x, torch.tensor(0.0))
    _equal(q, q_eager)
    assert not q.any()


@pytest.mark.parametrize("device", DEVICES)
def test_epilogues_compiled_equal_eager(device):
    acc = torch.randint(-2**24, 2**24, (4096, 64), dtype=torch.int32, generator=_gen())
    s_x, s_w = torch.tensor(0.0123), torch.rand(64, generator=_gen(1)) * 0.01
    bias = torch.randn(64, generator=_gen(2))
    acc, s_x, s_w, bias = _to(device, acc, s_x, s_w, bias)
    outs = [torch.empty(4096, 64, device=device) for _ in range(4)]
    _equal(fused.scale_accumulators(acc, s_x, s_w, outs[0]), fused.scale_accumulators.eager(acc, s_x, s_w, outs[1]))
    _equal(fused.scale_accumulators_bias(acc, s_x, s_w, bias, outs[2]),
           fused.scale_accumulators_bias.eager(acc, s_x, s_w, bias, outs[3]))
    _equal(outs[0], acc.float() * (s_x * s_w))
    # into a strided output (the channels-last view of a conv output)
    y = torch.empty(16, 16, 16, 64, device=device).permute(0, 3, 1, 2)
    fused.scale_accumulators(acc, s_x, s_w, y.permute(0, 2, 3, 1).reshape(4096, 64))
    _equal(y.permute(0, 2, 3, 1).reshape(4096, 64), outs[0])
    w_acc = torch.randint(-2**24, 2**24, (256, 3, 3, 128), dtype=torch.int32, generator=_gen(3)).to(device)
    w_acc = w_acc.permute(0, 3, 1, 2)
    s_gw = torch.rand(256, generator=_gen(4)).view(-1, 1, 1, 1).to(device)  # (the per-output-channel scale)
    for dtype in (torch.float32, torch.bfloat16):
        (none, dw), (none_eager, dw_eager) = _both(fused.scale_gradients, None, w_acc, s_x, s_gw, s_x, dtype, dtype, False)
        assert none is None and none_eager is None
        _equal(dw, dw_eager)
        _equal(dw, (w_acc.float() * s_gw * s_x).to(dtype).contiguous())
        assert dw.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_passes_compiled_equal_eager_and_the_plain_ops(dtype, device):
    """dY to channels-last rows and the dX epilogue (scale, cast, back to NCHW) in one pass each."""
    dy = torch.randn(8, 48, 32, 24, generator=_gen()).to(device, dtype)  # from STATIC elements: these compile above it
    rows, rows_eager = _both(fused.gradient_rows, dy)
    _equal(rows, rows_eager)
    _equal(rows, dy.float().permute(0, 2, 3, 1).reshape(-1, 48))
    acc = torch.randint(-2**24, 2**24, (8, 32, 24, 48), dtype=torch.int32, generator=_gen(1))
    s = torch.tensor(3.1e-5)
    w_acc = torch.randint(-2**24, 2**24, (48, 3, 3, 16), dtype=torch.int32, generator=_gen(2))
    s_gw = torch.rand(48, generator=_gen(3)).view(-1, 1, 1, 1)
    acc, s, w_acc, s_gw = _to(device, acc, s, w_acc, s_gw)
    w_acc = w_acc.permute(0, 3, 1, 2)
    for to_nchw in (True, False):
        (dx, dw), eager = _both(fused.scale_gradients, acc, w_acc, s, s_gw, s, dtype, torch.float32, to_nchw)
        _equal((dx, dw), eager)
        want = (acc.float() * s).to(dtype)
        _equal(dx, want.permute(0, 3, 1, 2).contiguous() if to_nchw else want)
        assert dx.is_contiguous()
        _equal(dw, (w_acc.float() * s_gw * s).contiguous())
        (dx_only, none), _ = _both(fused.scale_gradients, acc, None, s, s_gw, s, dtype, torch.float32, to_nchw)
        assert none is None
        _equal(dx_only, dx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_gradient_quantizers_compiled_equal_eager(stochastic, device):
    rows = torch.randn(2048, 48, generator=_gen()) * torch.logspace(-3, 1, 48)
    s_w = torch.rand(48, generator=_gen(1)) * 0.02
    s_gx, s_gw = torch.rand(48, generator=_gen(2)) * 0.01, torch.rand(48, generator=_gen(3)) * 0.1
    key_x, key_w = torch.tensor(12345, dtype=torch.int64), torch.tensor(999, dtype=torch.int64)
    rows, s_w, s_gx, s_gw, key_x, key_w = _to(device, rows, s_w, s_gx, s_gw, key_x, key_w)
    one = fused.quantize_gradient(rows, s_w, s_gx, stochastic, key_x)
    _equal(one, fused.quantize_gradient(rows, s_w, s_gx, stochastic, key_x))  # keyed: reproducible
    inner = fused._quantize_gradient_stochastic if stochastic else fused._quantize_gradient_nearest
    args = (rows, s_w, s_gx, key_x) if stochastic else (rows, s_w, s_gx)
    _equal(*_both(inner, *args))
    pair = fused.quantize_gradients(rows, s_w, s_gx, s_gw, stochastic, key_x, key_w)
    inner2 = fused._quantize_gradients_stochastic if stochastic else fused._quantize_gradients_nearest
    args2 = (rows, s_w, s_gx, s_gw, key_x, key_w) if stochastic else (rows, s_w, s_gx, s_gw)
    _equal(*_both(inner2, *args2))
    _equal(pair[0], one)  # the pair is exactly two single calls
    _equal(pair[1], fused.quantize_gradient(rows, torch.ones((), device=device), s_gw, stochastic, key_w))
    if stochastic:  # unbiased: the mean of the rounding error is ~0 in units of the step
        exact = rows / s_gw
        inside = exact.abs() < 126  # beyond the range the clamp saturates
        err = (pair[1].float() - exact)[inside]
        assert inside.sum() > 10_000 and err.abs().max() < 1 + 1e-5 and abs(err.mean().item()) < 0.01
        assert (pair[1][exact.abs() > 128].abs() == 127).all()


def test_computed_once_is_the_value_it_is_given():
    """`fusing.computed_once` (a per-column threshold stored once instead of recomputed per element) gives
    back exactly its input, compiled and eager, NaN, infinities and signed zeros included; a count against
    it is the count against the plain threshold."""
    t = torch.tensor([0.5, float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-38, 3.0])
    rows = torch.randn(300, 8, generator=_gen()) * 2

    def count(rows, t):
        sigma = (t * t).sqrt()  # an expression, as the policies' thresholds are
        return (rows.abs() > fusing.computed_once(sigma)).sum(0, dtype=fusing.SUM_DTYPE), fusing.computed_once(t)

    compiled = torch.compile(count, dynamic=True, fullgraph=True)  # (the denormal mode kept, as fused passes do)
    for got in (count(rows, t), fusing._keeping_denormals(compiled, (rows, t), True)):
        _equal(got[0], (rows.abs() > (t * t).sqrt()).sum(0, dtype=fusing.SUM_DTYPE))
        torch.testing.assert_close(got[1], t, rtol=0, atol=0, equal_nan=True)
        num = ~t.isnan()  # (a NaN's sign bit means nothing)
        assert torch.equal(torch.signbit(got[1])[num], torch.signbit(t)[num])


@pytest.mark.parametrize("device", DEVICES)
def test_weight_rows_compiled_equal_eager_and_core(device):
    w = torch.randn(64, 3, 3, 32, generator=_gen()).to(device).permute(0, 3, 1, 2)  # a reordered conv weight view
    (q, s), (q_eager, s_eager) = _both(fused.quantize_weight_rows, w)
    _equal(q, q_eager)
    _equal(s, s_eager)
    q_core, s_core = core.quantize_per_channel(w.flatten(1), 0, out_dtype=torch.int8)
    _equal(q, q_core.to(torch.int8))
    _equal(s, s_core)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["rows", "channels_last", "channels_last_pair"])
def test_both_forward_operands_in_one_call_equal_the_two_quantizers(form, device):
    """`quantize_operands` (the forward's activation and weight in one compiled call) gives, compiled and
    eager, exactly what `quantize_activation` and `quantize_weight_rows` give, a static clip included."""
    x = torch.randn(8, 24, 9, 10, generator=_gen()) * 3
    if form == "rows":
        x = x.reshape(-1, 90)
    w = torch.randn(48, 24, 3, 3, generator=_gen(1)) if form != "rows" else torch.randn(48, 90, generator=_gen(1))
    x, w = _to(device, x, w)
    for clip in (None, torch.tensor(2.5, device=device)):
        got, eager = _both(fused.quantize_operands, x, clip, form, w)
        _equal(got, eager)
        _equal(got, (*fused.quantize_activation.eager(x, clip, form), *fused.quantize_weight_rows.eager(w)))


def test_the_largest_argument_decides_compiling():
    """A late layer's small dX beside its large dW: the call compiles, for its exact shapes (it ran as eager
    passes over the dW when the first tensor decided, 10 of a resnet18 512x512 site's 25 ms)."""
    dx_acc = torch.randint(-2**20, 2**20, (16, 2, 2, 64), dtype=torch.int32, generator=_gen())
    dw_acc = torch.randint(-2**20, 2**20, (512, 3, 3, 64), dtype=torch.int32, generator=_gen(1)).permute(0, 3, 1, 2)
    assert dx_acc.numel() < fusing.SMALL and dw_acc.numel() >= fusing.STATIC
    s_gx, s_gw, s_x = torch.tensor(0.5), torch.rand(512, generator=_gen(2)).view(-1, 1, 1, 1), torch.tensor(0.01)
    before = len(fused.scale_gradients.variants)
    got, eager = _both(fused.scale_gradients, dx_acc, dw_acc, s_gx, s_gw, s_x, torch.float32, torch.float32, False)
    assert len(fused.scale_gradients.variants) == before + 1
    _equal(got, eager)
    assert not fused.scale_gradients.compiles(dx_acc, dx_acc, s_gx, s_gw, s_x, torch.float32, torch.float32, False)


def test_small_tensors_and_traced_code_run_eagerly():
    """Below SMALL elements the call is eager (cheaper than a compiled call); under torch.func it is too."""
    x = torch.randn(10)
    s = torch.tensor(0.05)
    assert torch.equal(quantize_nearest(x, s), quantize_nearest.eager(x, s))
    out = torch.func.vmap(lambda r: quantize_nearest(r, s).float())(torch.randn(4, N // 4))
    assert out.shape == (4, N // 4)



@fusing.fused
def _times(x, k):
    return x * k


def test_numpy_scalars_are_constants_of_their_own_variant():
    """A numpy integer argument (geometry a library computed in numpy) is a constant of the compiled code as
    an int is: another value gets its own variant. Keyed by its type alone, the second call ran the first
    value (a conv's stride: tests/test_cpu_backend.py)."""
    import numpy as np

    x = torch.randn(N, generator=_gen())
    for k in (2, 3):
        got, eager = _both(_times, x, np.int64(k))
        _equal(got, eager)
        _equal(got, x * k)

def test_many_signatures_stay_compiled():
    """More argument signatures than torch.compile's recompile limit (8): each gets its own compiled copy,
    none falls back to eager."""
    s = torch.tensor(0.01)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for shape in ((N,), (4, N // 4), (2, 4, N // 8), (2, 2, 2, N // 8)):
            x = torch.randn(shape, generator=_gen(), dtype=dtype)
            _equal(*_both(quantize_nearest, x, s))
    assert "quantize_nearest" not in fusing.compile_status()[1]


def _exact_shape_keys(f):
    """The first tensor's sizes in each of f's exact-shape variants' keys (`fusing._exact_key` of the arguments,
    a tensor's entry holding its sizes; a dynamic variant's `_signature` holds their size-1 pattern)."""
    return [k[1][0][2] for k in f.variants if isinstance(k[1][0][2], torch.Size)]


def test_big_tensors_compile_for_their_exact_shapes(monkeypatch):
    """From STATIC elements a pass is compiled for its exact shapes (a transposing loop compiled for dynamic
    shapes ran 2.6x slower): one variant per shape, smaller tensors a dynamic one, and all compute
    what the eager form computes."""
    monkeypatch.setattr(fusing, "STATIC", 4 * N)

    def to_rows(dy):
        return dy.float().movedim(1, -1).reshape(-1, dy.shape[1])

    monkeypatch.setattr(fusing, "STATIC_AFTER", 3)
    f = fusing.fused(to_rows)
    shapes = [(2, 16, 32, N // 512), (4, 16, 32, N // 512), (8, 16, 32, N // 512), (8, 32, 32, N // 512)]
    for calls in range(3):  # a shape's exact-shape variant comes at its third call: a one-off shape compiles nothing
        assert not _exact_shape_keys(f)
        for shape in shapes:
            x = torch.randn(shape, generator=_gen())
            _equal(f(x), to_rows(x))
    static = _exact_shape_keys(f)
    assert sorted(static) == sorted(torch.Size(s) for s in shapes if torch.Size(s).numel() >= 4 * N)
    assert len(f.variants) == len(static) + 1  # the smallest shape: a dynamic variant
    monkeypatch.setattr(fusing, "STATIC_SHAPES", len(f.variants))  # no more exact-shape compiles: dynamic
    x = torch.randn(8, 16, 32, 2 * N // 512, generator=_gen())
    for _ in range(3):
        _equal(f(x), to_rows(x))
    assert len(f.variants) == len(static) + 1


def test_partials_do_not_share_one_compiled_cache():
    """torch.compile runs every functools.partial through one shared wrapper, so fused partials (each policy's
    `operands` is one) would fill a single cache and hit the recompile limit together; each gets code of its own."""

    def scaled(k, x):
        return x * k

    x = torch.randn(N, generator=_gen())
    p = functools.partial(scaled, 2.0)
    a, b = fusing._fresh_copy(p), fusing._fresh_copy(p)
    assert not isinstance(a, functools.partial) and a.__code__ is not b.__code__  # dynamo's cache key
    _equal(a(x), x * 2.0)
    with _recompile_limit(1), warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager warns
        for k in (2.0, 3.0, 5.0):
            _equal(fusing.fused(functools.partial(scaled, k))(x), x * k)


def test_recompile_limit_restarts_with_a_fresh_copy(monkeypatch):
    """torch.compile's path (CUDA tensors, a torch without inductor's standalone compile): a signature that
    keeps recompiling (here: a branch on a size, crossed back and forth under a limit of one compilation)
    gets a fresh compiled copy instead of going eager for good; past RESTARTS it runs eagerly, with one
    warning. Every call computes the same numbers."""
    monkeypatch.setattr(precompiled, "AVAILABLE", False)

    def branchy(x):
        return x * 2 if x.shape[0] > N else x * 3

    f = fusing.fused(branchy)
    small, big = torch.randn(N - 8, generator=_gen()), torch.randn(2 * N, generator=_gen(1))
    with _recompile_limit(1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(2 * fusing.RESTARTS + 1):  # each big call hits the limit, each small one compiles anew
            x = big if i % 2 else small
            _equal(f(x), branchy(x))
        assert not [w for w in caught if "branchy" in str(w.message)]
        assert "branchy (one signature)" not in fusing.compile_status()[1]
        _equal(f(big), branchy(big))  # the limit once more: eager for good
    assert [w for w in caught if "branchy" in str(w.message) and "eagerly" in str(w.message)]
    assert "branchy (one signature)" in fusing.compile_status()[1]
    fusing._FAILED.pop("branchy (one signature)")


@pytest.mark.skipif(not precompiled.AVAILABLE, reason="this torch has no inductor standalone compile")
def test_a_traced_pass_keeps_to_its_shape_guards(monkeypatch):
    """A pass compiled without dynamo checks the shape guards its trace recorded: a branch on a size gives
    one variant per side, each call the numbers of its own side (a variant used without its guard would give
    x * 3 for the big tensor); past VARIANTS a signature runs eagerly, with one warning."""

    def branchy(x):
        return x * 2 if x.shape[0] > N else x * 3

    f = fusing.fused(branchy)
    small, big, bigger = (torch.randn(n, generator=_gen(i)) for i, n in enumerate((N - 8, 2 * N, 2 * N + 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x in (small, big, small, bigger, big):
            _equal(f(x), branchy(x))
    (traced,) = f.variants.values()
    assert isinstance(traced, precompiled.Traced) and len(traced.variants) == 2
    monkeypatch.setattr(precompiled, "VARIANTS", 2)
    monkeypatch.setattr(fusing, "_FAILED", {})
    g = fusing.fused(lambda x: x * 2 if x.shape[0] > 2 * N else x * 3 if x.shape[0] > 3 * N // 2 else x * 5)
    one, two, three = (torch.randn(n, generator=_gen(i)) for i, n in enumerate((N + 8, 7 * N // 4, 3 * N)))
    _equal(g(one), one * 5)
    _equal(g(two), two * 3)
    with pytest.warns(UserWarning, match="runs eagerly"):
        _equal(g(three), three * 2)
    _equal(g(one), one * 5)  # eager from then on, the same numbers
    assert list(fusing.compile_status()[1]) == ["<lambda> (one signature)"]


@pytest.mark.skipif(not precompiled.AVAILABLE, reason="this torch has no inductor standalone compile")
def test_a_traced_pass_writes_into_its_out_argument_and_keeps_its_structure():
    """In-place writes into an argument (the epilogues' `out`) land in the caller's tensor, and nested
    results (a tuple holding None, a dict) come back as the eager form returns them."""

    def write(x, out, d):
        out.copy_(x * d["k"])
        return None, (x.sum(0), {"m": x.amax()}), 3

    x, out = torch.randn(64, N // 64, generator=_gen()), torch.zeros(64, N // 64)
    got = fusing.fused(write)(x, out, {"k": torch.tensor(2.0)})
    _equal(out, x * 2)
    assert got[0] is None and got[2] == 3 and isinstance(got[1][1], dict)
    _equal(got[1][1]["m"], x.amax())


@pytest.mark.skipif(not precompiled.AVAILABLE, reason="this torch has no inductor standalone compile")
def test_calls_without_dynamo_compile_smaller_tensors(monkeypatch):
    """A compiled call without dynamo costs ~20 us less, so on that path (CPU) a pass compiles from
    SMALL_TRACED elements (4096 here) whatever its own threshold, and an epilogue of a few ops from
    EXACT_TRACED for its exact shapes (a dynamo call is worth neither below SMALL, a function's own
    threshold and STATIC); compiled, they give the eager numbers."""
    x, w = torch.randn(2, 8, 16, 16, generator=_gen()), torch.randn(16, 8, generator=_gen(1))
    assert fusing.SMALL_TRACED <= x.numel() < fusing.SMALL
    acc = torch.randint(-2**20, 2**20, (16, 8, 8, 64), dtype=torch.int32, generator=_gen(2))
    out, out_eager = torch.empty(16, 64, 8, 8).movedim(1, -1), torch.empty(16, 64, 8, 8).movedim(1, -1)
    s_x, s_w = torch.tensor(0.01), torch.rand(64, generator=_gen(3))
    assert fusing.EXACT_TRACED <= acc.numel() < fusing.STATIC
    before = len(fused.scale_accumulators.variants)
    _equal(*_both(fused.quantize_operands, x, None, "channels_last", w))
    fused.scale_accumulators(acc, s_x, s_w, out)
    fused.scale_accumulators.eager(acc, s_x, s_w, out_eager)
    _equal(out, out_eager)
    assert len(fused.scale_accumulators.variants) == before + 1
    statistics = fusing.fused(lambda g: g.abs().amax(0), min_elements=8192)  # worth a dynamo call from 8192
    assert statistics.compiles(x)
    monkeypatch.setattr(precompiled, "AVAILABLE", False)
    assert not statistics.compiles(x)
    assert not fused.quantize_operands.compiles(x, None, "channels_last", w)
    assert not fused.scale_accumulators.compiles(acc, s_x, s_w, out)


@pytest.mark.skipif(not precompiled.AVAILABLE, reason="this torch has no inductor standalone compile")
def test_a_pass_that_cannot_be_traced_goes_through_torch_compile(monkeypatch):
    """Where tracing without dynamo fails (here: made to), the function is compiled by torch.compile instead:
    no warning, no eager fallback, the same numbers."""
    monkeypatch.setattr(fusing, "_UNTRACED", {})

    def refuse(*args):
        raise NotImplementedError("an op this torch's make_fx cannot trace")

    monkeypatch.setattr(precompiled, "_compile", refuse)

    def twice(x):
        return (x * 2).round()

    f = fusing.fused(twice)
    x = torch.randn(N, generator=_gen())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _equal(f(x), twice(x))
        _equal(f(x), twice(x))
    (variant,) = f.variants.values()
    assert not isinstance(variant, precompiled.Traced) and "twice" in fusing._UNTRACED


def test_views_of_differently_shaped_bases_share_one_compilation():
    """dynamo guards on a view argument's base (here whether its middle dim is 1): the rows of a linear's
    [B, T, C] gradient with T = 1 and T > 1 recompiled one variant each time the base changed, which a long
    process (several models in one notebook) ran into as torch's recompile-limit warning, then eager passes.
    Views are passed as plain aliases, so the base is not seen; the numbers are those of the views."""

    def amax_scaled(x, s):
        return (x.float() * s).abs().amax()

    f = fusing.fused(amax_scaled)
    s = torch.tensor(2.0)
    with _recompile_limit(1), warnings.catch_warnings():
        warnings.simplefilter("error")  # hitting the limit for good warns (and raises here)
        for i in range(2 * fusing.RESTARTS + 3):
            base = torch.randn(4 * N // 64, 1 if i % 2 else 4, 16, generator=_gen(i))
            rows = base.reshape(-1, 16)
            assert rows._is_view()
            _equal(f(rows, s), amax_scaled(rows, s))
    assert len(f.variants) == 1 and None not in f.variants.values()


def test_a_fused_pass_inside_another_adds_no_size_guard():
    """A fused pass called from one being compiled runs inline; asking first whether its tensor is big enough
    for a compiled call of its own put a guard on that size into the outer pass (numel >= SMALL), so the outer
    one recompiled whenever a layer's tensor crossed it."""
    inner = fusing.fused(lambda x: x * 3)

    def outer(x):
        return inner(x) + 1

    f = fusing.fused(outer, min_elements=1)
    with _recompile_limit(1), warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(2 * fusing.RESTARTS + 3):
            x = torch.randn(fusing.SMALL * 2 if i % 2 else fusing.SMALL // 2, generator=_gen(i))
            _equal(f(x), x * 3 + 1)
    assert len(f.variants) == 1 and None not in f.variants.values()


def test_equal_dims_at_first_call_and_users_error_on_recompile():
    """A variant traced on a tensor whose dims happen to be equal must not assume they always are (no
    recompile for the next shape), and a user's `error_on_recompile` is about their code, not these passes."""
    s = torch.tensor(0.01)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for shape in ((32, 32, 32), (32, 16, 64), (8, 64, 64)):
            x = torch.randn(shape, generator=_gen(), dtype=torch.float16)
            _equal(*_both(fused.quantize_activation, x, s, "channels_last"))
    assert not any(k.startswith("quantize_activation") for k in fusing.compile_status()[1])


def test_eager_passes_block_runs_eagerly_and_restores_the_setting():
    def halve(x):
        return x * 0.5

    f = fusing.fused(halve)
    x = torch.randn(64, 512)
    with fusing.eager_passes():
        _equal(f(x), x * 0.5)
        with pytest.raises(RuntimeError), fusing.eager_passes(False):
            raise RuntimeError("inside a nested block")  # cannot turn compiling back on; restores on errors
        _equal(f(x), x * 0.5)
    assert not f.variants  # nothing was compiled inside the block
    assert fusing.COMPILE
    _equal(f(x), x * 0.5)
    assert len(f.variants) == 1


def test_every_policy_compiles_its_operands_for_a_batch_of_one(monkeypatch):
    """A batch-1 grouped conv's per-tensor gradient quantizer failed to compile ("sort with non-constant
    keys": `absmax` ordered symbolic strides), and the failure, recorded under the shared name "_operands",
    sent every policy's operands in the process to the eager path (4-8x slower). Now each compiles, and a
    failure would be recorded per policy."""
    import sys
    from pathlib import Path

    import torch.nn as nn

    sys.path.insert(0, str(Path(__file__).parent))
    from sites import run_site

    monkeypatch.setattr(fusing, "_FAILED", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "int8fx: ... runs eagerly" would raise here
        for policy in ("per-tensor", "gvq-mcs"):
            run_site(lambda: nn.Conv2d(192, 192, 3, padding=1, groups=8), (1, 192, 28, 28), "torch", policy,
                     "nearest")
    assert fusing.compile_status()[1] == {}


def test_a_depthwise_site_under_gvq_mcs_compiles_every_pass(monkeypatch):
    """The depthwise dW and gvq-mcs's counts are integer sums; on torch 2.5 and 2.8 inductor cannot compile
    them in int32 (a C++ error), and both ran eagerly with a warning. `fusing.SUM_DTYPE` takes int64 there."""
    import sys
    from pathlib import Path

    import torch.nn as nn

    sys.path.insert(0, str(Path(__file__).parent))
    from sites import run_site

    monkeypatch.setattr(fusing, "_FAILED", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "int8fx: ... runs eagerly" would raise here
        run_site(lambda: nn.Conv2d(64, 64, 3, padding=1, groups=64), (4, 64, 16, 16), "torch", "gvq-mcs", "nearest")
    assert fusing.compile_status()[1] == {}


def test_one_partials_compile_failure_leaves_the_others_compiled(monkeypatch):
    """Policies' fused calls are partials of one function: their failures are told apart by what they bind."""
    monkeypatch.setattr(fusing, "_FAILED", {})

    def body(kind, x):
        if kind == "breaks" and x.sum() > float("-inf"):  # a branch on a value: neither path can compile it
            return (x * 2).round()
        return (x * 2).round()

    broken, fine = fusing.fused(functools.partial(body, "breaks")), fusing.fused(functools.partial(body, "fine"))
    x = torch.randn(1 << 15)
    with pytest.warns(UserWarning, match=r"body\['breaks'\] runs eagerly"):
        assert torch.equal(broken(x), (x * 2).round())
    assert torch.equal(fine(x), (x * 2).round())
    assert list(fusing.compile_status()[1]) == ["body['breaks']"]
    assert [v is not None for v in fine.variants.values()] == [True]


def test_compiled_passes_leave_the_denormal_mode_alone():
    """On torch 2.5 inductor's kernels turned flush-to-zero on as they loaded (crtfastmath.o, linked for
    -ffast-math): from the first compiled pass on every float op of the process flushed denormals, the
    user's FP32 model's too, and an INT8 site's tiny weight gradients became zeros. On the torch running
    this, compiling a pass must leave denormals as they were."""
    f = fusing.fused(lambda x: x * 5 - 2)
    x = torch.randn(1 << 13, generator=_gen())
    _equal(f(x), x * 5 - 2)
    assert fusing._keeps_denormals()


@pytest.mark.skipif(not precompiled.AVAILABLE, reason="simulated inside a traced pass (dynamo would break the graph)")
def test_a_compiled_pass_that_turns_flush_to_zero_on_leaves_the_mode_as_it_was(monkeypatch):
    """A call whose kernel turns flush-to-zero on as it loads (what torch 2.5's do; simulated here while the
    pass is traced, inside the call that compiles it) gets the mode put back, and from then on every compiled
    call is watched. A mode the user chose is left alone."""
    monkeypatch.setattr(fusing, "_FLUSHES_DENORMALS", False)

    def loads_like_torch_2_5(x):
        torch.set_flush_denormal(True)
        return x * 3 + 1

    f = fusing.fused(loads_like_torch_2_5)
    x = torch.randn(1 << 13, generator=_gen())
    try:
        _equal(f(x), x * 3 + 1)
        assert fusing._keeps_denormals() and fusing._FLUSHES_DENORMALS
        torch.set_flush_denormal(True)  # the user's own choice
        _equal(f(x), x * 3 + 1)
        assert not fusing._keeps_denormals()
    finally:
        torch.set_flush_denormal(False)


def test_the_forward_quantizer_compiles_once_for_every_activation_size():
    """Through torch.compile (how passes compile where the traced path is missing: torch < 2.8, CUDA), one
    dynamic compilation serves every activation size. Dynamo 2.5 specialised `x.numel()` to its value:
    each size recompiled, and mobilenet_v2's forward operands ran eagerly within three steps."""
    from int8fx.quant.fused import quantize_activation

    f = torch.compile(lambda x: quantize_activation.eager(x, None, "channels_last"), dynamic=True)
    with fusing._compile_settings(), torch._dynamo.config.patch(error_on_recompile=True):
        for shape in ((4, 8, 6, 6), (4, 16, 3, 5), (2, 12, 7, 4)):
            x = torch.randn(shape, generator=_gen())
            _equal(fusing._keeping_denormals(f, (x,), False), quantize_activation.eager(x, None, "channels_last"))


@pytest.mark.skipif(not precompiled.AVAILABLE, reason="simulated inside a traced pass (dynamo would break the graph)")
def test_the_call_that_turned_flush_to_zero_on_computes_with_denormals(monkeypatch):
    """The kernel of the call that loads it already runs flushed (torch 2.5: the mode flips as the kernel
    loads, before it runs): that first call's values are computed again with denormals kept."""
    monkeypatch.setattr(fusing, "_FLUSHES_DENORMALS", False)

    def loads_like_torch_2_5(x):
        torch.set_flush_denormal(True)
        return x * 0.5

    f = fusing.fused(loads_like_torch_2_5)
    x = torch.full((1 << 13,), 1e-39)  # fp32 denormals
    try:
        got = f(x)
        assert fusing._keeps_denormals()
        assert (got > 0).all()
        _equal(got, x * 0.5)
    finally:
        torch.set_flush_denormal(False)


_RECIPROCAL_WITNESS = 8.355537414550781  # fp32: v / 127 and v * fp32(1 / 127) differ in the last bit


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_scales_are_divisions_where_inductor_would_multiply_by_a_reciprocal(device):
    """Inductor lowers a division by a constant to a multiplication by its reciprocal on CUDA tensors on every
    torch (`div_prim` in torch/_inductor/lowering.py exempts CPU tensors only since torch 2.11; torch 2.5 did
    it on CPU too): `clip / 127` then differs from the eager division in the last bit for ~4% of clips. The
    forward's operands (activation scale, weight scales) compiled must still equal their eager form; the
    activation's and one weight row's absmax are such a clip here."""
    x = torch.randn(16, 32, 32, 32, generator=_gen()).clamp(-4, 4)
    x.view(-1)[1234] = _RECIPROCAL_WITNESS
    w = torch.randn(64, 32, 3, 3, generator=_gen(1)).clamp(-4, 4)
    w[5].view(-1)[7] = -_RECIPROCAL_WITNESS
    x, w = x.to(device), w.to(device)
    assert torch.tensor(_RECIPROCAL_WITNESS) / 127 != torch.tensor(_RECIPROCAL_WITNESS) * torch.tensor(1 / 127)
    got, eager = _both(fused.quantize_operands, x, None, "channels_last", w)
    _equal(got, eager)
    assert torch.equal(got[0].cpu(), torch.tensor(_RECIPROCAL_WITNESS) / 127)  # the activation scale, divided


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_quantizers_divide_exactly_near_half_steps(device):
    """q = round(x / s) decides a half step by the quotient's last bits: where x / s lies within an ulp or
    two of k + 1/2, an approximate division (Triton's default `div.full.f32` on GPUs, up to 2 ulp off)
    rounds some to the other integer. The compiled quantizer must round every such value as the eager
    division does (`fusing.EAGER_NUMERICS`)."""
    s = torch.tensor(_RECIPROCAL_WITNESS) / 127
    halves = (torch.arange(-126, 126, dtype=torch.float64) + 0.5) * s.double()
    near = [halves.float()]
    up = down = near[0]
    for _ in range(3):  # a few ulps either side of each half step
        up, down = torch.nextafter(up, torch.tensor(float("inf"))), torch.nextafter(down, torch.tensor(-float("inf")))
        near += [up, down]
    x = torch.cat([torch.cat(near).repeat(12), torch.randn(N, generator=_gen()) * 4])
    x, s = _to(device, x, s)
    q, q_eager = _both(quantize_nearest, x, s)
    _equal(q, q_eager)
    _equal(q.cpu(), core.quantize(x.cpu(), s.cpu(), out_dtype=torch.int8))


def test_the_eager_numerics_options_are_ones_this_torch_takes():
    """`fusing.EAGER_NUMERICS` (inductor's options for GPU code that computes eager's bits) names options this
    torch has: inductor rejects an unknown one, which would send every GPU pass to eager with a warning. On
    torch >= 2.10 they exist; a CPU compile with them gives the eager bits too."""
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 10):
        assert fusing.EAGER_NUMERICS is None
        return
    assert fusing.EAGER_NUMERICS is not None and fusing.EAGER_NUMERICS["emulate_precision_casts"]
    x = torch.randn(4096, generator=_gen()) * 50
    s = torch.tensor(_RECIPROCAL_WITNESS) / 127
    compiled = torch.compile(quantize_nearest.eager, options=fusing.EAGER_NUMERICS, fullgraph=True)
    _equal(compiled(x, s), quantize_nearest.eager(x, s))
