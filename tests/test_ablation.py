"""`int8fx train --ablation`: the papers' ablation grid. The command runs end to end on a tiny setting,
its table is computed from the per-run JSON files, it resumes (a finished run is never trained again,
a changed recipe is refused), and the presets, the first/last-layer options and the statistics are
what the README and the docstrings say.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch

import int8fx
from int8fx import train as T
from int8fx.train.ends import end_layers, remove_end_batchnorm
from int8fx.train.runner import order_specs
from int8fx.train.stats import diff_of_means, mean_std, paired_diff
from int8fx.train.summary import reference_of
from int8fx.zoo import build_model

from fashion_data import needs_data

# what these tests check (the grid, the tables, resuming) does not depend on compiled passes: their training
# runs (in this process, `--jobs 1`) take them eagerly; compiling was ~80 s of the end-to-end test
pytestmark = pytest.mark.usefixtures("eager_passes")

README = Path(__file__).resolve().parent.parent / "README.md"

TINY = ["--ablation", "quick", "--seeds", "0,1", "--train-subset", "640", "--epochs", "1", "--batch-size", "64",
        "--width", "4", "--evals", "2", "--test-subset", "500", "--jobs", "1", "--threads", "1", "--progress", "none"]


def _train(out, *extra) -> int:
    from int8fx.cli import main

    return main(["train", *TINY, "--out", str(out), *extra])


def _stored(out) -> dict[tuple[str, int], dict]:
    recs = [json.loads(p.read_text())["run"] for p in sorted((out / "runs").glob("*.json"))]
    return {(r["label"], r["seed"]): r for r in recs}


def _summary_rows(table: str) -> dict[str, list[str]]:
    """The mean-over-seeds table of results.md as {run: cells}."""
    block = table.split("| run | seeds |", 1)[1]
    rows = {}
    for line in block.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


@needs_data
def test_ablation_runs_end_to_end_table_equals_run_files_and_resumes(tmp_path):
    out = tmp_path / "abl"
    assert _train(out, "--runs", "fp32,per-tensor,gvq") == 0
    runs = _stored(out)
    assert sorted(runs) == [(lab, s) for lab in ("fp32", "gvq", "per-tensor") for s in (0, 1)]
    res = json.loads((out / "results.json").read_text())
    assert {(r["label"], r["seed"]): r["top1"] for r in res["runs"]} == {k: r["top1"] for k, r in runs.items()}
    for r in runs.values():  # 10 steps of 64 images, final top-1 on all 500 test images
        assert r["steps"] == 10 and r["evals"]["n_test"][-1] == 500 and 10.0 < r["top1"] < 100.0
    assert runs[("gvq", 0)]["rounding"] == "stochastic" and runs[("fp32", 0)]["rounding"] is None

    # every number of the summary table, recomputed from the per-run files
    rows = _summary_rows((out / "results.md").read_text())
    acc = {lab: [runs[(lab, s)]["top1"] for s in (0, 1)] for lab in ("fp32", "per-tensor", "gvq")}
    for lab, cells in rows.items():
        m, sd = mean_std(acc[lab])
        assert cells[1] == "2" and cells[2] == f"{m:.2f} ± {sd:.2f}"
        assert cells[3] == f"{min(acc[lab]):.2f}..{max(acc[lab]):.2f}"
        if lab != "fp32":
            d, se = diff_of_means(acc[lab], acc["fp32"])
            assert cells[4] == f"{d:+.2f} ± {se:.2f}"
    d, se = diff_of_means(acc["gvq"], acc["per-tensor"])
    assert rows["gvq"][5] == f"{d:+.2f} ± {se:.2f} vs per-tensor" and rows["per-tensor"][5] == ""
    summary = {s["label"]: s for s in res["summary"]}
    assert summary["gvq"]["delta_vs_reference"] == pytest.approx(d, abs=1e-12)
    for name in ("accuracy.png", "loss.png", "curves.png"):
        assert (out / name).stat().st_size > 5_000

    # the same command again trains nothing; one more run trains only that run
    before = {k: r["finished"] for k, r in runs.items()}
    assert _train(out, "--runs", "fp32,per-tensor,gvq") == 0
    assert {k: r["finished"] for k, r in _stored(out).items()} == before
    assert _train(out, "--runs", "fp32,per-tensor,gvq,gvq:nearest") == 0
    sessions = json.loads((out / "sessions.json").read_text())
    assert [s["trained"] for s in sessions] == [6, 0, 2]
    res = json.loads((out / "results.json").read_text())
    assert len(res["reused"]) == 6 and res["wall_s_total"] == pytest.approx(sum(s["wall_s"] for s in sessions))
    assert _stored(out)[("gvq:nearest", 1)]["rounding"] == "nearest"
    assert "gvq:nearest" in _summary_rows((out / "results.md").read_text())

    # a changed recipe is refused, naming what changed, and nothing is written
    assert _train(out, "--runs", "fp32", "--lr", "0.05") == 2
    assert len(json.loads((out / "sessions.json").read_text())) == 3


def _args(*argv):
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    return p.parse_args(list(argv))


def test_ablation_grid_seeds_and_folder():
    recipe, runs, seeds, jobs = T.recipe_from_args(_args("--ablation", "resnet20"))
    assert recipe == T.PRESETS["resnet20"]["recipe"] and seeds == (0, 1, 2) and jobs == 2
    names = set(int8fx.quant.grad_quantizer_names())
    expected = ["fp32"] + [p for p in ("per-tensor", "gvq", "mcs", "gvq-mcs", "gvq-mcs-search", "dsgc") if p in names]
    assert list(runs[:len(expected)]) == expected
    assert "dsgc+dclrs" in runs and "dsgc+dclrs:nearest" in runs and "gvq-mcs-search:nearest" not in runs
    assert T.ablation_folder("resnet20", recipe) == Path("runs/ablation-resnet20")
    changed = T.recipe_from_args(_args("--ablation", "resnet20", "--lr", "0.4", "--fp32-ends", "--no-end-bn"))[0]
    assert (changed.lr, changed.fp32_ends, changed.end_bn) == (0.4, True, False)
    assert T.ablation_folder("resnet20", changed) == Path("runs/ablation-resnet20-lr0.4-fp32-ends-no-end-bn")
    with pytest.raises(ValueError, match="--runs"):
        T.recipe_from_args(_args("--ablation", "resnet20", "--rounding", "nearest"))


def test_order_specs_completes_the_recipe_rounding_first():
    kinds = T.parse_runs("fp32,gvq,gvq:nearest")
    order = [(s.label, s.seed) for s in order_specs(kinds, (0, 1))]
    assert order == [("fp32", 0), ("gvq", 0), ("fp32", 1), ("gvq", 1), ("gvq:nearest", 0), ("gvq:nearest", 1)]


def test_architecture_presets_are_the_readme_recipes():
    """The README's recipe table lists each preset's recipe; every listed field equals the code's."""
    text = README.read_text()
    table = text.split("<!-- ablation-recipes -->", 2)[1]
    lines = [ln for ln in table.splitlines() if ln.startswith("| `")]
    assert len(lines) == 2
    fields = ["model", "width", "epochs", "train_subset", "batch_size", "lr", "weight_decay", "augment"]
    for line in lines:
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        recipe = T.PRESETS[cells[0]]["recipe"]
        for name, cell in zip(fields, cells[1:]):
            value = getattr(recipe, name)
            want = "all 60,000" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:g}" \
                if isinstance(value, float) else str(value)
            assert cell == want, (cells[0], name, cell, want)
    # and the models are the papers' networks: ResNet-20 (0.27 M parameters), MobileNetV2 with depthwise convs
    r20 = build_model(T.PRESETS["resnet20"]["recipe"].model, width=T.PRESETS["resnet20"]["recipe"].width).module
    assert sum(p.numel() for p in r20.parameters()) == 272_186
    mb = build_model(T.PRESETS["mobilenetv2"]["recipe"].model, width=T.PRESETS["mobilenetv2"]["recipe"].width).module
    assert sum(isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1 for m in mb.modules()) == 8


def test_mobilenetv2_s2_runs_its_blocks_at_14_pixels():
    m = build_model("mobilenetv2-s2", width=1.0).module
    seen = {}
    m.features[3].register_forward_pre_hook(lambda mod, a: seen.update(block=a[0].shape[-1]))
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10) and seen["block"] == 14
    assert build_model("mobilenetv2", width=1.0).module.features[0].stride == (1, 1)  # the original is unchanged


@pytest.mark.parametrize("name,first,last,bn", [("resnet20", "conv1", "fc", "bn1"),
                                                ("mobilenetv2-s2", "features.0", "classifier.1", "features.1"),
                                                ("smallcnn", "features.0", "classifier.4", "features.1")])
def test_end_layers_in_execution_order_and_their_batchnorm(name, first, last, bn):
    m = build_model(name, width=4 if name != "mobilenetv2-s2" else 0.5).module
    x = torch.zeros(2, 1, 28, 28)
    assert end_layers(m, x) == (first, last)
    assert remove_end_batchnorm(m, x) == [bn]
    assert isinstance(m.get_submodule(bn), torch.nn.Identity) and m(x).shape == (2, 10)


def test_fp32_ends_keep_first_and_last_layer_in_fp32():
    recipe = T.Recipe(model="resnet20", width=4, fp32_ends=True, end_bn=False)
    q, _ = T.build_models(T.RunSpec("gvq", seed=0, rounding="nearest"), recipe)
    int8 = {n for n, m in q.named_modules() if isinstance(m, int8fx.nn.Int8Layer)}
    sites = {n for n, m in q.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert sites - int8 == {"conv1", "fc"} and len(int8) == len(sites) - 2
    assert all(q.get_submodule(n).config.rounding == "nearest" for n in int8)
    assert isinstance(q.bn1, torch.nn.Identity)
    fp, _ = T.build_models(T.RunSpec(None, seed=0), recipe)  # same start: FP32 has the same layers
    kept = int8fx.float_state_dict(q)
    assert all(torch.equal(v, kept[k]) for k, v in fp.state_dict().items())


def test_statistics():
    m, sd = mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3) and sd == pytest.approx(math.sqrt(7 / 3))  # squares 16/9 + 1/9 + 25/9, over n-1
    d, se = diff_of_means([90.0, 91.0, 92.0], [89.0, 89.0, 89.0])
    assert d == pytest.approx(2.0) and se == pytest.approx(math.sqrt(1.0 / 3))
    assert diff_of_means([90.0], [89.0, 89.5]) == (pytest.approx(0.75), None)
    pd, pse, n = paired_diff({0: 90.0, 1: 91.0, 2: 95.0}, {0: 89.0, 1: 89.5, 5: 0.0})
    assert (pd, n) == (pytest.approx(1.25), 2) and pse == pytest.approx(0.25)


def test_reference_runs_are_the_papers_comparisons():
    assert reference_of("fp32") is None and reference_of("per-tensor") is None
    assert reference_of("gvq") == "per-tensor" and reference_of("gvq-mcs:nearest") == "per-tensor:nearest"
    assert reference_of("dsgc+dclrs") == "dsgc" and reference_of("dsgc+dclrs:nearest") == "dsgc:nearest"


def test_store_refuses_another_recipe_and_names_files_safely(tmp_path):
    store = T.RunStore(tmp_path, T.Recipe().to_dict())
    spec = T.RunSpec("gvq-mcs", 2, False, "nearest")
    rec = {"label": spec.label, "seed": 2, "top1": 50.0}
    path = store.save(spec, rec)
    assert path.name == "gvq-mcs_nearest_s2.json" and re.fullmatch(r"[\w.+-]+", path.name)
    assert store.load(spec) == rec and store.load(T.RunSpec("gvq-mcs", 3, False, "nearest")) is None
    other = T.RunStore(tmp_path, T.Recipe(lr=0.2).to_dict())
    with pytest.raises(T.StoreMismatch, match="lr"):
        other.load(spec)
    # a run stored before a Recipe field existed matches a recipe that has the field's default
    stored = json.loads(path.read_text())
    del stored["recipe"]["end_bn"]
    path.write_text(json.dumps(stored))
    assert store.load(spec) == rec
    with pytest.raises(T.StoreMismatch, match="end_bn"):
        T.RunStore(tmp_path, T.Recipe(end_bn=False).to_dict()).load(spec)


@needs_data
def test_a_failing_run_leaves_the_others_stored_and_is_retried(tmp_path, monkeypatch):
    from int8fx.train import runner

    recipe = T.Recipe(width=4, train_subset=256, batch_size=64, epochs=1, test_subset=200, evals=1)
    store = T.RunStore(tmp_path, recipe.to_dict())
    real = runner.train_run

    def flaky(spec, *a, **k):
        if spec.policy == "gvq":
            raise RuntimeError("out of memory")
        return real(spec, *a, **k)

    monkeypatch.setattr(runner, "train_run", flaky)
    with pytest.raises(T.RunsFailed, match="1 of 3 runs failed.*gvq seed 0"):
        T.run_experiment(recipe, ("fp32", "gvq", "per-tensor"), (0,), threads=1, store=store)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["fp32_s0.json", "per-tensor_s0.json"]
    monkeypatch.setattr(runner, "train_run", real)
    res = T.run_experiment(recipe, ("fp32", "gvq", "per-tensor"), (0,), threads=1, store=store)
    assert res["reused"] == ["fp32 s0", "per-tensor s0"]
    assert [r["label"] for r in res["runs"]] == ["fp32", "gvq", "per-tensor"]
    assert [(s["trained"], s["failed"]) for s in store.sessions()] == [(2, 1), (1, 0)]  # both sessions count
