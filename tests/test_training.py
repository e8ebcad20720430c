"""`int8fx train` and the model zoo: the command trains on real Fashion-MNIST and writes its files; the
pieces it relies on (same start for FP32 and INT8, fixed subsets, augmentation, schedule) behave.

Kept under a minute on a 2-core CPU: the smoke run caps steps, scores on 1,000 test images and uses one
thread (two OpenMP threads on an oversubscribed CI machine spin and ran 4x slower in our measurements).
"""
from __future__ import annotations

import json

import pytest
import torch

import int8fx
from int8fx import train as T
from int8fx.zoo import build_model

from fashion_data import needs_data

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@needs_data
def test_quick_preset_trains_and_writes_files(tmp_path):
    """The README command, capped at 20 steps of a narrower net: FP32 and INT8 (the default policy)
    both learn on real data (mean loss of steps 11-20 well below that of steps 1-10; test accuracy far
    above the 10% of chance), and the table, JSON and three PNGs appear and agree with each other."""
    from int8fx.cli import main

    policy = int8fx.Int8Config().grad_quant
    out = tmp_path / "run"
    rc = main(["train", "--quick", "--runs", f"fp32,{policy}", "--max-steps", "20", "--evals", "2",
               "--width", "8", "--batch-size", "64", "--test-subset", "1000", "--threads", "1", "--out", str(out), "--progress", "none"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in res["runs"]] == ["fp32", policy]
    table = (out / "results.md").read_text()
    for r in res["runs"]:
        losses = r["history"]["train_loss"]
        assert r["steps"] == 20 and r["history"]["step"] == [10, 20]
        assert losses[-1] < 0.8 * losses[0], (r["label"], losses)
        assert r["top1"] > 40.0, (r["label"], r["top1"])
        assert r["evals"]["n_test"] == [1000, 1000]
        assert r["steps_per_s"] > 0 and r["train_s"] > 0
        assert f"| {r['label']} | 0 | {r['top1']:.2f} |" in table
    assert res["runs"][0]["int8"] is False and res["runs"][1]["int8"] is True
    for name in ("accuracy.png", "loss.png", "curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, name


def test_same_seed_same_start_different_seed_different_start():
    """FP32 and INT8 runs of one seed start from identical weights (the comparison is then about the
    arithmetic only); another seed draws other weights."""
    recipe = T.Recipe()
    fp, _ = T.build_models(T.RunSpec(None, seed=3), recipe)
    q, _ = T.build_models(T.RunSpec("per-tensor", seed=3), recipe)
    other, _ = T.build_models(T.RunSpec(None, seed=4), recipe)
    a, b = fp.state_dict(), int8fx.float_state_dict(q)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["features.0.weight"], other.state_dict()["features.0.weight"])


def test_rounding_option_reaches_every_int8_layer():
    """`--rounding nearest` reproduces the nearest-rounding comparison of RESULTS.md; the default is the
    library's (stochastic)."""
    import argparse

    p = argparse.ArgumentParser()
    T.add_arguments(p)
    assert T.recipe_from_args(p.parse_args(["--full"]))[0].rounding == int8fx.Int8Config().rounding == "stochastic"
    recipe = T.recipe_from_args(p.parse_args(["--full", "--rounding", "nearest"]))[0]
    q, _ = T.build_models(T.RunSpec("dsgc", seed=1), recipe)
    layers = [m for m in q.modules() if isinstance(m, int8fx.nn.Int8Layer)]
    assert len(layers) == 5 and all(m.config.rounding == "nearest" and m.config.seed == 1 for m in layers)


_TRAIN_BAD_INPUTS = {
    "unknown model": (["--model", "resnet5"], "unknown model 'resnet5'"),
    "batch size 0": (["--batch-size", "0"], "--batch-size 0: takes a whole number >= 1"),
    "negative epochs": (["--epochs", "-1"], "--epochs -1.0: takes a number > 0"),
    "negative learning rate": (["--lr", "-0.1"], "--lr -0.1: takes a number >= 0"),
    "NaN learning rate": (["--lr", "nan"], "--lr nan: takes a number >= 0"),
    "no evaluation": (["--evals", "0"], "--evals 0: takes a whole number >= 1"),
    "more images than the split": (["--train-subset", "70000"], "--train-subset 70000: takes 1 to 60000 images"),
    "seeds that are not numbers": (["--seeds", "a,b"], "--seeds 'a,b': expected comma-separated whole numbers"),
    "no jobs": (["--jobs", "0"], "argument --jobs: '0': must be >= 1"),
    "output folder is a file": (["--out", "{tmp}/a_file"], "it is not a folder"),
    "output folder under a file": (["--out", "{tmp}/a_file/run"], "a_file is a file"),
    "a data folder without the data": (["--data", "{tmp}/empty"], "Fashion-MNIST not found in"),
}


@pytest.mark.parametrize("case", list(_TRAIN_BAD_INPUTS))
def test_train_refuses_a_bad_input_before_any_run(case, tmp_path, capsys):
    """Found before the first run and said as `int8fx train: ...`, exit 2, nothing written: not a traceback
    from inside every run, nor a run that trains nothing (or on other data than the folder named) and
    reports it."""
    from int8fx.cli import main

    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    argv, message = _TRAIN_BAD_INPUTS[case]
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    before = sorted(tmp_path.rglob("*"))
    try:
        rc = main(["train", "--runs", "fp32", "--max-steps", "1", "--evals", "1", "--test-subset", "10", "--width", "4",
                   "--threads", "1", "--progress", "none", *argv])
    except SystemExit as e:  # argparse's own errors (a count below one)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(("int8fx train: ", "usage: int8fx train")) and "int8fx train: " in err and message in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_parse_runs_validates_names():
    names = int8fx.quant.grad_quantizer_names()
    assert T.parse_runs("fp32, per-tensor,fp32") == [(None, False, None), ("per-tensor", False, None)]
    assert T.parse_runs("gvq:nearest,gvq") == [("gvq", False, "nearest"), ("gvq", False, None)]
    with pytest.raises(ValueError, match="nearest, stochastic"):
        T.parse_runs("gvq:round-up")
    with pytest.raises(ValueError, match="FP32 has none"):
        T.parse_runs("fp32:nearest")
    with pytest.raises(ValueError, match="per-tensor"):  # the message lists what is registered
        T.parse_runs("fp32,no-such-policy")
    with pytest.raises(ValueError, match="fp32"):
        T.parse_runs("fp32+dclrs")
    if T.dclrs_available():
        assert T.parse_runs(["per-tensor"], dclrs=True) == [("per-tensor", True, None)]
        assert T.RunSpec("per-tensor", 0, True).label == "per-tensor+dclrs"
        assert T.parse_runs("dsgc+dclrs:nearest") == [("dsgc", True, "nearest")]
        assert T.RunSpec("dsgc", 0, True, "nearest").label == "dsgc+dclrs:nearest"
    assert set(T.preset_runs("full")) <= set(names) | {"fp32"}


def test_balanced_subset_is_fixed_and_balanced():
    labels = torch.arange(10).repeat_interleave(50)[torch.randperm(500)]
    a, b = T.balanced_subset(labels, 103), T.balanced_subset(labels, 103)
    assert torch.equal(a, b) and len(a) == 103 and len(a.unique()) == 103
    counts = torch.bincount(labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(T.balanced_subset(labels, None), torch.arange(500))


def test_augment_flips_and_shifts_reproducibly():
    x = torch.randn(64, 1, 28, 28)
    y = T.augment(x, "flip", torch.Generator().manual_seed(0))
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < 64
    c1 = T.augment(x, "flip+crop", torch.Generator().manual_seed(1))
    c2 = T.augment(x, "flip+crop", torch.Generator().manual_seed(1))
    assert torch.equal(c1, c2) and c1.shape == x.shape
    # each crop is the (maybe mirrored) image shifted by at most 2 pixels: its interior is found there
    for i in range(8):
        found = False
        for src in (x[i, 0], x[i, 0].flip(-1)):
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    shifted = torch.roll(src, (-dy, -dx), (0, 1))
                    if torch.equal(c1[i, 0, 2:-2, 2:-2], shifted[2:-2, 2:-2]):
                        found = True
        assert found, i


def test_lr_schedule_warms_up_then_decays_to_zero():
    r = T.Recipe(lr=0.2, warmup=0.1)
    lrs = [T.lr_at(s, 100, r) for s in range(100)]
    assert lrs[0] == pytest.approx(0.02) and max(lrs) == pytest.approx(0.2) and lrs.index(max(lrs)) == 9
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-3


def test_summary_gives_mean_spread_and_gap_to_fp32():
    recs = [dict(label=lab, seed=s, top1=acc, final_train_loss=0.3, test_loss=0.3, train_s=1.0, steps_per_s=2.0,
                 diverged_at=None)
            for lab, s, acc in (("fp32", 0, 91.0), ("fp32", 1, 92.0), ("gvq-mcs", 0, 90.0), ("gvq-mcs", 1, 90.5))]
    rows = {r["label"]: r for r in T.summarize(recs)}
    assert rows["fp32"]["top1_mean"] == pytest.approx(91.5)
    assert rows["fp32"]["top1_std"] == pytest.approx(0.5 ** 0.5)
    assert rows["gvq-mcs"]["delta_vs_fp32"] == pytest.approx(-1.25)


@pytest.mark.parametrize("name,width,params", [("resnet20", 16, 272_186), ("mobilenetv2", 0.5, None),
                                               ("smallcnn", 16, None)])
def test_zoo_models_take_fashion_mnist_and_convert_fully(name, width, params):
    """Own models run on [N, 1, 28, 28] -> [N, 10]; every conv/linear site converts to INT8.
    ResNet-20 at width 16 has the paper's 0.27 M parameters: 269,722 with option-A shortcuts and an RGB
    stem; here +2,752 for the option-B 1x1 shortcuts and -288 for the 1-channel stem."""
    zm = build_model(name, width=width)
    m = zm.module
    assert (zm.size, zm.channels) == (28, 1)
    if params is not None:
        assert sum(p.numel() for p in m.parameters()) == params
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    qm = int8fx.convert(m, int8fx.Int8Config(grad_quant="per-tensor"))
    rep = int8fx.inspect(qm)
    n_sites = sum(isinstance(x, (torch.nn.Conv2d, torch.nn.Linear)) for x in m.modules())
    assert len(rep.converted) == n_sites and n_sites > 0
    assert qm(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_torchvision_models_are_adapted_to_grayscale_and_small_inputs():
    pytest.importorskip("torchvision")
    zm = build_model("tv:resnet18")
    first = zm.module.conv1
    assert first.in_channels == 1 and (zm.size, zm.channels) == (28, 1)
    assert zm.module(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="resnet20"):
        build_model("no_such_net")


def test_smallest_input_finds_the_size_a_model_needs():
    """Models whose stem and pools shrink 28x28 to nothing (AlexNet, Inception) get resized inputs:
    a stride-8 conv followed by a 5x5 conv needs 5*8 = 40 px, so 64 is the first candidate that runs."""
    from int8fx.zoo import _smallest_input

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 8, stride=8), torch.nn.Conv2d(4, 4, 5), torch.nn.Flatten())
    assert _smallest_input(net, 1) == 64
    assert _smallest_input(torch.nn.Conv2d(1, 4, 3), 1) == 28


@needs_data
@pytest.mark.slow
def test_parallel_jobs_reproduce_sequential_runs(tmp_path):
    """`--jobs 2` trains in worker processes; with one thread each, every run's loss curve and
    accuracy equal those of the same run trained in this process (same seed -> same batches)."""
    recipe = T.Recipe(width=8, batch_size=64, max_steps=10, evals=1, test_subset=500, train_subset=2000)
    par = T.run_experiment(recipe, ("fp32", "per-tensor"), (0, 1), jobs=2, threads=1)
    seq = T.run_experiment(recipe, ("fp32", "per-tensor"), (0, 1), jobs=1, threads=1)
    assert [(r["label"], r["seed"]) for r in par["runs"]] == [(r["label"], r["seed"]) for r in seq["runs"]]
    for a, b in zip(par["runs"], seq["runs"]):
        assert a["history"]["train_loss"] == b["history"]["train_loss"]
        assert a["top1"] == b["top1"]
