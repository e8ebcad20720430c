// Device helpers shared by every int8fx kernel source.
//
// No system header is included anywhere: NVRTC then compiles the kernels with no -I path and no CUDA
// toolkit on the machine (CI has only the nvidia-cuda-nvrtc wheel), and one compile of a source stays
// well under a second. Conversions to and from bf16/fp16 go through single PTX instructions, the same
// ones PyTorch's CUDA kernels use, so rounding matches PyTorch bit for bit.
#pragma once

typedef signed char i8;
typedef long long i64;

// Epilogue kinds (what a kernel writes for an integer accumulator `acc` and scales s1, s2, ...):
//   EPI_I32  (int)acc              EPI_I64  acc
//   EPI_F32  (float)acc * s1 * s2  EPI_BF16 bf16((float)acc * s1 * s2)
// `(float)acc` rounds the exact integer to nearest, as `acc.float()` does in PyTorch (also from fp64).
#define EPI_I32 0
#define EPI_I64 1
#define EPI_F32 2
#define EPI_BF16 3

// Element types of floating-point inputs (template tags; 2-byte payloads).
struct bf16_t { unsigned short x; };
struct f16_t { unsigned short x; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float(((unsigned)v.x) << 16); }
__device__ __forceinline__ float to_f32(f16_t v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
  return f;
}

__device__ __forceinline__ unsigned short f32_to_bf16_bits(float f) {
  unsigned short r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}

// max(m, |v|) that lets NaN win (fmaxf would drop it): a NaN gradient must poison its scale.
__device__ __forceinline__ float nanmax_abs(float m, float v) {
  v = fabsf(v);
  return (v > m || v != v) ? v : m;
}
__device__ __forceinline__ float nanmax(float a, float b) { return (b > a || b != b) ? b : a; }

// atomicMax for non-negative floats (and +NaN) through their bit patterns: for x, y >= 0 the int order
// of the bits is the float order, and a positive NaN (what fabsf returns) compares above +Inf.
__device__ __forceinline__ void atomic_max_nonneg(float* addr, float v) {
  atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
}

// Dequantizing epilogue: (float)acc times whichever of row_scale[ri], col_scale[ci], alpha[0] are given,
// one factor at a time, left to right, as the autograd op writes it (`acc.float() * s_gw * s_x`): a
// product of the scales first could underflow for tiny operands while the result is representable.
// `epi` is a kernel argument, not a template parameter: it is uniform over the grid (no divergence) and
// keeps the number of compiled variants, and CI compile time, down.
__device__ __forceinline__ void store_acc(int epi, void* __restrict__ out, i64 off, i64 acc,
                                          const float* __restrict__ row, const float* __restrict__ col,
                                          const float* __restrict__ alpha, i64 ri, i64 ci) {
  if (epi == EPI_I32) {
    reinterpret_cast<int*>(out)[off] = (int)acc;
    return;
  }
  if (epi == EPI_I64) {
    reinterpret_cast<i64*>(out)[off] = acc;
    return;
  }
  float v = (float)acc;
  if (row) v = __fmul_rn(v, row[ri]);
  if (col) v = __fmul_rn(v, col[ci]);
  if (alpha) v = __fmul_rn(v, alpha[0]);
  if (epi == EPI_F32) {
    reinterpret_cast<float*>(out)[off] = v;
  } else {
    reinterpret_cast<unsigned short*>(out)[off] = f32_to_bf16_bits(v);
  }
}

// 32-bit shared-memory address of a generic pointer (what cp.async and ldmatrix take).
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  unsigned r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}

// 16-byte asynchronous global->shared copy; src_bytes = 0 zero-fills (rows/columns past the edge).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8x8 b16 matrices (= four 8-row x 16-byte int8 tiles) from shared memory into registers.
__device__ __forceinline__ void ldmatrix_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// D = A(16x32, row) * B(32x8, col) + D on the INT8 tensor cores; exact int32 accumulation.
__device__ __forceinline__ void mma_s8_16832(int* d, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Counter-based uniform in (0, 1): u = (r + 1/2) / 2^15, r the top 15 bits of lowbias32(idx * golden +
// key), exactly int8fx.quant.core.uniform_bits15 (so the reference and this kernel draw the same u for
// the same key and element index). Stateless: reproducible in any launch geometry.
__device__ __forceinline__ float uniform01(unsigned key, unsigned long long idx) {
  unsigned z = (unsigned)idx * 0x9E3779B9u + key;
  z ^= z >> 16;
  z *= 0x7FEB352Du;
  z ^= z >> 15;
  z *= 0x846CA68Bu;
  z ^= z >> 16;
  return (float)((z >> 17) & 0x7FFFu) * (1.0f / 32768.0f) + (1.0f / 65536.0f);
}
