// The two passes of CholeskyQR2 over a block on the CPU: its Gram matrix, and the in-place product
// with a small matrix (optionally fused with the Gram matrix of the result).  The b x b algebra and
// the MGS fallback are the one Python driver's (hessfast/kernels/cholqr2.py).
#include <algorithm>
#include <vector>

#include "kernels_cpu.h"
#include "simd_cpu.h"

namespace hessfast {
namespace cpu {
namespace {
constexpr int64_t kTile = 512;

// acc[i * b + j] += W[i, tile] . W[j, tile] for j <= i
template <typename T>
void tile_gram(const T* W, int64_t b, int64_t P, int64_t p0, int64_t n, double* acc) {
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j <= i; ++j) acc[i * b + j] += dot1<T>(W + i * P + p0, W + j * P + p0, n);
}

template <typename T>
void symmetrise_reduce(const std::vector<double>& part, int nth, int64_t b, double* G) {
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0;
      for (int t = 0; t < nth; ++t) s += part[size_t(t) * b * b + i * b + j];
      G[i * b + j] = G[j * b + i] = s;
    }
}
}  // namespace

template <typename T>
void gram(const T* W, int64_t b, int64_t P, double* G, int num_threads) {
  const int nt = threads_for(b * b * P, num_threads, P);
  std::vector<double> part(size_t(nt) * b * b, 0.0);
  const int used = for_column_ranges(nt, P, [&](int t, int64_t c0, int64_t c1) {
    for (int64_t p = c0; p < c1; p += kTile)
      tile_gram<T>(W, b, P, p, std::min(kTile, c1 - p), part.data() + size_t(t) * b * b);
  });
  symmetrise_reduce<T>(part, used, b, G);
}

template <typename T>
void apply_small(T* W, int64_t b, int64_t P, const double* M, double* G, int num_threads) {
  const int nt = threads_for(b * b * P, num_threads, P);
  std::vector<double> part(size_t(nt) * b * b, 0.0);
  std::vector<T> Mt(M, M + b * b);
  const int used = for_column_ranges(nt, P, [&](int t, int64_t c0, int64_t c1) {
    std::vector<T> buf(size_t(b) * kTile);
    for (int64_t p = c0; p < c1; p += kTile) {
      const int64_t n = std::min(kTile, c1 - p);
      // buf = M W[:, tile], then copied back; the tile stays in L1/L2.
      for (int64_t i = 0; i < b; ++i) {
        T* o = buf.data() + i * kTile;
        std::fill(o, o + n, T(0));
        for (int64_t j = 0; j < b; ++j) axpy1<T>(o, W + j * P + p, -Mt[i * b + j], n);
      }
      for (int64_t i = 0; i < b; ++i) std::copy(buf.data() + i * kTile, buf.data() + i * kTile + n, W + i * P + p);
      if (G) tile_gram<T>(W, b, P, p, n, part.data() + size_t(t) * b * b);
    }
  });
  if (G) symmetrise_reduce<T>(part, used, b, G);
}

template void gram<float>(const float*, int64_t, int64_t, double*, int);
template void gram<double>(const double*, int64_t, int64_t, double*, int);
template void apply_small<float>(float*, int64_t, int64_t, const double*, double*, int);
template void apply_small<double>(double*, int64_t, int64_t, const double*, double*, int);

}  // namespace cpu
}  // namespace hessfast
