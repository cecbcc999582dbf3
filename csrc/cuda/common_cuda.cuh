// Device helpers shared by the .cu files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace hessfast {
namespace cuda {

constexpr int kThreads = 256;  // threads per block = columns per chunk
constexpr int kRG = 8;         // rows of a block W handled per register group

// Element j of a basis row through the read-only cache, as the arithmetic type: float32 and float64
// rows as they are, bfloat16 rows (with float32 arithmetic) widened exactly.
__device__ __forceinline__ float load_q(const float* p) { return __ldg(p); }
__device__ __forceinline__ double load_q(const double* p) { return __ldg(p); }
__device__ __forceinline__ float load_q(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// part[blockIdx.x, j, r] += Q[j, cols] . ws[r - r0, :] for the rows of this warp, over one chunk.
// ws holds nr rows of W for the chunk's n columns (shared memory); Q rows are T or bfloat16.
template <typename T, typename TQ>
__device__ __forceinline__ void warp_row_dots(const TQ* __restrict__ Q, int64_t ldq, int k, int64_t c0, int n,
                                              const T (*ws)[kThreads], int r0, int nr, int b,
                                              T* __restrict__ my) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int j = warp; j < k; j += nwarps) {
    const TQ* q = Q + int64_t(j) * ldq + c0;
    T acc[kRG];
#pragma unroll
    for (int r = 0; r < kRG; ++r) acc[r] = T(0);
    for (int p = lane; p < n; p += 32) {
      const T x = load_q(q + p);
#pragma unroll
      for (int r = 0; r < kRG; ++r)
        if (r < nr) acc[r] += x * ws[r][p];
    }
#pragma unroll
    for (int r = 0; r < kRG; ++r) {
      if (r < nr) {
        const T s = warp_sum(acc[r]);
        if (lane == 0) my[int64_t(j) * b + r0 + r] += s;
      }
    }
  }
}

inline int cdiv64(int64_t a, int64_t b) { return int((a + b - 1) / b); }

}  // namespace cuda
}  // namespace hessfast
