"""inspect(): the table (fits 120 columns for resnet50, shows skipped sites with reasons), the numbers in
it (shapes, MACs, live clip values), JSON, the graph picture, and that inspecting changes nothing."""
from __future__ import annotations

import json
import warnings
import re
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import int8fx
from int8fx.kernels import resolve_backend
from int8fx.passes import sites_of
from int8fx.report import _INT8_FILL, _SKIP_FILL, _g

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def resnet50_trained():
    """resnet50 with conv1 and fc excluded, after one INT8 training step (clip buffers hold real values,
    so the clip column has its real width), plus its FP32 twin for an independent FLOP count."""
    torch.manual_seed(0)
    fp32 = torchvision.models.resnet50()
    qm = int8fx.convert(fp32, int8fx.Int8Config(exclude=("conv1", "fc")))
    x = torch.randn(2, 3, 32, 32)
    opt = int8fx.DeviationLRScaler(torch.optim.SGD(qm.parameters(), lr=1e-3), qm)
    qm(x).square().mean().backward()
    opt.step()
    return qm, fp32, x, int8fx.inspect(qm, x, name="resnet50")


def test_resnet50_table_fits_120_columns_and_shows_every_site(resnet50_trained):
    qm, _, _, rep = resnet50_trained
    text = rep.render(width=120)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert "…" not in text  # nothing cut short
    for site in sites_of(qm):
        assert any(re.match(rf"^\s*{re.escape(site.name)}\s", line) for line in lines), site.name
    assert len(rep.layers) == 54  # 53 convolutions + fc


def test_table_lists_skipped_sites_with_reasons(resnet50_trained):
    _, _, _, rep = resnet50_trained
    text = rep.render(width=120)
    assert [r.name for r in rep.skipped] == ["conv1", "fc"]
    assert "* kept in full precision (2):" in text
    assert "  conv1 (conv2d, module): excluded by Int8Config.exclude" in text.splitlines()
    assert "  fc (linear, module): excluded by Int8Config.exclude" in text.splitlines()
    row = next(line for line in text.splitlines() if re.match(r"^\s*fc\s", line))
    assert "no*" in row


def test_rows_show_live_clip_values_and_deviation(resnet50_trained):
    qm, _, _, rep = resnet50_trained
    text = rep.render(width=120)
    layer = qm.get_submodule("layer3.1.conv2")
    clips = layer.grad_quantizer.last_clip_w.float()
    row = next(r for r in rep.layers if r.name == "layer3.1.conv2")
    assert row.step == 1 and row.grad_quant == layer.grad_quantizer.policy
    assert (row.grad_clip_min, row.grad_clip_median, row.grad_clip_max) == (
        clips.min().item(), clips.median().item(), clips.max().item())
    assert row.grad_clip_max > 0
    assert row.deviation == layer.deviation.item()  # DCLRS turned tracking on
    assert row.act_clip_ema == layer.act_clip_ema.item() > 0
    assert row.backend == resolve_backend("auto", torch.device("cpu")).name  # what "auto" measured here
    assert rep.backend_note.startswith("backend auto on this CPU: ") and "->" in rep.backend_note
    assert row.fwd_granularity == "X per-tensor, W per-channel"
    line = next(line for line in text.splitlines() if re.match(r"^\s*layer3\.1\.conv2\s", line))
    assert f"{_g(row.grad_clip_min)}/{_g(row.grad_clip_median)}/{_g(row.grad_clip_max)}" in line
    assert "yes T/C" in line and row.grad_quant in line


def test_flop_share_matches_an_independent_count(resnet50_trained):
    """Total conv/linear MACs = torch's FlopCounterMode on the FP32 model / 2; the excluded share is
    conv1 (64 x 147 x 16 x 16 per image) and fc (1000 x 2048 per image)."""
    _, fp32, x, rep = resnet50_trained
    fp32.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fp32(x)
    total = counter.get_total_flops() // 2
    s = rep.summary
    assert s["macs_total"] == total
    excluded = 2 * (64 * 3 * 7 * 7 * 16 * 16 + 1000 * 2048)
    assert s["macs_int8"] == total - excluded
    assert s["int8_flop_percent"] == pytest.approx(100 * (total - excluded) / total)
    assert (s["sites"], s["converted"], s["skipped"]) == (54, 52, 2)
    assert f"({s['int8_flop_percent']:.1f}% of conv/linear FLOPs)" in rep.render(width=120)
    conv1 = next(r for r in rep.layers if r.name == "conv1")
    assert conv1.input_shape == (2, 3, 32, 32) and conv1.output_shape == (2, 64, 16, 16)
    assert conv1.macs == 2 * 64 * 3 * 7 * 7 * 16 * 16


def test_to_dict_and_json_round_trip(resnet50_trained, tmp_path):
    _, _, _, rep = resnet50_trained
    text = rep.to_json(tmp_path / "r.json")
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk == json.loads(text) == json.loads(json.dumps(rep.to_dict()))
    assert on_disk["schema"] == "int8fx.report/1"
    assert on_disk["summary"]["converted"] == 52
    row = next(r for r in on_disk["layers"] if r["name"] == "layer1.0.conv2")
    assert row["weight_shape"] == [64, 64, 3, 3] and row["converted"] is True and row["reason"] == ""
    assert row["quant_state"]["last_clip_w"]["shape"] == [64]
    assert on_disk["config"]["exclude"] == ["conv1", "fc"]


class FunctionalNet(nn.Module):
    """A functional conv excluded by name (shapes must come from the fx.Interpreter: it has no module) and
    a functional linear that is converted."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.w2 = nn.Parameter(torch.randn(4, 6 * 4 * 4))
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.bn(F.conv2d(x, self.w1, stride=2, padding=1))
        return F.linear(y.flatten(1), self.w2)


def test_functional_sites_get_shapes_and_inspect_changes_nothing():
    qm = int8fx.convert(FunctionalNet(), int8fx.Int8Config(exclude=("conv2d",))).train()
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    flags = {n: m.training for n, m in qm.named_modules()}
    rep = int8fx.inspect(qm, torch.randn(5, 3, 8, 8))
    conv, lin = rep.layers
    assert (conv.name, conv.converted, conv.reason) == ("conv2d", False, "excluded by Int8Config.exclude")
    assert conv.input_shape == (5, 3, 8, 8) and conv.weight_shape == (6, 3, 3, 3) and conv.output_shape == (5, 6, 4, 4)
    assert conv.macs == 5 * 6 * 4 * 4 * 27
    assert lin.converted and lin.weight_shape == (4, 96) and lin.macs == 5 * 4 * 96
    assert rep.summary["int8_flop_percent"] == pytest.approx(100 * 1920 / (1920 + 12960))
    after = qm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics, quantizer state untouched
    assert flags == {n: m.training for n, m in qm.named_modules()}


def test_without_example_input_the_table_says_how_to_get_shapes():
    rep = int8fx.inspect(int8fx.convert(FunctionalNet()))
    assert rep.summary["macs_total"] is None and rep.summary["int8_flop_percent"] is None
    assert "pass an example input" in str(rep)


def _svg_fills(path) -> dict[str, str]:
    ns = {"svg": "http://www.w3.org/2000/svg"}
    fills = {}
    for g in ET.parse(path).getroot().iter("{http://www.w3.org/2000/svg}g"):
        if g.get("class") == "node":
            title = g.find("svg:title", ns).text
            shape = next(e for e in g.iter() if e.tag.endswith(("polygon", "ellipse", "path")) and e.get("fill"))
            fills[title] = shape.get("fill")
    return fills


def test_save_graph_highlights_converted_and_skipped_nodes(tmp_path):
    qm = int8fx.convert(FunctionalNet(), int8fx.Int8Config(exclude=("conv2d",)))
    rep = int8fx.inspect(qm)
    rep.save_graph(tmp_path / "g.svg")
    fills = _svg_fills(tmp_path / "g.svg")
    int8_node = next(n.name for n in qm.current_graph().nodes if n.op == "call_module" and "int8" in n.target)
    assert fills[int8_node] == _INT8_FILL
    assert fills["conv2d"] == _SKIP_FILL  # the excluded functional conv
    assert fills["bn"] not in (_INT8_FILL, _SKIP_FILL)
    rep.save_graph(tmp_path / "g.dot")
    assert "excluded by Int8Config.exclude" in (tmp_path / "g.dot").read_text()


class Untraceable(nn.Module):
    """Data-dependent control flow at the root: fx cannot trace it, its children are traced separately."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())

    def forward(self, x):
        y = self.a(x)
        return self.b(y) if y.sum() > 0 else -self.b(y)


def test_partially_traced_model_reports_opaque_parts_and_draws_each_graph(tmp_path):
    qm = int8fx.convert(Untraceable())
    rep = int8fx.inspect(qm, torch.randn(1, 3, 6, 6))
    assert [o.name for o in rep.opaque] == ["(root)"]
    assert "not rewritable" in str(rep) and "(root) (Untraceable)" in str(rep)
    assert [r.converted for r in rep.layers] == [True, True] and rep.summary["int8_flop_percent"] == 100.0
    rep.save_graph(tmp_path / "p.dot")
    dot = (tmp_path / "p.dot").read_text()
    assert "cluster_part0" in dot and "cluster_part1" in dot


class TinyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.att(x, x, x, need_weights=False)[0]


def test_projections_inside_attention_get_shapes():
    """nn.MultiheadAttention's projections run inside opaque code (routed calls reach the sites past module hooks
    directly, past module hooks) and, in eval mode, would take torch's fused path: both are handled."""
    qm = int8fx.convert(TinyAttention()).eval()
    rows = {r.name: r for r in int8fx.inspect(qm, torch.randn(2, 5, 16)).layers}
    assert rows["att.in_proj"].converted and rows["att.in_proj"].weight_shape == (48, 16)
    assert rows["att.in_proj"].macs == 2 * 5 * 48 * 16
    assert rows["att.out_proj"].macs == 2 * 5 * 16 * 16


def test_transposed_convs_are_listed_with_their_shapes():
    """A decoder's ConvTranspose2d, module or F.conv_transpose2d call, is an INT8 site with its shapes and
    MACs (before, it was in no report, and a UNet-like model looked fully converted while it ran in FP32)."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Conv2d(4, 2, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing stays in FP32
        qm = int8fx.convert(m)
    x = torch.randn(2, 3, 8, 8)
    rep = int8fx.inspect(qm, x)
    assert [(r.name, r.op, r.converted) for r in rep.layers] == [
        ("0", "conv2d", True), ("1", "conv_transpose2d", True), ("2", "conv2d", True)]
    row = rep.layers[1]
    assert row.weight_shape == (8, 4, 2, 2) and row.output_shape == (2, 4, 16, 16)
    assert row.backend == rep.layers[0].backend  # the backend's GEMM computes its products, as the convs' (CPU)
    assert row.macs == 2 * 8 * 8 * 8 * (4 * 2 * 2)  # every input element meets C_out x k x k weights

    class Decoder(nn.Module):  # the same call in a module's own code
        def __init__(self):
            super().__init__()
            self.conv, self.up = nn.Conv2d(3, 4, 1), nn.Parameter(torch.randn(4, 2, 2, 2))

        def forward(self, x):
            return F.conv_transpose2d(self.conv(x), self.up, stride=2)

    qd = int8fx.convert(Decoder())
    rows = int8fx.inspect(qd, x).layers
    assert [(r.name, r.op, r.converted, r.source) for r in rows] == [  # (owners first, as for every site)
        ("conv_transpose2d", "conv_transpose2d", True, "function"), ("conv", "conv2d", True, "module")]
    assert rows[0].output_shape == (2, 2, 16, 16) and rows[0].macs == 2 * 4 * 8 * 8 * (2 * 2 * 2)


class _UnbatchedCall(nn.Module):
    """A conv called on one image without its batch dim (`nn.Conv2d` takes it; int8fx runs it as a batch of
    one, a call of the site inside the call)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x[0]).mean()


def test_an_unbatched_call_is_counted_once():
    """The inner batch-of-one call and the unbatched call around it were both observed: inspect showed twice
    the MACs (7.78k for 3.89k) and calibration two calls for one."""
    from int8fx.onnx.calibrate import calibrate

    qm = int8fx.convert(_UnbatchedCall())
    x = torch.randn(2, 3, 8, 8)
    qm(x).backward()
    (row,) = int8fx.inspect(qm, x).layers
    assert row.macs == 4 * 6 * 6 * 3 * 3 * 3  # (3,888: one call)
    assert calibrate(qm.eval(), [(x,)])["conv"].calls == 1
