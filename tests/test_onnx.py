"""The faithful ONNX form: valid files, onnxruntime output = the converted model's eval-mode output,
complete and lossless metadata, clean failure; from torch's torch.export-based exporter and from the
TorchScript exporter.

Models: resnet18, mobilenet_v2 (torchvision, random init, 48x48 inputs to keep CPU time low) and a small
conv1d+linear model that covers circular padding, grouped/dilated/strided conv1d, a rank-3 linear (MatMul
path), a functional F.linear (Gemm path) and a layer excluded from conversion.

The torchvision models get BatchNorm statistics from one train-mode pass over the example batch before
conversion, as a trained network has: with default statistics (mean 0, var 1) mobilenet_v2's activations
shrink to ~1e-9, where onnxruntime's ClipQuantFusion drops ReLU6 Clips in front of QuantizeLinear (its
redundancy test compares ranges with an absolute FLT_EPSILON; README, "ONNX export"). Each model then
takes one INT8 training step (with DCLRS on) so that every quantizer buffer holds non-trivial state for
the metadata round trip.

Tolerance. Given the same input, the exported QDQ op and int8fx's INT8 op produce the same INT8 codes
and differ only by fp32 summation order, which `test_every_site_matches_int8fx_given_the_same_input`
checks element by element against the textbook bound (K+2)u * sum|x_i w_i| (u = 2^-24). Through a whole
network that float noise occasionally moves an activation sitting on a rounding tie by one INT8 step,
and the network propagates that step. The end-to-end tolerance is therefore the model's own response to
such flips, measured on the eval-mode model with ~32 ulps of input noise (`tie_flip_sensitivity`),
times 2, plus 1e-5 of the output range for the summation noise itself.
"""
from __future__ import annotations

import dataclasses
import math
import os
import stat
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import int8fx
from int8fx import fusing
from int8fx.nn.scope import no_fused_fastpath
from int8fx.passes import conversion_of, sites_of
from int8fx.onnx import (METADATA_KEY, SCHEMA, SCHEMA_VERSION, OnnxExportError, export_onnx, read_onnx_metadata,
                         tensor_from_json)
from int8fx.onnx.calibrate import calibrate
from int8fx.onnx.check import tie_flip_sensitivity
from int8fx.quant.core import quantize, quantize_per_channel, scale_from_clip

from exporters import needs_dynamo_exporter, exporters

torchvision = pytest.importorskip("torchvision")

U = 2.0 ** -24  # unit roundoff of fp32


class Conv1dNet(nn.Module):
    """conv1d (circular padding) -> relu -> conv1d (grouped, dilated, strided; excluded) -> linear on
    [N, L, C] (MatMul) -> F.linear on [N, L*C] (Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1, padding_mode="circular")
        self.c2 = nn.Conv1d(8, 8, 3, stride=2, groups=2, padding=2, dilation=2)
        self.c3 = nn.Conv1d(8, 8, 1)
        self.fc1 = nn.Linear(8, 6)
        self.w = nn.Parameter(torch.randn(5, 6 * 5) / 5)
        self.b = nn.Parameter(torch.randn(5))

    def forward(self, x):
        y = self.c3(self.c2(F.relu(self.c1(x))))
        y = self.fc1(y.transpose(1, 2))
        return F.linear(y.flatten(1), self.w, self.b)


def _bn_from_batch(model: nn.Module, x: torch.Tensor) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the statistics of exactly the batches seen
    model.train()
    with torch.no_grad():
        model(x)


def _build(kind: str):
    torch.manual_seed(0)
    if kind == "conv1d":
        model, x = Conv1dNet(), torch.randn(3, 4, 10)
        cfg = int8fx.Int8Config(grad_quant="dsgc", exclude=("c2",), clip_update_period=1)
    else:
        model = torchvision.models.get_model(kind, weights=None)
        x = torch.randn(1, 3, 48, 48)
        _bn_from_batch(model, x)
        cfg = int8fx.Int8Config(grad_quant="gvq-mcs" if kind == "resnet18" else "dsgc")
    qm = int8fx.convert(model, cfg).train()
    opt = int8fx.DeviationLRScaler(torch.optim.SGD(qm.parameters(), lr=1e-3), qm)
    with fusing.eager_passes():  # compiling the step's passes was 25-45 s per model on a cold cache; what
        loss = qm(x).square().mean()  # the export tests read (the state it leaves) is the same bits either way
        loss.backward()
        opt.step()
    qm.eval()
    return qm, x, opt


@pytest.fixture(scope="module", params=exporters(("resnet18", "dynamo"), ("resnet18", "torchscript"), ("mobilenet_v2", "torchscript"),
                                                 pytest.param(("mobilenet_v2", "dynamo"), marks=pytest.mark.slow),  # 10-30 s
                                                 ("conv1d", "dynamo"), ("conv1d", "torchscript")), ids="-".join)
def exported(request, tmp_path_factory):
    kind, exporter = request.param
    qm, x, opt = _build(kind)
    path = str(tmp_path_factory.mktemp("onnx") / f"{kind}.onnx")
    meta = export_onnx(qm, x, path, lr_scaler=opt, exporter=exporter)
    assert meta["exporter"] == exporter and meta["form"] == "faithful"
    return kind, qm, x, path, meta


def _train_step(qm, x) -> None:
    """One training step that leaves the weights as they are: quantizer state (running clips) advances."""
    qm.train()
    qm(x).sum().backward()
    torch.optim.SGD(qm.parameters(), lr=0.0).step()
    qm.eval()


def _session(model_or_path, **kw):
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else model_or_path
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"], **kw)


# --------------------------------------------------------------------------- validity and agreement
def test_file_passes_the_full_onnx_checker(exported):
    _, _, _, path, _ = exported
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


class _TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return {"logits": self.conv2(F.relu(self.conv1(x))).mean((2, 3))}


def test_tie_flip_sensitivity_perturbs_what_the_sites_round():
    """Input noise cannot move the codes of a first site whose input sits away from every rounding tie (whole
    numbers here), so it measured 0 on transformers' RegNet while the file's float sums flipped codes of its
    second site. The probe perturbs each site's input too. `output` picks the compared tensor (a dict's)."""
    torch.manual_seed(0)
    qm = int8fx.convert(_TwoConvs())
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        qm(torch.randint(-5, 6, (8, 3, 16, 16), generator=gen).float())["logits"].square().sum().backward()
        int8fx.commit(qm)
    qm.eval()
    x = torch.randint(-5, 6, (8, 3, 16, 16), generator=gen).float()
    ref, sens = tie_flip_sensitivity(qm, x, output=lambda out: out["logits"])
    with torch.no_grad():
        assert torch.equal(ref, qm(x)["logits"])
        for _ in range(16):  # input noise alone moves nothing
            assert torch.equal(qm(x * (1 + 2.0 ** -19 * torch.randn(x.shape, generator=gen)))["logits"], ref)
    assert 0 < sens < 0.2 * ref.abs().max().item()


def test_onnxruntime_output_matches_eval_mode(exported, record_property):
    name, qm, x, path, _ = exported
    ref, sens = tie_flip_sensitivity(qm, x)
    out = _session(path).run(None, {"input": x.numpy()})[0]
    diff = float(np.abs(out - ref.numpy()).max())
    scale = ref.abs().max().item()
    tol = 2 * sens + 1e-5 * scale
    record_property("max_abs_diff", diff)
    record_property("tie_flip_sensitivity", sens)
    print(f"{name}: onnxruntime vs eval-mode max |diff| = {diff:.3g} (output absmax {scale:.3g}, "
          f"tie-flip sensitivity {sens:.3g}, tolerance {tol:.3g})")
    assert out.shape == tuple(ref.shape)
    assert diff <= tol


def _const(model, name: str) -> np.ndarray:
    """An initializer's value, following the Identity nodes torch's initializer de-duplication leaves."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    while name not in inits and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    return onnx.numpy_helper.to_array(inits[name])


def _instrumented(path: str, meta: dict):
    """The model with every site's QuantizeLinear input/output and result added as graph outputs."""
    model = onnx.load(path)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    nodes = {n.name: n for n in model.graph.node}
    wanted = []
    for site, entry in meta["layers"].items():
        for call in entry["onnx"]:
            q, out = nodes[call["x_quantize"]], nodes[call.get("bias_add", call["compute"])]
            wanted.append((site, q.input[0], q.output[0], out.output[0], _const(model, q.input[1])))
    have = {o.name for o in model.graph.output}
    for _, *names, _ in wanted:
        for n in names:
            if n not in have:
                model.graph.output.append(onnx.helper.make_tensor_value_info(n, types[n], None))
                have.add(n)
    return model, wanted


def test_every_site_matches_int8fx_given_the_same_input(exported):
    """Teacher-forced per site: onnxruntime's INT8 activation codes equal int8fx's `quantize` of the same
    float input (including inputs beyond the static clip, which saturate at -127 as in int8fx, not at
    QuantizeLinear's -128), and the site's output equals the exact integer GEMM times s_x*s_w[o] (+ bias) within the
    fp32 summation bound."""
    name, qm, x, path, meta = exported
    model, wanted = _instrumented(path, meta)
    names = sorted({n for _, *ns, _ in wanted for n in ns})
    vals = dict(zip(names, _session(model).run(names, {"input": x.numpy()})))
    layers = {s.name: s.layer for s in sites_of(qm) if s.converted}
    weights = {k: (v.weight, v.bias, v.spec) for k, v in calibrate(qm, [(x,)]).items()}
    checked = saturated = 0
    for site, x_name, q_name, y_name, graph_s_x in wanted:
        layer, entry = layers[site], meta["layers"][site]
        s_x = torch.tensor(graph_s_x)
        assert s_x.item() == entry["forward"]["activation"]["scale"]
        weight, bias, spec = weights[site]
        w_q, s_w = quantize_per_channel(weight.reshape(weight.shape[0], -1).float(), 0)
        assert torch.equal(s_w, tensor_from_json(entry["forward"]["weight"]["scale"]))
        x_in = torch.from_numpy(vals[x_name])
        q_ort = torch.from_numpy(vals[q_name])
        assert q_ort.dtype == torch.int8
        want_q = quantize(x_in, s_x)  # saturating at -127 too: the file clips in front of QuantizeLinear
        saturated += int(((x_in / s_x).round() < -127).sum())
        assert torch.equal(want_q, q_ort), site
        q, w = q_ort.double(), w_q.double().reshape(weight.shape)
        if layer.dims:
            pad = [p for lohi in reversed(spec.padding) for p in lohi]
            conv = (F.conv1d, F.conv2d, F.conv3d)[layer.dims - 1]
            acc = conv(F.pad(q, pad), w, None, spec.stride, 0, spec.dilation, spec.groups)
            mag = conv(F.pad(q.abs(), pad), w.abs(), None, spec.stride, 0, spec.dilation, spec.groups)
            k = weight[0].numel()
            sw = s_w.double().view(-1, *[1] * layer.dims)
            b = None if bias is None else bias.double().view(-1, *[1] * layer.dims)
        else:
            acc, mag, k = q @ w.T, q.abs() @ w.abs().T, weight.shape[1]
            sw, b = s_w.double(), None if bias is None else bias.double()
        s = s_x.double() * sw
        want = acc * s + (0 if b is None else b)
        bound = (k + 3) * U * mag * s + (0 if b is None else 2 * U * (acc * s).abs() + U * b.abs()) + 1e-30
        got = torch.from_numpy(vals[y_name]).double()
        assert got.shape == want.shape
        assert ((got - want).abs() <= bound).all(), (site, (got - want).abs().max().item())
        checked += 1
    assert checked == sum(len(e["onnx"]) for e in meta["layers"].values()) >= 3
    print(f"{name}: {saturated} activations below -127 steps")


def test_converted_ops_are_wrapped_in_qdq_and_excluded_ones_stay_float(exported):
    name, qm, _, path, meta = exported
    model = onnx.load(path)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    tagged = set()
    for site, entry in meta["layers"].items():
        for call in entry["onnx"]:
            tagged.add(call["compute"])
            w = inits[call["weight_initializer"]]
            assert w.data_type == onnx.TensorProto.INT8
            wdq = next(n for n in model.graph.node if n.name == call["w_dequantize"])
            axis = [a.i for a in wdq.attribute if a.name == "axis"]
            assert axis == [0]
            scale = _const(model, wdq.input[1])
            assert scale.shape == (entry["forward"]["weight"]["shape"][0],)  # per output channel
            xq = next(n for n in model.graph.node if n.name == call["x_quantize"])
            assert _const(model, xq.input[1]).shape == ()  # per tensor
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    untagged = [n for n in compute if n.name not in tagged]
    assert len(untagged) == len(meta["skipped"])
    for n in untagged:  # a float op: float weight initializer, no DequantizeLinear in front
        assert n.input[1] in inits and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT
        assert producers.get(n.input[0]) is None or producers[n.input[0]].op_type != "DequantizeLinear"
    if name == "conv1d":
        assert meta["skipped"] == [{"name": "c2", "op": "conv1d", "source": "module",
                                    "reason": "excluded by Int8Config.exclude"}]


# --------------------------------------------------------------------------- metadata
def test_metadata_covers_every_converted_layer_and_names_its_nodes(exported):
    _, qm, _, path, meta = exported
    converted = [s.name for s in sites_of(qm) if s.converted]
    assert list(meta["layers"]) == converted
    graph_nodes = {n.name for n in onnx.load(path).graph.node}
    for site in converted:
        entry = meta["layers"][site]
        assert entry["exported"] and entry["export"] == "int8" and len(entry["onnx"]) >= 1
        for k, call in enumerate(entry["onnx"]):
            base = site if k == 0 else f"{site}#{k + 1}"
            for role in ("x_quantize", "x_dequantize", "w_dequantize", "compute"):
                assert call[role] in graph_nodes
                # a Q/DQ pair two sites share (same input, same scale) keeps the first site's name
                assert call[role] == f"{base}/{role}" or role in ("x_quantize", "x_dequantize")


def test_widest_runtime_support_and_metadata_stored_once(exported):
    """IR version the lowest opset 18 allows (8: onnxruntime >= 1.14 loads it; IR 10 would shut out
    onnxruntime <= 1.17), no node-level metadata or stack traces, one metadata document."""
    _, _, _, path, meta = exported
    model = onnx.load(path)
    assert model.ir_version == 8 and meta["ir_version"] == 8
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", 18)]
    assert meta["opset"] == 18
    assert [p.key for p in model.metadata_props].count(METADATA_KEY) == 1
    assert not any(n.metadata_props or n.doc_string for n in model.graph.node)
    assert not model.functions


def test_metadata_round_trips_exactly(exported):
    _, qm, x, path, meta = exported
    assert meta["schema"] == SCHEMA and meta["schema_version"] == SCHEMA_VERSION
    assert read_onnx_metadata(path) == meta
    back = read_onnx_metadata(path, as_tensors=True)
    assert int8fx.Int8Config(**back["config"]) == conversion_of(qm).config
    cal = calibrate(qm, [(x,)])
    nontrivial = 0
    for s in sites_of(qm):
        if not s.converted:
            continue
        layer, entry = s.layer, back["layers"][s.name]
        for n, b in layer.grad_quantizer.named_buffers():
            assert entry["grad"]["state"][n].dtype == b.dtype
            assert torch.equal(entry["grad"]["state"][n], b), (s.name, n)  # bit-exact
            nontrivial += int(b.float().abs().sum() > 0)
        for n, b in layer.named_buffers(recurse=False):
            assert torch.equal(entry["state"][n], b), (s.name, n)
        assert entry["grad"]["policy"] == layer.grad_quantizer.policy
        assert entry["dclrs"]["deviation"] == float(layer.deviation) and entry["dclrs"]["tracks_deviation"]
        assert entry["dclrs"]["lr_factor"] == pytest.approx(max(math.exp(-20 * float(layer.deviation)), 0.1))
        act = entry["forward"]["activation"]  # default calibration "eval": the trained layer's running clip
        assert act["clip"] == float(layer.act_clip_ema) > 0 and act["clip_source"] == "act_clip_ema"
        assert act["scale"] == float(scale_from_clip(layer.act_clip_ema))
        assert act["calibration_absmax"] == float(cal[s.name].absmax)
        _, s_w = quantize_per_channel(cal[s.name].weight.reshape(cal[s.name].weight.shape[0], -1).float(), 0)
        assert torch.equal(entry["forward"]["weight"]["scale"], s_w)
    assert nontrivial > 0  # the training step left state worth round-tripping


def test_calibration_sources(tmp_path):
    """"ema" takes the training clip; "inputs" the calibration absmax; "eval" (default) whatever the
    eval-mode model uses: the training clip, or the batch absmax for layers set to eval_act_clip="batch"."""
    qm, x, _ = _build("conv1d")
    cal = calibrate(qm, [(x,)])
    for c in ("ema", "inputs", "eval"):
        if c == "eval":
            qm.c1.config = dataclasses.replace(qm.c1.config, eval_act_clip="batch")
        meta = export_onnx(qm, x, tmp_path / f"{c}.onnx", calibration=c)
        for s in sites_of(qm):
            if s.converted:
                act = meta["layers"][s.name]["forward"]["activation"]
                ema = c == "ema" or (c == "eval" and s.layer.config.eval_act_clip == "ema")
                clip = s.layer.act_clip_ema if ema else cal[s.name].absmax
                assert act["clip_source"] == ("act_clip_ema" if ema else "calibration"), (c, s.name)
                assert act["clip"] == float(clip) > 0
                assert act["scale"] == float(scale_from_clip(clip))


def test_inputs_beyond_the_static_clip_saturate_at_minus_127(tmp_path):
    """A trained layer's static clip is exceeded by new inputs; int8fx saturates at -127, QuantizeLinear
    alone at -128. The exported Clip keeps onnxruntime equal to the eval-mode model on both sides."""
    torch.manual_seed(0)
    qm = int8fx.convert(nn.Sequential(nn.Linear(6, 3)))
    _train_step(qm, torch.randn(4, 6))  # one training batch sets act_clip_ema
    qm.eval()
    layer = next(m for m in qm.modules() if isinstance(m, int8fx.nn.Int8Layer))
    clip = float(layer.act_clip_ema)
    x = torch.tensor([[-10 * clip, 10 * clip, -clip, clip, 0.5 * clip, -1.01 * clip]])
    with torch.no_grad():
        ref = qm(x)
    export_onnx(qm, x, tmp_path / "sat.onnx")
    out = _session(str(tmp_path / "sat.onnx")).run(None, {"input": x.numpy()})[0]
    w_q, s_w = quantize_per_channel(layer.weight.detach(), 0)
    levels = torch.tensor([[-127.0, 127, -127, 127, 64, -127]])  # 0.5 * 127 = 63.5 rounds to even
    want = (levels @ w_q.float().t()) * float(scale_from_clip(layer.act_clip_ema)) * s_w + layer.bias.detach()
    assert torch.allclose(ref, want, rtol=1e-5, atol=1e-6)
    assert np.allclose(out, ref.numpy(), rtol=1e-5, atol=1e-6), (out, ref)


def test_dynamic_batch_runs_other_batch_sizes(exported):
    name, qm, x, path, _ = exported
    if name != "conv1d":
        pytest.skip("one model suffices")
    out = _session(path).run(None, {"input": torch.randn(7, *x.shape[1:]).numpy()})[0]
    assert out.shape == (7, 5)


class BranchesOnBatchSize(nn.Module):
    """Code that special-cases a batch of one, which a traced graph with a symbolic batch cannot hold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        if x.shape[0] == 1:
            y = y * 2
        return self.fc(y)


class BatchStatistics(nn.Module):
    """Rows that interact in eval mode (a norm on the batch's own statistics): batch-dependent by design, and
    the exported ops follow the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8, track_running_stats=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("form", ["faithful", "deploy"])
@pytest.mark.parametrize("exporter", exporters("dynamo", "torchscript"))
def test_code_that_branches_on_the_batch_size_is_refused_a_dynamic_batch(form, exporter, tmp_path):
    """Exported from a batch of 4 with a symbolic batch, this model's file ran the batch-4 branch at batch 1,
    silently (from a batch of 1, the dynamo exporter fixed the batch at 1 unasked). Now the export says why
    and how; with dynamic_batch=False the file computes the model at the example's size."""
    torch.manual_seed(0)
    qm = int8fx.convert(BranchesOnBatchSize()).eval()
    path = str(tmp_path / "m.onnx")
    for batch in (4, 1):
        with pytest.raises(OnnxExportError, match=r"differently alone than in a batch of (4|2) \(output 0: .* of its "
                           r"range apart\).*dynamic_batch=False"):
            export_onnx(qm, torch.randn(batch, 3, 12, 12), path, form=form, exporter=exporter)
        assert not os.path.exists(path)
    x = torch.randn(1, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no running clips: the warning that says so)
        export_onnx(qm, x, path, form=form, exporter=exporter, dynamic_batch=False)
    out = _session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = qm(x).numpy()
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max(), (out, ref)  # the batch-1 branch (2x apart)


class SqueezesTheBatch(BranchesOnBatchSize):
    """`squeeze()` drops the batch of one too: the shape differs alone, not the numbers."""

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3), keepdim=True).squeeze())


@pytest.mark.parametrize("model, sizes", [(BatchStatistics, (4, 2)), (SqueezesTheBatch, (4, 1))])
def test_models_whose_rows_interact_or_whose_shapes_change_alone_keep_their_dynamic_batch(model, sizes, tmp_path):
    torch.manual_seed(0)
    qm = int8fx.convert(model()).eval()
    path = str(tmp_path / "m.onnx")
    x = torch.randn(4, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(qm, x, path)
    session = _session(path)
    for batch in sizes:
        out = session.run(None, {"input": x[:batch].numpy()})[0]
        with torch.no_grad():
            ref = qm(x[:batch]).reshape(batch, 4).numpy()
        assert out.shape == (batch, 4)
        assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max(), (batch, out, ref)


class TinyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.att = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.emb(x)
        a, _ = self.att(h, h, h, need_weights=False)
        return self.head(a.mean(1))


def test_attention_projections_inside_opaque_code_are_exported_in_int8(tmp_path):
    """nn.MultiheadAttention calls F.linear from code fx does not trace (int8fx routes it through
    routed); its eval-mode fast path would skip those calls, so calibration and export turn it off."""
    torch.manual_seed(0)
    qm = int8fx.convert(TinyAttention()).eval()
    x = torch.randn(2, 5, 8)
    meta = export_onnx(qm, x, tmp_path / "att.onnx")
    assert list(meta["layers"]) == ["emb", "att.in_proj", "att.out_proj", "head"]
    assert all(e["exported"] and len(e["onnx"]) == 1 for e in meta["layers"].values())
    ops = [n.op_type for n in onnx.load(tmp_path / "att.onnx").graph.node]
    assert ops.count("QuantizeLinear") == 4 and "Round" not in ops  # no INT8 math inlined as float ops
    with no_fused_fastpath():
        ref, sens = tie_flip_sensitivity(qm, x)
    out = _session(str(tmp_path / "att.onnx")).run(None, {"input": x.numpy()})[0]
    assert np.abs(out - ref.numpy()).max() <= 2 * sens + 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("exporter", exporters("dynamo", "torchscript"))
def test_a_routed_conv_computing_its_own_weight_is_exported_in_int8(tmp_path, exporter):
    """timm's StdConv2dSame standardises its weight in code fx does not trace; its routed call reaches its
    site (by the weight's shape), and so do the export's stand-ins, whose own F.conv2d on a weight of that
    shape must not be routed again (it recursed). Under the TorchScript exporter's tracing the weight's shape
    holds 0-d tensors, which matched no site: the export failed for want of the site's QDQ."""
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    qm = int8fx.convert(nn.Sequential(timm_layers.StdConv2dSame(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 4, 1)))
    x = torch.randn(2, 3, 15, 15)
    _train_step(qm, x)
    meta = export_onnx(qm, x, tmp_path / "std.onnx", exporter=exporter)
    assert all(e["exported"] and len(e["onnx"]) == 1 for e in meta["layers"].values())
    ref, sens = tie_flip_sensitivity(qm, x)
    out = _session(str(tmp_path / "std.onnx")).run(None, {"input": x.numpy()})[0]
    assert np.abs(out - ref.numpy()).max() <= 2 * sens + 1e-5 * ref.abs().max().item()


class ZeroStart(nn.Module):
    """RAFT's refinement loop in small: the first update convolves a zero flow built from the input's size,
    later updates what the model computed."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.flow = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        flow = torch.zeros(1, 2, x.shape[-2], x.shape[-1])
        out = self.enc(x)
        for _ in range(2):
            out = out + self.flow(flow)
            flow = flow + out[:, :2].mean(0, keepdim=True)
        return out


@pytest.mark.parametrize("exporter", exporters("dynamo", "torchscript"))
def test_a_site_call_on_an_input_known_at_export_time_exports(tmp_path, exporter):
    """The torch.export-based exporter computes what it can at export time: the zero flow's Clip (faithful)
    or the whole first call (deploy). Both forms failed on torchvision's RAFT ("lacks the pattern", "cannot
    find the node"). The faithful file now keeps that call's QuantizeLinear on the computed input and equals
    qmodel.eval(); the deploy file counts the call as computed at export, and agrees up to int8 rounding."""
    torch.manual_seed(0)
    qm = int8fx.convert(ZeroStart())
    x = torch.randn(4, 3, 8, 8)
    _train_step(qm, x)
    ref, sens = tie_flip_sensitivity(qm, x)
    for form in ("faithful", "deploy"):
        path = str(tmp_path / f"{form}.onnx")
        meta = export_onnx(qm, x, path, form=form, exporter=exporter, calibration_data=[x])
        out = _session(path).run(None, {"input": x.numpy()})[0]
        calls = len(meta["layers"]["flow"]["onnx"])
        if form == "faithful":
            assert calls == 2 and np.abs(out - ref.numpy()).max() <= 2 * sens + 1e-5 * ref.abs().max().item()
        else:
            assert calls + meta["deploy"]["site_calls_computed_at_export"].get("flow", 0) == 2
            assert np.abs(out - ref.numpy()).max() <= 0.05 * ref.abs().max().item()


def test_a_site_call_whose_node_is_there_but_unmatched_fails_the_deploy_export(tmp_path, monkeypatch):
    """What tells a call computed at export time from one the deploy graph would run in float: no conv/linear
    node of the site's weight shape is left unmatched. Here one of the two matches is dropped."""
    from int8fx.onnx import deploy

    torch.manual_seed(0)
    qm = int8fx.convert(ZeroStart())
    x = torch.randn(4, 3, 8, 8)
    _train_step(qm, x)
    assign = deploy.assign_sites

    def one_flow_call_unmatched(*args, **kwargs):
        found = assign(*args, **kwargs)
        last_flow = [f for f in found if f[1] == "flow"][-1]
        return [f for f in found if f is not last_flow]

    monkeypatch.setattr(deploy, "assign_sites", one_flow_call_unmatched)
    with pytest.raises(OnnxExportError, match=r"cannot find the conv/linear node of INT8 site\(s\) 'flow' \(1 of 2"):
        export_onnx(qm, x, str(tmp_path / "m.onnx"), form="deploy", exporter="torchscript", calibration_data=[x])
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- failure
class WithCummax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return torch.cummax(y, dim=1).values  # no ONNX lowering in torch's exporter


def test_unexpressible_op_names_the_node_and_writes_nothing(tmp_path):
    qm = int8fx.convert(WithCummax())
    target = tmp_path / "bad.onnx"
    with pytest.raises(OnnxExportError) as info:
        export_onnx(qm, torch.randn(1, 3, 8, 8), target)
    msg = str(info.value)
    assert "test_onnx.py:" in msg and "torch.cummax(y, dim=1)" in msg and "aten::cummax" in msg  # the user's line
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary one


def test_failed_export_leaves_an_existing_file_alone(tmp_path):
    target = tmp_path / "keep.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(OnnxExportError):
        export_onnx(int8fx.convert(WithCummax()), torch.randn(1, 3, 8, 8), target)
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["keep.onnx"]


def test_model_without_int8fx_metadata_is_rejected(tmp_path):
    path = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), path)
    with pytest.raises(ValueError, match=METADATA_KEY):
        read_onnx_metadata(path)


def test_unexportable_op_names_the_node_in_int8fx_rewritten_code_too(tmp_path):
    """A module whose own code int8fx rewrote with torch.fx (it calls F.conv2d): the error names the fx node."""

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x):
            return torch.cummax(F.conv2d(x, self.w), dim=1).values

    with pytest.raises(OnnxExportError, match=r"fx node 'cummax' of Int8Functional.* has no ONNX form \(aten::cummax\)"):
        export_onnx(int8fx.convert(Functional()), torch.randn(1, 3, 8, 8), tmp_path / "f.onnx")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- exporters
class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.export cannot capture it, the TorchScript exporter traces
    the branch the example takes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > -1e9:
            y = y * 2
        return y


def _beit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("beit_base_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                             embed_dim=16, num_heads=2, num_classes=3)


@needs_dynamo_exporter
@pytest.mark.parametrize("model, shape, reason", [
    (DataDependent, (1, 3, 8, 8), "torch.export cannot capture the model"),
    (_beit, (1, 3, 16, 16), "Cannot view a tensor"),
], ids=["capture", "translation"])
def test_auto_falls_back_to_torchscript_where_the_torch_export_based_exporter_fails(model, shape, reason, tmp_path):
    """Where torch.export cannot capture a model (control flow on a tensor value), or torch's ONNX translation
    of the captured graph fails (timm's BEiT: a decomposition of a view of its attention output; "auto"
    stopped there, blaming aten::view as an op without an ONNX form), "auto" takes the TorchScript exporter,
    and exporter="dynamo" says torch's own reason."""
    qm = int8fx.convert(model()).eval()
    x = torch.randn(shape)
    meta = export_onnx(qm, x, tmp_path / "m.onnx")
    assert meta["exporter"] == "torchscript"
    with torch.no_grad():
        ref = qm(x)
    out = _session(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    assert np.abs(out - ref.numpy()).max() <= 1e-5 * ref.abs().max().item()
    if model is DataDependent and _dynamo_exporter_drafts():
        # torch 2.8's torch.export-based exporter falls back to torch.export.draft_export, which takes the
        # branch the example takes, as the TorchScript exporter does
        assert export_onnx(qm, x, tmp_path / "m2.onnx", exporter="dynamo")["exporter"] == "dynamo"
        return
    with pytest.raises(OnnxExportError, match=reason) as info:
        export_onnx(qm, x, tmp_path / "m2.onnx", exporter="dynamo")
    assert "no ONNX form" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def _dynamo_exporter_drafts() -> bool:
    """Whether this torch's ONNX exporter falls back to `torch.export.draft_export` (2.8; not by default later)."""
    try:
        from torch.onnx._internal.exporter import _capture_strategies
    except ImportError:
        return False
    return any(s.__name__ == "TorchExportDraftExportStrategy" for s in _capture_strategies.CAPTURE_STRATEGIES)


def test_a_torch_export_based_exporter_without_int8_translations_is_refused_up_front(tmp_path, monkeypatch):
    """torch 2.5's torch.export-based exporter takes no custom translation, so it would stop at the first INT8
    site; exporter="dynamo" says so before any work and writes nothing, "auto" takes the TorchScript exporter
    (as it does there anyway: dynamo is not that torch's default)."""
    from int8fx.onnx import torch_export

    monkeypatch.setattr(torch_export, "dynamo_writes_int8_sites", lambda: False)
    qm = int8fx.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))).eval()
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(ValueError, match=r"takes no ONNX translation for INT8 sites \(that needs torch >= 2\.6\); "
                                         r"use exporter='torchscript'"):
        export_onnx(qm, x, tmp_path / "x.onnx", exporter="dynamo")
    assert os.listdir(tmp_path) == []
    assert export_onnx(qm, x, tmp_path / "y.onnx")["exporter"] == "torchscript"


@pytest.mark.parametrize("form", ["faithful", "deploy"])
@pytest.mark.parametrize("where", ["weight", "running_var"])
def test_a_diverged_model_is_refused_with_its_reason(form, where, tmp_path):
    """NaN in a weight or a BatchNorm statistic (a training that diverged): a ValueError that says so, no
    file. (A NaN weight never equals itself, so its site once passed for input-dependent and the deploy
    export died in a TypeError: torchvision's mnasnet1_0 after 100 steps at lr 0.05.)"""
    qm = int8fx.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))).eval()
    with torch.no_grad():
        (qm[0].weight if where == "weight" else qm[1].running_var)[1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values in 1 parameter\(s\)/buffer\(s\) \((0\.weight|1\.running_var)"
                                         r"\): its training diverged"):
        export_onnx(qm, torch.randn(2, 3, 8, 8), tmp_path / "x.onnx", form=form)
    assert os.listdir(tmp_path) == []


@needs_dynamo_exporter
def test_a_site_without_its_qdq_pattern_fails_loudly(tmp_path, monkeypatch):
    """If the exporter wrote a site as plain float math (as torch.export did with the old autograd.Function),
    the export must fail, naming the site, and write nothing."""
    from onnxscript import opset18 as op

    from int8fx.onnx import qdq_op

    key = next(iter(qdq_op.ONNX_TRANSLATIONS))

    def float_only(x, x_scale, x_zero_point, w_int8, w_scale, w_zero_point, bias, kind, strides, pads, dilations,
                   groups, output_padding):
        w = op.Mul(op.Cast(w_int8, to=1), op.Reshape(w_scale, op.Constant(value_ints=[-1, 1, 1, 1])))
        return op.Conv(x, w, bias, strides=list(strides), pads=list(pads), dilations=list(dilations), group=groups)

    monkeypatch.setitem(qdq_op.ONNX_TRANSLATIONS, key, float_only)
    qm = int8fx.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))).eval()
    with pytest.raises(OnnxExportError, match=r"lacks the QuantizeLinear/DequantizeLinear pattern of INT8 site\(s\) "
                                              r"'0' \(0 of 1 calls\), '2' \(0 of 1 calls\)"):
        export_onnx(qm, torch.randn(1, 3, 6, 6), tmp_path / "x.onnx", exporter="dynamo")
    assert os.listdir(tmp_path) == []


class PerSampleWeight(nn.Module):
    """A weight computed from the model input (as timm's CondConv mixes its experts per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.Parameter(torch.randn(2, 4, 3, 3, 3) * 0.3)
        self.route = nn.Linear(3, 2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        r = torch.sigmoid(self.route(x.mean((0, 2, 3))))
        w = (r.view(2, 1, 1, 1, 1) * self.experts).sum(0)
        return self.head(F.conv2d(x, w, padding=1))


@pytest.mark.parametrize("form", ["faithful", "deploy"])
def test_a_weight_computed_from_the_input_is_exported_in_float_and_the_metadata_says_so(form, tmp_path):
    torch.manual_seed(0)
    model = PerSampleWeight()
    qm = int8fx.convert(model)
    _train_step(qm, torch.randn(2, 3, 6, 6))
    qm.eval()
    x = torch.randn(1, 3, 6, 6)
    calibration = [torch.randn(4, 3, 6, 6) for _ in range(4)]  # the deploy form calibrates the float site's output
    meta = export_onnx(qm, x, tmp_path / "p.onnx", form=form, calibration_data=calibration)
    (fsite,) = [s for s in meta["layers"] if s not in ("route", "head")]
    assert meta["layers"][fsite]["export"] == "float" and not meta["layers"][fsite]["exported"]
    assert "computed from the model input" in meta["layers"][fsite]["reason"]
    assert meta["layers"]["head"]["export"] == "int8" and meta["layers"]["route"]["export"] == "int8"
    # what the file computes: that site in float, the others in INT8 with the trained clips
    ref_model = int8fx.convert(model, int8fx.Int8Config(exclude=(fsite,)))
    ref_model.load_state_dict(qm.state_dict(), strict=False)
    other = torch.randn(1, 3, 6, 6)  # another input: another weight, which the file must compute too
    with torch.no_grad():
        ref = ref_model.eval()(other)
    out = _session(str(tmp_path / "p.onnx")).run(None, {"input": other.numpy()})[0]
    rel = np.abs(out - ref.numpy()).max() / ref.abs().max().item()
    assert rel < (1e-5 if form == "faithful" else 0.05), rel


# --------------------------------------------------------------------------- files and metadata validation
def test_file_is_written_with_the_process_umask(tmp_path):
    qm = int8fx.convert(nn.Sequential(nn.Linear(4, 3))).eval()
    old = os.umask(0o022)
    try:
        export_onnx(qm, torch.randn(2, 4), tmp_path / "a.onnx", exporter="torchscript")
        os.umask(0o077)
        export_onnx(qm, torch.randn(2, 4), tmp_path / "b.onnx", exporter="torchscript")
    finally:
        os.umask(old)
    assert (tmp_path / "a.onnx").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.onnx").stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "b.onnx"]  # no temporary or external-data files


@pytest.mark.parametrize("exporter", exporters("torchscript", "dynamo"))
def test_a_compiled_model_exports_as_the_model_it_wraps(exporter, tmp_path):
    """`torch.compile(qm)` is what users train; its export is `qm`'s (torch.jit.trace refused the wrapper)."""
    torch.manual_seed(0)
    qm = int8fx.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)))
    x = torch.randn(2, 3, 8, 8)
    _train_step(qm, x)
    qm.eval()
    export_onnx(torch.compile(qm), x, tmp_path / "c.onnx", exporter=exporter)
    export_onnx(qm, x, tmp_path / "q.onnx", exporter=exporter)
    assert read_onnx_metadata(str(tmp_path / "c.onnx")) == read_onnx_metadata(str(tmp_path / "q.onnx"))
    out = _session(str(tmp_path / "c.onnx")).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, qm(x).numpy(), rtol=0, atol=1e-5)


def test_a_tensor_as_calibration_data_is_one_batch(tmp_path):
    """As the CLI reads a saved tensor: one batch of 16 images, not 16 batches of one image without its
    batch dimension (which raised a bare 'Boolean value of Tensor ... is ambiguous')."""
    torch.manual_seed(0)
    qm = int8fx.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))).eval()
    x, images = torch.randn(2, 3, 8, 8), 3 * torch.randn(16, 3, 8, 8)
    kw = dict(exporter="torchscript", calibration="inputs")
    alone = export_onnx(qm, x, tmp_path / "a.onnx", calibration_data=images, **kw)
    listed = export_onnx(qm, x, tmp_path / "b.onnx", calibration_data=[images], **kw)
    assert alone == listed and alone["calibration"]["batches"] == 2
    assert alone != export_onnx(qm, x, tmp_path / "c.onnx", **kw)  # (the images' larger range is calibrated)
    with pytest.raises(ValueError, match="calibration_data must be a tensor"):
        export_onnx(qm, x, tmp_path / "d.onnx", calibration_data=5, **kw)


@pytest.mark.parametrize("exporter", exporters("torchscript", "dynamo"))
def test_input_and_output_names_name_each_tensor_or_are_refused(exporter, tmp_path):
    """One name given as a string names the one input (not one input per character, of which torch used the
    first); a list that does not name every input or output is refused before anything is written."""
    qm = int8fx.convert(nn.Sequential(nn.Linear(4, 3))).eval()
    export_onnx(qm, torch.randn(2, 4), tmp_path / "a.onnx", exporter=exporter, input_names="features",
                output_names=["logits"])
    graph = onnx.load(tmp_path / "a.onnx").graph
    assert [i.name for i in graph.input] == ["features"] and [o.name for o in graph.output] == ["logits"]
    for names in (dict(input_names=["a", "b"]), dict(output_names=[]), dict(output_names=["", ]),
                  dict(input_names=[3])):
        with pytest.raises(ValueError, match="give one distinct, non-empty name for each"):
            export_onnx(qm, torch.randn(2, 4), tmp_path / "b.onnx", exporter=exporter, **names)
    assert os.listdir(tmp_path) == ["a.onnx"]


class _DictOut(nn.Module):
    """Returns a dict, as torchvision's segmentation models do."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        return {"feat": y, "logits": self.fc(y.mean((2, 3)))}


@pytest.mark.parametrize("exporter", exporters("torchscript", "dynamo"))
def test_the_outputs_of_a_dict_are_named_after_its_keys(exporter, tmp_path):
    """A model returning {"feat": ..., "logits": ...} gives a file whose outputs are "feat" and "logits" in
    both forms, with the values of those keys (before, "output" and a graph node's name such as
    "qdq_gemm_1"); output_names must then name both."""
    import onnxruntime as ort

    qm = int8fx.convert(_DictOut()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = qm(x)
    for form in ("faithful", "deploy"):
        path = str(tmp_path / f"{form}.onnx")
        export_onnx(qm, x, path, form=form, exporter=exporter)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        assert [o.name for o in sess.get_outputs()] == ["feat", "logits"]
        got = dict(zip(["feat", "logits"], sess.run(None, {"input": x.numpy()})))
        tol = 1e-5 if form == "faithful" else 0.05
        for key in ("feat", "logits"):
            assert got[key].shape == tuple(ref[key].shape)
            assert np.abs(got[key] - ref[key].numpy()).max() <= tol * np.abs(ref[key].numpy()).max(), (form, key)
    with pytest.raises(ValueError, match="the model has 2 tensor output"):
        export_onnx(qm, x, tmp_path / "b.onnx", exporter=exporter, output_names="logits")


def test_a_link_at_the_target_is_followed_and_a_device_or_pipe_is_not_replaced(tmp_path):
    """`-o model.onnx` where model.onnx links to a release directory writes the release's file and keeps the
    link (as `open` would); `-o /dev/null` (a pipe here) is refused rather than replaced by a regular file."""
    qm = int8fx.convert(nn.Sequential(nn.Linear(4, 3))).eval()
    (tmp_path / "release").mkdir()
    os.symlink(tmp_path / "release" / "v1.onnx", tmp_path / "model.onnx")  # (dangling until written)
    export_onnx(qm, torch.randn(2, 4), tmp_path / "model.onnx", exporter="torchscript")
    assert os.path.islink(tmp_path / "model.onnx") and os.listdir(tmp_path / "release") == ["v1.onnx"]
    assert read_onnx_metadata(str(tmp_path / "release" / "v1.onnx"))["layers"]
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match="it is a pipe"):
        export_onnx(qm, torch.randn(2, 4), tmp_path / "pipe", exporter="torchscript")
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "pipe", "release"]


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    torch.manual_seed(0)
    qm = int8fx.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)))
    _train_step(qm, torch.randn(2, 3, 4, 4))
    qm.eval()
    path = tmp_path_factory.mktemp("small") / "s.onnx"
    export_onnx(qm, torch.randn(1, 3, 4, 4), path, exporter="torchscript")
    return onnx.load(path)


def _with_metadata(model, edit):
    import json

    m = onnx.ModelProto()
    m.CopyFrom(model)
    prop = next(p for p in m.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(prop.value)
    out = edit(meta)
    prop.value = out if isinstance(out, str) else json.dumps(meta)
    return m


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(schema_version=0), r"'schema_version' is 0, expected an integer >= 1"),
    (lambda m: m.update(schema_version=True), r"'schema_version' is True, expected an integer >= 1"),
    (lambda m: m.update(schema_version=99), r"'schema_version' is 99, newer than this int8fx reads"),
    (lambda m: m.update(schema="other"), r"'schema' is 'other'"),
    (lambda m: m.pop("layers"), r"'layers' is missing"),
    (lambda m: m.update(layers=[]), r"'layers' is a list, expected a JSON object"),
    (lambda m: m.update(form="fast"), r"'form' is 'fast'"),
    (lambda m: m["layers"]["0"]["forward"]["activation"].update(scale=float("nan")),
     r"layers\['0'\].forward.activation.scale is nan, expected a positive finite number"),
    (lambda m: m["layers"]["0"]["forward"]["activation"].update(scale=-0.5),
     r"layers\['0'\].forward.activation.scale is -0.5, expected a positive finite number"),
    (lambda m: m["layers"]["3"]["forward"]["weight"]["scale"].update(data=[-1.0, 1.0]),
     r"layers\['3'\].forward.weight.scale holds a negative or non-finite value"),
    (lambda m: m["layers"]["3"]["forward"]["weight"].update(scale=[1.0]), r"is not a tensor object"),
    (lambda m: m["layers"]["0"]["onnx"][0].update(x_scale=m["layers"]["0"]["onnx"][0]["x_scale"] * 2),
     r"layers\['0'\].onnx\[0\].x_scale is .* but node '0/x_quantize' quantizes with scale"),
    (lambda m: m["layers"]["0"]["onnx"][0].update(compute="nowhere"), r"names node 'nowhere', which is not in the graph"),
    (lambda m: m.update(opset=17), r"'opset' is 17 but the graph's opset is 18"),
    (lambda m: json_dumps_truncated(m), r"not valid JSON \(truncated or damaged\?\)"),
])
def test_read_rejects_bad_metadata_with_a_clear_error(small_export, edit, message):
    from int8fx.onnx import OnnxMetadataError

    assert read_onnx_metadata(small_export)["layers"]  # the untouched file reads
    with pytest.raises(OnnxMetadataError, match=message):
        read_onnx_metadata(_with_metadata(small_export, edit))


def json_dumps_truncated(meta: dict) -> str:
    import json

    text = json.dumps(meta)
    return text[: len(text) // 2]


def test_read_names_a_file_that_is_not_onnx(tmp_path):
    from int8fx.onnx import OnnxMetadataError

    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01 definitely not a protobuf \xff" * 3)
    with pytest.raises(OnnxMetadataError, match="junk.onnx: not an ONNX model"):
        read_onnx_metadata(tmp_path / "junk.onnx")
    with pytest.raises(OnnxMetadataError, match="no such file"):
        read_onnx_metadata(tmp_path / "missing.onnx")


def test_a_site_without_a_running_clip_is_named_by_a_warning(tmp_path):
    """qmodel.eval() quantizes the input of a site that never committed a running clip at each batch's
    absmax; a file can only hold a static scale, so a faithful export says which sites differ that way, and
    a trained model exports without the warning, equal to qmodel.eval() on an input of another range."""
    torch.manual_seed(0)
    qm = int8fx.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 2, 2, stride=2)))
    for _ in range(2):
        qm(torch.randn(4, 3, 10, 10)).square().mean().backward()  # backward without a step: nothing committed
    qm.eval()
    with pytest.warns(UserWarning, match=r"2 site\(s\) \('0', '2'\) have no running activation clip"):
        export_onnx(qm, torch.randn(1, 3, 10, 10), tmp_path / "untrained.onnx")
    qm.train()
    opt = torch.optim.SGD(qm.parameters(), lr=0.0)
    for _ in range(2):
        qm(torch.randn(4, 3, 10, 10)).square().mean().backward()
        opt.step()
    qm.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*running activation clip")
        export_onnx(qm, torch.randn(1, 3, 10, 10), tmp_path / "trained.onnx")
    x = 3 * torch.randn(2, 3, 10, 10)  # another range than the export's example input
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    out = _session(str(tmp_path / "trained.onnx"), sess_options=opts).run(None, {"input": x.numpy()})[0]
    ref = qm(x).detach().numpy()
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
