"""The exact integer GEMM, on any device, at fp32-GEMM speed.

Operands hold integers in [-127, 127]. Every product is at most 127^2 = 16129 in magnitude, so a sum of
up to 1040 products stays below 2^24 and is exact in fp32 whatever order the BLAS adds in. We therefore
run fp32 batched GEMMs over chunks of the reduction dimension of at most `EXACT_K` and add the chunk
results in fp64 (exact up to 2^53). The result equals the int64 product element for element, which the
tests check against a naive int64 computation, and it is what the GPU kernels are checked against.

Reduced-precision fp32 matmul modes do not break this, so the op never reads or sets them (reading them
would also be a graph break under torch.compile): TF32 keeps 10 mantissa bits and bf16 8, both of which
hold every integer in [-127, 127] exactly, and both accumulate in fp32. So `torch.set_float32_matmul_
precision("high"/"medium")` and `torch.backends.cuda.matmul.allow_tf32` give the same exact sums
(tests/test_reference.py checks it).

Why not fp64 GEMMs throughout: half the speed of fp32. Where the CPU has int8 dot-product instructions,
`torch._int_mm` is faster still (int8fx.kernels.cpu_backend); this path is what every device can run.
"""
from __future__ import annotations

import torch
from torch import Tensor

EXACT_K = 1040  # 127**2 * 1040 = 16_774_160 < 2**24 = 16_777_216


def exact_int_bmm(a: Tensor, b: Tensor) -> Tensor:
    """Exact a @ b for integer-valued operands a [G, M, K], b [G, K, N] (any strides, fp32 or int8).

    Returns the accumulators as fp32 when one chunk suffices (exact: |acc| < 2^24), else fp64.
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"exact_int_bmm needs [G,M,K] @ [G,K,N], got {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.dtype != torch.float32:
        a = a.float()
    if b.dtype != torch.float32:
        b = b.float()
    K = a.shape[2]
    if K <= EXACT_K:
        return torch.bmm(a, b)
    acc = None
    for k0 in range(0, K, EXACT_K):
        part = torch.bmm(a[:, :, k0:k0 + EXACT_K], b[:, k0:k0 + EXACT_K, :])
        acc = part.double() if acc is None else acc.add_(part)
    return acc


class ReferenceBackend:
    """Backend protocol: `name`, `operand_dtype` (what quantize should emit) and `bmm(a, b)` returning
    exact integer accumulators (any dtype that holds them exactly). Other backends (torch, cupy) follow
    the same three names, so the autograd op never branches on the backend."""

    name = "reference"
    operand_dtype = torch.float32

    @staticmethod
    def bmm(a: Tensor, b: Tensor) -> Tensor:
        return exact_int_bmm(a, b)


def exact_sum_dtype(acc: Tensor, max_abs: float) -> Tensor:
    """`acc` in a float dtype that holds sums of magnitude up to `max_abs` exactly: fp32 below 2^24, else
    fp64. Integer accumulators (GPU backends) are converted too: col2im (F.fold) is float-only, and an int32
    sum could overflow where fp64 cannot."""
    want = torch.float32 if max_abs < 2**24 else torch.float64
    if acc.dtype == want or (acc.dtype == torch.float64 and want == torch.float32):
        return acc
    return acc.to(want)


def naive_int64_bmm(a: Tensor, b: Tensor) -> Tensor:
    """Slow ground truth for tests: int64 products summed in int64."""
    return torch.einsum("gmk,gkn->gmn", a.to(torch.int64), b.to(torch.int64))
