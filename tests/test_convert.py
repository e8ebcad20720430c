"""convert(): every conv/linear site becomes an INT8 op computing exactly the quantized math, the model's
names and the input model are preserved, and what is not converted says why."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import int8fx
from int8fx.nn import Int8Layer
from int8fx.quant import dequantize, quantize_per_channel, quantize_per_tensor

PER_TENSOR = int8fx.Int8Config(grad_quant="per-tensor", rounding="nearest")  # the emulation rounds to nearest
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _emulate(mod, x, dy):
    """Independent fake-quant emulation of the INT8 op with per-tensor gradient clips: forward on
    dequantized X (per tensor) and W (per out channel); dW from per-tensor-quantized dY; dX from
    per-tensor-quantized dY*s_W (the weight scale folded in). Returns (y, dx, dw)."""
    xin = x
    if getattr(mod, "padding_mode", "zeros") != "zeros":
        xin = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
    xq, sx = quantize_per_tensor(xin.detach())
    xh = dequantize(xq, sx).requires_grad_()
    wq, sw = quantize_per_channel(mod.weight.detach(), 0)
    wh = dequantize(wq, sw.view([-1] + [1] * (mod.weight.dim() - 1))).requires_grad_()
    if isinstance(mod, nn.Linear):
        ref, rows = F.linear(xh, wh, mod.bias), dy.reshape(-1, dy.shape[-1])
        unrows = lambda r: r.reshape(dy.shape)  # noqa: E731
    else:
        pad = mod.padding if mod.padding_mode == "zeros" else 0
        ref = CONV[mod.weight.dim() - 2](xh, wh, mod.bias, mod.stride, pad, mod.dilation, mod.groups)
        rows = dy.movedim(1, -1).reshape(-1, dy.shape[1])
        unrows = lambda r: r.reshape(dy.movedim(1, -1).shape).movedim(-1, 1)  # noqa: E731
    dq, sd = quantize_per_tensor(rows)
    gq, sg = quantize_per_tensor(rows * sw)
    dw, = torch.autograd.grad(ref, wh, unrows(dequantize(dq, sd)), retain_graph=True)
    dx, = torch.autograd.grad(ref, xh, unrows(dequantize(gq, sg) / sw))
    if xin is not x:
        dx, = torch.autograd.grad(xin, x, dx)
    return ref.detach(), dx, dw


LAYERS = [
    (lambda: nn.Conv1d(6, 9, 3, stride=2, padding=2, dilation=2, groups=3), (2, 6, 17)),
    (lambda: nn.Conv2d(64, 128, 3, stride=2, padding=1), (4, 64, 12, 12)),
    (lambda: nn.Conv2d(8, 8, 3, padding="same", groups=8, padding_mode="reflect", dilation=2, bias=False), (2, 8, 9, 10)),
    (lambda: nn.Conv2d(8, 4, (2, 3), padding="same", padding_mode="circular"), (2, 8, 9, 10)),
    (lambda: nn.Conv2d(6, 6, 3, padding=1, padding_mode="replicate", groups=2), (2, 6, 7, 5)),
    (lambda: nn.Conv3d(4, 8, (3, 2, 3), stride=(1, 2, 1), padding=1, groups=2), (2, 4, 5, 6, 7)),
    (lambda: nn.Conv2d(3, 5, 1), (2, 3, 4, 4)),
    (lambda: nn.Linear(7, 5), (3, 4, 7)),
]


@pytest.mark.parametrize("make,shape", LAYERS)
def test_layer_matches_quantized_math(make, shape):
    mod = make()
    qm = int8fx.convert(mod, PER_TENSOR)
    x = torch.randn(shape, requires_grad=True)
    y = qm(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref, dx, dw = _emulate(mod, x.detach().requires_grad_(), dy)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert torch.allclose(x.grad, dx, rtol=1e-5, atol=1e-5 * dx.abs().max().item())
    assert torch.allclose(qm.weight.grad, dw, rtol=1e-5, atol=1e-5 * dw.abs().max().item())
    if mod.bias is not None:
        assert torch.allclose(qm.bias.grad, dy.sum([d for d in range(dy.dim()) if d != (1 if dy.dim() > 2 and not isinstance(mod, nn.Linear) else dy.dim() - 1)]), rtol=1e-5, atol=1e-5)


class Functional(nn.Module):
    """Functional conv/linear calls: a plain parameter, a weight computed from parameters only
    (weight standardisation), and a weight that depends on the input (per-sample weights)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.w2 = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.fc_w = nn.Parameter(torch.randn(10, 8) * 0.2)
        self.fc_b = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, None, 1, 1))
        w2 = (self.w2 - self.w2.mean(dim=(1, 2, 3), keepdim=True)) / (self.w2.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        x = F.relu(torch.conv2d(x, w2, padding=1, groups=1))
        z = x.mean(dim=(2, 3))
        dyn = F.linear(z, z.t() @ z * 1e-3)  # weight depends on the input
        return F.linear(z + dyn, self.fc_w, self.fc_b)


def test_functional_sites():
    m = Functional()
    qm = int8fx.convert(m)
    rep = int8fx.inspect(qm)
    by_src = [(r.op, r.source, r.converted) for r in rep.layers]
    assert by_src.count(("conv2d", "function", True)) == 2
    assert by_src.count(("linear", "function", True)) == 2  # the input-dependent weight too: sized at its first call
    assert not rep.skipped
    x = torch.randn(2, 3, 8, 8)
    qm(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in qm.parameters())
    assert set(dict(m.named_parameters())) == set(dict(qm.named_parameters()))


def test_input_model_untouched_and_state_dict_names_identical():
    import torchvision

    m = torchvision.models.resnet18(num_classes=10)
    before = copy.deepcopy(m.state_dict())
    qm = int8fx.convert(m)
    assert not any(isinstance(x, Int8Layer) for x in m.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert set(int8fx.float_state_dict(qm)) == set(m.state_dict())
    m.load_state_dict(int8fx.float_state_dict(qm), strict=True)  # INT8 -> FP32
    qm.load_state_dict(m.state_dict(), strict=True)  # FP32 -> INT8 (quantizer state starts fresh)
    assert type(qm) is type(m) and isinstance(qm.layer1[0].conv1, nn.Conv2d)


def test_exclude_and_overrides():
    import torchvision

    m = torchvision.models.resnet18(num_classes=10)
    cfg = int8fx.Int8Config(exclude=("conv1", "fc"), overrides={"layer4.*": {"grad_quant": "per-tensor"}})
    qm = int8fx.convert(m, cfg)
    rows = {r.name: r for r in int8fx.inspect(qm).layers}
    assert not rows["conv1"].converted and "exclude" in rows["conv1"].reason
    assert not rows["fc"].converted
    assert isinstance(qm.conv1, nn.Conv2d) and not isinstance(qm.conv1, Int8Layer)
    assert rows["layer4.0.conv1"].grad_quant == "per-tensor" and rows["layer1.0.conv1"].grad_quant == cfg.grad_quant
    qm2 = int8fx.convert(m, int8fx.Int8Config(exclude=(nn.Linear,)))
    assert not {r.name: r for r in int8fx.inspect(qm2).layers}["fc"].converted
    by_type = int8fx.Int8Config(overrides={nn.Linear: {"grad_quant": "dsgc"}, "layer1.*": {"rounding": "stochastic"}})
    rows3 = {r.name: r for r in int8fx.inspect(int8fx.convert(m, by_type)).layers}
    assert rows3["fc"].grad_quant == "dsgc" and rows3["conv1"].grad_quant == by_type.grad_quant
    assert "torch.nn.modules.linear.Linear" in by_type.to_dict()["overrides"]
    with pytest.raises(int8fx.ConfigError, match="types"):
        int8fx.Int8Config(overrides={3: {"grad_quant": "dsgc"}})
    # one pattern or type given alone is that one item (a string is not a pattern per character)
    assert int8fx.Int8Config(exclude="conv1").exclude == ("conv1",)
    assert int8fx.Int8Config(exclude=nn.Linear).exclude == (nn.Linear,)
    alone = {r.name: r for r in int8fx.inspect(int8fx.convert(m, int8fx.Int8Config(exclude="layer4.*"))).layers}
    assert not alone["layer4.0.conv1"].converted and alone["layer3.0.conv1"].converted
    with pytest.raises(int8fx.ConfigError, match="name patterns"):
        int8fx.Int8Config(exclude=3)


def test_patterns_that_match_no_site_are_warned_about_with_the_names_they_were_close_to():
    """A mistyped pattern would leave the layers it meant in INT8 (or on the default policy) silently."""
    import warnings

    import torchvision

    m = torchvision.models.resnet18(num_classes=10)
    typo = int8fx.Int8Config(exclude=("fc", "conv_1", nn.Conv1d), overrides={"layer4.conv*": {"grad_quant": "dsgc"}})
    with pytest.warns(UserWarning, match="patterns that match no conv/linear site change nothing") as caught:
        int8fx.convert(m, typo)
    text = " ".join(str(w.message) for w in caught)
    assert "exclude 'conv_1' (close: conv1)" in text and "exclude Conv1d" in text
    assert "overrides 'layer4.conv*' (close: layer4." in text and "'fc'" not in text
    right = int8fx.Int8Config(exclude=("fc", nn.Conv2d), overrides={"layer4.*": {"grad_quant": "dsgc"}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        int8fx.convert(m, right)
    assert not [w for w in caught if "match no conv/linear site" in str(w.message)]


def test_config_errors_list_valid_values():
    with pytest.raises(int8fx.ConfigError, match="per-tensor"):
        int8fx.Int8Config(grad_quant="nope")
    with pytest.raises(int8fx.ConfigError, match="stochastic"):
        int8fx.Int8Config(rounding="up")
    with pytest.raises(int8fx.ConfigError, match="reference"):
        int8fx.Int8Config(backend="tpu")
    with pytest.raises(int8fx.ConfigError, match="unknown fields"):
        int8fx.Int8Config(overrides={"fc": {"grad_qant": "dsgc"}})
    with pytest.raises(int8fx.ConfigError, match="per-tensor"):
        int8fx.Int8Config(overrides={"fc": {"grad_quant": "bogus"}})
    with pytest.raises(TypeError):
        int8fx.convert("resnet18")


def test_subclass_with_own_forward_is_reported_not_converted():
    class WSConv(nn.Conv2d):
        def forward(self, x):
            w = self.weight - self.weight.mean()
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    m = nn.Sequential(WSConv(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    rep = int8fx.inspect(int8fx.convert(m))
    # the subclass is traced through (its F.conv2d becomes a functional INT8 site); the plain conv a module site
    assert all(r.converted for r in rep.layers) and len(rep.layers) == 2


@torch.fx.wrap
def _wrapped_attention(x, qkv_weight, proj_weight, qkv_bias):
    """Stands in for torchvision's fx-wrapped shifted_window_attention: weights arrive as arguments."""
    q, k, v = F.linear(x, qkv_weight, qkv_bias).chunk(3, dim=-1)
    a = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return F.linear(a @ v, proj_weight)


class HiddenSites(nn.Module):
    """Conv/linear weights used only by code the tracer does not enter."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16, bias=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = x + self.mha(x, x, x, need_weights=False)[0]
        x = x + _wrapped_attention(x, self.qkv.weight, self.proj.weight, self.qkv.bias)
        return self.head(x.mean(1))


def test_opaque_code_sites_run_in_int8():
    m = HiddenSites()
    qm = int8fx.convert(m, PER_TENSOR)
    rep = int8fx.inspect(qm)
    names = {r.name: r for r in rep.layers}
    assert {"mha.in_proj", "mha.out_proj", "qkv", "proj", "head"} <= set(names)
    assert all(r.converted for r in rep.layers), [(r.name, r.reason) for r in rep.skipped]
    x = torch.randn(2, 5, 16)
    y, yq = m(x), qm(x)
    assert F.cosine_similarity(y.flatten(), yq.flatten(), 0) > 0.99
    yq.sum().backward()
    int8fx.commit(qm)  # what an optimizer step does: the state of that backward becomes current
    layers = [r for r in rep.layers]
    steps = {r.name: int(names[r.name].step) for r in layers}
    rep2 = int8fx.inspect(qm)
    assert all(r.step == 1 for r in rep2.layers), {r.name: r.step for r in rep2.layers}  # each INT8 backward ran once
    assert set(int8fx.float_state_dict(qm)) == set(m.state_dict())
    assert steps  # inspected before the step: nothing had run yet
    assert all(v == 0 for v in steps.values())


class AttentionPool(nn.Module):
    """CLIP's attention pooling (open_clip's ModifiedResNet): its own code passes its Linear children's weights
    to `F.multi_head_attention_forward`, which torch.fx records as one call."""

    def __init__(self, d=16, heads=2, out=8):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(17, d) / d**0.5)
        self.q_proj, self.k_proj, self.v_proj, self.c_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, out)

    def forward(self, x):
        x = x.flatten(2).permute(2, 0, 1)
        x = torch.cat([x.mean(0, keepdim=True), x]) + self.pos[:, None, :]
        x, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=2, q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]), bias_k=None, bias_v=None,
            add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True, training=self.training, need_weights=False)
        return x[0]


def test_projections_passed_to_multi_head_attention_forward_run_in_int8():
    """The four projections' module sites compute the attention's F.linear calls: before, they were listed as
    converted while the attention ran them in FP32 on their weights (one warning named q_proj alone)."""
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), AttentionPool())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "stays FP32" warning
        qm = int8fx.convert(m, PER_TENSOR)
    rep = int8fx.inspect(qm)
    assert [(r.name, r.converted) for r in rep.layers] == [
        ("0", True), ("1.q_proj", True), ("1.k_proj", True), ("1.v_proj", True), ("1.c_proj", True)]
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y, yq = m(x), qm(x)
    assert not torch.equal(y, yq) and F.cosine_similarity(y.flatten(), yq.flatten(), 0) > 0.99
    yq.sum().backward()
    int8fx.commit(qm)
    assert {r.name: r.step for r in int8fx.inspect(qm).layers} == {r.name: 1 for r in rep.layers}  # each ran INT8


def test_warnings_the_code_raises_on_proxies_while_traced_stay_quiet():
    """convert traces a module's forward with proxies; code that warns on what it gets then (diffusers: `if
    kwargs.get("scale") is not None: deprecate(...)`, true of a proxy) does not warn at convert. (At run time a rewritten module
    replays its graph, which holds the computation and not Python's side effects such as a warning: unchanged.)"""

    class Deprecating(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x, scale=None):
            if scale is not None:
                warnings.warn("Passing `scale` is deprecated", FutureWarning)
            return F.conv2d(x, self.w, padding=1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qm = int8fx.convert(nn.Sequential(Deprecating()))
    assert all(r.converted for r in int8fx.inspect(qm).layers)


def test_unseen_weight_use_is_reported_not_dropped():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            # an einsum, not a linear call: not a site int8fx converts (`x @ w.t()` is: see test_user_model)
            return torch.einsum("bi,oi->bo", x, self.fc.weight)

    rep = int8fx.inspect(int8fx.convert(Sneaky()))
    assert [(r.name, r.converted) for r in rep.layers] == [("einsum", False), ("fc", True)]
    assert "computes with fc.weight outside a conv/linear call" in rep.layers[0].reason


def test_detection_model_converts_with_its_root_opaque():
    """A detector's own forward (data-dependent control flow) stays opaque while every conv/linear under it
    converts. Its training step is tests/test_model_zoo.py's (fasterrcnn_mobilenet_v3_large_320_fpn in the CI
    subset: losses, finite gradients for every parameter, gradient cosine to FP32)."""
    import torchvision

    m = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None,
                                                                           num_classes=3)
    qm = int8fx.convert(m)
    rep = int8fx.inspect(qm)
    assert len(rep.layers) > 60 and all(r.converted for r in rep.layers), [(r.name, r.reason) for r in rep.skipped]
    assert rep.opaque and rep.opaque[0].name == "(root)"  # data-dependent control flow: the root stays opaque
    assert type(qm) is type(m)  # the detector keeps its own class and API


def test_stochastic_gradient_rounding_is_unbiased_through_the_op():
    """Why stochastic rounding is the default: with one clip per tensor (dX) or channel (dW), nearest
    rounding turns every gradient entry below half a step into 0, so the samples of a batch whose
    gradients are small (the ones the model already gets right) stop contributing. Measured here with
    per-sample gradient magnitudes spread over three decades: nearest zeroes the small samples' dX
    exactly, while the mean over seeds of stochastically rounded gradients converges to the gradient of
    the quantized forward with unquantized dY (the straight-through target)."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(64, 16)
    dy = torch.randn(64, 8) * 10 ** (-3 * torch.rand(64, 1))
    xh = dequantize(*quantize_per_tensor(x))
    wq, sw = quantize_per_channel(lin.weight.detach(), 0)
    dw_ste, dx_ste = dy.t() @ xh, dy @ dequantize(wq, sw.view(-1, 1))

    def grads(rounding, seed):
        qm = int8fx.convert(lin, int8fx.Int8Config(rounding=rounding, seed=seed))
        xx = x.clone().requires_grad_()
        qm(xx).backward(dy)
        return qm.weight.grad, xx.grad

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert int8fx.Int8Config().rounding == "stochastic"
    near_w, near_x = grads("nearest", 0)
    sr = [grads("stochastic", s) for s in range(64)]
    mean_w, mean_x = (torch.stack(g).mean(0) for g in zip(*sr))
    small = dy.abs().amax(1) < 1e-2
    assert small.sum() >= 10
    assert torch.all(near_x[small] == 0)  # the bias: these samples' input gradients vanish
    assert rel(mean_x[small], dx_ste[small]) < 0.4  # measured 0.23
    assert rel(mean_w, dw_ste) < rel(near_w, dw_ste) / 3  # measured 0.0023 vs 0.013
    assert rel(mean_x, dx_ste) < rel(near_x, dx_ste) / 3  # measured 0.0031 vs 0.016
    assert not torch.equal(sr[0][0], sr[1][0])  # the seed reaches the rounding


def test_eval_forward_uses_the_training_clip_so_predictions_do_not_depend_on_the_batch():
    """In eval mode a trained layer quantizes with its running training clip (`act_clip_ema`), so one
    image's output does not change with the other images of its batch, and it matches the ONNX export.
    eval_act_clip="batch" (each batch's own absmax) is the dynamic alternative: there an outlier in the
    batch coarsens everybody's scale."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = torch.randn(5, 3, 8, 8)
    outlier = torch.cat([x[:1], 50 * x[1:2]])
    for mode, stable in (("ema", True), ("batch", False)):
        qm = int8fx.convert(model, int8fx.Int8Config(eval_act_clip=mode))
        qm(x).sum().backward()  # one training forward: act_clip_ema is set (when a step commits it)
        int8fx.commit(qm)
        qm.eval()
        with torch.no_grad():
            alone, with_outlier = qm(x[:1]), qm(outlier)[:1]
        assert torch.equal(alone, with_outlier) == stable, mode
    layer = [m for m in qm.modules() if isinstance(m, Int8Layer)][0]
    qm.train()
    qm(x)  # train mode: the batch's own absmax, and the running clip moves
    assert float(layer.act_clip) == pytest.approx(float(x.abs().max()))
    with pytest.raises(int8fx.config.ConfigError, match="eval_act_clip"):
        int8fx.Int8Config(eval_act_clip="static")


def test_untraceable_code_with_weights_of_its_own_is_warned_about():
    """A module whose forward branches on a tensor value cannot be traced, so an F.conv2d call on its own
    weight stays FP32; the report listed the module, convert said nothing. It now warns, naming the weight;
    an untraceable module whose only weights are its conv children's (all converted) gives no warning."""

    class Branchy(nn.Module):
        def __init__(self, own: bool):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.w = nn.Parameter(torch.randn(3, 3, 1, 1)) if own else None
            self.norm_scale = nn.Parameter(torch.ones(3))  # 1-d: no conv/linear weight

        def forward(self, x):
            y = self.conv(x) * self.norm_scale.view(1, -1, 1, 1)
            if self.w is not None and y.mean() > 0:  # data-dependent: torch.fx cannot trace it
                y = F.conv2d(y, self.w)
            return y

    with pytest.warns(UserWarning, match=r"1 module\(s\) may make F.conv\*d / F.linear calls int8fx cannot see.*"
                                         r"\(root\) \(Branchy\) uses its own w in code int8fx cannot rewrite"):
        qm = int8fx.convert(Branchy(own=True))
    assert "its own weights: w" in str(int8fx.inspect(qm))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        int8fx.convert(Branchy(own=False))


def test_a_model_torch_cannot_copy_is_a_clear_error_and_converts_in_place():
    """A pruned conv's weight is a computed tensor, which deepcopy refuses: convert (which copies by default)
    failed with torch's message about graph leaves. It now says to pass inplace=True, which works: the pruned
    weights' gradients stay masked and match FP32's."""
    import torch.nn.utils.prune as prune

    def pruned():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        prune.l1_unstructured(m[2], "weight", 0.5)
        return m

    with pytest.raises(RuntimeError, match="int8fx.convert works on a copy .* pass inplace=True"):
        int8fx.convert(pruned())
    ref, qm = pruned(), int8fx.convert(pruned(), inplace=True)
    assert [s.converted for s in int8fx.inspect(qm).layers] == [True, True]
    x = torch.randn(4, 3, 12, 12)
    qm(x).square().mean().backward()
    ref(x).square().mean().backward()
    g, g_ref = qm[2].weight_orig.grad, ref[2].weight_orig.grad
    assert bool((g[ref[2].weight_mask == 0] == 0).all())
    assert F.cosine_similarity(g.flatten(), g_ref.flatten(), 0) > 0.99


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_a_conv_subclass_overriding_conv_forward_keeps_its_computation(conv):
    """A subclass may override `_conv_forward` alone (here: weight standardisation), keeping torch's forward.
    It was taken for a plain conv, and the module site computed F.conv on the raw weight: outputs off by
    ~15 (the standardised weight's scale), weight-gradient cosine 0.37, no word. Its code is now traced like
    any module's own code: the call on the standardised weight is the site."""

    dims = (1, 2, 3) if conv is nn.Conv2d else (1, 2)

    class WSConv(conv):
        def _conv_forward(self, x, w, b):
            w = (w - w.mean(dim=dims, keepdim=True)) / (w.std(dim=dims, keepdim=True) + 1e-5)
            return super()._conv_forward(x, w, b)

    torch.manual_seed(0)
    m = nn.Sequential(WSConv(3, 8, 3), nn.ReLU(), WSConv(8, 4, 3))
    x = torch.randn(4, 3, *([12] * (2 if conv is nn.Conv2d else 1)))
    assert torch.equal(int8fx.convert(m, int8fx.Int8Config(quantize=False))(x), m(x))
    qm = int8fx.convert(m)
    assert [(s.converted, s.source) for s in int8fx.inspect(qm).layers] == [(True, "function")] * 2
    y, y_ref = qm(x), m(x)
    assert (y - y_ref).abs().max() < 0.05 * y_ref.abs().max()
    y.square().mean().backward()
    y_ref.square().mean().backward()
    for a, b in zip(qm.parameters(), m.parameters()):
        assert F.cosine_similarity(a.grad.flatten(), b.grad.flatten(), 0) > 0.99


def test_sites_left_in_fp32_by_accident_are_warned_about_and_chosen_ones_are_not():
    """An uninitialised lazy module cannot be converted: the model would train in FP32 without a word
    (inspect said why, convert did not)."""
    lazy = nn.Sequential(nn.LazyConv2d(8, 3), nn.Flatten(), nn.LazyLinear(4))
    with pytest.warns(UserWarning, match=r"2 conv/linear site\(s\) stay in full precision \(0: lazy module"):
        int8fx.convert(lazy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        int8fx.convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)), int8fx.Int8Config(exclude=["0"]),
                       filter_fn=lambda name, m: name != "1")
