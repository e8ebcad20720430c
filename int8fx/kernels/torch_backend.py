"""The "torch" backend: exact integer GEMMs through `torch._int_mm` (cuBLASLt INT8) on CUDA.

It is the measured baseline for the CuPy kernels and their fallback (pre-Ampere GPUs, shapes a kernel
does not cover). `torch._int_mm` computes one [M, K] x [K, N] int8 product with int32 accumulation and
accepts only M > 16 and K, N multiples of 8 (geometry.int_mm_padding gives the padded sizes; zero
rows/columns leave the product unchanged). Two things it does not do, handled here:
  * groups: one call per group (a grouped conv costs G launches; depthwise convs are slow here);
  * long reductions: int32 would overflow past 131008 products of 128 x 128, so K is cut into chunks
    of at most that (geometry.int_mm_k_chunks) and the chunks are added in int64.
Status: not yet run on a GPU (the cuda-marked tests check it against the reference).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import geometry as geo


def int_mm_exact(a: Tensor, b: Tensor) -> Tensor:
    """Exact a @ b for integer-valued 2-d a [M, K], b [K, N] on CUDA: int32, or int64 past 131008."""
    M, K = a.shape
    N = b.shape[1]
    chunks = geo.int_mm_k_chunks(K)
    acc = None
    for k0, k1 in chunks:
        Mp, Kp, Np = geo.int_mm_padding(M, k1 - k0, N)
        A = torch.zeros((Mp, Kp), dtype=torch.int8, device=a.device)
        A[:M, :k1 - k0].copy_(a[:, k0:k1])
        Bt = torch.zeros((Np, Kp), dtype=torch.int8, device=a.device)  # column-major B: cuBLASLt's fast layout
        Bt[:N, :k1 - k0].copy_(b[k0:k1].t())
        part = torch._int_mm(A, Bt.t())[:M, :N]
        if len(chunks) == 1:
            return part
        acc = part.to(torch.int64) if acc is None else acc.add_(part)
    return acc


class TorchBackend:
    name = "torch"
    operand_dtype = torch.int8

    @staticmethod
    def bmm(a: Tensor, b: Tensor) -> Tensor:
        """[G, M, K] @ [G, K, N] -> exact integer accumulators [G, M, N] (int32, or int64 for K > 131008)."""
        if not a.is_cuda:
            raise RuntimeError("the torch backend runs torch._int_mm on CUDA tensors only")
        G, M, K = a.shape
        N = b.shape[2]
        dtype = torch.int32 if K <= geo.MAX_K_PER_SPLIT else torch.int64
        out = torch.empty((G, M, N), dtype=dtype, device=a.device)
        if min(G, M, N) == 0:
            return out
        if K == 0:
            return out.zero_()
        for g in range(G):
            out[g] = int_mm_exact(a[g], b[g])
        return out
