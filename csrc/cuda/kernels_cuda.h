// CUDA kernels of hessfast: host launchers taking raw device pointers and a stream, so the module
// is built by nvcc without torch.  Same operations as csrc/cpu/kernels_cpu.h; the partial sums of
// the reductions go to a caller-provided workspace (allocated by torch in hessfast/kernels/).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace hessfast {
namespace cuda {

// Launch geometry for a problem; `work` is the workspace size in elements of the data type.
struct Plan {
  int grid = 1;        // blocks of the streaming passes (grid-stride over 256-column chunks)
  int grid_fused = 1;  // blocks of the fused pass, limited so its Q tiles stay in L2
  int64_t work = 0;
};

cudaError_t make_plan(int64_t k, int64_t b, int64_t P, int itemsize, Plan* plan);

// Fused CGS2 (see csrc/cpu/kernels_cpu.h): W (b, P) overwritten, coeffs (b, k), norms (b,).
// Q rows are T, or __nv_bfloat16 with T = float (widened on load; the plan takes Q's itemsize).
template <typename T, typename TQ = T>
cudaError_t cgs2(const TQ* Q, int64_t ldq, int64_t k, T* W, int64_t b, int64_t P, T* coeffs, T* norms,
                 T* work, const Plan& plan, cudaStream_t stream);

// G (b, b) = W W^T through the same dot kernel; work >= make_plan(b, b, P).work elements.
template <typename T>
cudaError_t gram(const T* W, int64_t b, int64_t P, T* G, T* work, const Plan& plan, cudaStream_t stream);

// out (b, P) = M W for a small M (b, b).
template <typename T>
cudaError_t apply_small(const T* W, int64_t b, int64_t P, const T* M, T* out, cudaStream_t stream);

// sum_u (b, P) += sum_i U[i]; part (grid, 2, b) = per-block sums of |U[i,r]|^2 and V[r].U[i,r]
// (the caller reduces part in float64).
template <typename T>
cudaError_t sqhvp(const T* U, int64_t c, int64_t b, int64_t P, const T* V, T* sum_u, T* part, int grid,
                  cudaStream_t stream);

}  // namespace cuda
}  // namespace hessfast
