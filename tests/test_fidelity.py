"""Gradient fidelity on real data: every conv/linear weight gradient of a converted resnet18 against the
FP32 model's (same weights, same real Fashion-MNIST batch).

BatchNorm runs with its running statistics (eval mode). With batch statistics, the gradient of a
randomly initialised ResNet is too ill-conditioned for a per-layer cosine to measure the INT8 GEMMs:
perturbing the FP32 weights by half an INT8 step alone already drops the worst layer to 0.86 (measured),
so a train-mode threshold would test BatchNorm's conditioning, not int8fx."""
import pytest
import torch
import torch.nn.functional as F

import int8fx
from int8fx import fusing
from int8fx.data import real_batch


@pytest.mark.parametrize("policy", ["per-tensor", "gvq-mcs"])
def test_resnet18_weight_gradients_close_to_fp32(policy, capsys):
    torchvision = pytest.importorskip("torchvision")
    x, y, source = real_batch(64, 32, 3, seed=0)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    qm = int8fx.convert(model, int8fx.Int8Config(grad_quant=policy)).eval()
    F.cross_entropy(model(x), y).backward()
    with fusing.eager_passes():  # compiling its passes was ~30 s; they give the same bits (tests/test_fused.py)
        F.cross_entropy(qm(x), y).backward()
    q_params = dict(qm.named_parameters())
    cos = {n: F.cosine_similarity(p.grad.flatten(), q_params[n].grad.flatten(), 0).item()
           for n, p in model.named_parameters() if p.dim() > 1}
    with capsys.disabled():
        print(f"\nresnet18 {policy} on {source}: weight-gradient cosine vs FP32")
        for n, c in cos.items():
            print(f"  {n:30s} {c:.4f}")
    assert len(cos) == 21
    assert min(cos.values()) >= 0.9, cos
    assert sum(cos.values()) / len(cos) >= 0.95
