"""`int8fx convert` round-trips through a checkpoint; `int8fx bench` prints one row per variant."""
import pytest
import torch

from int8fx.cli import main


def test_convert_checkpoint_round_trip(tmp_path, capsys):
    out = tmp_path / "r18.pt"
    assert main(["convert", "torchvision:resnet18", "-o", str(out), "--exclude", "fc", "--grad-quant", "dsgc",
                 "--input-shape", "none"]) == 0
    assert "20/21 conv/linear sites in INT8" in capsys.readouterr().out
    saved = torch.load(out, weights_only=False)
    assert saved["arch"] == "torchvision:resnet18" and saved["int8fx_config"]["grad_quant"] == "dsgc"
    assert "layer1.0.conv1.weight" in saved["state_dict"] and "layer1.0.conv1.step" in saved["state_dict"]
    # the checkpoint converts again with the same config, and its weights load back exactly
    assert main(["inspect", str(out), "--input-shape", "none"]) == 0
    text = capsys.readouterr().out
    assert "excluded by Int8Config.exclude" in text and "dsgc" in text


def test_bench_prints_a_row_per_variant(capsys):
    assert main(["bench", "squeezenet1_1", "--batch", "2", "--size", "32", "--reps", "1", "--no-fx-qat",
                 "--policy", "per-tensor", "gvq-mcs", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| squeezenet1_1")]
    assert [r.split("|")[2].strip() for r in rows] == ["fp32", "int8fx per-tensor", "int8fx gvq-mcs"]
    assert rows[0].split("|")[5].strip() == "1.00x"


def test_bench_header_names_the_cpu_and_smallcnn_runs_at_its_own_batch(capsys):
    from int8fx.kernels.probe import cpu_choice

    assert main(["bench", "smallcnn", "--zoo-batch", "4", "--reps", "1", "--no-fx-qat", "--policy", "per-tensor",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"# CPU {cpu_choice().cpu}" in out and cpu_choice().reason in out
    rows = [line for line in out.splitlines() if line.startswith("| smallcnn")]
    assert [r.split("|")[2].strip() for r in rows] == ["fp32", "int8fx per-tensor"]


def test_bench_unknown_model_is_one_line_and_exit_2(capsys):
    assert main(["bench", "resnet_nonexistent", "--reps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resnet_nonexistent" in err[0] and "smallcnn" in err[0]


@pytest.mark.parametrize("argv,message", [
    (["--reps", "0"], "argument --reps: '0': must be >= 1"),
    (["--zoo-batch", "0"], "argument --zoo-batch: '0': must be >= 1"),
    (["--threads", "-2"], "argument --threads: '-2': must be >= 1"),
    (["--size", "two"], "argument --size: 'two' is not a whole number"),
])
def test_bench_refuses_counts_below_one(argv, message, capsys):
    """Not a traceback after the FP32 row (`--reps 0`: no median), nor a timed empty batch (`--zoo-batch 0`)."""
    with pytest.raises(SystemExit) as info:
        main(["bench", "smallcnn", "--no-fx-qat", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_bench_an_input_the_model_cannot_take_is_one_line_before_any_timing(capsys):
    assert main(["bench", "smallcnn", "inception_v3", "--size", "8", "--reps", "1", "--no-fx-qat"]) == 2
    captured = capsys.readouterr()
    assert "| smallcnn" not in captured.out
    assert captured.err.strip().splitlines()[-1].startswith(
        "int8fx bench: inception_v3 cannot run on an input of shape (16, 3, 8, 8)")
