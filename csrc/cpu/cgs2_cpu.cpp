// Fused CGS2 reorthogonalisation on the CPU.
//
//   pass 1: h1 = Q W^T
//   pass 2: per tile of columns, W1 = W - h1^T Q  and then  h2 += Q W1^T  (the tile of Q is still
//           in L2 for the second use, so Q comes from memory once for both)
//   pass 3: W2 = W1 - h2^T Q, row norms of W2
//
// The columns are split statically among the threads; per-thread partial sums are reduced in a
// fixed order, so results are deterministic for a given thread count.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels_cpu.h"
#include "simd_cpu.h"

namespace hessfast {
namespace cpu {
namespace {

constexpr int kGroup = 8;  // rows of Q per sweep of a W tile: W is loaded once for 8 rows

long l2_bytes() {
  static const long l2 = [] {
    long s = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return s > (1 << 18) ? s : (1 << 20);
  }();
  return l2;
}

// Columns per tile of pass 2: the k x tile block of Q must stay in L2 between the update and the
// dots.  An eighth of L2 (320 columns at k = 100 in float64) measured best at P = 1e6, k = 100: a
// quarter was 1-3% and a half 4-7% slower in total (the block is partly evicted before its reuse).
int64_t tile_columns_fused(int64_t k, int64_t b, size_t elem) {
  int64_t t = (l2_bytes() / 8) / (int64_t(std::max<int64_t>(k + b, 1)) * int64_t(elem));
  t = std::min<int64_t>(std::max<int64_t>(t, 64), 2048);
  return t & ~int64_t(15);
}

// Columns per tile of the streaming passes 1 and 3: long row segments (up to 128 KiB) keep the
// hardware prefetchers streaming; the kGroup x tile block of Q and the b x tile block of W stay
// within half of L2 so that b > 1 re-reads the rows of Q from cache.
int64_t tile_columns_stream(int64_t b, size_t elem) {
  int64_t t = (l2_bytes() / 2) / ((kGroup + b) * int64_t(elem));
  t = std::min<int64_t>(std::max<int64_t>(t, 256), int64_t(128 * 1024) / int64_t(elem));
  return t & ~int64_t(15);
}

// The line width of the micro-kernels: 64 bytes (one zmm, 32 registers) where the x86-64-v4 clones
// of simd_cpu.h run (AVX-512 F, BW, CD, DQ and VL), else 32 (one ymm with AVX2, 16 registers).
// HESSFAST_CPU_VECTOR_BYTES=32 or 64 forces one (both are correct everywhere; the tests run each).
bool wide_registers() {
  static const bool wide = [] {
    const char* forced = std::getenv("HESSFAST_CPU_VECTOR_BYTES");
    if (forced != nullptr && std::strcmp(forced, "64") == 0) return true;
    if (forced != nullptr && std::strcmp(forced, "32") == 0) return false;
#if defined(__GNUC__) && defined(__x86_64__)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
#else
    return false;
#endif
  }();
  return wide;
}

// Calls f(G, R) (as integral constants) over the register blocks of a k x b problem and passes it
// the first rows j (of Q) and r0 (of W) of each block.  Rows of W go in blocks of R = 4 (then 2,
// 1; with 16 registers no R = 4); for each, rows of Q in blocks of G (then 4, 2, 1), keeping the
// G * R + R + 1 live registers within the file: with 32 registers G = 4 for R = 4 and 8 otherwise;
// with 16, G = 4 for R = 2 and 8 for R = 1.
template <int VB, typename F>
void for_blocks(int64_t k, int64_t b, F&& f) {
  auto rows_of_q = [&](int64_t r0, auto rtag, auto gtag) {
    constexpr int G = decltype(gtag)::value;
    int64_t j = 0;
    for (; j + G <= k; j += G) f(j, r0, std::integral_constant<int, G>(), rtag);
    if constexpr (G > 4)
      for (; j + 4 <= k; j += 4) f(j, r0, std::integral_constant<int, 4>(), rtag);
    if constexpr (G > 2)
      for (; j + 2 <= k; j += 2) f(j, r0, std::integral_constant<int, 2>(), rtag);
    for (; j < k; ++j) f(j, r0, std::integral_constant<int, 1>(), rtag);
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I4 = std::integral_constant<int, 4>;
  using I8 = std::integral_constant<int, 8>;
  using G2 = std::conditional_t<VB == 64, I8, I4>;
  int64_t r = 0;
  if constexpr (VB == 64)
    for (; r + 4 <= b; r += 4) rows_of_q(r, I4(), I4());
  for (; r + 2 <= b; r += 2) rows_of_q(r, I2(), G2());
  for (; r < b; ++r) rows_of_q(r, I1(), I8());
}

// acc[j * b + r] += Q[j, p0:p0+n] . W[r, p0:p0+n]
template <int VB, typename T, typename TQ>
void tile_dots(const TQ* Q, int64_t ldq, int64_t k, const T* W, int64_t b, int64_t P, int64_t p0,
               int64_t n, double* acc) {
  for_blocks<VB>(k, b, [&](int64_t j, int64_t r0, auto gtag, auto rtag) {
    constexpr int G = decltype(gtag)::value, R = decltype(rtag)::value;
    const TQ* q[G];
    const T* w[R];
    for (int i = 0; i < G; ++i) q[i] = Q + (j + i) * ldq + p0;
    for (int r = 0; r < R; ++r) w[r] = W + (r0 + r) * P + p0;
    double o[G * R] = {};
    dot_block<T, TQ, G, R, VB>(q, w, n, o);
    for (int i = 0; i < G; ++i)
      for (int r = 0; r < R; ++r) acc[(j + i) * b + r0 + r] += o[i * R + r];
  });
}

// W[r, p0:p0+n] -= sum_j h[j * b + r] Q[j, p0:p0+n]
template <int VB, typename T, typename TQ>
void tile_update(const TQ* Q, int64_t ldq, int64_t k, T* W, int64_t b, int64_t P, int64_t p0,
                 int64_t n, const T* h) {
  for_blocks<VB>(k, b, [&](int64_t j, int64_t r0, auto gtag, auto rtag) {
    constexpr int G = decltype(gtag)::value, R = decltype(rtag)::value;
    const TQ* q[G];
    T* w[R];
    T c[G * R];
    for (int i = 0; i < G; ++i) q[i] = Q + (j + i) * ldq + p0;
    for (int r = 0; r < R; ++r) w[r] = W + (r0 + r) * P + p0;
    for (int i = 0; i < G; ++i)
      for (int r = 0; r < R; ++r) c[i * R + r] = h[(j + i) * b + r0 + r];
    axpy_block<T, TQ, G, R, VB>(w, q, c, n);
  });
}

template <int VB, typename T, typename TQ>
void cgs2_lines(const TQ* Q, int64_t ldq, int64_t k, T* W, int64_t b, int64_t P, T* coeffs, T* norms,
                int num_threads) {
  const int64_t tile2 = tile_columns_fused(k, b, sizeof(TQ));
  const int64_t tile = tile_columns_stream(b, sizeof(T));
  const int nt = threads_for((k + 1) * b * P, num_threads, P);
  const int64_t kb = k * b;
  const int64_t stride = ((std::max<int64_t>(kb, b) + 7) / 8 + 1) * 8;  // own cache lines
  std::vector<double> part(size_t(nt) * size_t(stride));
  std::vector<double> h1(kb), h2(kb), ns(b);
  std::vector<T> h1t(kb), h2t(kb);

  auto reduce = [&](std::vector<double>& out, int64_t len, int nth) {
    for (int64_t i = 0; i < len; ++i) {
      double s = 0;
      for (int t = 0; t < nth; ++t) s += part[size_t(t) * stride + i];
      out[i] = s;
    }
  };
  // The coefficients of a pass, summed over the threads and cast for the next pass's update.
  auto reduce_cast = [&](std::vector<double>& out, std::vector<T>& cast, int nth) {
    reduce(out, kb, nth);
    for (int64_t i = 0; i < kb; ++i) cast[i] = T(out[i]);
  };

#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    const int nth = omp_get_num_threads();
    int64_t c0, c1;
    column_range(P, t, nth, &c0, &c1);
    double* my = part.data() + size_t(t) * stride;

    // Pass 1: h1 = Q W^T.
    std::fill(my, my + kb, 0.0);
    for (int64_t p = c0; p < c1; p += tile)
      tile_dots<VB, T, TQ>(Q, ldq, k, W, b, P, p, std::min(tile, c1 - p), my);
#pragma omp barrier
#pragma omp single
    reduce_cast(h1, h1t, nth);
    // Pass 2: W1 = W - h1^T Q and h2 = Q W1^T, tile by tile.
    std::fill(my, my + kb, 0.0);
    for (int64_t p = c0; p < c1; p += tile2) {
      const int64_t n = std::min(tile2, c1 - p);
      tile_update<VB, T, TQ>(Q, ldq, k, W, b, P, p, n, h1t.data());
      tile_dots<VB, T, TQ>(Q, ldq, k, W, b, P, p, n, my);
    }
#pragma omp barrier
#pragma omp single
    reduce_cast(h2, h2t, nth);
    // Pass 3: W2 = W1 - h2^T Q and the row norms.
    std::fill(my, my + b, 0.0);
    for (int64_t p = c0; p < c1; p += tile) {
      const int64_t n = std::min(tile, c1 - p);
      tile_update<VB, T, TQ>(Q, ldq, k, W, b, P, p, n, h2t.data());
      for (int64_t r = 0; r < b; ++r) my[r] += sumsq<T>(W + r * P + p, n);
    }
#pragma omp barrier
#pragma omp single
    reduce(ns, b, nth);
  }

  for (int64_t r = 0; r < b; ++r) {
    for (int64_t j = 0; j < k; ++j) coeffs[r * k + j] = T(h1[j * b + r] + h2[j * b + r]);
    norms[r] = T(std::sqrt(ns[r]));
  }
}

}  // namespace

template <typename T, typename TQ>
void cgs2(const TQ* Q, int64_t ldq, int64_t k, T* W, int64_t b, int64_t P, T* coeffs, T* norms,
          int num_threads) {
  if (wide_registers())
    cgs2_lines<64>(Q, ldq, k, W, b, P, coeffs, norms, num_threads);
  else
    cgs2_lines<32>(Q, ldq, k, W, b, P, coeffs, norms, num_threads);
}

template void cgs2<float, float>(const float*, int64_t, int64_t, float*, int64_t, int64_t, float*,
                                 float*, int);
template void cgs2<double, double>(const double*, int64_t, int64_t, double*, int64_t, int64_t,
                                   double*, double*, int);
template void cgs2<float, bf16>(const bf16*, int64_t, int64_t, float*, int64_t, int64_t, float*,
                                float*, int);

}  // namespace cpu
}  // namespace hessfast
