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

Why not fp64 GEMMs throughout: half the speed of fp32. Which exact path is fastest depends on the CPU:
where oneDNN has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX) `torch._int_mm` runs 3-10x
these fp32 GEMMs (the "torch" backend, int8fx.kernels.torch_backend, with the channels-last pipeline of
int8fx.kernels.nhwc); without them it ran at 3-6 GOP/s, far below this path. `backend="auto"` measures
both once per process and takes the faster (int8fx.kernels.probe). This path is what every device runs;
on the CPU a plain conv may instead take oneDNN's fp32 conv on the same integer-valued operands, exact for
the same reason (int8fx.kernels.direct, form "fp32").
"""
from __future__ import annotations

import torch
from torch import Tensor

EXACT_K = 1040  # 127**2 * 1040 = 16_774_160 < 2**24 = 16_777_216
BATCHED_CHUNKS_MAX = 1 << 24  # partial sums (64 MiB of fp32) up to which the K-chunks share one bmm


def exact_int_bmm(a: Tensor, b: Tensor) -> Tensor:
    """Exact a @ b for integer-valued operands a [G, M, K], b [G, K, N] (any strides, fp32 or int8).

    Returns the accumulators as fp32 when one chunk suffices (exact: |acc| < 2^24), else fp64.
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"exact_int_bmm needs [G,M,K] @ [G,K,N], got {tuple(a.shape)} @ {tuple(b.shape)}")
    _, M, K = a.shape
    N = b.shape[2]
    chunks = -(-K // EXACT_K)
    if chunks > 1 and chunks * M * N <= BATCHED_CHUNKS_MAX:
        return _chunks_in_one_bmm(a, b, chunks)
    if a.dtype != torch.float32:
        a = a.float()
    if b.dtype != torch.float32:
        b = b.float()
    if K <= EXACT_K:
        return torch.bmm(a, b)
    acc = None
    for k0 in range(0, K, EXACT_K):
        part = torch.bmm(a[:, :, k0:k0 + EXACT_K], b[:, k0:k0 + EXACT_K, :])
        acc = part.double() if acc is None else acc.add_(part)
    return acc


def _chunks_in_one_bmm(a: Tensor, b: Tensor, chunks: int) -> Tensor:
    """`exact_int_bmm` for K > EXACT_K as one bmm over a batch of K-chunks (zero-padded to whole chunks) and
    an fp64 sum of the partial products: a long reduction (the channels-last pipeline's weight gradient,
    over batch x positions) would otherwise be ~100 small GEMMs and fp64 adds. The copies into the chunked
    fp32 operands are the int8 -> fp32 conversion the GEMM needs anyway."""
    G, M, K = a.shape
    N = b.shape[2]
    full, rest = divmod(K, EXACT_K)
    ap = torch.empty((G, chunks, M, EXACT_K), dtype=torch.float32, device=a.device)
    ap[:, :full].copy_(a[:, :, :full * EXACT_K].unflatten(2, (full, EXACT_K)).transpose(1, 2))
    if rest:
        ap[:, full, :, :rest].copy_(a[:, :, full * EXACT_K:])
        ap[:, full, :, rest:].zero_()
    bp = torch.empty((G, chunks * EXACT_K, N), dtype=torch.float32, device=b.device)
    bp[:, :K].copy_(b)
    bp[:, K:].zero_()
    parts = torch.bmm(ap.view(G * chunks, M, EXACT_K), bp.view(G * chunks, EXACT_K, N))
    return parts.view(G, chunks, M, N).sum(1, dtype=torch.float64)


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
