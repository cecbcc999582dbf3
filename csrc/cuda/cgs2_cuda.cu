// Fused CGS2 reorthogonalisation on CUDA: three passes over Q (see csrc/cpu/cgs2_cpu.cpp).
//   pass 1 (dots_kernel):          part = per-block Q W^T           -> h1
//   pass 2 (update_kernel<true>):  W -= h1^T Q, then part = Q W^T   -> h2   (tile re-read from L2)
//   pass 3 (update_kernel<false>): W -= h2^T Q, part = |W_r|^2      -> norms
// Each block walks 256-column chunks grid-stride and accumulates its own slice of `part` in T; the
// slices are reduced in double in a fixed order (deterministic, no atomics).
#include <algorithm>

#include "common_cuda.cuh"
#include "kernels_cuda.h"

namespace hessfast {
namespace cuda {
namespace {

template <typename T, typename TQ>
__global__ void dots_kernel(const TQ* __restrict__ Q, int64_t ldq, int k, const T* __restrict__ W, int b,
                            int64_t P, T* __restrict__ part) {
  __shared__ T ws[kRG][kThreads];
  T* my = part + int64_t(blockIdx.x) * k * b;
  for (int64_t c0 = int64_t(blockIdx.x) * kThreads; c0 < P; c0 += int64_t(gridDim.x) * kThreads) {
    const int n = P - c0 < kThreads ? int(P - c0) : kThreads;
    for (int r0 = 0; r0 < b; r0 += kRG) {
      const int nr = min(kRG, b - r0);
      __syncthreads();
      for (int r = 0; r < nr; ++r)
        ws[r][threadIdx.x] = int(threadIdx.x) < n ? W[int64_t(r0 + r) * P + c0 + threadIdx.x] : T(0);
      __syncthreads();
      warp_row_dots<T, TQ>(Q, ldq, k, c0, n, ws, r0, nr, b, my);
    }
  }
}

template <typename T, typename TQ, bool kDots>
__global__ void update_kernel(const TQ* __restrict__ Q, int64_t ldq, int k, T* __restrict__ W, int b, int64_t P,
                              const T* __restrict__ h, T* __restrict__ part) {
  __shared__ T ws[kRG][kThreads];
  __shared__ T red[kThreads / 32][kRG];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  T* my = part + int64_t(blockIdx.x) * (kDots ? int64_t(k) * b : int64_t(b));
  for (int64_t c0 = int64_t(blockIdx.x) * kThreads; c0 < P; c0 += int64_t(gridDim.x) * kThreads) {
    const int n = P - c0 < kThreads ? int(P - c0) : kThreads;
    const bool in = tid < n;
    const int64_t p = c0 + (in ? tid : 0);
    for (int r0 = 0; r0 < b; r0 += kRG) {
      const int nr = min(kRG, b - r0);
      T w[kRG];
#pragma unroll
      for (int r = 0; r < kRG; ++r) w[r] = (in && r < nr) ? W[int64_t(r0 + r) * P + p] : T(0);
      int j = 0;
      for (; j + 4 <= k; j += 4) {  // four independent loads in flight per thread
        const T q0 = in ? load_q(Q + int64_t(j) * ldq + p) : T(0);
        const T q1 = in ? load_q(Q + int64_t(j + 1) * ldq + p) : T(0);
        const T q2 = in ? load_q(Q + int64_t(j + 2) * ldq + p) : T(0);
        const T q3 = in ? load_q(Q + int64_t(j + 3) * ldq + p) : T(0);
        const T* hj = h + int64_t(j) * b + r0;
#pragma unroll
        for (int r = 0; r < kRG; ++r)
          if (r < nr) w[r] -= __ldg(hj + r) * q0 + __ldg(hj + b + r) * q1 + __ldg(hj + 2 * b + r) * q2 +
                              __ldg(hj + 3 * b + r) * q3;
      }
      for (; j < k; ++j) {
        const T q0 = in ? load_q(Q + int64_t(j) * ldq + p) : T(0);
#pragma unroll
        for (int r = 0; r < kRG; ++r)
          if (r < nr) w[r] -= __ldg(h + int64_t(j) * b + r0 + r) * q0;
      }
#pragma unroll
      for (int r = 0; r < kRG; ++r)
        if (in && r < nr) W[int64_t(r0 + r) * P + p] = w[r];
      __syncthreads();  // ws / red of the previous group are no longer read
      if (kDots) {
#pragma unroll
        for (int r = 0; r < kRG; ++r) ws[r][tid] = w[r];
        __syncthreads();
        warp_row_dots<T, TQ>(Q, ldq, k, c0, n, ws, r0, nr, b, my);
      } else {
#pragma unroll
        for (int r = 0; r < kRG; ++r) {
          const T s = warp_sum(w[r] * w[r]);
          if (lane == 0) red[warp][r] = s;
        }
        __syncthreads();
        if (tid < nr) {
          T s = T(0);
          for (int i = 0; i < int(blockDim.x >> 5); ++i) s += red[i][tid];
          my[r0 + tid] += s;
        }
      }
    }
  }
}

// out[i] = sum_{blocks} part[block, i], summed in double in a fixed order: each block's partial
// sum is in T, the combination of the blocks in double (hessfast.kernels.reference's contract).
template <typename T>
__global__ void reduce_kernel(const T* __restrict__ part, int nblocks, int64_t len, T* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= len) return;
  double s = 0.0;
  for (int blk = 0; blk < nblocks; ++blk) s += double(part[int64_t(blk) * len + i]);
  out[i] = T(s);
}

template <typename T>
__global__ void finalize_kernel(const T* __restrict__ h1, const T* __restrict__ h2, const T* __restrict__ nsq,
                                int k, int b, T* __restrict__ coeffs, T* __restrict__ norms) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < int64_t(k) * b) {
    const int r = int(i / k), j = int(i % k);
    coeffs[i] = h1[int64_t(j) * b + r] + h2[int64_t(j) * b + r];
  }
  if (i < b) norms[i] = sqrt(nsq[i]);
}

template <typename T>
cudaError_t reduce(const T* part, int nblocks, int64_t len, T* out, cudaStream_t s) {
  if (len == 0) return cudaSuccess;
  reduce_kernel<T><<<cdiv64(len, 256), 256, 0, s>>>(part, nblocks, len, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t make_plan(int64_t k, int64_t b, int64_t P, int itemsize, Plan* plan) {
  int dev = 0, sms = 1, l2 = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev);
  if (err != cudaSuccess) return err;
  const int64_t chunks = std::max<int64_t>(1, (P + kThreads - 1) / kThreads);
  plan->grid = int(std::min<int64_t>(chunks, int64_t(8) * sms));
  // In the fused pass the blocks' Q tiles (k x 256 each) must fit in half the L2 until re-read.
  const int64_t tile = std::max<int64_t>(1, k) * kThreads * itemsize;
  const int64_t fit = std::max<int64_t>(int64_t(2) * sms, (int64_t(l2) / 2) / tile);
  plan->grid_fused = int(std::min<int64_t>(chunks, std::min<int64_t>(fit, int64_t(8) * sms)));
  const int64_t g = std::max(plan->grid, plan->grid_fused);
  plan->work = g * std::max<int64_t>(k, 1) * b + 2 * k * b + b;
  return cudaSuccess;
}

template <typename T, typename TQ>
cudaError_t cgs2(const TQ* Q, int64_t ldq, int64_t k, T* W, int64_t b, int64_t P, T* coeffs, T* norms, T* work,
                 const Plan& plan, cudaStream_t s) {
  const int64_t kb = k * b;
  const int64_t g = std::max(plan.grid, plan.grid_fused);
  T* part = work;
  T* h1 = part + g * std::max<int64_t>(k, 1) * b;
  T* h2 = h1 + kb;
  T* nsq = h2 + kb;
  cudaError_t err;
  if (k > 0) {
    if ((err = cudaMemsetAsync(part, 0, sizeof(T) * plan.grid * kb, s)) != cudaSuccess) return err;
    dots_kernel<T, TQ><<<plan.grid, kThreads, 0, s>>>(Q, ldq, int(k), W, int(b), P, part);
    if ((err = reduce<T>(part, plan.grid, kb, h1, s)) != cudaSuccess) return err;
    if ((err = cudaMemsetAsync(part, 0, sizeof(T) * plan.grid_fused * kb, s)) != cudaSuccess) return err;
    update_kernel<T, TQ, true><<<plan.grid_fused, kThreads, 0, s>>>(Q, ldq, int(k), W, int(b), P, h1, part);
    if ((err = reduce<T>(part, plan.grid_fused, kb, h2, s)) != cudaSuccess) return err;
  }
  if ((err = cudaMemsetAsync(part, 0, sizeof(T) * plan.grid * b, s)) != cudaSuccess) return err;
  update_kernel<T, TQ, false><<<plan.grid, kThreads, 0, s>>>(Q, ldq, int(k), W, int(b), P, h2, part);
  if ((err = reduce<T>(part, plan.grid, b, nsq, s)) != cudaSuccess) return err;
  const int64_t n = std::max<int64_t>(kb, b);
  finalize_kernel<T><<<cdiv64(n, 256), 256, 0, s>>>(h1, h2, nsq, int(k), int(b), coeffs, norms);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gram(const T* W, int64_t b, int64_t P, T* G, T* work, const Plan& plan, cudaStream_t s) {
  cudaError_t err = cudaMemsetAsync(work, 0, sizeof(T) * plan.grid * b * b, s);
  if (err != cudaSuccess) return err;
  dots_kernel<T, T><<<plan.grid, kThreads, 0, s>>>(W, P, int(b), W, int(b), P, work);
  return reduce<T>(work, plan.grid, b * b, G, s);
}

template cudaError_t cgs2<float, float>(const float*, int64_t, int64_t, float*, int64_t, int64_t, float*, float*,
                                        float*, const Plan&, cudaStream_t);
template cudaError_t cgs2<double, double>(const double*, int64_t, int64_t, double*, int64_t, int64_t, double*,
                                          double*, double*, const Plan&, cudaStream_t);
template cudaError_t cgs2<float, __nv_bfloat16>(const __nv_bfloat16*, int64_t, int64_t, float*, int64_t, int64_t,
                                                float*, float*, float*, const Plan&, cudaStream_t);
template cudaError_t gram<float>(const float*, int64_t, int64_t, float*, float*, const Plan&, cudaStream_t);
template cudaError_t gram<double>(const double*, int64_t, int64_t, double*, double*, const Plan&, cudaStream_t);

}  // namespace cuda
}  // namespace hessfast
