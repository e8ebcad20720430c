"""The "torch" backend: exact integer GEMMs through `torch._int_mm`, on the CPU (oneDNN) and on CUDA
(cuBLASLt).

On a CPU with int8 dot-product instructions (AVX512-VNNI, AMX) `torch._int_mm` is several times faster
than an fp32 GEMM (measured on this project's machines: 3.4-10x on conv shapes); on one without them it is
far slower, which is why `backend="auto"` measures before it picks (int8fx.kernels.probe). Its products
are int32 sums of int8 products, exact while no more than MAX_K_PER_SPLIT = 131008 of them add up
(127 * 128 * 131008 < 2^31); longer reductions are cut into chunks whose sums are added in int64.
On CUDA `torch._int_mm` accepts only M > 16 and K, N multiples of 8 (geometry.int_mm_padding gives the
padded sizes; zero rows/columns leave the product unchanged); on the CPU any shape.
Convolutions reach it through the channels-last pipeline (int8fx.kernels.nhwc), one GEMM per group;
depthwise convolutions, whose per-group GEMMs are 1 x 9 products, stay on the reference's direct path.
Status on CUDA: verified on an H200 (tests/test_kernels_cuda.py, 2026-11-29 and 2026-12-04), and what
`backend="auto"` runs on CUDA: cuBLASLt's int8 GEMM ran 0.9 POP/s at 8192^3 there, 2.2x the CuPy kernel
(benchmarks/RESULTS.md). Two changes since the last GPU run, not yet run on one: operands already in
cuBLASLt's layout are passed uncopied (`_cublaslt_operand`), and reductions longer than MAX_K_PER_SPLIT go
to the CuPy split-K GEMM where CuPy is installed (`int_mm_exact`).
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from ..fusing import outside_traces
from . import geometry as geo


# products whose sums expose a CPU int8 GEMM that is not exact: shapes that take oneDNN's different kernels
# (a tall, a short and an odd-sized product), each on codes at +-127 and on random codes
EXACTNESS_SHAPES = ((256, 576, 64), (17, 64, 32), (3, 131, 5))


@functools.lru_cache(maxsize=1)
@outside_traces
def cpu_int_mm_wrong() -> str:
    """"" where `torch._int_mm` computes exact int32 sums on this CPU, else what was wrong (checked once per
    process against int64 products). Why: on a CPU without int8 dot-product instructions (no AVX512-VNNI,
    AVX-VNNI or AMX: x86 CPUs before Cascade Lake and AMD Zen 4) oneDNN multiplies unsigned x signed int8
    pairs into 16-bit sums that saturate (`vpmaddubsw`). Measured on an Intel Xeon with oneDNN capped to AVX2
    (ONEDNN_MAX_CPU_ISA=AVX2): all 4,096 sums of a 64x1024x64 product of codes 127 wrong, random codes off
    by up to 155,816; codes below 4 came out right, so only full-range codes show it."""
    gen = torch.Generator().manual_seed(0)
    try:
        for m, k, n in EXACTNESS_SHAPES:
            full = torch.full((m, k), 127, dtype=torch.int8), torch.full((k, n), 127, dtype=torch.int8)
            mixed = -full[0], full[1]
            rand = (torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen),
                    torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen))
            for a, b in (full, mixed, rand):
                want = a.long() @ b.long()
                wrong = int((torch._int_mm(a, b).long() != want).sum())
                if wrong:
                    return (f"{wrong} of {want.numel()} sums of a {m}x{k}x{n} int8 product wrong (oneDNN without int8 "
                            "dot products saturates 16-bit pair sums)")
    except RuntimeError as e:  # a build without CPU _int_mm
        return f"torch._int_mm is not available on this CPU build ({e})"
    return ""


def int_mm_exact(a: Tensor, b: Tensor) -> Tensor:
    """Exact a @ b for int8 a [M, K], b [K, N]: int32, or int64 when K > MAX_K_PER_SPLIT. On CUDA a reduction
    that long (a weight gradient summed over a large batch's positions) runs on int8fx's split-K GEMM where
    CuPy is installed: cuBLASLt, given it in int32-safe chunks, ran a ResNet stem's dW at batch 256
    (64 x 147 x 3.2M) as 25 calls of 0.59 ms at 4 TOP/s on an H200, and the split-K kernel ran ResNet-50's
    layer1 dW 4.4x faster than one cuBLASLt call (benchmarks/RESULTS.md)."""
    M, K = a.shape
    N = b.shape[1]
    chunks = geo.int_mm_k_chunks(K)
    if K == 0 or M == 0 or N == 0:
        return torch.zeros((M, N), dtype=torch.int32 if len(chunks) <= 1 else torch.int64, device=a.device)
    if len(chunks) > 1 and a.is_cuda and (splitk := _splitk_gemm(a.device)) is not None:
        return splitk(a.unsqueeze(0), b.unsqueeze(0))[0]
    acc = None
    for k0, k1 in chunks:
        part = _int_mm(a[:, k0:k1], b[k0:k1])
        if len(chunks) == 1:
            return part
        acc = part.to(torch.int64) if acc is None else acc.add_(part)
    return acc


# cuBLASLt has no int8 kernel for some shapes: on an H200 (CUDA 13.0, torch 2.11) it refused N = 152, K = 64
# with 65,536 or more rows (a ResNet-50 stem's dX at batch 256) and took that N with 33 rows, and every other
# conv shape it was given. Such a product runs exactly on the reference instead, once asked per shape.
_REFUSED: set = set()  # padded (M, K, N) shapes cuBLASLt refused in this process


def refused_shapes() -> set:
    """The padded (M, K, N) int8 GEMMs cuBLASLt refused in this process (run exactly on the reference)."""
    return set(_REFUSED)


@functools.lru_cache(maxsize=None)
def _splitk_gemm(device: torch.device):
    """int8fx.kernels.cupy_backend.int_bmm where CuPy is installed and its kernels run on `device` (compute
    capability >= 8.0), else None (the chunked cuBLASLt path)."""
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return None
    from .cupy_backend import int_bmm, runs_on

    return int_bmm if runs_on(device) else None


def _int_mm(a: Tensor, b: Tensor) -> Tensor:
    if not a.is_cuda:
        return torch._int_mm(_plain_strides(a), _plain_strides(b))
    M, K = a.shape
    N = b.shape[1]
    Mp, Kp, Np = geo.int_mm_padding(M, K, N)
    if (Mp, Kp, Np) not in _REFUSED:
        # A row-major and B column-major (cuBLASLt's fast layout), zero-padded to the sizes it accepts; an
        # operand already so is passed as it is: the copy of a conv's 462 MB im2col took as long as its GEMM
        A = _cublaslt_operand(a, Mp, Kp)
        Bt = _cublaslt_operand(b.t(), Np, Kp)
        try:
            y = torch._int_mm(A, Bt.t())
            return y if (Mp, Np) == (M, N) else y[:M, :N]
        except RuntimeError as e:  # a shape cuBLASLt has no kernel for: the same product, exactly, without it
            if "CUBLAS_STATUS_NOT_SUPPORTED" not in str(e):
                raise
            _REFUSED.add((Mp, Kp, Np))
            warnings.warn(f"int8fx: cuBLASLt refused the int8 GEMM {Mp}x{Kp}x{Np}; it runs on the exact fp32 "
                          "reference GEMM (same numbers, slower)")
    from .reference import exact_int_bmm

    return exact_int_bmm(a.unsqueeze(0), b.unsqueeze(0))[0].to(torch.int32)  # K <= MAX_K_PER_SPLIT here


def _cublaslt_operand(t: Tensor, rows: int, cols: int) -> Tensor:
    """t [r, c] as a contiguous, 16-byte aligned int8 [rows, cols] (zeros beyond t): t itself where it is one."""
    r, c = t.shape
    if (r, c) == (rows, cols) and t.is_contiguous() and t.data_ptr() % 16 == 0:
        return _plain_strides(t)
    buf = (torch.empty if (r, c) == (rows, cols) else torch.zeros)((rows, cols), dtype=torch.int8, device=t.device)
    buf[:r, :c].copy_(t)
    return buf


def _plain_strides(t: Tensor) -> Tensor:
    """t with the standard strides of a row- or column-major matrix. A size-1 dim may carry any stride (e.g.
    from a compiled kernel's output); oneDNN then rejects the operand and torch falls back to a path that
    returned wrong products for such strides (torch 2.14: [4, 1] with strides (1, 2), and [1, 2] with (1, 1),
    which is what `w.t()` of a [2, 1] weight gives). Rewriting a size-1
    dim's stride moves no data."""
    m, k = t.shape
    if t.is_contiguous():  # also true for a size-1 dim of any stride: canonical row-major strides then
        return t.as_strided((m, k), (k, 1), t.storage_offset())
    if t.t().is_contiguous():
        return t.as_strided((m, k), (1, m), t.storage_offset())
    return t.contiguous()


class TorchBackend:
    name = "torch"
    operand_dtype = torch.int8

    @staticmethod
    def bmm(a: Tensor, b: Tensor) -> Tensor:
        """[G, M, K] @ [G, K, N] -> exact integer accumulators [G, M, N] (int32, or int64 for long K)."""
        G, M, K = a.shape
        N = b.shape[2]
        dtype = torch.int32 if K <= geo.MAX_K_PER_SPLIT else torch.int64
        if G == 1:
            return int_mm_exact(a[0], b[0]).unsqueeze(0)
        out = torch.empty((G, M, N), dtype=dtype, device=a.device)
        for g in range(G):
            out[g] = int_mm_exact(a[g], b[g])
        return out
