"""The `inspect` and `export` subcommands, every MODEL form they accept, and every bad input `export` turns
into one line and exit status 2 (run in-process: importing torch once keeps this file fast)."""
from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from int8fx.cli import main
from int8fx.modelspec import ModelSpecError, load_model, parse_shape
from int8fx.onnx import read_onnx_metadata
from int8fx.quant.core import quantize_per_channel

torchvision = pytest.importorskip("torchvision")


USER_MODULE = textwrap.dedent('''
    import torch, torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    def build():
        torch.manual_seed(0)
        return Tiny(), torch.randn(2, 3, 6, 6)

    def just_model():
        return Tiny()

    not_a_model = 3
''')


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_models.py"
    path.write_text(USER_MODULE)
    return path


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_help_explains_every_option_and_the_model_forms(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for words in ("torchvision:NAME", "module:function", "checkpoint", "--input-shape", "--exclude", "--grad-quant"):
        assert words in out
    if command == "export":
        for words in ("-o OUT.onnx", "--form {faithful,deploy}", "--target {portable,onnxruntime}",
                      "--exporter {auto,dynamo,torchscript}", "--opset",
                      "--calibration {eval,inputs,ema}", "--calibration-data", "--static-batch"):
            assert words in out
    else:
        assert "--json" in out and "--graph" in out


def test_inspect_torchvision_model_writes_json_and_graph(tmp_path, capsys):
    rc = main(["inspect", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--exclude", "fc",
               "--json", str(tmp_path / "r.json"), "--graph", str(tmp_path / "g.dot"), "--width", "120"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "resnet18: 20/21 conv/linear sites in INT8" in out
    assert "  fc (linear, module): excluded by Int8Config.exclude" in out.splitlines()
    assert max(len(line) for line in out.splitlines()) <= 120
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["skipped"] == 1 and report["layers"][0]["input_shape"] == [1, 3, 32, 32]
    assert "Int8Conv2d" in (tmp_path / "g.dot").read_text()


def test_a_timm_model_by_name(tmp_path, capsys):
    pytest.importorskip("timm")
    model, example, shape, _ = load_model("timm:resnet26d")
    assert type(model).__name__ == "ResNet" and example is None and shape == (1, 3, 224, 224)
    rc = main(["inspect", "timm:resnet26d", "--input-shape", "1,3,64,64"])
    assert rc == 0 and "resnet26d: 32/32 conv/linear sites in INT8" in capsys.readouterr().out
    with pytest.raises(ModelSpecError, match="timm has no model 'resnet26dd'; did you mean: .*resnet26d"):
        load_model("timm:resnet26dd")


def test_export_module_function_runs_in_onnxruntime(user_file, tmp_path, capsys):
    out_path = tmp_path / "tiny.onnx"
    rc = main(["export", f"{user_file}:build", "-o", str(out_path), "--grad-quant", "dsgc"])
    assert rc == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "(deploy form, opset 18, IR 8" in out and "2 INT8 sites" in out  # deploy is the command's default
    assert "onnxruntime (CPU) runs 2 of 2 INT8 sites in INT8 kernels" in out
    meta = read_onnx_metadata(out_path)
    assert list(meta["layers"]) == ["conv", "fc"] and meta["config"]["grad_quant"] == "dsgc"
    assert meta["form"] == "deploy"
    onnx.checker.check_model(onnx.load(out_path), full_check=True)
    y = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"]).run(
        None, {"input": np.random.default_rng(0).standard_normal((5, 3, 6, 6), dtype=np.float32)})[0]
    assert y.shape == (5, 2)  # dynamic batch


def test_export_needs_an_example_input(user_file, tmp_path, capsys):
    rc = main(["export", f"{user_file}:just_model", "-o", str(tmp_path / "x.onnx")])
    assert rc == 2 and "--input-shape" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    assert main(["export", f"{user_file}:just_model", "-o", str(tmp_path / "x.onnx"), "--input-shape", "1,3,5,5"]) == 0


def test_state_dict_checkpoint_with_arch_uses_its_weights(tmp_path, capsys):
    torch.manual_seed(3)
    model = torchvision.models.resnet18()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"arch": "torchvision:resnet18", "state_dict": model.state_dict(),
                "int8fx_config": {"grad_quant": "per-tensor"}}, ckpt)
    out_path = tmp_path / "r18.onnx"
    assert main(["export", str(ckpt), "-o", str(out_path), "--input-shape", "1,3,32,32", "--exclude", "fc"]) == 0
    meta = read_onnx_metadata(out_path)
    assert meta["config"]["grad_quant"] == "per-tensor" and meta["config"]["exclude"] == ["fc"]
    init = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(out_path).graph.initializer}
    w_q, _ = quantize_per_channel(model.conv1.weight.detach().reshape(64, -1), 0)
    stored = init[meta["layers"]["conv1"]["onnx"][0]["weight_initializer"]]
    # deploy form: bn1 (default statistics, gamma 1) is folded in, which leaves int8fx's INT8 codes as they are
    assert np.array_equal(stored.reshape(64, -1), w_q.to(torch.int8).numpy())


def test_whole_model_checkpoint_and_bare_state_dict(tmp_path, capsys):
    torch.manual_seed(1)
    model = torchvision.models.mobilenet_v3_small()
    torch.save(model, tmp_path / "whole.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert main(["inspect", str(tmp_path / "whole.pt"), "--input-shape", "none"]) == 0
    assert "whole.pt: 54/54 conv/linear sites in INT8" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "bare.pt")]) == 2
    assert "--arch" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "bare.pt"), "--arch", "torchvision:mobilenet_v3_small",
                 "--input-shape", "none"]) == 0


def test_unresolvable_models_get_helpful_errors(user_file, tmp_path, capsys):
    with pytest.raises(ModelSpecError, match="did you mean: .*resnet50"):
        load_model("torchvision:resnet5")
    with pytest.raises(ModelSpecError, match="no attribute 'nope'"):
        load_model(f"{user_file}:nope")
    with pytest.raises(ModelSpecError, match="gave a int"):
        load_model(f"{user_file}:not_a_model")
    with pytest.raises(ModelSpecError, match="not torchvision:NAME or timm:NAME, not module:function, and no such file"):
        load_model("missing.pt")
    with pytest.raises(ModelSpecError, match="positive integer"):
        parse_shape("1,0,3")
    assert parse_shape("1x3x8x8") == (1, 3, 8, 8) and parse_shape("none") == ()
    assert main(["inspect", "torchvision:resnet5"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_export_failure_exits_1_and_leaves_no_file(tmp_path, capsys):
    path = tmp_path / "bad_models.py"
    path.write_text(textwrap.dedent('''
        import torch, torch.nn as nn
        class Bad(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 3, 1)
            def forward(self, x):
                return torch.cummax(self.conv(x), 1).values
    '''))
    out_path = tmp_path / "bad.onnx"
    rc = main(["export", f"{path}:Bad", "-o", str(out_path), "--input-shape", "1,3,4,4"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "bad_models.py:" in err and "torch.cummax(self.conv(x), 1)" in err and "aten::cummax" in err
    assert sorted(os.listdir(tmp_path)) == ["__pycache__", "bad_models.py"] or sorted(os.listdir(tmp_path)) == [
        "bad_models.py"]


def _bad_inputs(tmp_path, user_file):
    (tmp_path / "a_file.txt").write_text("x")
    torch.save({"not": "batches"}, tmp_path / "dict.pt")
    os.mkfifo(tmp_path / "pipe")
    model = [f"{user_file}:build"]
    return {
        "missing directory": (model + ["-o", str(tmp_path / "nodir" / "x.onnx")], "does not exist"),
        "output is a directory": (model + ["-o", str(tmp_path)], "is a directory"),
        "output is a pipe": (model + ["-o", str(tmp_path / "pipe")], "pipe: it is a pipe, and the file would replace it"),
        "parent is a file": (model + ["-o", str(tmp_path / "a_file.txt" / "x.onnx")], "does not exist"),
        "bad input shape": (model + ["-o", str(tmp_path / "x.onnx"), "--input-shape", "1,three,8"], "comma-separated integers"),
        "wrong channel count": (model + ["-o", str(tmp_path / "x.onnx"), "--input-shape", "1,4,6,6"],
                                "cannot run on an input of shape (1, 4, 6, 6)"),
        "opset 12": (model + ["-o", str(tmp_path / "x.onnx"), "--opset", "12"], "--opset 12: needs >= 13"),
        "opset too new": (model + ["-o", str(tmp_path / "x.onnx"), "--opset", "99"], "opset must be an integer from 13"),
        "dynamo below opset 18": (model + ["-o", str(tmp_path / "x.onnx"), "--opset", "17", "--exporter", "dynamo"],
                                  "needs opset >= 18"),
        "missing calibration file": (model + ["-o", str(tmp_path / "x.onnx"), "--calibration-data",
                                              str(tmp_path / "none.pt")], "none.pt: no such file"),
        "calibration file of the wrong kind": (model + ["-o", str(tmp_path / "x.onnx"), "--calibration-data",
                                                        str(tmp_path / "dict.pt")], "expected a tensor [N, ...]"),
        "calibration file that is not torch": (model + ["-o", str(tmp_path / "x.onnx"), "--calibration-data",
                                                        str(tmp_path / "a_file.txt")], "not a torch.save file"),
        "unknown form": (model + ["-o", str(tmp_path / "x.onnx"), "--form", "fast"], "invalid choice: 'fast'"),
        "unknown target": (model + ["-o", str(tmp_path / "x.onnx"), "--target", "tpu"], "invalid choice: 'tpu'"),
        "target of the faithful form": (model + ["-o", str(tmp_path / "x.onnx"), "--form", "faithful", "--target",
                                                 "onnxruntime"], "--target onnxruntime: tunes the deploy form"),
        "missing -o": (model, "the following arguments are required: -o/--output"),
        "unresolvable model": (["torchvision:resnet5", "-o", str(tmp_path / "x.onnx")], "did you mean"),
    }


@pytest.mark.parametrize("case", [
    "missing directory", "output is a directory", "output is a pipe", "parent is a file", "bad input shape", "wrong channel count",
    "opset 12", "opset too new", "dynamo below opset 18", "missing calibration file",
    "calibration file of the wrong kind", "calibration file that is not torch", "unknown form", "unknown target",
    "target of the faithful form", "missing -o",
    "unresolvable model"])
def test_every_bad_input_is_one_line_exit_2_and_no_file(case, tmp_path, user_file, capsys):
    argv, message = _bad_inputs(tmp_path, user_file)[case]
    before = set(os.listdir(tmp_path))
    try:
        rc = main(["export", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("int8fx export: ") and err.count("\n") == 1 and message in err, err
    assert set(os.listdir(tmp_path)) == before  # nothing written, no temporary file left


_CONVERT_AND_INSPECT_BAD_INPUTS = {
    "convert: output is a directory": (["convert", "{model}", "-o", "{tmp}"], "is a directory"),
    "convert: missing directory": (["convert", "{model}", "-o", "{tmp}/nodir/x.pt"], "does not exist"),
    "convert: unknown model": (["convert", "torchvision:resnet5", "-o", "{tmp}/x.pt"], "did you mean"),
    "convert: not a checkpoint": (["convert", "{tmp}/a_file.txt", "-o", "{tmp}/x.pt"], "not a torch.save checkpoint"),
    "convert: a state_dict without its architecture": (["convert", "{tmp}/state.pt", "-o", "{tmp}/x.pt"],
                                                       "pass --arch"),
    "inspect: json in a missing directory": (["inspect", "{model}", "--json", "{tmp}/nodir/r.json"], "does not exist"),
    "inspect: graph is a directory": (["inspect", "{model}", "--graph", "{tmp}"], "is a directory"),
    "inspect: graph format": (["inspect", "{model}", "--graph", "{tmp}/g.xyz"], "cannot draw the graph as .xyz"),
    "inspect: width": (["inspect", "{model}", "--width", "-5"], "argument --width: '-5': must be >= 1"),
}


@pytest.mark.parametrize("case", list(_CONVERT_AND_INSPECT_BAD_INPUTS))
def test_convert_and_inspect_say_a_bad_input_in_one_line_exit_2_and_write_nothing(case, tmp_path, user_file, capsys):
    """As `int8fx export` does: a bad output path is found before the work, not by a traceback after it."""
    (tmp_path / "a_file.txt").write_text("x")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state.pt")
    argv, message = _CONVERT_AND_INSPECT_BAD_INPUTS[case]
    argv = [a.format(model=f"{user_file}:build", tmp=tmp_path) for a in argv]
    before = set(os.listdir(tmp_path))
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors (a count below one): its usage, then the one line
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    said = err.strip().splitlines()[-1]
    assert said.startswith(f"int8fx {argv[0]}: ") and message in said, err
    assert set(os.listdir(tmp_path)) - {"__pycache__"} == before - {"__pycache__"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_a_bad_input(tmp_path, user_file, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["export", f"{user_file}:build", "-o", str(ro / "x.onnx")]) == 2
        assert "is not writable" in capsys.readouterr().err and os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_detection_models_build_without_downloading(monkeypatch):
    """torchvision's detection builders fetch ImageNet backbone weights unless told weights_backbone=None."""
    import torchvision.models._api as api

    def no_download(*args, **kwargs):
        raise AssertionError("a MODEL spec must never download weights")

    monkeypatch.setattr(api, "load_state_dict_from_url", no_download)
    model, _, shape, _ = load_model("torchvision:fasterrcnn_resnet50_fpn")
    assert type(model).__name__ == "FasterRCNN" and shape is None
