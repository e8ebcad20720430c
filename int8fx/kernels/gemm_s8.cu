// INT8 x INT8 -> exact integer GEMM on the tensor cores (sm_80+), batched over groups, with split-K.
//
//   C[g, m, n] = epilogue( sum_k A[g, m, k] * B[g, n, k] )
//
// Both operands are K-major ("row.col" for mma): A[g] is M x K with row stride lda, B[g] is N x K with
// row stride ldb, K contiguous; K is padded by the launcher to a multiple of 16 (one cp.async chunk)
// with zeros, and every row start is 16-byte aligned. Rows past M or N and chunks past K are
// zero-filled in shared memory, so any M, N and any K that is a multiple of 16 is exact.
//
// One CTA computes a BM x BN tile over the k-range of its split:
//   split s of S covers [s * k_per_split, min(K, (s+1) * k_per_split)), k_per_split a multiple of BK.
// The launcher (geometry.plan_gemm) keeps each k-range <= 131008, so the int32 accumulators cannot
// overflow even for -128 * -128 products; longer reductions are split and summed in int64 by
// splitk_reduce below. With S > 1 the GEMM writes raw int32 partials (EPI_I32) to a workspace
// [S][G][M][N] and splitk_reduce applies the real epilogue.
//
// Dynamic shared memory: max(STAGES * (BM + BN) * (BK + 16), BM * (BN + 8) * 4) bytes (pipeline ring,
// then the int32 output tile of the epilogue in the same space).
//
// Pipeline: STAGES-deep ring of shared-memory tiles filled with cp.async (16 B per thread per copy);
// fragments come from ldmatrix.x4 and feed mma.sync.m16n8k32.s8. Shared rows are padded from BK to
// BK + 16 bytes: with a 80-byte (5 x 16 B) row pitch, the 8 row addresses of one ldmatrix phase fall
// in 8 distinct 16-byte bank groups (5 is odd), so fragment loads are free of bank conflicts.
//
// Output addressing (lets the forward write NCHW directly, and split-K write its workspace):
//   off(g, s, m, n) = g*sCg + s*sCs + (m / P)*sCmo + (m % P)*sCmi + n*sCn
// e.g. row-major [M, ldc]: P = M, sCmi = ldc, sCn = 1; NCHW output of a conv with P output positions:
//   sCmo = O*P, sCmi = 1, sCn = P.
// Scales for EPI_F32/EPI_BF16: (float)acc * row_scale[g*M + m] * col_scale[g*N + n] * alpha[0], left to
// right, each factor optional (null).
#include "common.cuh"

// One operand tile (ROWS x 16*CH bytes, K-major) into shared memory with a row pitch of LDS bytes, in
// 16-byte cp.async chunks spread over THREADS threads; rows past `rows` and columns past k_end are
// zero-filled (src-size 0). A and B tiles differ only in these arguments.
template <int ROWS, int CH, int LDS, int THREADS>
__device__ __forceinline__ void load_tile(i8* dst, const i8* src, int first_row, int rows, i64 ld, int k0,
                                          int k_end, int tid) {
#pragma unroll
  for (int i = 0; i < ROWS * CH / THREADS; ++i) {
    const int idx = tid + i * THREADS;
    const int r = idx / CH, c = idx % CH;
    const int gr = first_row + r, gk = k0 + c * 16;
    const bool ok = gr < rows && gk < k_end;
    cp_async16(dst + r * LDS + c * 16, ok ? src + (i64)gr * ld + gk : src, ok ? 16 : 0);
  }
}

template <int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32)
gemm_s8(const i8* __restrict__ A, i64 sAg, i64 lda,
        const i8* __restrict__ B, i64 sBg, i64 ldb,
        void* __restrict__ C, i64 sCg, i64 sCs, i64 sCmo, i64 sCmi, i64 sCn, int P,
        const float* __restrict__ row_scale, const float* __restrict__ col_scale, const float* __restrict__ alpha,
        int M, int N, int K, int splits, int k_per_split, int epi) {
  constexpr int THREADS = WARPS_M * WARPS_N * 32;
  constexpr int WM = BM / WARPS_M;  // warp tile
  constexpr int WN = BN / WARPS_N;
  constexpr int MI = WM / 16;  // mma tiles per warp
  constexpr int NI = WN / 8;
  constexpr int LDS = BK + 16;  // padded shared row pitch in bytes (see header)
  constexpr int CH = BK / 16;   // 16-byte chunks per row
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must be a multiple of 16x16");
  static_assert(BK % 32 == 0, "BK must be a multiple of the mma K (32)");
  static_assert((BM * CH) % THREADS == 0 && (BN * CH) % THREADS == 0, "loader: whole chunks per thread");
  static_assert(STAGES >= 2, "need at least double buffering");

  extern __shared__ __align__(128) unsigned char smem[];
  i8* sA = reinterpret_cast<i8*>(smem);
  i8* sB = sA + STAGES * BM * LDS;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp / WARPS_N;
  const int wn = warp % WARPS_N;
  const int row0 = blockIdx.x * BM;
  const int col0 = blockIdx.y * BN;
  const int g = blockIdx.z / splits;
  const int s = blockIdx.z % splits;
  const int k_begin = s * k_per_split;
  const int k_end = min(K, k_begin + k_per_split);
  const int nk = k_end > k_begin ? (k_end - k_begin + BK - 1) / BK : 0;
  const i8* Ag = A + g * sAg;
  const i8* Bg = B + g * sBg;

  auto load_stage = [&](int stage, int kt) {
    const int k0 = k_begin + kt * BK;
    load_tile<BM, CH, LDS, THREADS>(sA + stage * BM * LDS, Ag, row0, M, lda, k0, k_end, tid);
    load_tile<BN, CH, LDS, THREADS>(sB + stage * BN * LDS, Bg, col0, N, ldb, k0, k_end, tid);
  };

  int acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0;

  // prologue: STAGES-1 tiles in flight (empty groups keep the wait_group arithmetic uniform)
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < nk) load_stage(st, st);
    cp_async_commit();
  }

  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<STAGES - 2>();  // tile kt has landed (for this thread) ...
    __syncthreads();              // ... and for every thread; stage (kt-1) % STAGES is free again
    {
      const int pf = kt + STAGES - 1;
      if (pf < nk) load_stage(pf % STAGES, pf);
      cp_async_commit();
    }
    const i8* tA = sA + (kt % STAGES) * BM * LDS;
    const i8* tB = sB + (kt % STAGES) * BN * LDS;
#pragma unroll
    for (int kk = 0; kk < BK / 32; ++kk) {
      unsigned a[MI][4];
      unsigned b[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        // matrices: (rows 0-7, k 0-15) (rows 8-15, k 0-15) (rows 0-7, k 16-31) (rows 8-15, k 16-31)
        const i8* p = tA + (wm * WM + mi * 16 + (lane & 15)) * LDS + kk * 32 + (lane >> 4) * 16;
        ldmatrix_x4(a[mi][0], a[mi][1], a[mi][2], a[mi][3], smem_u32(p));
      }
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        // matrices: (n 0-7, k 0-15) (n 0-7, k 16-31) (n 8-15, k 0-15) (n 8-15, k 16-31)
        const i8* p = tB + (wn * WN + nj * 16 + ((lane >> 4) << 3) + (lane & 7)) * LDS + kk * 32 + ((lane >> 3) & 1) * 16;
        ldmatrix_x4(b[2 * nj][0], b[2 * nj][1], b[2 * nj + 1][0], b[2 * nj + 1][1], smem_u32(p));
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_s8_16832(acc[mi][ni], a[mi], b[ni]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the pipeline buffers: reuse them for the output tile

  // Epilogue, staged through shared memory: fragments -> Cs[BM][BN + 8] int32 (the +8 word pad makes
  // each half-warp's 8-byte fragment writes hit 32 distinct banks), then all threads walk the tile
  // with consecutive threads on consecutive output addresses: n fastest for row-major outputs, m
  // fastest when the output is m-contiguous (NCHW). One generic store loop instead of an unrolled
  // store per fragment keeps the code (and compile time) small and the global stores coalesced.
  constexpr int LDC = BN + 8;
  int* Cs = reinterpret_cast<int*>(smem);
  {
    const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = wm * WM + mi * 16 + gq + h * 8;
          const int c = wn * WN + ni * 8 + tq * 2;
          *reinterpret_cast<int2*>(Cs + r * LDC + c) = make_int2(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
        }
  }
  __syncthreads();
  const bool m_fast = sCmi == 1 && sCn != 1;
  const i64 base = g * sCg + s * sCs;
  for (int idx = tid; idx < BM * BN; idx += THREADS) {
    const int r = m_fast ? idx % BM : idx / BN;
    const int c = m_fast ? idx / BM : idx % BN;
    const int m = row0 + r, n = col0 + c;
    if (m < M && n < N) {
      store_acc(epi, C, base + (i64)(m / P) * sCmo + (i64)(m % P) * sCmi + n * sCn, (i64)Cs[r * LDC + c],
                row_scale, col_scale, alpha, (i64)g * M + m, (i64)g * N + n);
    }
  }
}

// Sum the S int32 partials of a split-K GEMM in int64 (exact for any K) and apply the epilogue.
// ws: [S][G][M][N] contiguous (split stride = G*M*N). One thread per output element, grid-stride.
__global__ void __launch_bounds__(256)
splitk_reduce(const int* __restrict__ ws, int splits, int G, int M, int N,
              void* __restrict__ C, i64 sCg, i64 sCmo, i64 sCmi, i64 sCn, int P,
              const float* __restrict__ row_scale, const float* __restrict__ col_scale, const float* __restrict__ alpha,
              int epi) {
  const i64 total = (i64)G * M * N;
  for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
    const int n = (int)(idx % N);
    const i64 t = idx / N;
    const int m = (int)(t % M);
    const int g = (int)(t / M);
    i64 sum = 0;
    for (int s = 0; s < splits; ++s) sum += ws[s * total + idx];
    store_acc(epi, C, g * sCg + (i64)(m / P) * sCmo + (i64)(m % P) * sCmi + n * sCn, sum, row_scale, col_scale,
              alpha, (i64)g * M + m, (i64)g * N + n);
  }
}
