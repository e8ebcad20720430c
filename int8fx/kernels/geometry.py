"""Launch geometry of the CUDA kernels, in plain Python: tiles, grids, split-K, padding, conv indices.

Everything a launcher decides before it touches a GPU lives here, so CI (no GPU) can check it against
the shapes it must cover: ResNet-50 layers, odd sizes, K not a multiple of 32, tiny and huge batches,
depthwise convs. The CUDA sources assume what these functions guarantee (K padded to 16 bytes, k-ranges
that cannot overflow int32, grids inside the hardware limits); the tests hold the functions to it.

`kernel_variants()` is the single list of every template instantiation a launcher can request; the
compile test compiles exactly that list, so a variant the launchers use is a variant CI has compiled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------- constants
COMPILE_ARCHS = ("sm_80", "sm_90")  # every kernel is plain sm_80 PTX features (no wgmma: no sm_90a yet)
MIN_CAPABILITY = (8, 0)  # cp.async, ldmatrix, mma.m16n8k32.s8
K_ALIGN = 16  # bytes per cp.async chunk: K-major operands are zero-padded to a multiple of this
# Largest k-range one int32 accumulator may cover: 131008 * 128 * 128 < 2**31 (even for -128 * -128),
# rounded down to a multiple of every tile's BK (64).
MAX_K_PER_SPLIT = 131008
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535
MAX_SPLITS = 256
MIN_K_TILES_PER_SPLIT = 8  # below this a split's pipeline never fills
WORKSPACE_LIMIT_BYTES = 1 << 30
SMEM_LIMIT_SM90 = 227 * 1024  # opt-in dynamic shared memory per block (sm_80: 163 KiB, sm_86/89: 99 KiB)
EPI_I32, EPI_I64, EPI_F32, EPI_BF16 = 0, 1, 2, 3
EPILOGUES = {"int32": EPI_I32, "int64": EPI_I64, "float32": EPI_F32, "bfloat16": EPI_BF16}
ELEMENTWISE_THREADS = 256

# C++ tag type of each floating input dtype the quantize kernels read (see common.cuh)
CTYPES = {"float32": "float", "bfloat16": "bf16_t", "float16": "f16_t"}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b


# ----------------------------------------------------------------------------- GEMM tiles
@dataclass(frozen=True)
class Tile:
    """One instantiation of gemm_s8<BM, BN, BK, WARPS_M, WARPS_N, STAGES>."""

    bm: int
    bn: int
    bk: int
    warps_m: int
    warps_n: int
    stages: int

    @property
    def name(self) -> str:
        return f"{self.bm}x{self.bn}"

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory: the larger of the cp.async ring, STAGES x (BM + BN) rows of BK + 16 bytes
        (padded pitch), and the epilogue's int32 output tile BM x (BN + 8), which reuses the same space."""
        return max(self.stages * (self.bm + self.bn) * (self.bk + 16), self.bm * (self.bn + 8) * 4)

    @property
    def expression(self) -> str:
        return f"gemm_s8<{self.bm},{self.bn},{self.bk},{self.warps_m},{self.warps_n},{self.stages}>"

    def check(self) -> None:
        """The static_asserts of gemm_s8.cu, in Python (so a bad tile fails before NVRTC runs)."""
        wm, wn = self.bm // self.warps_m, self.bn // self.warps_n
        chunks = self.bk // 16
        assert self.bm % self.warps_m == 0 and self.bn % self.warps_n == 0
        assert wm % 16 == 0 and wn % 16 == 0, "warp tile must be a multiple of 16x16"
        assert self.bk % 32 == 0 and self.bk <= MAX_K_PER_SPLIT
        assert MAX_K_PER_SPLIT % self.bk == 0
        assert (self.bm * chunks) % self.threads == 0 and (self.bn * chunks) % self.threads == 0
        assert self.stages >= 2
        assert self.smem_bytes <= SMEM_LIMIT_SM90, "over the per-block shared memory of sm_90"


# largest first; plan_gemm picks among them
TILES = (
    Tile(128, 256, 64, 2, 4, 3),  # big square GEMMs: 8 warps of 64x64
    Tile(128, 128, 64, 2, 4, 4),
    Tile(128, 64, 64, 2, 2, 4),   # conv forward / dX: huge M, 64-channel N
    Tile(64, 64, 64, 2, 2, 4),    # small M x N (weight gradients, linear layers), split-K
)
TILE_BY_NAME = {t.name: t for t in TILES}
MAX_TILE_WASTE = 1.3  # padded tile area / useful area above which a smaller tile is preferred


@dataclass(frozen=True)
class GemmPlan:
    """How one batched GEMM [G, M, Kp] x [G, N, Kp]^T is launched.

    Split s covers k in [s * k_per_split, min(Kp, (s + 1) * k_per_split)). With splits > 1 the GEMM
    writes int32 partials to a workspace [splits, G, M, N] and splitk_reduce sums them in int64.
    """

    G: int
    M: int
    N: int
    K: int
    Kp: int
    tile: Tile
    splits: int
    k_per_split: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return (ceil_div(self.M, self.tile.bm), ceil_div(self.N, self.tile.bn), self.G * self.splits)

    @property
    def ctas(self) -> int:
        return math.prod(self.grid)

    @property
    def acc_dtype(self) -> str:
        """int32 holds the sum exactly when the whole reduction fits one int32 k-range, else int64."""
        return "int32" if self.Kp <= MAX_K_PER_SPLIT else "int64"

    @property
    def workspace_elems(self) -> int:
        return self.splits * self.G * self.M * self.N if self.splits > 1 else 0

    def k_ranges(self) -> list[tuple[int, int]]:
        return [(s * self.k_per_split, min(self.Kp, (s + 1) * self.k_per_split)) for s in range(self.splits)]


def pad_k(K: int) -> int:
    """K-major operands are padded with zeros to a multiple of 16 bytes (at least one chunk)."""
    return max(K_ALIGN, round_up(K, K_ALIGN))


def tile_waste(tile: Tile, M: int, N: int) -> float:
    return (round_up(M, tile.bm) * round_up(N, tile.bn)) / (M * N)


def choose_tile(G: int, M: int, N: int, sm_count: int, smem_limit: int = SMEM_LIMIT_SM90) -> Tile:
    """The largest tile that wastes little on the edges and still gives every SM a CTA; if none gives a
    full wave, the largest low-waste tile (split-K then supplies the parallelism). Tiles needing more
    shared memory than the device grants one block are skipped."""
    usable = [t for t in TILES if t.smem_bytes <= smem_limit]
    if not usable:
        raise ValueError(f"no GEMM tile fits in {smem_limit} bytes of shared memory per block")
    fitting = [t for t in usable if tile_waste(t, M, N) <= MAX_TILE_WASTE] or [usable[-1]]
    for t in fitting:
        if G * ceil_div(M, t.bm) * ceil_div(N, t.bn) >= sm_count:
            return t
    return fitting[0]


def choose_splits(G: int, M: int, N: int, Kp: int, tile: Tile, sm_count: int) -> int:
    """Enough splits to cover ~2 waves of CTAs, never fewer than exactness needs, never so many that a
    split has fewer than MIN_K_TILES_PER_SPLIT k-tiles (unless exactness forces it)."""
    k_tiles = ceil_div(Kp, tile.bk)
    need = ceil_div(Kp, MAX_K_PER_SPLIT)  # int32 exactness
    ctas = G * ceil_div(M, tile.bm) * ceil_div(N, tile.bn)
    want = ceil_div(2 * sm_count, ctas) if ctas < sm_count else 1
    want = min(want, max(1, k_tiles // MIN_K_TILES_PER_SPLIT), MAX_SPLITS)
    limit_ws = max(1, WORKSPACE_LIMIT_BYTES // max(1, 4 * G * M * N))
    limit_grid = max(1, MAX_GRID_YZ // G)
    return max(need, min(want, limit_ws, limit_grid))


def plan_gemm(G: int, M: int, N: int, K: int, sm_count: int = 132, tile: Tile | str | None = None,
              splits: int | None = None, smem_limit: int = SMEM_LIMIT_SM90) -> GemmPlan:
    """Plan a [G, M, K] x [G, K, N] INT8 GEMM. `tile`/`splits` force a choice (tests, benchmarks)."""
    if min(G, M, N, K) < 1:
        raise ValueError(f"empty GEMM G={G} M={M} N={N} K={K}")
    Kp = pad_k(K)
    if isinstance(tile, str):
        tile = TILE_BY_NAME[tile]
    tile = tile or choose_tile(G, M, N, sm_count, smem_limit)
    k_tiles = ceil_div(Kp, tile.bk)
    s = splits or choose_splits(G, M, N, Kp, tile, sm_count)
    s = max(1, min(s, k_tiles))
    k_per_split = ceil_div(k_tiles, s) * tile.bk
    while k_per_split > MAX_K_PER_SPLIT:  # forced splits too few for exactness: add more
        s += 1
        k_per_split = ceil_div(k_tiles, s) * tile.bk
    s = ceil_div(Kp, k_per_split)  # no empty splits
    plan = GemmPlan(G, M, N, K, Kp, tile, s, k_per_split)
    gx, gy, gz = plan.grid
    if gx > MAX_GRID_X or gy > MAX_GRID_YZ or gz > MAX_GRID_YZ:
        raise ValueError(f"GEMM G={G} M={M} N={N} K={K} needs grid {plan.grid}, over the CUDA limits "
                         f"({MAX_GRID_X}, {MAX_GRID_YZ}, {MAX_GRID_YZ})")
    return plan


def plan_reduce(G: int, M: int, N: int, sm_count: int = 132) -> int:
    """Blocks of 256 threads for splitk_reduce (grid-stride)."""
    return max(1, min(ceil_div(G * M * N, ELEMENTWISE_THREADS), sm_count * 16))


def int_mm_padding(M: int, K: int, N: int) -> tuple[int, int, int]:
    """Padded (M, K, N) that `torch._int_mm` on CUDA accepts: M > 16, K and N multiples of 8 (and K >= 16
    for the cuBLASLt heuristics of older releases). Zero rows/columns do not change the product."""
    return max(32, round_up(M, 8)), max(16, round_up(K, 8)), max(8, round_up(N, 8))


def int_mm_k_chunks(K: int) -> list[tuple[int, int]]:
    """k-ranges for torch._int_mm (int32 accumulation): each <= MAX_K_PER_SPLIT, so each is exact and
    the chunks add up exactly in int64."""
    return [(k0, min(K, k0 + MAX_K_PER_SPLIT)) for k0 in range(0, K, MAX_K_PER_SPLIT)]


# ----------------------------------------------------------------------------- elementwise / reductions
def plan_elementwise(items: int, sm_count: int = 132) -> int:
    """Grid size (blocks of 256) for a grid-stride kernel over `items` work items."""
    return max(1, min(ceil_div(items, ELEMENTWISE_THREADS), sm_count * 32))


def vec_width(inner: int, *aligned: bool) -> int:
    """4 elements per thread when the contiguous run length allows it and the pointers are aligned."""
    return 4 if inner % 4 == 0 and all(aligned) else 1


def plan_absmax_runs(A: int, C: int, B: int, vec: int, sm_count: int = 132) -> int:
    """blocks_per_c for absmax_runs: enough blocks in all to fill the GPU a few times over, each with
    at least 8 vectors per thread."""
    per_c = A * (B // vec)
    want = max(1, (sm_count * 8) // C)
    return max(1, min(want, ceil_div(per_c, ELEMENTWISE_THREADS * 8), MAX_GRID_X // C))


def plan_absmax_cols(R: int, C: int, vec: int, sm_count: int = 132) -> tuple[int, int]:
    gx = ceil_div(C, 32 * vec)
    gy = max(1, min(ceil_div(R, 8 * 8), max(1, (sm_count * 8) // gx), MAX_GRID_YZ))
    return gx, gy


def acb_view(shape: tuple, axis: int | None) -> tuple[int, int, int]:
    """(A, C, B) of a contiguous tensor of `shape` reduced/quantized per index of `axis` (None: per tensor)."""
    n = math.prod(shape)
    if axis is None:
        return 1, 1, n
    axis = axis % len(shape)
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


# ----------------------------------------------------------------------------- convolution lowering
@dataclass(frozen=True)
class ConvGeom:
    """A conv site in the 3-D form im2col.cu takes (1d/2d get unit leading spatial dims)."""

    N: int
    C: int
    D: int
    H: int
    W: int
    G: int
    OD: int
    OH: int
    OW: int
    KD: int
    KH: int
    KW: int
    SD: int
    SH: int
    SW: int
    PD: int
    PH: int
    PW: int
    DD: int
    DH: int
    DW: int

    @property
    def M(self) -> int:
        return self.N * self.OD * self.OH * self.OW

    @property
    def K(self) -> int:
        return (self.C // self.G) * self.KD * self.KH * self.KW

    def args(self) -> tuple[int, ...]:
        return (self.N, self.C, self.D, self.H, self.W, self.G, self.OD, self.OH, self.OW, self.KD, self.KH, self.KW,
                self.SD, self.SH, self.SW, self.PD, self.PH, self.PW, self.DD, self.DH, self.DW)


def conv_geom(spec, in_shape: tuple) -> ConvGeom:
    """GemmSpec (int8fx.kernels.im2col) + input shape [N, C, *spatial] -> ConvGeom. The kernels pad
    symmetrically-or-not by reading zeros outside the input, so only the leading pad matters here; the
    output size (which the trailing pad affects) comes from spec.out_size."""
    if spec.dims == 0:
        raise ValueError("linear layers need no im2col")
    nd = spec.dims
    out = spec.out_size(tuple(in_shape[2:]))
    lead = 3 - nd

    def three(vals, fill):
        return (fill,) * lead + tuple(vals)

    D, H, W = three(in_shape[2:], 1)
    OD, OH, OW = three(out, 1)
    KD, KH, KW = three(spec.kernel, 1)
    SD, SH, SW = three(spec.stride, 1)
    PD, PH, PW = three((lo for lo, _ in spec.padding), 0)
    DD, DH, DW = three(spec.dilation, 1)
    if min(OD, OH, OW) < 1:
        raise ValueError(f"conv output would be empty for input {tuple(in_shape)}")
    return ConvGeom(in_shape[0], in_shape[1], D, H, W, spec.groups, OD, OH, OW, KD, KH, KW, SD, SH, SW, PD, PH, PW,
                    DD, DH, DW)


def im2col_source_index(p: ConvGeom) -> torch.Tensor:
    """[G, M, K] int64 flat index into x[N, C, D, H, W] that im2col_s8 reads for (g, m, k), -1 for a
    zero (padding). The same formula as im2col.cu, vectorised: tests compare it with to_cols."""
    g = torch.arange(p.G).view(-1, 1, 1)
    m = torch.arange(p.M).view(1, -1, 1)
    k = torch.arange(p.K).view(1, 1, -1)
    ow, r = m % p.OW, m // p.OW
    oh, r = r % p.OH, r // p.OH
    od, n = r % p.OD, r // p.OD
    kw, q = k % p.KW, k // p.KW
    kh, q = q % p.KH, q // p.KH
    kd, cg = q % p.KD, q // p.KD
    c = g * (p.C // p.G) + cg
    i_d = od * p.SD - p.PD + kd * p.DD
    i_h = oh * p.SH - p.PH + kh * p.DH
    i_w = ow * p.SW - p.PW + kw * p.DW
    inside = (i_d >= 0) & (i_d < p.D) & (i_h >= 0) & (i_h < p.H) & (i_w >= 0) & (i_w < p.W)
    flat = (((n * p.C + c) * p.D + i_d) * p.H + i_h) * p.W + i_w
    return torch.where(inside, flat, torch.full_like(flat, -1))


def col2im_gather(cols: torch.Tensor, p: ConvGeom) -> torch.Tensor:
    """What col2im_s32 computes, in the same gather form (each input element visits its kernel offsets and
    tests divisibility by the stride): cols [G, M, K] integer -> int64 [N, C, D, H, W]. Tests compare
    it with from_cols, which is written as a scatter, so the kernel's index arithmetic is checked."""
    n, c, d, h, w = torch.meshgrid(*(torch.arange(v) for v in (p.N, p.C, p.D, p.H, p.W)), indexing="ij")
    g, cg = c // (p.C // p.G), c % (p.C // p.G)
    cols = cols.to(torch.int64)
    out = torch.zeros(n.shape, dtype=torch.int64)
    for kd in range(p.KD):
        for kh in range(p.KH):
            for kw in range(p.KW):
                td, th, tw = d + p.PD - kd * p.DD, h + p.PH - kh * p.DH, w + p.PW - kw * p.DW
                ok = (td >= 0) & (td % p.SD == 0) & (th >= 0) & (th % p.SH == 0) & (tw >= 0) & (tw % p.SW == 0)
                od, oh, ow = td // p.SD, th // p.SH, tw // p.SW
                ok &= (od < p.OD) & (oh < p.OH) & (ow < p.OW)
                m = ((n * p.OD + od) * p.OH + oh) * p.OW + ow
                k = ((cg * p.KD + kd) * p.KH + kh) * p.KW + kw
                vals = cols[g.clamp(max=p.G - 1), m.clamp(0, p.M - 1), k]
                out += torch.where(ok, vals, torch.zeros_like(vals))
    return out


def plan_im2col(p: ConvGeom, transposed: bool, sm_count: int = 132) -> tuple[int, int]:
    """(row pitch ld, blocks) of im2col_s8: ld = K (or M, transposed) padded to 16 bytes."""
    ld = pad_k(p.M if transposed else p.K)
    rows = p.K if transposed else p.M
    return ld, plan_elementwise(p.G * rows * (ld // 16), sm_count)


# ----------------------------------------------------------------------------- variants
def kernel_variants() -> dict[str, tuple[str, ...]]:
    """Every kernel instantiation any launcher in cupy_backend.py can request, per source file."""
    quant = tuple(f"{k}<{t},{v}>" for k in ("absmax_runs", "absmax_cols", "quantize_s8")
                  for t in CTYPES.values() for v in (1, 4))
    return {
        "gemm_s8.cu": tuple(t.expression for t in TILES) + ("splitk_reduce",),
        "quantize.cu": quant,
        "im2col.cu": ("im2col_s8<false>", "im2col_s8<true>", "col2im_s32"),
    }
