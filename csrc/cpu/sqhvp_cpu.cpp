// Streamed per-sample squared-HVP accumulation on the CPU: one pass over the chunk U.
// Each thread owns a slice of columns of sum_u, so its updates need no synchronisation; the
// scalar sums are reduced from per-thread partials in a fixed order.
#include <algorithm>
#include <vector>

#include "kernels_cpu.h"
#include "simd_cpu.h"

namespace hessfast {
namespace cpu {

template <typename T>
void sqhvp(const T* U, int64_t c, int64_t b, int64_t P, const T* V, T* sum_u, double* sum_sq,
           double* sum_vu, int num_threads) {
  constexpr int64_t kTile = 1024;
  const int nt = threads_for(c * b * P, num_threads, P);
  std::vector<double> part(size_t(nt) * 2 * b, 0.0);
  const int used = for_column_ranges(nt, P, [&](int t, int64_t c0, int64_t c1) {
    double* my = part.data() + size_t(t) * 2 * b;
    for (int64_t r = 0; r < b; ++r)
      for (int64_t p = c0; p < c1; p += kTile) {
        const int64_t n = std::min(kTile, c1 - p);
        for (int64_t i = 0; i < c; ++i)
          sqhvp_tile<T>(U + (i * b + r) * P + p, V + r * P + p, sum_u + r * P + p, n, my + r,
                        my + b + r);
      }
  });
  for (int64_t r = 0; r < b; ++r)
    for (int t = 0; t < used; ++t) {
      sum_sq[r] += part[size_t(t) * 2 * b + r];
      sum_vu[r] += part[size_t(t) * 2 * b + b + r];
    }
}

template void sqhvp<float>(const float*, int64_t, int64_t, int64_t, const float*, float*, double*,
                           double*, int);
template void sqhvp<double>(const double*, int64_t, int64_t, int64_t, const double*, double*,
                            double*, double*, int);

}  // namespace cpu
}  // namespace hessfast
