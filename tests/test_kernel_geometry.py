"""Launch geometry of the CUDA kernels, checked on the CPU against the shapes they must cover.

What is checked here without a GPU:
  * plan_gemm: padding, split-K ranges (cover K exactly, int32-safe), grids inside the CUDA limits,
    tile choice and split counts that fill the GPU for ResNet-50 shapes, odd/tiny/huge shapes;
  * an emulation of one gemm_s8 CTA written from the PTX ISA's definitions of cp.async (zero-fill),
    ldmatrix.x4 and the mma.m16n8k32 .s8 fragments, using the kernel's own index formulas (loader,
    ldmatrix lane addresses, stage ring, epilogue staging, output addressing): it must reproduce the
    exact integer product, so an index slip in those formulas fails here;
  * the im2col/col2im index arithmetic of im2col.cu (spelled in geometry.py) against to_cols/from_cols.
What is not checked here: that the CUDA C++ says the same as these Python formulas (the cuda tests).
"""
import numpy as np
import pytest
import torch

from int8fx.kernels import geometry as geo
from int8fx.kernels.im2col import from_cols, to_cols
from int8fx.nn.modules import make_spec

H100_SMS = 132

# (Cin, Cout, kernel, stride, H) of every distinct ResNet-50 conv (torchvision layout, 224x224 input)
RESNET50_CONVS = [
    (3, 64, 7, 2, 224), (64, 64, 1, 1, 56), (64, 64, 3, 1, 56), (64, 256, 1, 1, 56), (256, 64, 1, 1, 56),
    (256, 128, 1, 1, 56), (128, 128, 3, 2, 56), (128, 512, 1, 1, 28), (256, 512, 1, 2, 56), (512, 128, 1, 1, 28),
    (128, 128, 3, 1, 28), (512, 256, 1, 1, 28), (256, 256, 3, 2, 28), (256, 1024, 1, 1, 14), (512, 1024, 1, 2, 28),
    (1024, 256, 1, 1, 14), (256, 256, 3, 1, 14), (1024, 512, 1, 1, 14), (512, 512, 3, 2, 14), (512, 2048, 1, 1, 7),
    (1024, 2048, 1, 2, 14), (2048, 512, 1, 1, 7), (512, 512, 3, 1, 7),
]


def _resnet50_gemms(batch):
    """(name, G, M, N, K) of the forward, input-gradient and weight-gradient GEMM of every conv + the fc."""
    out = []
    for cin, cout, k, s, h in RESNET50_CONVS:
        ho = (h + 2 * (k // 2) - k) // s + 1
        m, kk = batch * ho * ho, cin * k * k
        out += [("fwd", 1, m, cout, kk), ("dx", 1, m, kk, cout), ("dw", 1, cout, kk, m)]
    out += [("fwd", 1, batch, 1000, 2048), ("dx", 1, batch, 2048, 1000), ("dw", 1, 1000, 2048, batch)]
    return out


def _check_plan(plan, G, M, N, K):
    t = plan.tile
    assert plan.Kp % geo.K_ALIGN == 0 and K <= plan.Kp < K + geo.K_ALIGN
    ranges = plan.k_ranges()
    assert ranges[0][0] == 0 and ranges[-1][1] == plan.Kp, "splits must cover the padded K exactly"
    assert all(a1 == b0 for (_, a1), (b0, _) in zip(ranges, ranges[1:])), "splits must be contiguous"
    assert all(k1 > k0 for k0, k1 in ranges), "no empty split"
    assert all(k1 - k0 <= geo.MAX_K_PER_SPLIT for k0, k1 in ranges), "int32 accumulators could overflow"
    assert plan.k_per_split % t.bk == 0
    gx, gy, gz = plan.grid
    assert (gx - 1) * t.bm < M <= gx * t.bm and (gy - 1) * t.bn < N <= gy * t.bn
    assert gz == G * plan.splits
    assert gx <= geo.MAX_GRID_X and gy <= geo.MAX_GRID_YZ and gz <= geo.MAX_GRID_YZ
    assert t.smem_bytes <= geo.SMEM_LIMIT_SM90
    assert 4 * plan.workspace_elems <= geo.WORKSPACE_LIMIT_BYTES
    assert plan.acc_dtype == ("int64" if plan.Kp > geo.MAX_K_PER_SPLIT else "int32")


def test_int32_bound_is_tight_and_tile_aligned():
    assert geo.MAX_K_PER_SPLIT * 128 * 128 < 2**31 <= (geo.MAX_K_PER_SPLIT + 64) * 128 * 128
    for t in geo.TILES:
        t.check()


@pytest.mark.parametrize("batch", [1, 32, 256])
def test_resnet50_plans(batch):
    for name, G, M, N, K in _resnet50_gemms(batch):
        plan = geo.plan_gemm(G, M, N, K, H100_SMS)
        _check_plan(plan, G, M, N, K)
        if name == "dw" and batch == 256:
            # the long reduction over batch x spatial must be split until the GPU is busy
            assert plan.ctas >= H100_SMS, (M, N, K, plan)


def test_resnet50_layer1_dw_is_split_and_forward_is_not():
    """The shape of the measured 2.4 TOP/s _int_mm: dW of layer1's 3x3 conv at batch 256."""
    dw = geo.plan_gemm(1, 64, 576, 256 * 56 * 56, H100_SMS)
    assert dw.tile.name == "64x64" and dw.splits >= 16 and dw.ctas >= 2 * H100_SMS - 64
    fwd = geo.plan_gemm(1, 256 * 56 * 56, 64, 576, H100_SMS)
    assert fwd.splits == 1 and fwd.tile.bn == 64 and fwd.ctas >= H100_SMS
    big = geo.plan_gemm(1, 8192, 8192, 8192, H100_SMS)
    assert big.tile.name == "128x256" and big.splits == 1


@pytest.mark.parametrize("G,M,N,K", [
    (1, 1, 1, 1), (1, 1, 1000, 2048), (1, 7, 3, 31), (1, 17, 9, 33), (3, 33, 65, 147), (2, 1000, 1, 4608),
    (32, 50, 4, 72), (512, 12544, 1, 9), (2048, 49, 1, 27), (1, 64, 64, 131008), (1, 64, 64, 131009),
    (1, 3, 5, 3_211_264), (1, 51_380_224, 64, 576), (1, 64, 576, 51_380_224), (65535, 1, 1, 1),
])
def test_odd_tiny_and_huge_shapes(G, M, N, K):
    plan = geo.plan_gemm(G, M, N, K, H100_SMS)
    _check_plan(plan, G, M, N, K)


def test_forced_splits_are_raised_to_exactness():
    plan = geo.plan_gemm(1, 16, 16, 1_000_000, H100_SMS, tile="64x64", splits=1)
    _check_plan(plan, 1, 16, 16, 1_000_000)
    assert plan.splits >= 8 and plan.acc_dtype == "int64"


def test_grid_limits_raise():
    with pytest.raises(ValueError, match="CUDA limits"):
        geo.plan_gemm(70000, 16, 16, 16, H100_SMS)
    with pytest.raises(ValueError, match="empty"):
        geo.plan_gemm(1, 0, 16, 16)


def test_smem_limit_skips_big_tiles():
    """On a 99 KiB-per-block GPU (sm_86/89) the 128x256 tile (132 KiB) must never be chosen."""
    plan = geo.plan_gemm(1, 8192, 8192, 8192, 84, smem_limit=99 * 1024)
    assert plan.tile.smem_bytes <= 99 * 1024


def test_bad_tile_is_rejected():
    with pytest.raises(AssertionError):
        geo.Tile(64, 48, 64, 2, 2, 4).check()  # warp tile 32x24: not a whole number of 16-wide B loads
    with pytest.raises(AssertionError):
        geo.Tile(64, 64, 64, 4, 4, 4).check()  # 512 threads, 256 chunks per operand: idle loader threads


def test_int_mm_padding_and_chunks():
    for M, K, N in [(1, 1, 1), (16, 8, 8), (17, 9, 7), (802816, 576, 64), (64, 802816, 576)]:
        Mp, Kp, Np = geo.int_mm_padding(M, K, N)
        assert Mp > 16 and Mp >= M and Kp % 8 == 0 and Kp >= K and Np % 8 == 0 and Np >= N
    chunks = geo.int_mm_k_chunks(300_000)
    assert chunks[0][0] == 0 and chunks[-1][1] == 300_000 and all(b - a <= geo.MAX_K_PER_SPLIT for a, b in chunks)


def test_reduction_plans():
    assert geo.acb_view((8, 3, 5), 1) == (8, 3, 5)
    assert geo.acb_view((8, 3, 5), -1) == (24, 5, 1)
    assert geo.acb_view((8, 3, 5), None) == (1, 1, 120)
    bpc = geo.plan_absmax_runs(1, 1, 10**8, 4, H100_SMS)
    assert 1 < bpc <= H100_SMS * 8
    gx, gy = geo.plan_absmax_cols(802816, 64, 4, H100_SMS)
    assert gx == 1 and 1 < gy <= geo.MAX_GRID_YZ
    assert geo.vec_width(12, True) == 4 and geo.vec_width(12, False) == 1 and geo.vec_width(6, True) == 1


def test_variants_cover_every_tile_and_dtype():
    v = geo.kernel_variants()
    assert set(v["gemm_s8.cu"]) >= {t.expression for t in geo.TILES}
    for ctype in geo.CTYPES.values():
        for k in ("absmax_runs", "absmax_cols", "quantize_s8"):
            assert f"{k}<{ctype},1>" in v["quantize.cu"] and f"{k}<{ctype},4>" in v["quantize.cu"]


# ----------------------------------------------------------------------------- CTA emulation
def _ldmatrix_x4(smem: np.ndarray, addr: np.ndarray) -> np.ndarray:
    """PTX ldmatrix.sync.aligned.m8n8.x4.b16: lanes 8q..8q+7 supply the row addresses of matrix q;
    lane T receives, in register q, the 4 bytes at (row T // 4 of matrix q) + 4 * (T % 4)."""
    T = np.arange(32)
    rows = addr[8 * np.arange(4)[:, None] + T[None, :] // 4]  # [4, 32]
    start = rows + 4 * (T % 4)[None, :]
    return smem[start[..., None] + np.arange(4)]  # [4 regs, 32 lanes, 4 bytes]


def _mma_16832(acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """PTX mma.m16n8k32.row.col.s32.s8.s8.s32 fragments (g = lane >> 2, t = lane & 3):
    a0: A[g, 4t..4t+3], a1: A[g+8, 4t..], a2: A[g, 16+4t..], a3: A[g+8, 16+4t..];
    b0: B[k=4t..4t+3, n=g], b1: B[k=16+4t.., n=g]; c0,c1: D[g, 2t..2t+1], c2,c3: D[g+8, 2t..2t+1].
    a [4, 32, 4], b [2, 32, 4] int8 bytes; acc [32, 4] int64, updated in place."""
    T = np.arange(32)
    g, t = T >> 2, T & 3
    A = np.zeros((16, 32), np.int64)
    B = np.zeros((32, 8), np.int64)
    j = np.arange(4)
    for reg, (dr, dk) in enumerate(((0, 0), (8, 0), (0, 16), (8, 16))):
        A[(g + dr)[:, None], (dk + 4 * t)[:, None] + j] = a[reg]
    for reg, dk in enumerate((0, 16)):
        B[(dk + 4 * t)[:, None] + j, g[:, None]] = b[reg]
    D = A @ B
    acc += np.stack([D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]], axis=1)


def _emulate_cta(tile, A, Bt, M, N, K, g, s, bx, by, splits, k_per_split, out, addr, rng):
    """One CTA of gemm_s8 (epi = raw int32), with gemm_s8.cu's index formulas. The smem buffers start
    filled with garbage so that a missed zero-fill shows."""
    bm, bn, bk, wmn, wnn, stages = tile.bm, tile.bn, tile.bk, tile.warps_m, tile.warps_n, tile.stages
    THREADS, LDS, CH = tile.threads, bk + 16, bk // 16
    WM, WN = bm // wmn, bn // wnn
    MI, NI = WM // 16, WN // 8
    sA = rng.integers(-128, 128, (stages, bm * LDS)).astype(np.int8)
    sB = rng.integers(-128, 128, (stages, bn * LDS)).astype(np.int8)
    row0, col0 = bx * bm, by * bn
    k_begin = s * k_per_split
    k_end = min(K, k_begin + k_per_split)
    nk = -(-(k_end - k_begin) // bk) if k_end > k_begin else 0

    def load_stage(stage, kt):
        k0 = k_begin + kt * bk
        for dst, src, rows, lim, r0 in ((sA, A, bm, M, row0), (sB, Bt, bn, N, col0)):
            for tid in range(THREADS):
                for i in range(rows * CH // THREADS):
                    idx = tid + i * THREADS
                    r, c = idx // CH, idx % CH
                    gr, gk = r0 + r, k0 + c * 16
                    ok = gr < lim and gk < k_end
                    dst[stage, r * LDS + c * 16: r * LDS + c * 16 + 16] = src[g, gr, gk:gk + 16] if ok else 0

    acc = np.zeros((THREADS // 32, MI, NI, 32, 4), np.int64)
    for st in range(stages - 1):
        if st < nk:
            load_stage(st, st)
    lane = np.arange(32)
    for kt in range(nk):
        pf = kt + stages - 1
        if pf < nk:
            load_stage(pf % stages, pf)
        tA, tB = sA[kt % stages], sB[kt % stages]
        for warp in range(THREADS // 32):
            wm, wn = warp // wnn, warp % wnn
            for kk in range(bk // 32):
                a = [_ldmatrix_x4(tA, (wm * WM + mi * 16 + (lane & 15)) * LDS + kk * 32 + (lane >> 4) * 16)
                     for mi in range(MI)]
                b = [None] * NI
                for nj in range(NI // 2):
                    r = _ldmatrix_x4(tB, (wn * WN + nj * 16 + ((lane >> 4) << 3) + (lane & 7)) * LDS + kk * 32
                                     + ((lane >> 3) & 1) * 16)
                    b[2 * nj], b[2 * nj + 1] = r[0:2], r[2:4]
                for mi in range(MI):
                    for ni in range(NI):
                        _mma_16832(acc[warp, mi, ni], a[mi], b[ni])
    # epilogue: fragments -> Cs[bm][bn + 8] -> output loop
    LDC = bn + 8
    Cs = rng.integers(-2**31, 2**31, (bm * LDC,))
    gq, tq = lane >> 2, lane & 3
    for warp in range(THREADS // 32):
        wm, wn = warp // wnn, warp % wnn
        for mi in range(MI):
            for ni in range(NI):
                for h in range(2):
                    r = wm * WM + mi * 16 + gq + h * 8
                    c = wn * WN + ni * 8 + tq * 2
                    Cs[r * LDC + c] = acc[warp, mi, ni, :, 2 * h]
                    Cs[r * LDC + c + 1] = acc[warp, mi, ni, :, 2 * h + 1]
    sCg, sCs, sCmo, sCmi, sCn, P = addr
    m_fast = sCmi == 1 and sCn != 1
    base = g * sCg + s * sCs
    for idx in range(bm * bn):
        r, c = (idx % bm, idx // bm) if m_fast else (idx // bn, idx % bn)
        m, n = row0 + r, col0 + c
        if m < M and n < N:
            out[base + (m // P) * sCmo + (m % P) * sCmi + n * sCn] = Cs[r * LDC + c]


def _emulate_gemm(A, Bt, plan, addr, out_size, rng):
    out = np.full(out_size, -999_999_999, np.int64)  # poisoned: every element must be written
    G, M, _ = A.shape
    N = Bt.shape[1]
    gx, gy, gz = plan.grid
    for z in range(gz):
        g, s = z // plan.splits, z % plan.splits
        for bx in range(gx):
            for by in range(gy):
                _emulate_cta(plan.tile, A, Bt, M, N, plan.Kp, g, s, bx, by, plan.splits, plan.k_per_split, out,
                             addr, rng)
    return out


@pytest.mark.parametrize("tile,G,M,N,K,splits", [
    ("64x64", 1, 50, 40, 80, 1),      # ragged M and N, K = 80 (one full and one partial 64-byte k-tile)
    ("64x64", 2, 17, 9, 300, 3),      # groups, split-K with a short last split
    ("128x64", 1, 130, 70, 48, 1),    # two CTAs in m, two in n, K smaller than one k-tile
    ("128x128", 1, 40, 136, 144, 2),  # 8-warp tile
    ("128x256", 1, 20, 260, 64, 1),   # the big tile: 8 mma n-tiles per warp
])
def test_gemm_cta_emulation_is_exact(tile, G, M, N, K, splits):
    rng = np.random.default_rng(0)
    plan = geo.plan_gemm(G, M, N, K, H100_SMS, tile=tile, splits=splits)
    assert plan.splits == splits
    Kp = plan.Kp
    A = np.zeros((G, M, Kp), np.int8)
    Bt = np.zeros((G, N, Kp), np.int8)
    A[:, :, :K] = rng.integers(-128, 128, (G, M, K))
    Bt[:, :, :K] = rng.integers(-128, 128, (G, N, K))
    want = np.einsum("gmk,gnk->gmn", A.astype(np.int64), Bt.astype(np.int64))
    if splits == 1:
        got = _emulate_gemm(A, Bt, plan, (M * N, 0, 0, N, 1, M), G * M * N, rng).reshape(G, M, N)
    else:  # workspace [S][G][M][N] as the launcher addresses it, then splitk_reduce's sum
        ws = _emulate_gemm(A, Bt, plan, (M * N, G * M * N, 0, N, 1, M), splits * G * M * N, rng)
        got = ws.reshape(splits, G, M, N).sum(0)
    np.testing.assert_array_equal(got, want)


def test_gemm_emulation_writes_nchw_through_the_m_split():
    """The forward's output addressing: element (g, m, n) of a grouped conv GEMM lands at
    y[m // P, g * Og + n, m % P] of an NCHW output, every element written once."""
    rng = np.random.default_rng(1)
    G, Nb, P, Og, K = 2, 3, 10, 5, 32
    M = Nb * P
    plan = geo.plan_gemm(G, M, Og, K, H100_SMS, tile="64x64", splits=1)
    A = rng.integers(-128, 128, (G, M, plan.Kp)).astype(np.int8)
    Bt = rng.integers(-128, 128, (G, Og, plan.Kp)).astype(np.int8)
    O = G * Og
    got = _emulate_gemm(A, Bt, plan, (Og * P, 0, O * P, 1, P, P), Nb * O * P, rng).reshape(Nb, O, P)
    prod = np.einsum("gmk,gnk->gmn", A.astype(np.int64), Bt.astype(np.int64))  # [G, M, Og]
    want = prod.reshape(G, Nb, P, Og).transpose(1, 0, 3, 2).reshape(Nb, O, P)
    np.testing.assert_array_equal(got, want)


def test_emulation_catches_a_wrong_fragment_order():
    """Guard on the guard: swapping the two n-halves of the B ldmatrix.x4 (a plausible slip) must break
    the emulated product, so the emulation really depends on those formulas."""
    rng = np.random.default_rng(2)
    lane = np.arange(32)
    smem = rng.integers(-128, 128, (16 * 80,)).astype(np.int8)
    good = _ldmatrix_x4(smem, (((lane >> 4) << 3) + (lane & 7)) * 80 + ((lane >> 3) & 1) * 16)
    bad = _ldmatrix_x4(smem, (((lane >> 3) & 1) * 8 + (lane & 7)) * 80 + (lane >> 4) * 16)
    assert not np.array_equal(good, bad)


# ----------------------------------------------------------------------------- conv lowering
CONV_CASES = [
    # dims, in spatial, kernel, stride, padding, dilation, groups, Cin, Cout
    (1, (11,), (3,), (2,), 1, (1,), 1, 4, 6),
    (1, (9,), (4,), (1,), "same", (2,), 2, 4, 6),
    (2, (7, 6), (3, 3), (1, 1), 1, (1, 1), 1, 3, 5),
    (2, (8, 9), (3, 2), (2, 1), (1, 0), (2, 1), 3, 6, 9),
    (2, (6, 6), (3, 3), (1, 1), 1, (1, 1), 4, 4, 4),       # depthwise
    (2, (5, 5), (1, 1), (2, 2), 0, (1, 1), 1, 8, 4),       # strided 1x1 (to_cols' special path)
    (2, (4, 4), (2, 2), (1, 1), "same", (1, 1), 1, 2, 3),  # asymmetric 'same' padding
    (3, (4, 5, 3), (3, 2, 3), (1, 2, 1), 1, (1, 1, 1), 1, 2, 3),
    (3, (5, 4, 4), (2, 2, 2), (2, 1, 1), (0, 1, 1), (1, 2, 1), 2, 4, 2),
]


def _spec_and_input(case):
    dims, spatial, kernel, stride, padding, dilation, groups, cin, _ = case
    spec = make_spec(dims, kernel, stride, padding, dilation, groups)
    x = torch.randint(-127, 128, (2, cin) + spatial, dtype=torch.int8)
    return spec, x


@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_index_formula_matches_to_cols(case):
    spec, x = _spec_and_input(case)
    cols, out = to_cols(x, spec)
    p = geo.conv_geom(spec, tuple(x.shape))
    assert (p.OD, p.OH, p.OW)[3 - spec.dims:] == tuple(out)
    assert (p.M, p.K) == tuple(cols.shape[1:]) and p.G == cols.shape[0]
    idx = geo.im2col_source_index(p)
    flat = x.reshape(-1)
    got = torch.where(idx >= 0, flat[idx.clamp(min=0)], torch.zeros((), dtype=torch.int8))
    assert torch.equal(got, cols)


@pytest.mark.parametrize("case", CONV_CASES)
def test_col2im_gather_formula_matches_from_cols(case):
    spec, x = _spec_and_input(case)
    p = geo.conv_geom(spec, tuple(x.shape))
    cols = torch.randint(-10**6, 10**6, (p.G, p.M, p.K), dtype=torch.int64)
    want = from_cols(cols.double(), spec, tuple(x.shape)).to(torch.int64)  # fp64: exact here, and F.fold has no int64
    got = geo.col2im_gather(cols, p).reshape(want.shape)
    assert torch.equal(got, want)


def test_im2col_plans_pad_to_16():
    spec, x = _spec_and_input(CONV_CASES[3])
    p = geo.conv_geom(spec, tuple(x.shape))
    for transposed, n in ((False, p.K), (True, p.M)):
        ld, blocks = geo.plan_im2col(p, transposed, H100_SMS)
        assert ld % 16 == 0 and n <= ld < n + 16 and blocks >= 1


def test_conv_geom_rejects_linear():
    with pytest.raises(ValueError):
        geo.conv_geom(make_spec(0, (), 1, 0, 1, 1), (4, 8))


def test_all_resnet50_conv_geoms():
    for cin, cout, k, s, h in RESNET50_CONVS:
        spec = make_spec(2, (k, k), s, k // 2, 1, 1)
        p = geo.conv_geom(spec, (256, cin, h, h))
        assert p.K == cin * k * k and p.OH == (h + 2 * (k // 2) - k) // s + 1
        for transposed in (False, True):
            ld, blocks = geo.plan_im2col(p, transposed, H100_SMS)
            assert blocks <= geo.MAX_GRID_X and p.G * (p.K if transposed else p.M) * ld < 2**40

