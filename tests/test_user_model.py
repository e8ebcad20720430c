"""A converted model is the user's model: class, module tree, hooks, forward code (its own checkpointing,
its branches on `self.training`), copies and pickles all survive; only conv/linear sites change."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint

import int8fx
from int8fx import fusing
from int8fx.nn import Int8Function, Int8Layer, ModuleSite, Rewritten, Routed
from int8fx.passes import conversion_of, sites_of

torchvision = pytest.importorskip("torchvision")
X = torch.randn(2, 3, 32, 32)


def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def test_structure_class_and_attributes_are_the_users():
    m = resnet()
    qm = int8fx.convert(m)
    assert type(qm) is torchvision.models.ResNet and isinstance(qm, torchvision.models.ResNet)
    assert type(qm.layer1[0]) is torchvision.models.resnet.BasicBlock
    conv = qm.layer1[0].conv1
    assert isinstance(conv, nn.Conv2d) and isinstance(conv, ModuleSite) and type(conv).__name__ == "Int8Conv2d"
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (64, 64, (3, 3), (1, 1))
    ours = ("grad_quantizer", "pending")  # each site's quantizer state and its staged copy
    assert [n for n, _ in qm.named_modules() if not n.endswith(ours) and ".grad_quantizer." not in n] == [
        n for n, _ in m.named_modules()]
    assert not any(isinstance(x, Int8Layer) for x in m.modules())  # the input model is left alone


def test_inplace_keeps_optimizer_and_hooks_made_before_conversion():
    m = resnet()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    calls = []
    m.layer1.register_forward_hook(lambda mod, a, out: calls.append("block"))
    m.conv1.register_forward_hook(lambda mod, a, out: calls.append("conv"))
    before = m.conv1.weight.detach().clone()
    qm = int8fx.convert(m, inplace=True)
    assert qm is m and isinstance(m.conv1, ModuleSite)
    F.cross_entropy(qm(X), torch.tensor([1, 2])).backward()
    opt.step()
    assert calls == ["conv", "block"]
    assert not torch.equal(before, m.conv1.weight)  # the optimizer made before conversion moved the weight


def test_hooks_on_blocks_fire_and_see_int8_outputs():
    qm = int8fx.convert(resnet())
    seen = {}
    qm.layer2.register_forward_hook(lambda mod, a, out: seen.setdefault("out", out))
    qm.layer2[0].conv1.register_forward_pre_hook(lambda mod, a: seen.setdefault("in", a[0]))
    qm(X)
    assert seen["out"].shape == (2, 128, 4, 4) and seen["in"].shape == (2, 64, 8, 8)


class Checkpointed(nn.Module):
    """Uses activation checkpointing in its own forward, with a counter of how often the block runs."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)
        self.runs = 0
        self.checkpointing = True  # as timm's set_grad_checkpointing switches it

    def forward(self, x):
        def run(t):
            self.runs += 1
            return self.block(t)

        y = checkpoint.checkpoint(run, x, use_reentrant=False) if self.checkpointing else run(x)
        return self.head(y.mean((2, 3)))


def test_the_models_own_activation_checkpointing_still_recomputes_and_counts_once():
    torch.manual_seed(0)
    qm = int8fx.convert(Checkpointed())
    qm(X).sum().backward()
    int8fx.commit(qm)  # what an optimizer step does
    assert qm.runs == 2  # forward, then the recomputation in backward: checkpointing is kept
    conv = qm.block[0]
    assert int(conv.step) == 1 and conv.weight.grad is not None
    assert float(conv.act_clip_ema) == pytest.approx(float(X.abs().max()), rel=1e-6)  # observed once, not twice


def test_a_checkpointed_block_recomputes_the_same_gradients():
    """The recomputation in backward quantizes as the forward did: with nearest rounding the gradients equal a
    run without checkpointing bit for bit (with stochastic rounding, the default, the recomputed calls key
    their own streams: another draw of the same rounding, README "What you get back")."""
    grads = []
    for checkpointing in (True, False):
        torch.manual_seed(0)
        qm = int8fx.convert(Checkpointed(), int8fx.Int8Config(rounding="nearest"))
        qm.checkpointing = checkpointing
        qm(X).square().sum().backward()
        grads.append([p.grad for p in qm.parameters()])
    assert len(grads[0]) == 6 and all(torch.equal(a, b) for a, b in zip(*grads))


def test_deepcopy_and_pickle_keep_int8fx_state_and_behaviour(tmp_path):
    qm = int8fx.convert(resnet())
    F.cross_entropy(qm(X), torch.tensor([1, 2])).backward()
    qm.eval()
    want = qm(X)
    for other in (copy.deepcopy(qm), _roundtrip(qm)):
        assert type(other.conv1) is type(qm.conv1)
        assert torch.equal(other(X), want)
        assert [s.name for s in sites_of(other)] == [s.name for s in sites_of(qm)]
        assert all(s.layer is other.get_submodule(s.name) for s in sites_of(other))
        assert int8fx.inspect(other).summary["converted"] == 21
        int8fx.export_onnx(other, X[:1], tmp_path / "copy.onnx")


def _roundtrip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_averaged_model_of_a_converted_model_inspects_and_exports(tmp_path):
    qm = int8fx.convert(resnet())
    ema = torch.optim.swa_utils.AveragedModel(qm, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    F.cross_entropy(qm(X), torch.tensor([1, 2])).backward()
    ema.update_parameters(qm)
    assert conversion_of(ema) is not None and int8fx.inspect(ema).summary["converted"] == 21
    ema.eval()
    meta = int8fx.export_onnx(ema, X[:1], tmp_path / "ema.onnx")
    assert len(meta["layers"]) == 21


class Functional(nn.Module):
    """Its own code calls F.conv2d (with a standardised weight) and branches on self.training."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        w = (self.w - self.w.mean((1, 2, 3), keepdim=True)) / self.w.std((1, 2, 3), keepdim=True)
        y = F.relu(F.conv2d(x, w, padding=1))
        if self.training:
            y = F.dropout(y, 0.5)
        return self.fc(y.mean((2, 3)))


def test_functional_sites_keep_both_training_modes_and_pickle():
    torch.manual_seed(0)
    m = Functional()
    qm = int8fx.convert(m)
    assert type(qm).__name__ == "Int8Functional" and isinstance(qm, (Functional, Rewritten))
    assert set(qm._int8fx_graphs) == {"train", "eval"}  # the dropout branch: one graph per mode
    assert isinstance(qm.int8_conv2d, Int8Function) and [s.name for s in sites_of(qm)] == ["conv2d", "fc"]
    qm.eval()
    assert torch.equal(qm(X), qm(X))  # eval: no dropout
    qm.train()
    torch.manual_seed(1)
    a = qm(X)
    torch.manual_seed(2)
    assert not torch.equal(a, qm(X))  # train: dropout draws
    back = _roundtrip(qm.eval())
    assert torch.equal(back(X), qm(X)) and isinstance(back.int8_conv2d, Int8Function)
    passthrough = int8fx.convert(m, int8fx.Int8Config(quantize=False))
    for train in (True, False, True):
        m.train(train), passthrough.train(train)
        torch.manual_seed(3)
        want = m(X)
        torch.manual_seed(3)
        assert torch.equal(passthrough(X), want)


def test_to_float_gives_back_the_original_classes_with_trained_weights():
    m = resnet()
    qm = int8fx.convert(m)
    opt = torch.optim.SGD(qm.parameters(), lr=1e-3)
    F.cross_entropy(qm(X), torch.tensor([1, 2])).backward()
    opt.step()
    fm = int8fx.to_float(qm)
    assert type(fm.conv1) is nn.Conv2d and not any(isinstance(x, Int8Layer) for x in fm.modules())
    assert set(fm.state_dict()) == set(m.state_dict())
    assert all(torch.equal(v, qm.state_dict()[k]) for k, v in fm.state_dict().items())
    assert conversion_of(fm) is None and conversion_of(qm) is not None  # a copy: qm is still INT8
    fm.eval(), m.eval()
    m.load_state_dict(fm.state_dict())
    assert torch.isfinite(m(X)).all() and torch.equal(fm(X), m(X))
    f2 = int8fx.to_float(int8fx.convert(Functional()), inplace=True)
    assert type(f2) is Functional and not hasattr(f2, "int8_conv2d")
    with pytest.raises(ValueError, match="int8fx.convert"):
        int8fx.to_float(m)


def test_the_float_model_trains_after_to_float():
    """An optimizer step commits every live site's staged state; a module to_float gave back is no site."""
    qm = int8fx.convert(resnet())
    fm = int8fx.to_float(qm)
    opt = torch.optim.SGD(fm.parameters(), lr=1e-3)
    F.cross_entropy(fm(X), torch.tensor([1, 2])).backward()
    opt.step()  # raised AttributeError: 'Conv2d' object has no attribute 'commit'
    int8fx.commit(fm)
    f2 = int8fx.to_float(int8fx.convert(Functional()), inplace=True)
    torch.optim.SGD(f2.parameters(), lr=1e-3).step()


def test_filter_fn_keeps_sites_in_fp32_with_a_reason():
    qm = int8fx.convert(resnet(), filter_fn=lambda name, mod: not name.startswith("layer4"))
    rows = {r.name: r for r in int8fx.inspect(qm).layers}
    assert not rows["layer4.0.conv1"].converted and rows["layer4.0.conv1"].reason == "filter_fn returned False"
    assert rows["layer3.0.conv1"].converted and type(qm.layer4[0].conv1) is nn.Conv2d
    with pytest.raises(TypeError, match="filter_fn"):
        int8fx.convert(resnet(), filter_fn="layer4")


class Finetuned(nn.Module):
    """A backbone with a residual branch and a head: what users change after conversion (a new head for
    another task, a branch fused into one conv for deployment)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(F.relu(x + self.branch(x)).mean((2, 3)))


def _train_step_and_rows(qm):
    qm.train()
    F.cross_entropy(qm(X), torch.tensor([1, 2])).backward()
    torch.optim.SGD(qm.parameters(), lr=0.01).step()  # commits each site's step and running clips
    report = int8fx.inspect(qm)
    return report, {r.name: r for r in report.layers}


@pytest.mark.parametrize("form", ["faithful", "deploy"])
def test_a_head_replaced_after_convert_is_reported_and_exported_in_full_precision(tmp_path, form):
    qm = int8fx.convert(Finetuned())
    qm.fc = nn.Linear(8, 5)  # timm's reset_classifier does this
    report, rows = _train_step_and_rows(qm)
    assert not rows["fc"].converted and rows["fc"].reason.startswith("replaced after int8fx.convert by a plain Linear")
    assert report.summary["converted"] == 2 and rows["branch.0"].converted
    with pytest.warns(UserWarning, match=r"1 conv/linear module\(s\) \('fc'\) were assigned or added after "
                      r"int8fx.convert and run in full precision, in the model and in the file"):
        meta = int8fx.export_onnx(qm.eval(), X[:1], tmp_path / "m.onnx", form=form, calibration_data=[X])
    assert sorted(meta["layers"]) == ["branch.0", "stem.0"]
    assert [(s["name"], s["reason"]) for s in meta["skipped"]] == [("fc", rows["fc"].reason)]


def test_a_module_converted_on_its_own_and_assigned_in_is_a_site_of_the_model(tmp_path):
    qm = int8fx.convert(Finetuned())
    qm.fc = int8fx.convert(nn.Linear(8, 5))
    report, rows = _train_step_and_rows(qm)
    assert report.summary["converted"] == 3 and rows["fc"].converted and rows["fc"].step == 1
    assert qm.fc.site_name == "fc"  # named by its place here, as calibration and export key it
    meta = int8fx.export_onnx(qm.eval(), X[:1], tmp_path / "m.onnx")
    assert meta["layers"]["fc"]["export"] == "int8" and meta["layers"]["fc"]["onnx"]


def test_a_branch_fused_into_a_new_conv_after_convert_drops_its_sites_and_lists_the_new_conv():
    qm = int8fx.convert(Finetuned())
    qm.branch = nn.Conv2d(8, 8, 3, padding=1)  # as a re-parameterisation (RepVGG, MobileOne) does
    report, rows = _train_step_and_rows(qm)
    assert list(rows) == ["stem.0", "fc", "branch"]  # branch.0 is gone: it computes nothing
    assert not rows["branch"].converted and rows["branch"].reason.startswith("added after int8fx.convert")
    assert report.summary["converted"] == 2


def test_converting_again_converts_what_changed_and_keeps_the_trained_state():
    """The advice for a model changed after convert: `int8fx.convert(qm)` again. Every site that was there
    keeps its clips, gradient statistics and step count bit for bit; the new head and conv become sites."""
    qm = int8fx.convert(Finetuned())
    _train_step_and_rows(qm)
    qm.fc, qm.branch = nn.Linear(8, 5), nn.Conv2d(8, 8, 3, padding=1)
    kept = {k: v.clone() for k, v in qm.state_dict().items() if k.startswith("stem.0.")}
    assert "stem.0.act_clip" in kept and kept["stem.0.step"] == 1
    q2 = int8fx.convert(qm)
    assert q2 is not qm and type(q2) is Finetuned and not isinstance(qm.fc, Int8Layer)  # a copy, as convert's
    assert all(torch.equal(v, q2.state_dict()[k]) for k, v in kept.items())
    report, rows = _train_step_and_rows(q2)
    assert list(rows) == ["stem.0", "branch", "fc"] and report.summary["converted"] == 3
    assert rows["stem.0"].step == 2 and rows["fc"].step == rows["branch"].step == 1
    params = list(qm.parameters())
    assert int8fx.convert(qm, inplace=True) is qm  # the same parameters: optimizers go on
    assert all(a is b for a, b in zip(qm.parameters(), params, strict=True))
    assert isinstance(qm.fc, Int8Layer) and torch.equal(qm.stem[0].act_clip, kept["stem.0.act_clip"])
    with pytest.raises(ValueError, match="another Int8Config"):
        int8fx.convert(qm, int8fx.Int8Config(grad_quant="dsgc"))
    filtered = int8fx.convert(Finetuned(), filter_fn=lambda name, mod: name != "fc")
    with pytest.raises(ValueError, match="filter_fn"):
        int8fx.convert(filtered)
    assert not isinstance(int8fx.convert(filtered, filter_fn=lambda name, mod: name != "fc").fc, Int8Layer)
    with pytest.raises(ValueError, match="holds a converted model"):
        int8fx.convert(nn.Sequential(qm))


# Compiling the fused passes for a real model's shapes on a cold cache is most of such a test's time (the
# first efficientnet_b0 step: 22 signatures, 90 s on CI's two cores), and what these tests check (modes,
# state, output types, export) does not depend on it: the passes give the same bits compiled or eager
# (tests/test_fused.py), and tests/test_model_zoo.py keeps the compiled path meeting real models.
def test_eval_mode_is_eval_mode_stochastic_depth_and_dropout_off():
    """torchvision's efficientnet (stochastic depth) and a dropout head: eval is deterministic and its BN
    statistics do not move; the ONNX export of eval mode has no random ops."""
    torch.manual_seed(0)
    qm = int8fx.convert(torchvision.models.efficientnet_b0(num_classes=4))
    with fusing.eager_passes():
        qm(X).sum().backward()  # one training step: running clips set
        qm.eval()
        stats = {k: v.clone() for k, v in qm.state_dict().items() if "running" in k}
        with torch.no_grad():
            assert torch.equal(qm(X), qm(X))
    assert all(torch.equal(v, qm.state_dict()[k]) for k, v in stats.items())


def test_export_leaves_the_model_unchanged_and_has_no_training_ops(tmp_path):
    import onnx

    torch.manual_seed(0)
    qm = int8fx.convert(torchvision.models.efficientnet_b0(num_classes=4))
    with fusing.eager_passes():
        qm(X).sum().backward()
    qm.train()
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    with fusing.eager_passes():
        int8fx.export_onnx(qm, X[:1], tmp_path / "e.onnx")
    assert qm.training and all(torch.equal(v, qm.state_dict()[k]) for k, v in before.items())
    ops = {n.op_type for n in onnx.load(tmp_path / "e.onnx").graph.node}
    assert not ops & {"RandomUniformLike", "RandomUniform", "Dropout"}
    assert "QuantizeLinear" in ops


def test_inception_aux_output_type_follows_the_mode():
    torch.manual_seed(0)
    m = torchvision.models.inception_v3(weights=None, init_weights=False, aux_logits=True, num_classes=3)
    qm = int8fx.convert(m)
    x = torch.randn(2, 3, 299, 299)
    with fusing.eager_passes():
        assert type(qm.train()(x)).__name__ == "InceptionOutputs"
        with torch.no_grad():
            assert type(qm.eval()(x)) is torch.Tensor


def test_converted_modules_keep_their_forward_signature():
    """Tools read a model's inputs from `inspect.signature(model.forward)`; so does torch.export, which on
    torch 2.9 failed to export a model whose converted forward said `(*args, **kwargs)` to ONNX."""
    import inspect

    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    qm = int8fx.convert(nn.ModuleDict({"f": Functional(), "mha": mha, "conv": nn.Conv2d(3, 4, 3)}))
    for name, base in (("f", Functional), ("mha", nn.MultiheadAttention), ("conv", nn.Conv2d)):
        m = qm[name]
        assert type(m) is not base and inspect.signature(m.forward) == inspect.signature(base.forward.__get__(m))
    assert list(inspect.signature(qm["f"].forward).parameters) == ["x"]


def test_multihead_attention_is_routed_and_its_fast_path_stays_off_while_quantizing():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    qm = int8fx.convert(nn.Sequential(mha))
    att = qm[0]
    assert isinstance(att, Routed) and isinstance(att, nn.MultiheadAttention)
    assert [s.name for s in sites_of(qm)] == ["0.in_proj", "0.out_proj"]
    x = torch.randn(2, 5, 16)
    att(x, x, x)[0].sum().backward()
    int8fx.commit(qm)
    assert int(att.int8_in_proj.step) == 1 and int(att.out_proj.step) == 1


timm = pytest.importorskip("timm")


def test_timm_conv2d_same_and_weight_standardisation_are_converted():
    from timm.layers import Conv2dSame, StdConv2d

    torch.manual_seed(0)
    same, std = Conv2dSame(3, 8, 3, stride=2), StdConv2d(8, 8, 3, padding=1)
    qm = int8fx.convert(nn.Sequential(same, nn.ReLU(), std))
    rows = {r.name: r for r in int8fx.inspect(qm).layers}
    assert rows["0"].converted and rows["0"].source == "routed" and isinstance(qm[0], Conv2dSame)
    assert rows["2"].converted and rows["2"].source == "function" and isinstance(qm[2], StdConv2d)
    x = torch.randn(2, 3, 15, 15)  # odd size: Conv2dSame pads asymmetrically
    ref = nn.Sequential(same, nn.ReLU(), std)(x)
    y = qm(x)
    assert y.shape == ref.shape and F.cosine_similarity(y.flatten(), ref.flatten(), 0) > 0.99
    y.sum().backward()
    int8fx.commit(qm)
    assert int(qm[0].int8_conv2d.step) == 1 and int(qm[2].int8_conv2d.step) == 1


@pytest.mark.parametrize("cls", ["StdConv2dSame", "ScaledStdConv2dSame"])
def test_timm_same_padded_weight_standardised_conv_runs_its_site(cls):
    """timm's StdConv2dSame (the ResNet stems of its hybrid ViTs) is a conv whose forward torch.fx cannot
    trace (padding from the input's size) and that passes a standardised copy of its weight to F.conv2d.
    Routed by weight identity, the call never reached its site: inspect said INT8, the layer ran FP32 and
    its site never counted a step. Calls with a weight of its weight's shape are routed too."""
    import timm.layers

    torch.manual_seed(0)
    m = nn.Sequential(getattr(timm.layers, cls)(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 15, 15)
    assert torch.equal(int8fx.convert(m, int8fx.Int8Config(quantize=False))(x), m(x))
    qm = int8fx.convert(m)
    assert int8fx.inspect(qm).layers[0].source == "routed"
    y, ref = qm(x), m(x)
    assert not torch.equal(y, ref) and F.cosine_similarity(y.flatten(), ref.flatten(), 0) > 0.99
    y.square().mean().backward()
    ref.square().mean().backward()
    int8fx.commit(qm)
    assert int(qm[0].int8_conv2d.step) == 1
    assert F.cosine_similarity(qm[0].weight.grad.flatten(), m[0].weight.grad.flatten(), 0) > 0.99


def test_conv_calls_of_modules_without_parameters_are_sites():
    """A module with no parameters of its own can still convolve: timm's BlurPool2d (anti-aliased ResNets and
    DenseNets) applies a fixed filter held in a buffer, a hypernetwork's helper applies a weight it is given.
    Such modules were never traced: their calls ran FP32 and inspect did not list them at all, while the same
    call in a module that happened to own a parameter was converted."""
    import timm.layers

    class DynamicConv(nn.Module):  # no parameters: the weight is an argument, computed by another layer
        def forward(self, x, w):
            return F.conv2d(x, w.reshape(-1, x.shape[1], 1, 1))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.blur = timm.layers.BlurPool2d(8, filt_size=3, stride=2)
            self.gen, self.dyn = nn.Linear(3, 4 * 8), DynamicConv()

        def forward(self, x):
            return self.dyn(self.blur(self.conv(x)), self.gen(x.mean((0, 2, 3))))

    torch.manual_seed(0)
    m, x = Net(), torch.randn(2, 3, 16, 16)
    qm = int8fx.convert(m)
    layers = {r.name: r for r in int8fx.inspect(qm).layers}
    assert sorted(layers) == ["blur.conv2d", "conv", "dyn.conv2d", "gen"] and all(r.converted for r in layers.values())
    assert torch.equal(int8fx.convert(m, int8fx.Int8Config(quantize=False))(x), m(x))
    y, ref = qm(x), m(x)
    assert not torch.equal(y, ref) and F.cosine_similarity(y.flatten(), ref.flatten(), 0) > 0.99
    y.square().mean().backward()
    ref.square().mean().backward()
    int8fx.commit(qm)
    assert int(qm.blur.int8_conv2d.step) == int(qm.dyn.int8_conv2d.step) == 1
    for name in ("conv.weight", "gen.weight"):
        g, g_ref = qm.get_parameter(name).grad, m.get_parameter(name).grad
        assert F.cosine_similarity(g.flatten(), g_ref.flatten(), 0) > 0.99
    assert qm.blur.filt.grad is None


def test_a_linear_layer_written_as_a_product_with_its_weight_is_a_site():
    """`x @ self.proj` (CLIP-style heads), `torch.addmm(b, x, W)` (GPT-2's Conv1D), `x.matmul(W.t())` are
    linear layers: they ran FP32 and inspect did not list them. Products that are not a layer on the input
    stay as they are: a weight on the left (`A @ x`), a fixed matrix in a buffer, a product of two weights
    (a low-rank factorisation, whose F.linear call is the site). The first is listed as a site kept in FP32."""

    class Products(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.proj = nn.Parameter(torch.randn(8, 6) / 3)
            self.w, self.b = nn.Parameter(torch.randn(5, 6) / 3), nn.Parameter(torch.randn(5))
            self.mix = nn.Parameter(torch.randn(4, 4) / 2)
            self.k = nn.Parameter(torch.randn(5, 5) / 2)
            self.u, self.v = nn.Parameter(torch.randn(5, 2) / 2), nn.Parameter(torch.randn(2, 7) / 2)
            self.register_buffer("fixed", torch.randn(5, 3))

        def forward(self, x):
            t = self.conv(x).flatten(2).transpose(1, 2)  # [N, tokens, 8]
            t = t[:, :4] @ self.proj  # [N, 4, 6]
            t = (self.mix @ t).matmul(self.w.t()) + self.b  # a weight on the left, then a 3-d input
            y = torch.addmm(self.b, t.mean(1), self.k)  # [N, 5]
            return F.linear(torch.cat([y, y[:, :2]], 1), self.u @ self.v) @ self.fixed

    torch.manual_seed(0)
    m, x = Products(), torch.randn(2, 3, 6, 6)
    qm = int8fx.convert(m)
    layers = {r.name: r for r in int8fx.inspect(qm).layers}
    assert sorted(layers) == ["addmm", "conv", "linear", "matmul", "matmul_1", "matmul_2"], sorted(layers)
    left = layers.pop("matmul_1")  # self.mix @ t: listed, in FP32, with why
    assert not left.converted and "a product of the input with mix in another form than x @ W" in left.reason
    assert all(r.converted and r.op in ("linear", "conv2d") for r in layers.values())
    exact = int8fx.convert(m, int8fx.Int8Config(quantize=False))
    y0, ref = exact(x), m(x)
    assert torch.equal(y0, ref)
    y0.square().mean().backward()
    ref.square().mean().backward()
    assert all(torch.equal(p.grad, m.get_parameter(n).grad) for n, p in exact.named_parameters())
    m.zero_grad()
    y, ref = qm(x), m(x)
    assert not torch.equal(y, ref) and F.cosine_similarity(y.flatten(), ref.flatten(), 0) > 0.98
    y.square().mean().backward()
    ref.square().mean().backward()
    int8fx.commit(qm)
    assert int(qm.int8_matmul.step) == int(qm.int8_addmm.step) == 1
    for name in ("proj", "w", "k", "u"):
        g, g_ref = qm.get_parameter(name).grad, m.get_parameter(name).grad
        assert F.cosine_similarity(g.flatten(), g_ref.flatten(), 0) > 0.95, name


class _Drawing(nn.Module):
    """Skips its conv at random with a draw that does not depend on the input."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)

    def forward(self, x):
        if self.training and torch.rand(1).item() < 0.5:
            return F.conv2d(x, self.w) * 0
        return F.conv2d(x, self.w)


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.calls, self.outputs = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2), 0, []

    def forward(self, x):
        self.calls += 1
        y = F.conv2d(x, self.w)
        self.outputs.append(y)  # tracing appended torch.fx proxies to the model's own list
        return y


class _Keywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)

    def forward(self, x, **kw):
        y, mask = F.conv2d(x, self.w), kw.get("mask")
        return y if mask is None else y * mask


def _opaque_scale(x, s: float):
    return x * s


torch.fx.wrap("_opaque_scale")  # a function torch.fx does not enter (as Swin's attention)


class _CountingWithoutCalls(nn.Module):
    """Changes self and calls an opaque function, but makes no call int8fx would rewrite."""

    def __init__(self):
        super().__init__()
        self.conv, self.pos, self.calls = nn.Conv2d(3, 4, 3), nn.Parameter(torch.zeros(1, 4, 6, 6)), 0

    def forward(self, x):
        self.calls += 1
        return _opaque_scale(self.conv(x) + self.pos, 2.0)


class _Tempered(nn.Module):
    """A temperature annealed by the training loop, and a constant tensor made by the code."""

    def __init__(self):
        super().__init__()
        self.w, self.tau = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2), 1.0

    def forward(self, x):
        return F.conv2d(x, self.w) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1) / self.tau


def test_code_a_graph_cannot_replay_is_kept_and_values_it_froze_are_guarded():
    """A converted module runs its forward as a torch.fx graph, which replays what the code did while traced.
    A draw that does not depend on the input was replayed forever (the branch taken once, always), an
    assignment to `self` never happened again (a counter stayed 0; a list held two torch.fx proxies from
    tracing and never grew), a tensor the code made from constants was looked up on the module and missing
    (AttributeError at the first call), `kw.get("mask") is not None` was always true (a call without a mask
    failed), and a number read from `self` stayed what it was at convert time (an annealed temperature was
    ignored)."""
    x = torch.randn(2, 3, 8, 8)
    m, state = _Drawing(), torch.get_rng_state()
    with pytest.warns(UserWarning, match="draws random numbers"):
        qm = int8fx.convert(m)
    assert torch.equal(torch.get_rng_state(), state)  # tracing drew, and the generator was put back
    zeros = [bool((qm(x) == 0).all()) for _ in range(40)]
    assert 5 < sum(zeros) < 35  # the model's own code, drawing at every call

    with pytest.warns(UserWarning, match=r"changes self \(calls, outputs\)"):
        qm = int8fx.convert(_Counting())
    assert qm.outputs == []
    for _ in range(3):
        qm(x)
    assert qm.calls == 3 and len(qm.outputs) == 3 and all(type(y) is torch.Tensor for y in qm.outputs)

    with warnings.catch_warnings():  # nothing to rewrite in it: its code is kept without a word, its conv converted
        warnings.simplefilter("error")
        qm = int8fx.convert(_CountingWithoutCalls())
    qm(x)
    assert qm.calls == 1 and isinstance(qm.conv, ModuleSite) and not int8fx.inspect(qm).opaque

    m = _Keywords()
    with pytest.warns(UserWarning, match=r"reads \*\*kw"):
        qm = int8fx.convert(m)
    assert torch.equal(qm(x), m(x)) and torch.equal(qm(x, mask=torch.zeros(1)), torch.zeros(2, 4, 6, 6))

    torch.manual_seed(0)
    m = _Tempered()
    qm = int8fx.convert(m)
    assert [r.converted for r in int8fx.inspect(qm).layers] == [True]
    y = qm(x)
    assert F.cosine_similarity(y.flatten(), m(x).flatten(), 0) > 0.99
    qm.tau = m.tau = 2.0
    with pytest.raises(RuntimeError, match=r"converted with self.tau = 1.0, and it is now 2.0"):
        qm(x)
    qm.tau = 1.0
    assert qm(x).shape == y.shape
    assert not any(k.startswith("_int8fx") for k in int8fx.to_float(qm).__dict__)


class _PerDevice:
    """A helper object (not a module) that keeps outputs per device, as timm's FeatureHooks does."""

    def __init__(self):
        self.outputs = {}


class _StoresInHelper(nn.Module):
    """Keeps its output in a helper object, keyed by the input's device (timm's FeatureHookNet), and calls
    F.conv2d on its own weight."""

    def __init__(self):
        super().__init__()
        self.w, self.store = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2), _PerDevice()

    def forward(self, x):
        y = F.conv2d(x, self.w)
        self.store.outputs[x.device] = y.detach()
        return y.mean((2, 3))


def test_code_that_stores_into_a_helper_object_is_kept_and_leaves_no_proxy_behind():
    """Tracing ran the code with torch.fx proxies, and the helper's dict kept one as a key (`x.device`): the
    converted model could not be copied or saved ("'node' not in new_dict during proxy unpickling"; timm's
    `features_only=True, feature_cls="hook"` models), and its graph would never fill the helper at run time.
    The proxy is taken out and the code kept, as for any code that changes self."""
    torch.manual_seed(0)
    m, x = _StoresInHelper(), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"changes self \(store\)"):
        qm = int8fx.convert(m)
    assert qm.store.outputs == {}
    assert torch.equal(qm(x), m(x))  # its own code, the call on its own weight in FP32 (it said so)
    assert torch.equal(qm.store.outputs[x.device], m.store.outputs[x.device])
    copied = copy.deepcopy(qm)
    buffer = io.BytesIO()
    torch.save(qm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(copied(x), m(x)) and torch.equal(loaded(x), m(x))


class _HeadReader(nn.Module):
    """Code that reads plain values of its submodules: a head's temperature, a nested block's flag."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 36, 5))
        self.head.temperature, self.head[1].scaled = 1.0, False

    def forward(self, x):
        y = self.head(F.conv2d(x, self.w))
        y = y * 3.0 if self.head[1].scaled else y
        return y / self.head.temperature


def test_plain_values_read_from_submodules_are_guarded_too():
    """The graph froze `self.head.temperature` as it froze `self.tau`: a temperature changed after convert
    was silently ignored. Now such a change is refused as for the module's own values, the submodule's
    training flag and torch's own reads of it (hooks) are not values of the code, and a change back runs."""
    torch.manual_seed(0)
    m, x = _HeadReader(), torch.randn(2, 3, 8, 8)
    qm = int8fx.convert(m)
    y = qm(x)
    assert F.cosine_similarity(y.flatten(), m(x).flatten(), 0) > 0.99
    qm.eval()
    qm.head.register_forward_hook(lambda *a: None)
    qm(x)  # train/eval switches and hooks on the submodules change nothing the graph froze
    qm.train()
    for change, message in ((lambda: setattr(qm.head, "temperature", 2.0), r"self.head.temperature = 1.0, and it is now 2.0"),
                            (lambda: setattr(qm.head[1], "scaled", True), r"self.head.1.scaled = False, and it is now True")):
        change()
        with pytest.raises(RuntimeError, match=message):
            qm(x)
        qm.head.temperature, qm.head[1].scaled = 1.0, False
    assert torch.equal(qm(x), y)  # back to the values it was traced with: it runs, as before


class _Gated(nn.Module):
    """Optional arguments, as attention layers take a mask or a shared position bias."""

    def __init__(self):
        super().__init__()
        self.gate, self.proj = nn.Parameter(torch.randn(6, 5) * 0.3), nn.Parameter(torch.randn(4, 6) * 0.3)

    def forward(self, x, bias: torch.Tensor | None = None, context=None):
        if context is not None:  # a call on `gate` that only some calls make, before the call on `proj`
            x = x * torch.sigmoid(F.linear(context, self.gate)).mean(-1, keepdim=True)
        y = F.linear(x, self.proj)
        if bias is not None:
            y = y + bias
        return y


def test_optional_arguments_given_or_not_each_run_their_own_code():
    """torch.fx traces `if bias is not None:` as always true: timm's BEiT attention (`shared_rel_pos_bias=None`)
    failed at its first call with "unsupported operand type(s) for +: 'Tensor' and 'NoneType'". Each set of
    optional arguments passed as None now has its graph, and a call present in some graphs only does not
    shift the sites of the calls after it."""
    torch.manual_seed(0)
    m, x, b, c = _Gated(), torch.randn(3, 6), torch.randn(4), torch.randn(3, 5)
    passthrough = int8fx.convert(m, int8fx.Int8Config(quantize=False))
    for args, kwargs in (((x,), {}), ((x, b), {}), ((x,), {"context": c}), ((x, None, c), {}), ((x, b, c), {}),
                         ((x,), {"bias": b, "context": None})):
        assert torch.equal(passthrough(*args, **kwargs), m(*args, **kwargs))
    qm = int8fx.convert(m)
    assert [(r.name, r.converted) for r in int8fx.inspect(qm).layers] == [("linear", True), ("linear_1", True)]
    assert sorted(f.out_channels for f in qm.children() if isinstance(f, Int8Function)) == [4, 6]
    y = qm(x, b) + qm(x, context=c)
    assert F.cosine_similarity(y.flatten(), (m(x, b) + m(x, context=c)).flatten(), 0) > 0.99
    calls = sorted((f.out_channels, int(f.calls)) for f in qm.children() if isinstance(f, Int8Function))
    assert calls == [(4, 2), (6, 1)]  # proj in both calls, gate in the one with a context
    y.square().mean().backward()
    assert qm.proj.grad is not None and qm.gate.grad is not None
    class Flagged(nn.Module):  # `mask is not None or flag` reads the traced flag only when mask is None
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6))

        def forward(self, x, mask=None, flag: bool = False):
            y = F.linear(x, self.w)
            return y * mask if mask is not None or flag else y

    with pytest.warns(UserWarning, match="cannot be traced with mask None"):
        qm = int8fx.convert(Flagged())
    assert torch.equal(qm(x), F.linear(x, qm.w)) and torch.equal(qm(x, torch.zeros(4)), torch.zeros(3, 4))
    import timm

    torch.manual_seed(0)
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                             embed_dim=32, num_heads=2, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(int8fx.convert(beit, int8fx.Int8Config(quantize=False))(x), beit(x))
    int8fx.convert(beit)(x).sum().backward()


def test_a_bf16_model_trains_in_int8_with_its_quantizer_state_in_fp32():
    """`model.to(torch.bfloat16)` casts every floating buffer; int8fx's state (clips, running averages, staged
    copies) stays fp32, as the INT8 op computes its scales in fp32 (it failed outright before)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))

    torch.manual_seed(0)
    ref = Net().to(torch.bfloat16)
    qm = int8fx.convert(copy.deepcopy(ref)).to(torch.bfloat16)
    x = X.to(torch.bfloat16)
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    qm(x).float().logsumexp(1).sum().backward()
    ref(x).float().logsumexp(1).sum().backward()
    opt.step()
    assert qm.conv.weight.dtype == qm.conv.weight.grad.dtype == torch.bfloat16
    assert qm(x).dtype == torch.bfloat16
    state = {k: v for k, v in qm.state_dict().items() if k.startswith(("conv.", "fc.")) and "weight" not in k
             and "bias" not in k}
    assert state and all(v.dtype in (torch.float32, torch.int64) for v in state.values()), \
        {k: v.dtype for k, v in state.items()}
    assert all(t.dtype in (torch.float32, torch.int64) for t in qm.conv.pending.buffers())
    assert float(qm.conv.act_clip_ema) == pytest.approx(float(X.to(torch.bfloat16).abs().max()), rel=1e-6)
    assert int(qm.conv.step) == 1
    g, g_ref = qm.conv.weight.grad.float().flatten(), ref.conv.weight.grad.float().flatten()
    assert F.cosine_similarity(g, g_ref, dim=0) > 0.95
    qm.half()  # and back into any other float dtype
    assert qm.conv.act_clip.dtype == qm.fc.grad_quantizer.last_clip_x.dtype == torch.float32


def test_a_gradient_penalty_through_int8_sites_raises_instead_of_being_wrong():
    """create_graph=True gives the same first gradients; differentiating them again (a gradient penalty)
    raises: the INT8 backward has no second-order terms (its graph gave a weight gradient at cosine 0.03 to
    FP32's, silently)."""
    torch.manual_seed(0)
    qm = int8fx.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 2)),
                        int8fx.Int8Config(rounding="nearest"))
    x = X.clone().requires_grad_()
    plain, = torch.autograd.grad(qm(x).sum(), x)
    g, = torch.autograd.grad(qm(x).sum(), x, create_graph=True)
    assert torch.equal(g.detach(), plain)
    with pytest.raises(RuntimeError, match="INT8 conv/linear backward is not differentiable"):
        g.square().sum().backward()


def test_fx_tracing_a_converted_model_keeps_each_site_as_one_call():
    """torchvision's create_feature_extractor (torch.fx) on a converted backbone: each INT8 site is one
    call_module node, so the traced model computes what the converted one does and trains its sites
    (before, tracing failed on the sites' own branches: "symbolically traced variables cannot be used as
    inputs to control flow")."""
    from torchvision.models.feature_extraction import create_feature_extractor

    qm = int8fx.convert(resnet(), int8fx.Int8Config(rounding="nearest")).eval()
    features = create_feature_extractor(qm, return_nodes=["layer2", "layer4"])
    calls = [n.target for n in features.graph.nodes if n.op == "call_module"]
    assert "conv1" in calls and "layer1.0.conv1" in calls and "layer4.1.conv2" in calls
    body = nn.Sequential(qm.conv1, qm.bn1, qm.relu, qm.maxpool, qm.layer1, qm.layer2, qm.layer3, qm.layer4)
    with torch.no_grad():
        assert torch.equal(features(X)["layer4"], body(X))
    features.train()
    features(X)["layer4"].sum().backward()
    assert qm.layer4[1].conv2.weight.grad is not None and float(qm.layer4[1].conv2.pending.get("act_clip")) > 0
    # a routed module (timm's Conv2dSame: code fx cannot trace even in FP32) is one call too
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    tq = int8fx.convert(timm.create_model("tf_efficientnet_lite0", num_classes=4), int8fx.Int8Config(rounding="nearest")).eval()
    gm = torch.fx.symbolic_trace(tq)
    with torch.no_grad():
        assert torch.equal(gm(X), tq(X))


def test_a_model_converted_on_the_meta_device_starts_with_fresh_int8_state_after_to_empty():
    """Meta-device init (large models, FSDP): convert, `to_empty`, initialise the parameters. `to_empty`
    leaves memory uninitialised, and int8fx's clips, counters and running averages were garbage (an eval
    clip of -2e36, a step counter of 1e14)."""
    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 2))

    with torch.device("meta"):
        qm = int8fx.convert(net(), int8fx.Int8Config(grad_quant="dsgc"))
    qm.to_empty(device="cpu")
    for m in qm.modules():
        if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False)):
            m.reset_parameters()
    fresh = int8fx.convert(net(), int8fx.Int8Config(grad_quant="dsgc"))
    ours = {k: v for k, v in fresh.state_dict().items() if not k.endswith(("weight", "bias"))}
    got = qm.state_dict()
    assert ours and all(torch.equal(got[k], v) for k, v in ours.items()), \
        {k: got[k] for k, v in ours.items() if not torch.equal(got[k], v)}
    assert all(torch.equal(a, b) for a, b in zip(qm[0].pending.buffers(), fresh[0].pending.buffers()))
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    qm(X).sum().backward()
    opt.step()
    assert int(qm[0].step) == 1 and float(qm[0].act_clip_ema) == pytest.approx(float(X.abs().max()))
