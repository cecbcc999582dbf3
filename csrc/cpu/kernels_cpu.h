// CPU kernels of hessfast: raw-pointer entry points (row-major, float or double).
// The Python front (hessfast/kernels) checks shapes, dtypes and contiguity before calling them;
// csrc/cpu_module.cpp checks them again at the pybind11 boundary.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace hessfast {
namespace cpu {

// Thread t's share [c0, c1) of P columns under a static split into nth parts aligned to 16
// elements (whole cache lines and SIMD vectors per thread).
inline void column_range(int64_t P, int t, int nth, int64_t* c0, int64_t* c1) {
  const int64_t per = ((P + nth - 1) / nth + 15) & ~int64_t(15);
  *c0 = std::min<int64_t>(P, t * per);
  *c1 = std::min<int64_t>(P, *c0 + per);
}

// Threads worth waking for `work` multiply-adds over P columns: one below 2^16, else up to
// num_threads, with at least 64 columns each.
inline int threads_for(int64_t work, int num_threads, int64_t P) {
  const int nt = work < (int64_t(1) << 16) ? 1 : std::max(num_threads, 1);
  return int(std::min<int64_t>(nt, std::max<int64_t>(P / 64, 1)));
}

// Runs f(t, c0, c1) on up to nt OpenMP threads, thread t owning columns [c0, c1) of P (see
// column_range); returns the number of threads that ran, i.e. how many partial results to reduce.
template <typename F>
int for_column_ranges(int nt, int64_t P, F&& f) {
  int used = 1;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), nth = omp_get_num_threads();
    if (t == 0) used = nth;
    int64_t c0, c1;
    column_range(P, t, nth, &c0, &c1);
    f(t, c0, c1);
  }
  return used;
}

// Fused classical Gram-Schmidt applied twice (CGS2), paper Appendix D, in three passes over Q
// instead of four.
//   Q      (k, ldq)  basis rows, only the first P entries of each row are read; of type T, or
//                    bfloat16 words (TQ = uint16_t) with T = float (widened exactly on load)
//   W      (b, P)    block to project; overwritten with W2 = (I - Q^T Q)^2 W
//   coeffs (b, k)    h1 + h2
//   norms  (b,)      row norms of W2
template <typename T, typename TQ = T>
void cgs2(const TQ* Q, int64_t ldq, int64_t k, T* W, int64_t b, int64_t P, T* coeffs, T* norms,
          int num_threads);

// Gram matrix G = W W^T (b, b) accumulated in double.
template <typename T>
void gram(const T* W, int64_t b, int64_t P, double* G, int num_threads);

// W <- M W for a small (b, b) matrix M (double); if G is not null also G = (M W)(M W)^T,
// fused in the same pass.
template <typename T>
void apply_small(T* W, int64_t b, int64_t P, const double* M, double* G, int num_threads);

// Streamed squared-HVP accumulation over c samples: for each probe r,
//   sum_sq[r] += sum_i |U[i,r]|^2,  sum_u[r] += sum_i U[i,r],  sum_vu[r] += sum_i V[r].U[i,r]
//   U (c, b, P), V (b, P), sum_u (b, P), sum_sq and sum_vu (b,) double.
template <typename T>
void sqhvp(const T* U, int64_t c, int64_t b, int64_t P, const T* V, T* sum_u, double* sum_sq,
           double* sum_vu, int num_threads);

}  // namespace cpu
}  // namespace hessfast
