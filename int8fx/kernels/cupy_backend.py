"""CuPy launchers for int8fx's CUDA kernels, and the "cupy" GEMM backend built on them.

Status: every kernel here compiles (NVRTC, sm_80 and sm_90) in CI, and the cuda-marked tests
(tests/test_kernels_cuda.py) passed on an H200 (2026-11-29, 2026-12-04): the GEMM is exact on every shape and tile.
It is not what `backend="auto"` picks: its mma.sync GEMM reaches 0.3-0.65x cuBLASLt's int8 GEMM
(`torch._int_mm`) on Hopper, which has wgmma for that; only on long reductions (the dW GEMMs of early
layers, K > 131008, where `_int_mm` must be cut into int32-safe chunks) its split-K is 1.4-4.5x faster, and
the "torch" backend hands it those (`int_bmm`; int8fx.kernels.torch_backend.int_mm_exact).

Layers, bottom up:
  * `_function`: compile (int8fx.kernels.nvrtc, disk-cached) for the device's architecture, load the
    cubin into a CuPy module, cache the function per (device, kernel).
  * launchers, one per kernel family, taking torch tensors: `gemm` (+ split-K reduce), `absmax`,
    `quantize`, `im2col`, `col2im`. They launch on PyTorch's current stream and allocate through
    PyTorch's caching allocator, pass device pointers (scales, seeds) instead of Python numbers, and
    so never synchronise with the host.
  * `CupyBackend`: the backend protocol (`name`, `operand_dtype`, `bmm`, plus the optional
    `quantize` hook the autograd op routes its gradient quantization through).
  * `conv_forward` / `conv_backward`: a whole INT8 conv layer on these kernels with the operand layouts
    each GEMM wants (transposed im2col for dW, quantize writing [M, O] and [O, M] directly), used by
    the benchmark and the tests; the autograd op composes the same pieces through `bmm`.
CuPy is imported lazily: importing this module needs neither CuPy nor a GPU.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from . import geometry as geo
from ..quant.core import QMAX, divide
from .nvrtc import compile_source

_FLOAT_INPUTS = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ----------------------------------------------------------------------------- loading and launching
def runs_on(device: torch.device) -> bool:
    """Whether these kernels run on `device`: a CUDA device of compute capability >= 8.0 (cp.async, INT8
    mma.m16n8k32)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= geo.MIN_CAPABILITY


def _cupy():
    import cupy  # lazy: int8fx imports without CuPy

    return cupy


@functools.lru_cache(maxsize=None)
def device_arch(index: int) -> str:
    """sm_XY of a CUDA device, checked against what the kernels need and what NVRTC can emit."""
    from .nvrtc import nvrtc_version, supported_archs

    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < geo.MIN_CAPABILITY:
        raise RuntimeError(f"int8fx's CUDA kernels need compute capability >= 8.0 (cp.async, INT8 mma.m16n8k32); "
                           f"device {index} has {major}.{minor}")
    cc = 10 * major + minor
    if cc not in supported_archs():
        raise RuntimeError(f"NVRTC {nvrtc_version()} cannot compile for sm_{cc}; supported: {supported_archs()}")
    return f"sm_{cc}"


@functools.lru_cache(maxsize=None)
def device_limits(index: int) -> tuple[int, int]:
    """(multiprocessor count, opt-in shared memory per block) of a device."""
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    return props.multi_processor_count, int(smem)


@functools.lru_cache(maxsize=None)
def _function(index: int, source: str, expression: str, smem: int):
    cp = _cupy()
    comp = compile_source(source, device_arch(index), (expression,), disk=True)
    with cp.cuda.Device(index):
        module = cp.cuda.function.Module()
        module.load(comp.cubin)
        fn = module.get_function(comp.lowered[expression])  # holds a reference to its module
        if smem > 48 * 1024:
            from cupy_backends.cuda.api import driver

            driver.funcSetAttribute(fn.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
    return fn


@functools.lru_cache(maxsize=64)
def _stream(index: int, ptr: int):
    import warnings

    with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream for Stream.from_external(obj), which
        warnings.simplefilter("ignore", DeprecationWarning)  # takes an object, not the raw handle torch gives
        return _cupy().cuda.ExternalStream(ptr, index)


def _launch(device: torch.device, source: str, expression: str, grid, block, args, smem: int = 0) -> None:
    index = device.index if device.index is not None else torch.cuda.current_device()
    fn = _function(index, source, expression, smem)
    stream = _stream(index, torch.cuda.current_stream(index).cuda_stream)
    with _cupy().cuda.Device(index):
        fn(tuple(grid), tuple(block), tuple(args), shared_mem=smem, stream=stream)


def _p(t: Tensor | None) -> np.uint64:
    """Device pointer argument (0 for an absent optional pointer)."""
    return np.uint64(0 if t is None else t.data_ptr())


def _i32(v: int) -> np.int32:
    if not -(2**31) <= v < 2**31:
        raise ValueError(f"{v} does not fit the kernel's 32-bit argument")
    return np.int32(v)


def _i64(v: int) -> np.int64:
    return np.int64(v)


def _sm_count(device: torch.device) -> int:
    return device_limits(device.index if device.index is not None else torch.cuda.current_device())[0]


def _smem_limit(device: torch.device) -> int:
    return device_limits(device.index if device.index is not None else torch.cuda.current_device())[1]


# ----------------------------------------------------------------------------- GEMM
def _kmajor_ok(x: Tensor, K: int) -> bool:
    G, R, Kx = x.shape
    return (x.dtype == torch.int8 and Kx == K and x.stride(2) == 1 and x.data_ptr() % 16 == 0
            and (R == 1 or x.stride(1) % 16 == 0) and (G == 1 or x.stride(0) % 16 == 0))


def as_kmajor(x: Tensor, Kp: int) -> Tensor:
    """[G, R, K] integer-valued operand (any dtype holding integers in [-128, 127], any strides) -> int8
    [G, R, Kp] with K contiguous, 16-byte aligned rows and zeros in k >= K. No copy when x already is."""
    if _kmajor_ok(x, Kp):
        return x
    G, R, K = x.shape
    buf = (torch.empty if K == Kp else torch.zeros)((G, R, Kp), dtype=torch.int8, device=x.device)
    buf[:, :, :K].copy_(x)
    return buf


def gemm(A: Tensor, Bt: Tensor, *, epilogue: str = "int32", out: Tensor | None = None, out_addr: tuple | None = None,
         row_scale: Tensor | None = None, col_scale: Tensor | None = None, alpha: Tensor | None = None,
         plan: geo.GemmPlan | None = None, tile=None, splits: int | None = None) -> Tensor:
    """epilogue(A[g] @ Bt[g]^T) for int8 K-major operands A [G, M, Kp], Bt [G, N, Kp] (see `as_kmajor`).

    epilogue: "int32" / "int64" (raw accumulators) or "float32" / "bfloat16" (acc.float() * row_scale[g*M+m]
    * col_scale[g*N+n] * alpha, one factor at a time left to right, each optional). Output [G, M, N] contiguous unless `out_addr` =
    (tensor, sCg, sCmo, sCmi, sCn, P) addresses element (g, m, n) at g*sCg + (m//P)*sCmo + (m%P)*sCmi + n*sCn.
    """
    G, M, Kp = A.shape
    N = Bt.shape[1]
    if Bt.shape[0] != G or Bt.shape[2] != Kp or Kp % geo.K_ALIGN:
        raise ValueError(f"gemm needs A [G,M,Kp], Bt [G,N,Kp] with Kp % 16 == 0; got {tuple(A.shape)}, {tuple(Bt.shape)}")
    if not (_kmajor_ok(A, Kp) and _kmajor_ok(Bt, Kp)):
        raise ValueError("gemm operands must be int8, K-contiguous, 16-byte aligned (use as_kmajor)")
    dev = A.device
    plan = plan or geo.plan_gemm(G, M, N, Kp, _sm_count(dev), tile, splits, _smem_limit(dev))
    if plan.Kp != Kp:
        raise ValueError(f"plan was made for Kp={plan.Kp}, operands have {Kp}")
    epi = geo.EPILOGUES[epilogue]
    for name, t, n in (("row_scale", row_scale, G * M), ("col_scale", col_scale, G * N), ("alpha", alpha, 1)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != n or not t.is_contiguous() or t.device != dev):
            raise ValueError(f"{name} must be a contiguous float32 tensor of {n} elements on {dev}")
    if out_addr is None:
        if out is None:
            out = torch.empty((G, M, N), dtype=getattr(torch, epilogue), device=dev)
        if out.shape != (G, M, N) or not out.is_contiguous() or out.dtype != getattr(torch, epilogue):
            raise ValueError(f"out must be a contiguous {epilogue} tensor of shape {(G, M, N)}")
        out_addr = (out, M * N, 0, N, 1, M)
    C, sCg, sCmo, sCmi, sCn, P = out_addr
    t = plan.tile
    sAg = A.stride(0) if G > 1 else 0
    sBg = Bt.stride(0) if G > 1 else 0
    common = (_p(A), _i64(sAg), _i64(A.stride(1)), _p(Bt), _i64(sBg), _i64(Bt.stride(1)))
    if plan.splits == 1:
        args = common + (_p(C), _i64(sCg), _i64(0), _i64(sCmo), _i64(sCmi), _i64(sCn), _i32(P),
                         _p(row_scale), _p(col_scale), _p(alpha), _i32(M), _i32(N), _i32(Kp), _i32(1),
                         _i32(plan.k_per_split), _i32(epi))
        _launch(dev, "gemm_s8.cu", t.expression, plan.grid, (t.threads,), args, t.smem_bytes)
        return C
    ws = torch.empty((plan.splits, G, M, N), dtype=torch.int32, device=dev)
    args = common + (_p(ws), _i64(M * N), _i64(G * M * N), _i64(0), _i64(N), _i64(1), _i32(M),
                     _p(None), _p(None), _p(None), _i32(M), _i32(N), _i32(Kp), _i32(plan.splits),
                     _i32(plan.k_per_split), _i32(geo.EPI_I32))
    _launch(dev, "gemm_s8.cu", t.expression, plan.grid, (t.threads,), args, t.smem_bytes)
    args = (_p(ws), _i32(plan.splits), _i32(G), _i32(M), _i32(N), _p(C), _i64(sCg), _i64(sCmo), _i64(sCmi),
            _i64(sCn), _i32(P), _p(row_scale), _p(col_scale), _p(alpha), _i32(epi))
    _launch(dev, "gemm_s8.cu", "splitk_reduce", (geo.plan_reduce(G, M, N, _sm_count(dev)),), (256,), args)
    return C


def int_bmm(a: Tensor, b: Tensor, *, tile=None, splits: int | None = None) -> Tensor:
    """Exact a @ b for integer-valued a [G, M, K], b [G, K, N] (any strides): int32, or int64 when K is
    long enough that int32 could overflow (geometry.GemmPlan.acc_dtype)."""
    G, M, K = a.shape
    N = b.shape[2]
    dev = a.device
    if min(G, M, N) == 0 or K == 0:  # empty batch / empty reduction: nothing to launch
        return torch.zeros((G, M, N), dtype=torch.int32, device=dev)
    plan = geo.plan_gemm(G, M, N, K, _sm_count(dev), tile, splits, _smem_limit(dev))
    A = as_kmajor(a, plan.Kp)
    Bt = as_kmajor(b.transpose(1, 2), plan.Kp)
    return gemm(A, Bt, epilogue=plan.acc_dtype, plan=plan)


# ----------------------------------------------------------------------------- quantization
def _float_input(x: Tensor) -> str:
    try:
        return _FLOAT_INPUTS[x.dtype]
    except KeyError:
        raise TypeError(f"quantize kernels read float32/bfloat16/float16, got {x.dtype}") from None


def absmax(x: Tensor, axis: int | None = None, premul: Tensor | None = None) -> Tensor:
    """max |x * premul[c]| per index c of `axis` (per tensor when None: a 0-d result), NaN winning, as
    int8fx.quant.core.absmax. `premul` [C] (optional, per index of `axis`) folds a per-channel factor in."""
    x = x.contiguous()
    ctype = geo.CTYPES[_float_input(x)]
    A, C, B = geo.acb_view(tuple(x.shape), axis)
    out = torch.zeros(C, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out if axis is not None else out.reshape(())
    if premul is not None:
        premul = premul.to(torch.float32).contiguous()
    sm = _sm_count(x.device)
    aligned = x.data_ptr() % 16 == 0
    if B == 1 and C > 1:  # channel innermost: [R, C] column reduction
        vec = geo.vec_width(C, aligned)
        gx, gy = geo.plan_absmax_cols(A, C, vec, sm)
        _launch(x.device, "quantize.cu", f"absmax_cols<{ctype},{vec}>", (gx, gy), (32, 8),
                (_p(x), _i64(A), _i32(C), _p(premul), _p(out)))
    else:
        vec = geo.vec_width(B, aligned)
        bpc = geo.plan_absmax_runs(A, C, B, vec, sm)
        _launch(x.device, "quantize.cu", f"absmax_runs<{ctype},{vec}>", (C * bpc,), (256,),
                (_p(x), _i64(A), _i32(C), _i64(B), _p(premul), _p(out), _i32(bpc)))
    return out if axis is not None else out.reshape(())


def quantize(x: Tensor, scale: Tensor, *, axis: int | None = None, premul: Tensor | None = None,
             rounding: str = "nearest", key: Tensor | int | None = None, out: Tensor | None = None,
             out_strides: tuple[int, int, int] | None = None) -> Tensor:
    """int8 q = clamp(round(x * premul[c] / scale[c]), -127, 127) per index c of `axis` (per tensor when
    None), with int8fx.quant.core.quantize's semantics (nearest = ties to even, bit-exact; stochastic =
    floor(v + u) with the counter-based u of `uniform_bits15` for the int32 stream `key`, the same draws).
    `out`/`out_strides` (oA, oC, oB) place q[a, c, b] of the [A, C, B] view anywhere (e.g. transposed)."""
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    x = x.contiguous()
    ctype = geo.CTYPES[_float_input(x)]
    A, C, B = geo.acb_view(tuple(x.shape), axis)
    scale = scale.to(x.device, torch.float32).reshape(-1).contiguous()
    if scale.numel() not in (1, C):
        raise ValueError(f"scale has {scale.numel()} elements; need 1 or {C}")
    if out is None:
        out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        out_strides = (C * B, B, 1)
    elif out_strides is None:
        raise ValueError("out_strides must accompany out")
    if x.numel() == 0:
        return out
    if premul is not None:
        premul = premul.to(x.device, torch.float32).reshape(-1).contiguous()
    oA, oC, oB = out_strides
    vec = geo.vec_width(B, x.data_ptr() % 16 == 0)
    pack4 = int(vec == 4 and oB == 1 and oA % 4 == 0 and oC % 4 == 0 and out.data_ptr() % 4 == 0)
    stochastic = rounding == "stochastic"
    if stochastic and key is None:
        raise ValueError("stochastic rounding needs a key (the counter-based stream to draw from)")
    seed = torch.as_tensor(key, device=x.device).to(torch.int32).reshape(1) if stochastic else None
    blocks = geo.plan_elementwise(A * C * (B // vec), _sm_count(x.device))
    _launch(x.device, "quantize.cu", f"quantize_s8<{ctype},{vec}>", (blocks,), (256,),
            (_p(x), _i64(A), _i32(C), _i64(B), _p(scale), _i32(int(scale.numel() > 1)),
             _p(premul), _p(out), _i64(oA), _i64(oC), _i64(oB), _i32(int(stochastic)), _p(seed), _i32(pack4)))
    return out


def _scale_axis(x: Tensor, scale: Tensor) -> int | None | bool:
    """Axis along which `scale` broadcasts against x (None: per tensor; False: a pattern not covered)."""
    if scale.numel() == 1:
        return None
    shape = (1,) * (x.dim() - scale.dim()) + tuple(scale.shape)
    if len(shape) != x.dim():
        return False
    axes = [d for d, (s, n) in enumerate(zip(shape, x.shape)) if s != 1]
    if len(axes) != 1 or shape[axes[0]] != x.shape[axes[0]]:
        return False
    return axes[0]


# ----------------------------------------------------------------------------- conv lowering
def im2col(x_q: Tensor, spec, transposed: bool = False) -> tuple[Tensor, geo.ConvGeom]:
    """int8 x [N, C, *S] -> Xcol [G, M, Kp] (or Xcol^T [G, K, Mp] when transposed), zero-padded to 16."""
    if x_q.dtype != torch.int8:
        raise TypeError(f"im2col reads int8 activations, got {x_q.dtype}")
    x_q = x_q.contiguous()
    p = geo.conv_geom(spec, tuple(x_q.shape))
    ld, blocks = geo.plan_im2col(p, transposed, _sm_count(x_q.device))
    rows = p.K if transposed else p.M
    out = torch.empty((p.G, rows, ld), dtype=torch.int8, device=x_q.device)
    _launch(x_q.device, "im2col.cu", f"im2col_s8<{'true' if transposed else 'false'}>", (blocks,), (256,),
            (_p(x_q), _p(out)) + tuple(_i32(v) for v in p.args()) + (_i64(ld),))
    return out, p


def col2im(cols: Tensor, p: geo.ConvGeom, scale: Tensor | None, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """int32 dXcol [G, M, ld] -> dx [N, C, *S]: the window sums in int64, times scale[0] in fp32 (or the
    int64 sums when out_dtype is int64). `p` from im2col/conv_geom; dx gets the spatial rank of `p`'s spec."""
    if (cols.dtype != torch.int32 or cols.shape[:2] != (p.G, p.M) or cols.stride(2) != 1
            or (p.G > 1 and cols.stride(0) != p.M * cols.stride(1))):
        raise ValueError(f"col2im needs int32 [G={p.G}, M={p.M}, ld] with unit last stride, got {cols.dtype} {tuple(cols.shape)}")
    epi = {torch.float32: geo.EPI_F32, torch.bfloat16: geo.EPI_BF16, torch.int64: geo.EPI_I64}[out_dtype]
    dx = torch.empty((p.N, p.C, p.D, p.H, p.W), dtype=out_dtype, device=cols.device)
    if scale is not None:
        scale = scale.to(cols.device, torch.float32).reshape(1).contiguous()
    elif epi != geo.EPI_I64:
        raise ValueError("a float col2im needs a scale")
    blocks = geo.plan_elementwise(dx.numel(), _sm_count(cols.device))
    _launch(cols.device, "im2col.cu", "col2im_s32", (blocks,), (256,),
            (_p(cols), _i64(cols.stride(1)), _p(dx), _p(scale), _i32(epi)) + tuple(_i32(v) for v in p.args()))
    return dx


# ----------------------------------------------------------------------------- the backend
class CupyBackend:
    """INT8 tensor-core backend: `bmm` returns exact int32 (int64 for reductions over 131008) accumulators.

    `quantize` is the optional hook of the backend protocol: the autograd op hands it its gradient
    quantizations; it returns None for what it does not cover (non-int8 output, an unusual broadcast),
    and the op then uses the reference quantizer. Pre-Ampere GPUs are served by the torch backend, CPU
    tensors by the reference (int8fx.kernels.resolve_backend)."""

    name = "cupy"
    operand_dtype = torch.int8

    def bmm(self, a: Tensor, b: Tensor) -> Tensor:
        if not runs_on(a.device):
            raise RuntimeError(f"int8fx's CUDA kernels need a CUDA device of compute capability >= "
                               f"{'.'.join(map(str, geo.MIN_CAPABILITY))}; got {a.device} (resolve_backend picks "
                               "the backend for a device)")
        return int_bmm(a, b)

    @staticmethod
    def quantize(x: Tensor, scale: Tensor, rounding: str = "nearest", key=None,
                 out_dtype: torch.dtype = torch.int8) -> Tensor | None:
        if (out_dtype != torch.int8 or not x.is_cuda or x.dtype not in _FLOAT_INPUTS
                or torch.cuda.get_device_capability(x.device) < geo.MIN_CAPABILITY):
            return None
        axis = _scale_axis(x, scale)
        if axis is False:
            return None
        return quantize(x, scale, axis=axis, rounding=rounding, key=key)


# ----------------------------------------------------------------------------- a whole conv layer
def conv_forward(x: Tensor, weight: Tensor, spec, out_dtype: torch.dtype | None = None) -> tuple[Tensor, tuple]:
    """INT8 forward of a conv layer on the kernels: X per tensor, W per output channel (as
    int8fx.nn.functional.quantized_forward), the dequantizing epilogue writing NCHW directly.
    Returns (y without bias, saved state for conv_backward)."""
    out_dtype = out_dtype or x.dtype
    G = spec.groups
    O = weight.shape[0]
    s_x = divide(absmax(x), QMAX)
    x_q = quantize(x, s_x)
    cols, p = im2col(x_q, spec)
    w2 = weight.reshape(O, -1)
    s_w = divide(absmax(w2, axis=0), QMAX)
    Kp = cols.shape[2]
    w_q = torch.zeros((O, Kp), dtype=torch.int8, device=x.device)  # [G, O/G, Kp] K-major
    quantize(w2, s_w, axis=0, out=w_q, out_strides=(0, Kp, 1))
    P = p.OD * p.OH * p.OW
    ydt = _epilogue_dtype(out_dtype)
    y = torch.empty((p.N, O, P), dtype=ydt, device=x.device)
    Og = O // G
    gemm(cols, w_q.view(G, Og, Kp), epilogue=str(ydt).removeprefix("torch."), col_scale=s_w,
         alpha=s_x.reshape(1), out_addr=(y, Og * P, O * P, 1, P, P))
    out_shape = (p.N, O) + tuple(spec.out_size(tuple(x.shape[2:])))
    return y.view(out_shape).to(out_dtype), (x_q, s_x, w_q, s_w, p, tuple(x.shape), x.dtype, tuple(weight.shape))


def _epilogue_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels write fp32 or bf16; other float dtypes are converted from fp32 afterwards (what the
    reference's `.to(x.dtype)` does)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def conv_backward(dy: Tensor, saved: tuple, spec) -> tuple[Tensor, Tensor]:
    """INT8 backward with the per-tensor absmax gradient quantizer and nearest rounding, matching
    int8fx.nn.functional.Int8GemmFunction.backward for grad_quant="per-tensor":
      dX = col2im(q(dY s_W[o]) . W_int8) * s_gX   (s_gX from the per-tensor absmax of dY s_W[o])
      dW = (q(dY)^T . Xcol) * s_gW[o] * s_X        (s_gW per tensor, broadcast per channel)
    Layouts: one quantize pass writes dY from NCHW straight into [M, O] (dX operand) and another into
    [O, Mp] (dW operand); im2col writes Xcol^T [G, K, Mp], so the dW GEMM reduces over a contiguous M."""
    x_q, s_x, w_q, s_w, p, x_shape, x_dtype, w_shape = saved
    G = spec.groups
    dy = dy.contiguous()
    N, O = dy.shape[:2]
    P = dy[0, 0].numel() if N else 0
    M = N * P
    Og = O // G
    Kp = w_q.shape[1]
    K = p.K
    # ---- dX: dXcol[g, m, k] = sum_o q(dY s_W)[m, o] W[o, k]
    s_gx = divide(absmax(dy, axis=1, premul=s_w).amax(), QMAX)
    Op = geo.pad_k(Og)
    if Op == Og and O % 16 == 0:
        gq = torch.empty((M, O), dtype=torch.int8, device=dy.device)
        quantize(dy, s_gx, axis=1, premul=s_w, out=gq, out_strides=(P * O, 1, O))
        A_dx = gq.view(M, G, Og).transpose(0, 1)  # [G, M, Og]: K-major, row stride O
    else:  # narrow groups (depthwise): pad each group's reduction to 16 with zeros
        gq = torch.zeros((G, M, Op), dtype=torch.int8, device=dy.device)
        for g in range(G):
            quantize(dy[:, g * Og:(g + 1) * Og], s_gx, axis=1, premul=s_w[g * Og:(g + 1) * Og],
                     out=gq[g], out_strides=(P * Op, 1, Op))
        A_dx = gq
    wt = torch.zeros((G, K, Op), dtype=torch.int8, device=dy.device)  # W^T per group, K-major in o
    wt[:, :, :Og].copy_(w_q.view(G, Og, Kp)[:, :, :K].transpose(1, 2))
    dcols = gemm(A_dx, wt, epilogue="int32")  # [G, M, K]
    dx = col2im(dcols, p, s_gx, _epilogue_dtype(x_dtype)).view(x_shape).to(x_dtype)
    # ---- dW: dW[o, k] = sum_m q(dY)[o, m] Xcol[m, k]
    s_gw = divide(absmax(dy), QMAX)
    Mp = geo.pad_k(M)
    gqt = torch.zeros((O, Mp), dtype=torch.int8, device=dy.device)
    quantize(dy, s_gw, axis=1, out=gqt, out_strides=(P, Mp, 1))  # dy[n, o, p] -> gqt[o, n*P + p]
    colsT, _ = im2col(x_q, spec, transposed=True)  # [G, K, Mp]
    dw = torch.empty(w_shape, dtype=torch.float32, device=dy.device)
    gemm(gqt.view(G, Og, Mp), colsT, epilogue="float32", row_scale=s_gw.expand(O).contiguous(),
         alpha=s_x.reshape(1), out=dw.view(G, Og, K))
    return dx, dw
