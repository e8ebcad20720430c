"""Transposed convolutions (nn.ConvTranspose1d/2d/3d) as INT8 training sites: the integers are exactly the
transposed conv's, the gradients are its conv's products with roles exchanged (int8fx.nn.transposed), and
the converted module behaves as the user's (output_size, unbatched input, pass-through, errors)."""
import copy
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import int8fx
from fashion_data import needs_data
from int8fx.kernels import resolve_backend
from int8fx.nn import functional
from int8fx.nn.functional import quantized_forward
from int8fx.nn.modules import make_spec
from exporters import exporters
from sites import SITES, assert_same, run_site

CASES = {  # (module, input shape)
    "2d-strided-output-padding-grouped": (lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1,
                                                                     groups=2), (2, 8, 5, 6)),
    "2d-rect-dilated": (lambda: nn.ConvTranspose2d(3, 5, (2, 3), stride=(2, 1), padding=(0, 1), output_padding=(1, 0),
                                                   dilation=(1, 2)), (2, 3, 4, 5)),
    "2d-depthwise": (lambda: nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, groups=4), (2, 4, 5, 5)),
    "2d-kernel-equals-stride": (lambda: nn.ConvTranspose2d(6, 4, 2, stride=2, bias=False), (2, 6, 3, 3)),
    "1d": (lambda: nn.ConvTranspose1d(6, 3, 4, stride=2, padding=1), (2, 6, 9)),
    "3d-grouped": (lambda: nn.ConvTranspose3d(4, 6, (2, 3, 2), stride=(2, 1, 2), groups=2), (1, 4, 3, 4, 3)),
}
_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_C = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _spec(m: nn.Module):
    spec = make_spec(len(m.kernel_size), m.kernel_size, m.stride, m.padding, m.dilation, m.groups)
    return replace(spec, transposed=True, output_padding=tuple(m.output_padding))


def _geometry(m):
    return dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_is_the_exact_integer_transposed_conv(case):
    """y = (X_int8 (*)^T W_int8) s_X s_W[o], the integer sums exact (float64 of int codes is exact here), with
    one weight scale per *output* channel (W's dim 1 in each group)."""
    make, shape = CASES[case]
    torch.manual_seed(0)
    m = make()
    x = torch.randn(shape)
    y, x_q, s_x, w_q, s_w = quantized_forward(x, m.weight, _spec(m), resolve_backend("reference", x.device))
    w_int = w_q.reshape(m.weight.shape)
    nd = len(m.kernel_size)
    acc = _T[nd](x_q.double(), w_int.double(), None, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    assert torch.equal(y, acc.float() * (s_x * s_w).view(-1, *[1] * nd))
    c_in, og = m.weight.shape[:2]  # each output channel's codes reach +-127: W quantized per output channel
    per_out = w_int.view(m.groups, c_in // m.groups, og, -1).transpose(1, 2).reshape(m.groups * og, -1)
    assert torch.equal(per_out.abs().amax(1), torch.full((m.groups * og,), 127, dtype=torch.int8))
    assert F.cosine_similarity(y.flatten(), (m(x) - (0 if m.bias is None else m.bias.view(-1, *[1] * nd))).flatten(),
                               0) > 0.999


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_are_the_exact_integer_products(case):
    """With operands the quantizers represent exactly (X and W integer multiples of one step, dY integers
    in [-127, 127]; per-tensor gradient clips, nearest rounding), dX is the conv of dY with W (the
    transposed conv's adjoint) and dW the transposed conv's weight gradient, both as exact integers times one
    scale: each must be a constant multiple of the float64 computation, element for element."""
    make, shape = CASES[case]
    torch.manual_seed(0)
    m = make()
    nd = len(m.kernel_size)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every output channel's absmax 1: s_W the same for all, so dY s_W quantizes exactly
        w_int = torch.randint(-127, 128, m.weight.shape, generator=g).double()
        w_int[(slice(None), slice(None)) + (0,) * nd] = 127
        m.weight.copy_(w_int / 127)
    x_int = torch.randint(-127, 128, shape, generator=g).double()
    x_int.view(-1)[0] = 127
    x = (x_int / 127 * 0.5).float().requires_grad_()
    qm = int8fx.convert(copy.deepcopy(m), int8fx.Int8Config(grad_quant="per-tensor", rounding="nearest"))
    y = qm(x)
    dy_int = torch.randint(-127, 128, y.shape, generator=g).double()
    dy_int.view(-1)[0] = -127
    y.backward(dy_int.float())

    w_ = w_int.clone().requires_grad_()
    x_ = x_int.clone().requires_grad_()
    _T[nd](x_, w_, None, m.stride, m.padding, m.output_padding, m.groups, m.dilation).backward(dy_int)
    assert torch.equal(x_.grad, _C[nd](dy_int, w_int, None, **_geometry(m)))  # (the adjoint, for the record)
    for got, exact in ((x.grad, x_.grad), (qm.weight.grad, w_.grad)):
        nz = exact != 0
        ratio = got.double()[nz] / exact[nz]
        assert nz.sum() > exact.numel() // 2 and torch.equal(got.double()[~nz], exact[~nz])
        assert float((ratio / ratio[0] - 1).abs().max()) < 2**-22  # one scale, applied once in fp32


TRANSPOSED_SITES = {**{f"site:{k}": v for k, v in SITES.items() if k.startswith("conv-transpose")}, **CASES,
                    "2d-k4-s2-wide": (lambda: nn.ConvTranspose2d(24, 16, 4, stride=2, padding=1), (3, 24, 6, 5)),
                    "2d-k3-s1-channels-last": (lambda: nn.ConvTranspose2d(8, 12, 3, padding=1), (2, 8, 7, 6))}


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("grad_quant,rounding", [("per-tensor", "nearest"), ("gvq-mcs", "stochastic")])
@pytest.mark.parametrize("case", sorted(TRANSPOSED_SITES))
def test_channels_last_pipeline_equals_the_reference_pipeline(case, grad_quant, rounding, backend, monkeypatch):
    """On CPU a transposed site runs the channels-last pipeline (the conv's nhwc products with roles
    exchanged, int8fx.nn.transposed); its y, dX, dW and db over two steps equal, bit for bit, what the
    reference pipeline's layouts compute for the same site."""
    make, shape = TRANSPOSED_SITES[case]
    channels_last = case.endswith("channels-last")
    ran = []
    pipeline = functional.pipeline

    def spy(*args):
        kind, be = pipeline(*args)
        ran.append(kind)
        return kind, be

    monkeypatch.setattr(functional, "pipeline", spy)
    fast = run_site(make, shape, backend, grad_quant, rounding, channels_last=channels_last)
    assert set(ran) == {"nhwc"}
    monkeypatch.setattr(functional, "pipeline",
                        lambda backend, device, *rest: ("reference", resolve_backend("reference", device)))
    assert_same(run_site(make, shape, backend, grad_quant, rounding, channels_last=channels_last), fast)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_follow_fp32_with_per_channel_clips(case):
    """gvq-mcs (per-output-channel dW clips) on output channels whose gradients differ 300-fold in size: a
    per-channel scale put on the wrong channel would wreck dW's cosine to FP32."""
    make, shape = CASES[case]
    torch.manual_seed(0)
    m = make()
    qm = int8fx.convert(copy.deepcopy(m), int8fx.Int8Config(rounding="nearest"))
    x = torch.randn(shape)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = m(x1), qm(x2)
    o = y1.shape[1]
    dy = torch.randn(y1.shape) * torch.logspace(0, 2.5, o).view(1, o, *[1] * (y1.dim() - 2))
    y1.backward(dy)
    y2.backward(dy)
    cos = lambda a, b: float(F.cosine_similarity(a.detach().flatten().double(), b.detach().flatten().double(), 0))  # noqa: E731
    assert cos(y1, y2) > 0.999
    assert cos(x1.grad, x2.grad) > 0.99 and cos(m.weight.grad, qm.weight.grad) > 0.99
    if m.bias is not None:
        torch.testing.assert_close(m.bias.grad, qm.bias.grad, rtol=1e-5, atol=0)  # dY's sums, in another order


def test_the_converted_module_is_the_users_transposed_conv():
    """Converted in place (class, isinstance, repr), listed by inspect, `output_size` and unbatched inputs as
    torch takes them, pass-through exact, and torch's errors for bad arguments."""
    torch.manual_seed(0)
    m = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1)
    ref = copy.deepcopy(m)
    qm = int8fx.convert(m)
    assert isinstance(qm, nn.ConvTranspose2d) and "ConvTranspose2d" in type(qm).__name__
    row = int8fx.inspect(qm).layers[0]
    assert row.converted and row.op == "conv_transpose2d"
    x = torch.randn(2, 4, 5, 5)
    for size in (None, [9, 9], [10, 10]):
        y = qm(x, output_size=size)
        assert y.shape == ref(x, output_size=size).shape
        assert F.cosine_similarity(y.flatten(), ref(x, size).flatten(), 0) > 0.999
    assert qm(x[0]).shape == ref(x[0]).shape == (3, 9, 9)
    empty = torch.zeros(0, 4, 5, 5, requires_grad=True)  # an empty batch: an empty output, zero gradients
    qm(empty, [10, 10]).sum().backward()
    assert empty.grad.shape == empty.shape and not qm.weight.grad.any()
    with pytest.raises(ValueError, match="output_size|requested an output size"):
        qm(x, output_size=[20, 20])
    with pytest.raises(ValueError, match="input channels"):
        qm(torch.randn(2, 3, 5, 5))
    bad = int8fx.convert(nn.ConvTranspose2d(4, 3, 3, stride=2, output_padding=2))
    with pytest.raises(ValueError, match="output padding"):
        bad(x)
    with pytest.raises(TypeError):
        int8fx.convert(nn.Conv2d(4, 3, 3))(x, [9, 9])  # a conv takes no output_size, converted or not
    exact = int8fx.convert(copy.deepcopy(ref), int8fx.Int8Config(quantize=False))
    assert torch.equal(exact(x, [10, 10]), ref(x, [10, 10]))
    back = int8fx.to_float(copy.deepcopy(qm))
    assert type(back) is nn.ConvTranspose2d and torch.equal(back(x), ref(x))


def _tied_decode(h, w):
    return F.conv_transpose2d(h, w, stride=2)


torch.fx.wrap("_tied_decode")  # opaque to torch.fx: called with its module-site weights routed


class _OwnCall(nn.Module):
    """F.conv_transpose2d on a parameter of its own, and on a conv module site's weight (a tied decoder), in
    its own code and in an opaque function."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 2, stride=2)
        self.w = nn.Parameter(torch.randn(4, 3, 2, 2) / 4)

    def forward(self, x):
        h = F.relu(self.enc(x))
        return (F.conv_transpose2d(h, self.w, stride=2) + F.conv_transpose2d(h, self.enc.weight, stride=2)
                + _tied_decode(h, self.enc.weight))  # (a routed call on the conv's weight: a site of its own)


class _OwnForward(nn.ConvTranspose2d):
    def forward(self, x, output_size=None):
        return super().forward(x * 2, output_size)


class _Untraceable(nn.ConvTranspose2d):
    def forward(self, x):
        if x.abs().sum() >= 0:  # data-dependent control flow: torch.fx cannot trace it
            return super().forward(x)
        return x


def test_transposed_calls_in_own_code_own_forwards_and_untraceable_subclasses_are_int8_sites():
    """Every way a transposed conv is called becomes an INT8 site: F.conv_transpose2d in a module's own code
    (a tied weight, a conv site's used in a transposed call, gets a site of its own rather than the conv's),
    and ConvTranspose2d subclasses with forwards of their own (routed at run time: torch.fx cannot trace the
    output-size arithmetic of a given `output_size`, nor data-dependent control flow). Pass-through is exact; INT8 follows FP32 and every parameter gets a gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(_OwnCall(), _OwnForward(3, 4, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
                          _Untraceable(4, 2, 2, stride=2))
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left in FP32
        qm = int8fx.convert(copy.deepcopy(model))
    rows = [(r.name, r.op, r.converted, r.source) for r in int8fx.inspect(qm).layers]
    assert sorted(rows) == sorted([
        ("0.enc", "conv2d", True, "module"), ("0.conv_transpose2d", "conv_transpose2d", True, "function"),
        ("0.conv_transpose2d_1", "conv_transpose2d", True, "function"), ("1", "conv_transpose2d", True, "routed"),
        ("3", "conv_transpose2d", True, "routed"), ("0._tied_decode.conv_transpose2d", "conv_transpose2d", True, "routed")])
    exact = int8fx.convert(copy.deepcopy(model), int8fx.Int8Config(quantize=False))
    assert torch.equal(exact(x), model(x))
    y, y_fp = qm(x), model(x)
    assert y.shape == y_fp.shape == (2, 2, 32, 32)
    assert F.cosine_similarity(y.flatten(), y_fp.flatten(), 0) > 0.999
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0 for p in qm.parameters())
    assert all(int(m.calls) == 1 for m in qm.modules() if isinstance(m, int8fx.nn.modules.Int8Layer))


@torch.fx.wrap
def _tied_decode_by_name(z, w):  # the same call, through a name the code does not spell
    return getattr(F, "_".join(["conv", "transpose2d"]))(z, w, stride=2)


class _WrappedTiedAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return _tied_decode(torch.relu(self.enc(x)), self.enc.weight)


class _WrappedTiedAEByName(_WrappedTiedAE):
    def forward(self, x):
        return _tied_decode_by_name(torch.relu(self.enc(x)), self.enc.weight)


def test_a_tied_transposed_call_inside_a_wrapped_function_is_a_site_of_its_own():
    """A conv's weight handed to a `torch.fx.wrap`-ped function (`_tied_decode`, above) that calls
    F.conv_transpose2d with it: the
    function's code names the op, so convert gives those calls a site of their own (it ran in FP32 and no
    report said so). Where the code does not spell the op, the call runs in FP32 and says so once."""
    torch.manual_seed(0)
    model = _WrappedTiedAE()
    x = torch.randn(2, 3, 9, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left in FP32
        qm = int8fx.convert(copy.deepcopy(model))
        y = qm(x)
    rows = sorted((r.name, r.op, r.converted, r.source) for r in int8fx.inspect(qm).layers)
    assert rows == [("_tied_decode.conv_transpose2d", "conv_transpose2d", True, "routed"),
                    ("enc", "conv2d", True, "module")]
    sites = {m.site_name: m for m in qm.modules() if isinstance(m, int8fx.nn.modules.Int8Layer)}
    y_fp = model(x)
    assert y.shape == y_fp.shape and F.cosine_similarity(y.flatten(), y_fp.flatten(), 0) > 0.99
    y.square().sum().backward()
    model(x).square().sum().backward()
    assert F.cosine_similarity(qm.enc.weight.grad.flatten(), model.enc.weight.grad.flatten(), 0) > 0.99
    assert [int(sites[n].calls) for n in sorted(sites)] == [1, 1]  # each site ran its own call, once
    exact = int8fx.convert(copy.deepcopy(model), int8fx.Int8Config(quantize=False))
    assert torch.equal(exact(x), model(x))

    unnamed = int8fx.convert(_WrappedTiedAEByName())
    assert [r.name for r in int8fx.inspect(unnamed).layers] == ["enc"]
    with pytest.warns(UserWarning, match=r"F.conv_transpose2d call on the weight of enc .* runs in FP32"):
        unnamed(x)


@needs_data
def test_a_decoder_with_int8_transposed_convs_learns_as_fp32_does():
    """A conv autoencoder whose decoder is two strided ConvTranspose2d, 100 Adam steps on Fashion-MNIST images,
    FP32 and INT8 from the same init: the reconstruction error on 1024 held-out images is within 5% of
    FP32's (measured: 0.0329 vs 0.0324 at 150 steps), and well below the untrained model's."""
    from int8fx.data import load_fashion_mnist, normalize_images

    images = normalize_images(load_fashion_mnist("train")[0][:7168])
    train, held_out = images[:6144], images[6144:]

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                             nn.ConvTranspose2d(32, 16, 3, 2, 1, output_padding=1), nn.ReLU(),
                             nn.ConvTranspose2d(16, 1, 3, 2, 1, output_padding=1))

    def error(m):
        with torch.no_grad():
            return float((m.eval()(held_out) - held_out).square().mean())

    untrained = error(make())
    errors = {}
    for int8 in (False, True):
        m = int8fx.convert(make()) if int8 else make()
        opt = torch.optim.Adam(m.parameters(), 3e-3)
        for step in range(100):
            b = train[step % 96 * 64:][:64]
            loss = (m(b) - b).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        errors[int8] = error(m)
    assert errors[False] < 0.5 * untrained
    assert errors[True] < 1.05 * errors[False], errors


@pytest.mark.parametrize("exporter", exporters("torchscript", "dynamo"))
def test_faithful_onnx_carries_the_transposed_sites_qdq_and_equals_eval_mode(tmp_path, exporter):
    """The faithful file: Clip -> QuantizeLinear -> DequantizeLinear -> ConvTranspose, W's int8 codes behind a
    DequantizeLinear on axis 1 (its output channels); onnxruntime without graph optimizations equals
    qm.eval() to float summation error. (Its optimized ConvTranspose sums differently, ~1e-5 relative, which
    can flip a rounding in a quantizer after it.) Grouped transposed convs are refused with an error that
    says what to do, and no file."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    from int8fx.onnx.errors import OnnxExportError

    torch.manual_seed(0)
    qm = int8fx.convert(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)))
    x = torch.randn(2, 3, 16, 16)
    for _ in range(2):
        qm(x).square().mean().backward()
        int8fx.commit(qm)
    qm.eval()
    path = tmp_path / "f.onnx"
    int8fx.export_onnx(qm, x, path, form="faithful", exporter=exporter)
    meta = int8fx.read_onnx_metadata(path)
    site = meta["layers"]["2"]
    assert site["op"] == "conv_transpose2d" and site["exported"] and site["forward"]["weight"]["axis"] == 1
    import onnx

    nodes = {n.name: n for n in onnx.load(path).graph.node}
    assert nodes["2/compute"].op_type == "ConvTranspose" and nodes["2/w_dequantize"].op_type == "DequantizeLinear"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    out = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    ref = qm(x).detach()
    assert float((torch.from_numpy(out) - ref).abs().max()) <= 1e-6 * float(ref.abs().max())

    grouped = int8fx.convert(nn.Sequential(nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2))).eval()
    with pytest.raises(OnnxExportError, match=r"grouped INT8 transposed .* 0 .*exclude"):
        int8fx.export_onnx(grouped, torch.randn(1, 4, 3, 3), tmp_path / "g.onnx", exporter=exporter)
    assert not (tmp_path / "g.onnx").exists()


@pytest.mark.parametrize("exporter", exporters("torchscript", "dynamo"))
def test_deploy_onnx_quantizes_the_transposed_sites_at_int8fxs_scales(tmp_path, exporter):
    """The deploy form of a decoder (a transposed conv followed by BatchNorm, one with a bias and one whose
    output the model returns): each transposed site's ConvTranspose reads its input through a QuantizeLinear
    at the site's own scale and its weight as int8 initializers on axis 1 (its output channels) that are
    int8fx's codes (up to the sign of a folded BatchNorm's factor). onnxruntime has no integer
    ConvTranspose kernel, so it runs it in float on those dequantized weights, as it does for its own
    quantizer's files (TensorRT takes Q/DQ deconvolutions in INT8); the output stays within the deploy
    form's roundings of qm.eval()."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    from onnx import numpy_helper

    torch.manual_seed(0)
    qm = int8fx.convert(nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, bias=False),
                                      nn.BatchNorm2d(8), nn.ReLU(), nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)))
    opt = torch.optim.SGD(qm.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        qm(torch.randn(8, 3, 16, 16, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    qm.eval()
    x = torch.randn(8, 3, 16, 16, generator=gen)
    path = tmp_path / "d.onnx"
    int8fx.export_onnx(qm, x[:1], path, form="deploy", exporter=exporter, calibration_data=[x])
    meta = int8fx.read_onnx_metadata(path)
    assert meta["deploy"]["sites_without_onnxruntime_int8_kernel"] == ["3", "6"]
    model = onnx.load(path)
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for site, layer in (("3", qm[3]), ("6", qm[6])):
        assert meta["layers"][site]["op"] == "conv_transpose2d" and meta["layers"][site]["exported"]
        call = meta["layers"][site]["onnx"][0] if "onnx" in meta["layers"][site] else None
        compute = nodes[f"{site}/compute"]
        assert compute.op_type == "ConvTranspose"
        wdq, xq = nodes[f"{site}/w_dequantize"], nodes[f"{site}/x_quantize"]
        assert [a.i for a in wdq.attribute if a.name == "axis"] == [1]
        codes = inits[wdq.input[0]]
        w = layer.weight.detach()
        ours = torch.round(w / (w.abs().amax(dim=(0, 2, 3), keepdim=True) / 127)).numpy()  # per output channel
        assert codes.dtype == np.int8 and (np.abs(codes) == np.abs(ours)).all(), site
        assert float(inits[xq.input[1]]) == pytest.approx(float(layer.act_clip_ema) / 127, rel=1e-6), call
    opts = ort.SessionOptions()
    out = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    ref = qm(x).detach()
    err = (torch.from_numpy(out) - ref).abs()
    assert float(err.max()) < 0.05 * float(ref.abs().max()) and float(err.mean()) < 0.01 * float(ref.abs().mean())
