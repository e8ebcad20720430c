"""Whole converted sites run for two steps, shared by the CPU backend tests and the CUDA tests: each kind
of site (strided, grouped, depthwise, dilated, padded, 1d/3d, transposed, linear) and a bit-for-bit
comparison."""
from __future__ import annotations

import torch
import torch.nn as nn

import int8fx

SITES = {
    "conv2d": (lambda: nn.Conv2d(16, 32, 3, padding=1), (4, 16, 12, 12)),
    "conv2d-strided-grouped": (lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4), (4, 16, 13, 12)),
    "conv2d-1x1-no-bias": (lambda: nn.Conv2d(16, 32, 1, bias=False), (4, 16, 8, 8)),
    # a late layer's shape: fewer im2col rows than output channels
    "conv2d-small-map-grouped": (lambda: nn.Conv2d(8, 48, 3, padding=1, groups=2), (2, 8, 3, 3)),
    "conv2d-depthwise": (lambda: nn.Conv2d(8, 8, 3, groups=8, padding=1), (2, 8, 9, 6)),
    "conv2d-depthwise-same-even": (lambda: nn.Conv2d(6, 6, 4, groups=6, padding="same"), (2, 6, 7, 8)),  # pads 1 | 2
    "conv2d-depthwise-strided-wide-pad": (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=2, groups=4), (2, 4, 9, 8)),
    "conv2d-depthwise-strided-mult2": (lambda: nn.Conv2d(8, 16, 5, stride=2, groups=8, padding=2), (2, 8, 11, 10)),
    "conv2d-dilated-asym": (lambda: nn.Conv2d(6, 8, (3, 5), padding=(2, 1), dilation=(2, 1), groups=2), (2, 6, 9, 8)),
    "conv2d-same-even-kernel": (lambda: nn.Conv2d(3, 4, 4, padding="same"), (2, 3, 6, 7)),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 8, 2, padding="same", padding_mode="reflect"), (2, 3, 9, 10)),
    "conv2d-circular": (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), (2, 4, 7, 7)),
    "conv2d-pad-past-input": (lambda: nn.Conv2d(3, 4, 3, padding=3), (2, 3, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(6, 9, 3, stride=2, padding=2, dilation=2, groups=3), (2, 6, 17)),
    "conv1d-1x1-single-channel": (lambda: nn.Conv1d(1, 2, 1, bias=False), (2, 1, 3)),
    "conv3d": (lambda: nn.Conv3d(4, 8, (3, 2, 3), stride=(1, 2, 1), padding=1, groups=2), (2, 4, 5, 6, 7)),
    "conv3d-depthwise": (lambda: nn.Conv3d(4, 4, 3, groups=4, padding=1), (1, 4, 4, 5, 6)),
    "conv-transpose2d-strided-grouped": (lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1,
                                                                    groups=2), (2, 8, 5, 6)),
    "conv-transpose2d-depthwise-dilated": (lambda: nn.ConvTranspose2d(4, 4, 3, padding=2, dilation=2, groups=4),
                                           (2, 4, 6, 5)),
    "conv-transpose1d": (lambda: nn.ConvTranspose1d(6, 3, 4, stride=2, padding=1, bias=False), (2, 6, 9)),
    "conv-transpose3d": (lambda: nn.ConvTranspose3d(4, 2, (2, 3, 2), stride=(2, 1, 2)), (1, 4, 3, 4, 3)),
    "linear-3d-input": (lambda: nn.Linear(20, 7), (3, 5, 20)),
    "linear-single-row": (lambda: nn.Linear(5, 1), (1, 5)),
}


def run_site(make, shape, backend, grad_quant, rounding, channels_last=False, dtype=torch.float32, device="cpu"):
    """Two steps of one converted site (tests/test_kernels_cuda.py runs it on CUDA)."""
    torch.manual_seed(0)
    model = make().to(dtype)
    qm = int8fx.convert(model, int8fx.Int8Config(backend=backend, grad_quant=grad_quant, rounding=rounding)).to(device)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    out = []
    for step in range(2):  # the second step runs on state (clips, periods) the first one committed
        y = qm(x)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2 + step), dtype=dtype).to(device)
        x.grad = None
        qm.zero_grad()
        y.backward(dy)
        int8fx.commit(qm)
        out.append((y.detach(), x.grad.clone(), qm.weight.grad.clone(),
                    None if qm.bias is None else qm.bias.grad.clone()))
    return out


def assert_same(a, b, close=(), sums=()):
    """Two `run_site`s equal bit for bit, except the named quantities: `close` within 16 fp32 ulps of each
    element, `sums` (float sums in another order) within 1e-5 of the largest element."""
    for step_a, step_b in zip(a, b):
        for name, u, v in zip(("y", "dX", "dW", "db"), step_a, step_b):
            if u is None or v is None:
                assert u is None and v is None, name
            elif name in close:
                torch.testing.assert_close(u, v.to(u.device), rtol=2**-19, atol=0, msg=name)
            elif name in sums:
                torch.testing.assert_close(u, v.to(u.device), rtol=0, atol=1e-5 * float(v.abs().max()), msg=name)
            else:
                assert torch.equal(u, v.to(u.device)), f"{name} differs: max |diff| {(u - v.to(u.device)).abs().max().item()}"


# the sites oneDNN's direct paths take (int8fx.kernels.direct): plain convs only; never grouped, dilated,
# depthwise, or padded beyond "same" (conv3d's k=2 dim has padding 1); the forward not on 1x1 convs, whose
# GEMM needs no im2col, dW on those too. A transposed site's products are its conv's (int8fx.nn.transposed):
# its dX is that conv's forward and its dW that conv's dW, so ungrouped ones take both
TAKES_DIRECT_CONV = {"conv2d", "conv2d-circular", "conv2d-reflect", "conv-transpose1d", "conv-transpose3d"}
TAKES_DIRECT_DW = TAKES_DIRECT_CONV | {"conv2d-1x1-no-bias", "conv1d-1x1-single-channel"}


def direct_kinds(site: str) -> set:
    """{"conv", "dW"}: the direct paths a site takes where they are forced on."""
    return ({"conv"} if site in TAKES_DIRECT_CONV else set()) | ({"dW"} if site in TAKES_DIRECT_DW else set())


def count_direct_calls(monkeypatch) -> list:
    """Calls of the direct paths from here on, as ("conv", form) and ("dW", "fp32")."""
    from int8fx.kernels import direct

    direct.exact("int8"), direct.exact("fp32")  # (their one-time probes call the direct paths too)
    calls = []
    real_conv, real_dw = direct.conv, direct.grad_weight
    monkeypatch.setattr(direct, "conv", lambda *a: calls.append(("conv", a[3])) or real_conv(*a))
    monkeypatch.setattr(direct, "grad_weight", lambda *a: calls.append(("dW", "fp32")) or real_dw(*a))
    return calls

