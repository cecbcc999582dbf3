// Vectorised micro-kernels shared by the CPU kernels (hessfast._kernels_cpu).
//
// Every routine works on one tile of n contiguous elements.  GCC's target_clones builds an AVX-512,
// an AVX2+FMA and a baseline version of each and picks one at load time (ifunc), so the wheel stays
// portable while the hot loops use the widest vectors the machine has.  `#pragma omp simd reduction`
// lets the compiler vectorise the reductions without -ffast-math (it may reassociate only these sums).
#pragma once
#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(HESSFAST_NO_CLONES)
#define HF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HF_CLONES
#endif

namespace hessfast {
namespace cpu {

// out[j] += sum_p q_j[p] * w[p] for the four rows q0..q3 (one read of w for four rows of Q).
template <typename T>
HF_CLONES void dot4(const T* __restrict q0, const T* __restrict q1, const T* __restrict q2,
                    const T* __restrict q3, const T* __restrict w, int64_t n, double* out) {
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t p = 0; p < n; ++p) {
    const T x = w[p];
    s0 += q0[p] * x;
    s1 += q1[p] * x;
    s2 += q2[p] * x;
    s3 += q3[p] * x;
  }
  out[0] += s0;
  out[1] += s1;
  out[2] += s2;
  out[3] += s3;
}

template <typename T>
HF_CLONES double dot1(const T* __restrict q, const T* __restrict w, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t p = 0; p < n; ++p) s += q[p] * w[p];
  return s;
}

// w[p] -= c0 q0[p] + c1 q1[p] + c2 q2[p] + c3 q3[p]  (one load/store of w for four rows of Q).
template <typename T>
HF_CLONES void axpy4(T* __restrict w, const T* __restrict q0, const T* __restrict q1,
                     const T* __restrict q2, const T* __restrict q3, T c0, T c1, T c2, T c3,
                     int64_t n) {
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) w[p] -= c0 * q0[p] + c1 * q1[p] + c2 * q2[p] + c3 * q3[p];
}

template <typename T>
HF_CLONES void axpy1(T* __restrict w, const T* __restrict q, T c, int64_t n) {
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) w[p] -= c * q[p];
}

template <typename T>
HF_CLONES double sumsq(const T* __restrict w, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t p = 0; p < n; ++p) s += w[p] * w[p];
  return s;
}

// One sample's contribution to the squared-HVP state on a tile: su += u, returns (u.u, v.u).
template <typename T>
HF_CLONES void sqhvp_tile(const T* __restrict u, const T* __restrict v, T* __restrict su,
                          int64_t n, double* sq, double* vu) {
  T a = 0, c = 0;
#pragma omp simd reduction(+ : a, c)
  for (int64_t p = 0; p < n; ++p) {
    const T x = u[p];
    a += x * x;
    c += v[p] * x;
    su[p] += x;
  }
  *sq += a;
  *vu += c;
}


// ---- Cache-line micro-kernels of the fused CGS2 ------------------------------------------------
// One iteration handles one 64-byte line of each of G rows of Q through GCC vector types (one zmm
// with AVX-512, two ymm with AVX2, four xmm otherwise); W is loaded once per line for all G rows.
// Accumulation is in T, in 64/sizeof(T) lanes per row, reduced once at the end of the tile.
// (Software prefetch of the next rows or the next tile was measured and made things slower.)
template <typename T>
struct Line;
template <>
struct Line<double> {
  typedef double v __attribute__((vector_size(64)));
};
template <>
struct Line<float> {
  typedef float v __attribute__((vector_size(64)));
};
#define HF_LOAD(x, p) __builtin_memcpy(&(x), (p), 64)
#define HF_STORE(p, x) __builtin_memcpy((p), &(x), 64)

// out[i] += q[i][0:n] . w[0:n], i < G.
template <typename T, int G>
HF_CLONES void dot_rows(const T* const* __restrict q, const T* __restrict w, int64_t n,
                        double* out) {
  typedef typename Line<T>::v V;
  constexpr int L = 64 / sizeof(T);
  V acc[G];
  const T* qq[G];
  for (int i = 0; i < G; ++i) acc[i] = V{}, qq[i] = q[i];
  int64_t p = 0;
  for (; p + L <= n; p += L) {
    V x;
    HF_LOAD(x, w + p);
    for (int i = 0; i < G; ++i) {
      V y;
      HF_LOAD(y, qq[i] + p);
      acc[i] += y * x;
    }
  }
  for (int i = 0; i < G; ++i) {
    T s = 0;
    for (int l = 0; l < L; ++l) s += acc[i][l];
    for (int64_t e = p; e < n; ++e) s += qq[i][e] * w[e];
    out[i] += s;
  }
}

// w[0:n] -= sum_i c[i] q[i][0:n], i < G.
template <typename T, int G>
HF_CLONES void axpy_rows(T* __restrict w, const T* const* __restrict q, const T* __restrict c,
                         int64_t n) {
  typedef typename Line<T>::v V;
  constexpr int L = 64 / sizeof(T);
  const T* qq[G];
  T cc[G];
  for (int i = 0; i < G; ++i) qq[i] = q[i], cc[i] = c[i];
  int64_t p = 0;
  for (; p + L <= n; p += L) {
    V s, y, x;
    HF_LOAD(y, qq[0] + p);
    s = cc[0] * y;
    for (int i = 1; i < G; ++i) {
      HF_LOAD(y, qq[i] + p);
      s += cc[i] * y;
    }
    HF_LOAD(x, w + p);
    x -= s;
    HF_STORE(w + p, x);
  }
  for (; p < n; ++p) {
    T s = cc[0] * qq[0][p];
    for (int i = 1; i < G; ++i) s += cc[i] * qq[i][p];
    w[p] -= s;
  }
}
#undef HF_LOAD
#undef HF_STORE

}  // namespace cpu
}  // namespace hessfast
