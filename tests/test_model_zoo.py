"""torchvision's classification and video models convert with every conv/linear site in INT8 and train a
step on CPU with finite gradients. CI runs a representative subset; `-m slow` runs them all (the same
check as benchmarks/model_zoo.py, whose full output is recorded in benchmarks/RESULTS.md)."""
import pathlib
import sys

import pytest

pytest.importorskip("torchvision")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import model_zoo  # noqa: E402

SUBSET = ["inception_v3", "mobilenet_v2", "densenet121", "efficientnet_b0", "shufflenet_v2_x1_0", "regnet_y_400mf",
          "convnext_tiny", "r3d_18", "resnet18", "mnasnet0_5", "squeezenet1_1", "mobilenet_v3_small"]


def _check(name):
    row = model_zoo.check(name)
    assert row["sites"] > 0
    assert row["converted"] == row["sites"], row["skipped"]
    assert row["finite"], name
    assert not row["no_grad"], row["no_grad"][:5]


@pytest.mark.parametrize("name", SUBSET)
def test_model_converts_fully_and_trains_a_step(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in model_zoo.model_names() if n not in SUBSET])
def test_every_other_model(name):
    _check(name)
