// Fused quantization: absmax reductions and round-to-int8 (ALGORITHMS.md, "INT8 quantizer").
//
// Every tensor is seen as a contiguous [A, C, B] array with the channel index c in the middle:
//   per tensor            A = 1, C = 1, B = numel
//   per row of [R, L]     A = 1, C = R, B = L      (weights per output channel)
//   per column of [R, C]  A = R, C = C, B = 1      (gradient rows [M, O] per output channel)
//   NCHW per channel      A = N, C = C, B = H*W
// so one reduction kernel per access pattern and one quantize kernel cover every granularity.
//
// Semantics match int8fx.quant.core exactly (the CUDA tests compare bit for bit):
//   absmax: max |x * premul[c]| with NaN winning (a NaN/Inf gradient poisons its scale);
//   quantize: s = scale[c] (or scale[0]); q = 0 where !(s > 0) (zero or NaN scale), else
//             clamp(rint(x*premul[c] / s), -127, 127) with IEEE division and ties to even,
//             or floor(x/s + u) for stochastic rounding, u from a counter-based hash of (key, index);
//             a NaN quotient gives 0 (as PyTorch's float->int8 cast does).
// `premul` (optional) folds a per-channel factor in before both: the dX operand dY * s_W[o].
// `out` addressing is separate from the input's: q[a, c, b] goes to out[a*oA + c*oC + b*oB], so one
// pass can also transpose (e.g. NCHW dY -> [M, O] or [O, M] int8 GEMM operands).
#include "common.cuh"

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float* v) {
  if constexpr (VEC == 1) {
    v[0] = to_f32(p[0]);
  } else if constexpr (sizeof(T) == 4) {
    static_assert(VEC == 4, "fp32 vectors are 16 bytes");
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
  } else {
    static_assert(VEC == 4 && sizeof(T) == 2, "2-byte vectors are 8 bytes");
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    T e;
    e.x = (unsigned short)(q.x & 0xffffu); v[0] = to_f32(e);
    e.x = (unsigned short)(q.x >> 16);     v[1] = to_f32(e);
    e.x = (unsigned short)(q.y & 0xffffu); v[2] = to_f32(e);
    e.x = (unsigned short)(q.y >> 16);     v[3] = to_f32(e);
  }
}

__device__ __forceinline__ float block_nanmax(float m, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = nanmax(m, __shfl_xor_sync(0xffffffffu, m, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (lane == 0) red[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < nw ? red[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = nanmax(m, __shfl_xor_sync(0xffffffffu, m, o));
  }
  return m;
}

// Per-channel absmax where each channel is A runs of B contiguous elements.
// grid.x = C * blocks_per_c (blocks of one channel split its A*B elements); out[C] must start at 0.
// VEC > 1 needs B % VEC == 0 and a VEC*sizeof(T)-aligned base.
template <typename T, int VEC>
__global__ void __launch_bounds__(256)
absmax_runs(const T* __restrict__ x, i64 A, int C, i64 B, const float* __restrict__ premul,
            float* __restrict__ out, int blocks_per_c) {
  __shared__ float red[32];
  const int c = blockIdx.x / blocks_per_c;
  const int part = blockIdx.x % blocks_per_c;
  const float pm = premul ? premul[c] : 1.f;
  const i64 bv = B / VEC;
  const i64 nv = A * bv;
  float m = 0.f;
  for (i64 j = (i64)part * blockDim.x + threadIdx.x; j < nv; j += (i64)blocks_per_c * blockDim.x) {
    const i64 a = A == 1 ? 0 : j / bv;
    const i64 b = (j - a * bv) * VEC;
    float v[VEC];
    load_vec<T, VEC>(x + (a * C + c) * B + b, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) m = nanmax_abs(m, premul ? v[e] * pm : v[e]);
  }
  m = block_nanmax(m, red);
  if (threadIdx.x == 0) atomic_max_nonneg(out + c, m);
}

// Per-column absmax of a contiguous [R, C] array (channel innermost). Block (32, 8): threadIdx.x owns
// VEC adjacent columns (a warp reads 32*VEC contiguous elements), threadIdx.y strides over rows.
// grid = (ceil(C / (32*VEC)), row_blocks); out[C] must start at 0. VEC > 1 needs C % VEC == 0.
template <typename T, int VEC>
__global__ void __launch_bounds__(256)
absmax_cols(const T* __restrict__ x, i64 R, int C, const float* __restrict__ premul, float* __restrict__ out) {
  __shared__ float red[8][32 * VEC];
  const int c0 = (blockIdx.x * 32 + threadIdx.x) * VEC;
  float m[VEC];
  float pm[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    m[e] = 0.f;
    pm[e] = (premul && c0 + e < C) ? premul[c0 + e] : 1.f;
  }
  if (c0 < C) {
    for (i64 r = (i64)blockIdx.y * 8 + threadIdx.y; r < R; r += (i64)gridDim.y * 8) {
      float v[VEC];
      load_vec<T, VEC>(x + r * C + c0, v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) m[e] = nanmax_abs(m[e], premul ? v[e] * pm[e] : v[e]);
    }
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) red[threadIdx.y][threadIdx.x * VEC + e] = m[e];
  __syncthreads();
  if (threadIdx.y == 0 && c0 < C) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float t = red[0][threadIdx.x * VEC + e];
#pragma unroll
      for (int y = 1; y < 8; ++y) t = nanmax(t, red[y][threadIdx.x * VEC + e]);
      atomic_max_nonneg(out + c0 + e, t);
    }
  }
}

__device__ __forceinline__ signed char quantize_one(float v, float s, int stochastic, unsigned seed,
                                                    unsigned long long idx) {
  if (!(s > 0.f)) return 0;  // zero or NaN scale
  float y = __fdiv_rn(v, s);
  y = stochastic ? floorf(__fadd_rn(y, uniform01(seed, idx))) : rintf(y);
  if (y != y) return 0;
  y = fminf(fmaxf(y, -127.f), 127.f);
  return (signed char)(int)y;
}

// q[a, c, b] -> out[a*oA + c*oC + b*oB], VEC consecutive b per thread (B % VEC == 0, aligned base).
// scale: scale[c] if scale_per_c else scale[0]; seed: device pointer to the int32 stream key (read only
// when stochastic), so keying a stream on a device counter never synchronises with the host. pack4: the launcher
// guarantees oB == 1 and 4-byte aligned destinations, so VEC=4 results go out as one 32-bit store.
template <typename T, int VEC>
__global__ void __launch_bounds__(256)
quantize_s8(const T* __restrict__ x, i64 A, int C, i64 B, const float* __restrict__ scale, int scale_per_c,
            const float* __restrict__ premul, i8* __restrict__ out, i64 oA, i64 oC, i64 oB,
            int stochastic, const int* __restrict__ seed_ptr, int pack4) {
  const unsigned seed = stochastic ? (unsigned)seed_ptr[0] : 0u;
  const i64 bv = B / VEC;
  const i64 nv = A * C * bv;
  for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < nv; j += (i64)gridDim.x * blockDim.x) {
    const i64 b = (j % bv) * VEC;
    const i64 t = j / bv;
    const int c = (int)(t % C);
    const i64 a = t / C;
    const float s = scale[scale_per_c ? c : 0];
    const float pm = premul ? premul[c] : 1.f;
    const i64 src = (a * C + c) * B + b;
    float v[VEC];
    load_vec<T, VEC>(x + src, v);
    signed char q[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) q[e] = quantize_one(premul ? v[e] * pm : v[e], s, stochastic, seed, src + e);
    const i64 dst = a * oA + c * oC + b * oB;
    if (VEC == 4 && pack4) {
      const unsigned w = (unsigned)(unsigned char)q[0] | ((unsigned)(unsigned char)q[1 % VEC] << 8) |
                         ((unsigned)(unsigned char)q[2 % VEC] << 16) | ((unsigned)(unsigned char)q[3 % VEC] << 24);
      *reinterpret_cast<unsigned*>(out + dst) = w;
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[dst + e * oB] = q[e];
    }
  }
}
