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

}  // namespace cpu
}  // namespace hessfast
