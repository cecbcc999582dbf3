// Vectorised micro-kernels shared by the CPU kernels (hessfast._kernels_cpu).
//
// Every routine works on one tile of n contiguous elements.  GCC's target_clones builds an AVX-512,
// an AVX2+FMA and a baseline version of each and picks one at load time (ifunc), so the wheel stays
// portable while the hot loops use the widest vectors the machine has.  `#pragma omp simd reduction`
// lets the compiler vectorise the reductions without -ffast-math (it may reassociate only these sums).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(HESSFAST_NO_CLONES)
#define HF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HF_CLONES
#endif

namespace hessfast {
namespace cpu {

// Single-row micro-kernels on one tile.  The sums accumulate in T (vector lanes) over the tile
// and are returned as double, in which the callers combine the tiles.

// q[0:n] . w[0:n]
template <typename T>
HF_CLONES double dot1(const T* __restrict q, const T* __restrict w, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t p = 0; p < n; ++p) s += q[p] * w[p];
  return s;
}

// w[0:n] -= c q[0:n]
template <typename T>
HF_CLONES void axpy1(T* __restrict w, const T* __restrict q, T c, int64_t n) {
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) w[p] -= c * q[p];
}

// w[0:n] . w[0:n]
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

// ---- bfloat16 basis rows ----------------------------------------------------------------------
// A bfloat16 is the upper half of a float32; the kernels keep such rows as raw 16-bit words and
// widen them exactly (a shift) on load, so all arithmetic and accumulation stays in float32.
typedef uint16_t bf16;

// Q element -> T (exact).
template <typename T, typename TQ>
inline T widen(TQ x) {
  if constexpr (std::is_same<TQ, bf16>::value) {
    const uint32_t u = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    return x;
  }
}

// ---- Register-line micro-kernels of the fused CGS2 ---------------------------------------------
// One iteration handles one line of VB bytes of W (VB / sizeof(T) elements) and the matching
// elements of rows of Q through GCC vector types.  The caller picks VB = 64 (one zmm) where AVX-512
// is there and VB = 32 (one ymm) otherwise: GCC lowers a 64-byte vector on AVX2 through the stack
// (measured 2.4x slower than four sgemv calls on an AVX2 EPYC), while a 32-byte one maps to one
// register.  Rows of Q are of type TQ: T itself, or bf16 with T = float (widened on load).
// Accumulation is in T, in VB / sizeof(T) lanes per row pair, reduced once at the end of the tile.
// (Software prefetch of the next rows or the next tile was measured and made things slower.)
// (Spelled out per width: GCC ignores a vector_size that depends on a template parameter.)
template <typename T, int VB>
struct Line;
template <>
struct Line<float, 32> {
  typedef float v __attribute__((vector_size(32)));
};
template <>
struct Line<float, 64> {
  typedef float v __attribute__((vector_size(64)));
};
template <>
struct Line<double, 32> {
  typedef double v __attribute__((vector_size(32)));
};
template <>
struct Line<double, 64> {
  typedef double v __attribute__((vector_size(64)));
};
// Half a line of bfloat16 words and the line of float32 bit patterns they widen to.
template <int VB>
struct Bf16Line;
template <>
struct Bf16Line<32> {
  typedef uint16_t h __attribute__((vector_size(16)));
  typedef uint32_t u __attribute__((vector_size(32)));
};
template <>
struct Bf16Line<64> {
  typedef uint16_t h __attribute__((vector_size(32)));
  typedef uint32_t u __attribute__((vector_size(64)));
};
#define HF_LOAD(x, p) __builtin_memcpy(&(x), (p), sizeof(x))
#define HF_STORE(p, x) __builtin_memcpy((p), &(x), sizeof(x))

// x <- the VB / sizeof(T) elements of Q at p, as one line of T.
template <typename T, int VB, typename TQ>
inline __attribute__((always_inline)) void load_q(typename Line<T, VB>::v& x, const TQ* p) {
  if constexpr (std::is_same<TQ, T>::value) {
    HF_LOAD(x, p);
  } else {
    static_assert(std::is_same<TQ, bf16>::value && std::is_same<T, float>::value,
                  "Q rows are T or (with T = float) bf16");
    typedef typename Bf16Line<VB>::h H;
    typedef typename Bf16Line<VB>::u U;
    H h;
    __builtin_memcpy(&h, p, VB / 2);
    const U u = __builtin_convertvector(h, U) << 16;
    __builtin_memcpy(&x, &u, VB);
  }
}

// Register-blocked micro-kernels: G rows of Q against R rows of W (w[r] = W row r at this tile).
// Per line, each of the G rows of Q is loaded (and widened) once for all R rows of W and each row
// of W once for all G rows of Q: G + R loads for G * R multiply-adds.  G * R + R + 1 registers
// are live (the caller's blocks keep that within the register file: 32 with AVX-512, 16 with AVX2).

// out[i * R + r] += q[i][0:n] . w[r][0:n]
template <typename T, typename TQ, int G, int R, int VB>
HF_CLONES void dot_block(const TQ* const* __restrict q, const T* const* __restrict w, int64_t n,
                         double* out) {
  typedef typename Line<T, VB>::v V;
  constexpr int L = VB / sizeof(T);
  V acc[G][R];
  const TQ* qq[G];
  const T* ww[R];
  for (int i = 0; i < G; ++i) {
    qq[i] = q[i];
    for (int r = 0; r < R; ++r) acc[i][r] = V{};
  }
  for (int r = 0; r < R; ++r) ww[r] = w[r];
  int64_t p = 0;
  for (; p + L <= n; p += L) {
    V x[R];
    for (int r = 0; r < R; ++r) HF_LOAD(x[r], ww[r] + p);
    for (int i = 0; i < G; ++i) {
      V y;
      load_q<T, VB>(y, qq[i] + p);
      for (int r = 0; r < R; ++r) acc[i][r] += y * x[r];
    }
  }
  for (int i = 0; i < G; ++i)
    for (int r = 0; r < R; ++r) {
      T s = 0;
      for (int l = 0; l < L; ++l) s += acc[i][r][l];
      for (int64_t e = p; e < n; ++e) s += widen<T>(qq[i][e]) * ww[r][e];
      out[i * R + r] += s;
    }
}

// w[r][0:n] -= sum_i c[i * R + r] q[i][0:n]
template <typename T, typename TQ, int G, int R, int VB>
HF_CLONES void axpy_block(T* const* __restrict w, const TQ* const* __restrict q,
                          const T* __restrict c, int64_t n) {
  typedef typename Line<T, VB>::v V;
  constexpr int L = VB / sizeof(T);
  const TQ* qq[G];
  T* ww[R];
  V cv[G][R];  // the coefficients, broadcast once per tile
  for (int i = 0; i < G; ++i) {
    qq[i] = q[i];
    for (int r = 0; r < R; ++r) cv[i][r] = V{} + c[i * R + r];
  }
  for (int r = 0; r < R; ++r) ww[r] = w[r];
  int64_t p = 0;
  for (; p + L <= n; p += L) {
    V s[R], y;
    load_q<T, VB>(y, qq[0] + p);
    for (int r = 0; r < R; ++r) s[r] = cv[0][r] * y;
    for (int i = 1; i < G; ++i) {
      load_q<T, VB>(y, qq[i] + p);
      for (int r = 0; r < R; ++r) s[r] += cv[i][r] * y;
    }
    for (int r = 0; r < R; ++r) {
      V x;
      HF_LOAD(x, ww[r] + p);
      x -= s[r];
      HF_STORE(ww[r] + p, x);
    }
  }
  for (; p < n; ++p)
    for (int r = 0; r < R; ++r) {
      T s = c[r] * widen<T>(qq[0][p]);
      for (int i = 1; i < G; ++i) s += c[i * R + r] * widen<T>(qq[i][p]);
      ww[r][p] -= s;
    }
}
#undef HF_LOAD
#undef HF_STORE

}  // namespace cpu
}  // namespace hessfast
