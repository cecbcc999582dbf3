// CUDA kernels for CholeskyQR2's block product and the streamed squared-HVP accumulation.
#include "common_cuda.cuh"
#include "kernels_cuda.h"

namespace hessfast {
namespace cuda {
namespace {

// out[i, p] = sum_j M[i, j] W[j, p]: one thread per column, M staged in shared memory.
template <typename T>
__global__ void apply_small_kernel(const T* __restrict__ W, int b, int64_t P, const T* __restrict__ M,
                                   T* __restrict__ out) {
  extern __shared__ unsigned char smem_raw[];
  T* Ms = reinterpret_cast<T*>(smem_raw);
  for (int i = threadIdx.x; i < b * b; i += blockDim.x) Ms[i] = M[i];
  __syncthreads();
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < P; p += int64_t(gridDim.x) * blockDim.x) {
    for (int i0 = 0; i0 < b; i0 += kRG) {
      T acc[kRG];
#pragma unroll
      for (int r = 0; r < kRG; ++r) acc[r] = T(0);
      for (int j = 0; j < b; ++j) {
        const T x = __ldg(W + int64_t(j) * P + p);
#pragma unroll
        for (int r = 0; r < kRG; ++r)
          if (i0 + r < b) acc[r] += Ms[(i0 + r) * b + j] * x;
      }
#pragma unroll
      for (int r = 0; r < kRG; ++r)
        if (i0 + r < b) out[int64_t(i0 + r) * P + p] = acc[r];
    }
  }
}

// One pass over U (c, b, P): thread per column, block sums of |u|^2 and v.u per probe.
template <typename T>
__global__ void sqhvp_kernel(const T* __restrict__ U, int64_t c, int b, int64_t P, const T* __restrict__ V,
                             T* __restrict__ sum_u, T* __restrict__ part) {
  __shared__ T red[kThreads / 32][2];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  T* my = part + int64_t(blockIdx.x) * 2 * b;
  for (int64_t c0 = int64_t(blockIdx.x) * kThreads; c0 < P; c0 += int64_t(gridDim.x) * kThreads) {
    const bool in = c0 + tid < P;
    const int64_t p = in ? c0 + tid : c0;
    for (int r = 0; r < b; ++r) {
      const int64_t rp = int64_t(r) * P + p;
      T su = in ? sum_u[rp] : T(0), sq = T(0), vu = T(0);
      const T v = in ? V[rp] : T(0);
      for (int64_t i = 0; i < c; ++i) {
        const T u = in ? __ldg(U + i * b * P + rp) : T(0);
        su += u;
        sq += u * u;
        vu += v * u;
      }
      if (in) sum_u[rp] = su;
      sq = warp_sum(sq);
      vu = warp_sum(vu);
      __syncthreads();
      if (lane == 0) {
        red[warp][0] = sq;
        red[warp][1] = vu;
      }
      __syncthreads();
      if (tid < 2) {
        T s = T(0);
        for (int w = 0; w < int(blockDim.x >> 5); ++w) s += red[w][tid];
        my[tid * b + r] += s;
      }
    }
  }
}

}  // namespace

template <typename T>
cudaError_t apply_small(const T* W, int64_t b, int64_t P, const T* M, T* out, cudaStream_t s) {
  const size_t smem = sizeof(T) * b * b;
  if (smem > 48 * 1024) return cudaErrorInvalidValue;  // b <= 78 (float64); blocks are small
  const int grid = int(std::min<int64_t>((P + kThreads - 1) / kThreads, 65535));
  apply_small_kernel<T><<<grid, kThreads, smem, s>>>(W, int(b), P, M, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t sqhvp(const T* U, int64_t c, int64_t b, int64_t P, const T* V, T* sum_u, T* part, int grid,
                  cudaStream_t s) {
  cudaError_t err = cudaMemsetAsync(part, 0, sizeof(T) * grid * 2 * b, s);
  if (err != cudaSuccess) return err;
  sqhvp_kernel<T><<<grid, kThreads, 0, s>>>(U, c, int(b), P, V, sum_u, part);
  return cudaGetLastError();
}

template cudaError_t apply_small<float>(const float*, int64_t, int64_t, const float*, float*, cudaStream_t);
template cudaError_t apply_small<double>(const double*, int64_t, int64_t, const double*, double*, cudaStream_t);
template cudaError_t sqhvp<float>(const float*, int64_t, int64_t, int64_t, const float*, float*, float*, int,
                                  cudaStream_t);
template cudaError_t sqhvp<double>(const double*, int64_t, int64_t, int64_t, const double*, double*, double*, int,
                                   cudaStream_t);

}  // namespace cuda
}  // namespace hessfast
