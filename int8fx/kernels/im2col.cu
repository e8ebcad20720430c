// Conv lowering on INT8 activations: im2col into K-major GEMM operands and the adjoint col2im, one
// code path for Conv1d/2d/3d (1d and 2d run as 3d with unit leading dims), any stride, zero padding,
// dilation and groups (depthwise included).
//
// Index convention (identical to int8fx.kernels.im2col.to_cols, which the tests hold it to):
//   x: [N, C, D, H, W] int8 contiguous, G groups, Cg = C / G
//   m = ((n*OD + od)*OH + oh)*OW + ow            (GEMM rows: batch x output positions)
//   k = ((cg*KD + kd)*KH + kh)*KW + kw           (GEMM reduction: in-channels/group x window)
//   source element: x[n, g*Cg + cg, od*SD - PD + kd*DD, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW], 0 outside.
// int8fx.kernels.geometry.im2col_source_index spells the same formula in Python; a CPU test checks it
// against to_cols, so what remains unverified without a GPU is only this transliteration.
#include "common.cuh"

struct ConvGeom {
  int N, C, D, H, W, G, OD, OH, OW, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW;
};

__device__ __forceinline__ signed char conv_src(const i8* __restrict__ x, const ConvGeom& p, int n, int c, int od,
                                                int oh, int ow, int kd, int kh, int kw) {
  const int id = od * p.SD - p.PD + kd * p.DD;
  const int ih = oh * p.SH - p.PH + kh * p.DH;
  const int iw = ow * p.SW - p.PW + kw * p.DW;
  if ((unsigned)id >= (unsigned)p.D || (unsigned)ih >= (unsigned)p.H || (unsigned)iw >= (unsigned)p.W) return 0;
  return x[(((i64)n * p.C + c) * p.D + id) * (i64)p.H * p.W + (i64)ih * p.W + iw];
}

// Non-transposed (TRANS = false): out[g][m][k] with row pitch ld (>= K, multiple of 16), k in [K, ld)
//   zero-filled: the forward operand Xcol, K padded for 16-byte cp.async.
// Transposed (TRANS = true): out[g][k][m] with row pitch ld (>= M, multiple of 16), m in [M, ld)
//   zero-filled: the weight-gradient operand Xcol^T, K-major in the reduction index m.
// Each thread writes 16 consecutive bytes of one row (one 16-byte store), walking the fast index with
// carries instead of dividing per element. grid-stride over G * rows * (ld / 16) items.
template <bool TRANS>
__global__ void __launch_bounds__(256)
im2col_s8(const i8* __restrict__ x, i8* __restrict__ out, int N, int C, int D, int H, int W, int G,
          int OD, int OH, int OW, int KD, int KH, int KW, int SD, int SH, int SW, int PD, int PH, int PW,
          int DD, int DH, int DW, i64 ld) {
  const ConvGeom p{N, C, D, H, W, G, OD, OH, OW, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW};
  const int Cg = C / G;
  const i64 M = (i64)N * OD * OH * OW;
  const i64 K = (i64)Cg * KD * KH * KW;
  const i64 rows = TRANS ? K : M;
  const i64 chunks = ld / 16;
  const i64 total = (i64)G * rows * chunks;
  for (i64 it = (i64)blockIdx.x * blockDim.x + threadIdx.x; it < total; it += (i64)gridDim.x * blockDim.x) {
    const i64 chunk = it % chunks;
    const i64 t = it / chunks;
    const i64 row = t % rows;
    const int g = (int)(t / rows);
    const i64 f0 = chunk * 16;  // first fast index (k if !TRANS, m if TRANS)
    // decompose the row index once and the first fast index once, then carry
    i64 mrow = TRANS ? f0 : row, krow = TRANS ? row : f0;
    int ow = (int)(mrow % OW); i64 r = mrow / OW;
    int oh = (int)(r % OH); r /= OH;
    int od = (int)(r % OD); int n = (int)(r / OD);
    int kw = (int)(krow % KW); i64 q = krow / KW;
    int kh = (int)(q % KH); q /= KH;
    int kd = (int)(q % KD); int cg = (int)(q / KD);
    unsigned w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < 16; ++e) {
      const bool in = TRANS ? (f0 + e < M) : (f0 + e < K);
      if (in) {
        const signed char v = conv_src(x, p, n, g * Cg + cg, od, oh, ow, kd, kh, kw);
        w[e >> 2] |= (unsigned)(unsigned char)v << ((e & 3) * 8);
      }
      if (TRANS) {  // advance m by one: ow -> oh -> od -> n
        if (++ow == OW) { ow = 0; if (++oh == OH) { oh = 0; if (++od == OD) { od = 0; ++n; } } }
      } else {      // advance k by one: kw -> kh -> kd -> cg
        if (++kw == KW) { kw = 0; if (++kh == KH) { kh = 0; if (++kd == KD) { kd = 0; ++cg; } } }
      }
    }
    *reinterpret_cast<uint4*>(out + ((i64)g * rows + row) * ld + f0) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Adjoint of im2col (col2im) fused with dequantization, as a gather: each input element sums, in int64,
// the accumulators of every (output position, kernel offset) pair that read it, then writes
// epilogue(sum) = (float)sum * scale[0] (fp32 or bf16, epi = EPI_F32/EPI_BF16) or the int64 sum
// (EPI_I64). No atomics, so the result is deterministic, and int64 keeps it exact for any size.
// cols: int32 [G][M][ld] (the dXcol GEMM output, row pitch ld >= K); dx: [N, C, D, H, W].
__global__ void __launch_bounds__(256)
col2im_s32(const int* __restrict__ cols, i64 ld, void* __restrict__ dx, const float* __restrict__ scale, int epi,
           int N, int C, int D, int H, int W, int G, int OD, int OH, int OW, int KD, int KH, int KW,
           int SD, int SH, int SW, int PD, int PH, int PW, int DD, int DH, int DW) {
  const int Cg = C / G;
  const i64 M = (i64)N * OD * OH * OW;
  const i64 total = (i64)N * C * D * H * W;
  for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
    const int iw = (int)(idx % W);
    i64 r = idx / W;
    const int ih = (int)(r % H); r /= H;
    const int id = (int)(r % D); r /= D;
    const int c = (int)(r % C);
    const int n = (int)(r / C);
    const int g = c / Cg, cg = c % Cg;
    const int* __restrict__ base = cols + (i64)g * M * ld;
    i64 sum = 0;
    for (int kd = 0; kd < KD; ++kd) {
      const int td = id + PD - kd * DD;
      if (td < 0 || td % SD) continue;
      const int od = td / SD;
      if (od >= OD) continue;
      for (int kh = 0; kh < KH; ++kh) {
        const int th = ih + PH - kh * DH;
        if (th < 0 || th % SH) continue;
        const int oh = th / SH;
        if (oh >= OH) continue;
        for (int kw = 0; kw < KW; ++kw) {
          const int tw = iw + PW - kw * DW;
          if (tw < 0 || tw % SW) continue;
          const int ow = tw / SW;
          if (ow >= OW) continue;
          const i64 m = (((i64)n * OD + od) * OH + oh) * OW + ow;
          const i64 k = (((i64)cg * KD + kd) * KH + kh) * KW + kw;
          sum += base[m * ld + k];
        }
      }
    }
    store_acc(epi, dx, idx, sum, nullptr, nullptr, scale, 0, 0);
  }
}
