// pybind11 front of hessfast._kernels_cpu.
//
// Arguments are numpy arrays (zero-copy views of CPU tensors made by `tensor.numpy()`), so the
// module is built without torch and does not depend on the installed torch version.  Every array
// is checked here (dtype, shape, contiguity, writability) with a message naming it; the kernels in
// csrc/cpu/ then work on raw pointers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/kernels_cpu.h"
#include "cpu/simd_cpu.h"

namespace py = pybind11;
namespace hc = hessfast::cpu;

namespace {

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

[[noreturn]] void fail(const std::string& fn, const std::string& name, const std::string& want,
                       const py::array& a) {
  throw py::value_error("hessfast._kernels_cpu." + fn + ": " + name + " must be " + want +
                        ", got shape " + shape_str(a) + " dtype " + dtype_str(a) +
                        (a.writeable() ? "" : " (read-only)"));
}

// Checks ndim, the expected sizes (-1: any), dtype (same as `like`), C-contiguity of the last axis
// and, for outputs, writability.
void check(const std::string& fn, const std::string& name, const py::array& a,
           std::vector<py::ssize_t> shape, const py::dtype& dt, bool writable, bool contiguous,
           const std::string& want) {
  bool ok = a.ndim() == py::ssize_t(shape.size()) && a.dtype().is(dt);
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
  if (ok && contiguous) ok = (a.flags() & py::array::c_style) != 0;
  if (ok && !contiguous && a.ndim() == 2)
    ok = a.strides(1) == a.itemsize() && a.strides(0) % a.itemsize() == 0 &&
         a.strides(0) >= a.shape(1) * a.itemsize();
  if (ok && writable) ok = a.writeable();
  if (!ok) fail(fn, name, want, a);
}

bool is_f64(const std::string& fn, const py::array& a, const std::string& name) {
  if (a.dtype().is(py::dtype::of<double>())) return true;
  if (a.dtype().is(py::dtype::of<float>())) return false;
  fail(fn, name, "float32 or float64", a);
}

// ---- CGS2 -----------------------------------------------------------------------------------
// Q is float32 or float64 like W, or (with a float32 W) a bfloat16 basis passed as its raw 16-bit
// words (an int16/uint16 view: numpy has no bfloat16).
void cgs2(py::array Q, int64_t k, py::array W, py::array coeffs, py::array norms, int nt) {
  const std::string fn = "cgs2";
  const bool f64 = is_f64(fn, W, "W");
  const auto dt = W.dtype();
  const bool q_bf16 = Q.dtype().is(py::dtype::of<int16_t>()) || Q.dtype().is(py::dtype::of<uint16_t>());
  const std::string q_want = "a 2-D (m+1, P) array with unit column stride, of W's dtype " + dtype_str(W) +
                             (f64 ? "" : " or bfloat16 words (int16/uint16)");
  if (Q.ndim() != 2 || (q_bf16 && f64)) fail(fn, "Q", q_want, Q);
  const int64_t P = Q.shape(1);
  if (k < 0 || k > Q.shape(0))
    throw py::value_error("hessfast._kernels_cpu.cgs2: k=" + std::to_string(k) +
                          " must lie in [0, Q.shape[0]=" + std::to_string(Q.shape(0)) + "]");
  check(fn, "Q", Q, {-1, P}, q_bf16 ? Q.dtype() : dt, false, false, q_want);
  check(fn, "W", W, {-1, P}, dt, true, true,
        "a writable C-contiguous (b, " + std::to_string(P) + ") float32 or float64 array");
  const int64_t b = W.shape(0);
  check(fn, "coeffs", coeffs, {b, k}, dt, true, true,
        "a writable C-contiguous (" + std::to_string(b) + ", " + std::to_string(k) + ") array of dtype " + dtype_str(W));
  check(fn, "norms", norms, {b}, dt, true, true,
        "a writable (" + std::to_string(b) + ",) array of dtype " + dtype_str(W));
  const int64_t ldq = Q.strides(0) / Q.itemsize();
  py::gil_scoped_release nogil;
  if (f64)
    hc::cgs2<double>(static_cast<const double*>(Q.data()), ldq, k,
                     static_cast<double*>(W.mutable_data()), b, P,
                     static_cast<double*>(coeffs.mutable_data()),
                     static_cast<double*>(norms.mutable_data()), nt);
  else if (q_bf16)
    hc::cgs2<float, hc::bf16>(static_cast<const hc::bf16*>(Q.data()), ldq, k,
                              static_cast<float*>(W.mutable_data()), b, P,
                              static_cast<float*>(coeffs.mutable_data()),
                              static_cast<float*>(norms.mutable_data()), nt);
  else
    hc::cgs2<float>(static_cast<const float*>(Q.data()), ldq, k,
                    static_cast<float*>(W.mutable_data()), b, P,
                    static_cast<float*>(coeffs.mutable_data()),
                    static_cast<float*>(norms.mutable_data()), nt);
}

// ---- CholeskyQR2 with MGS fallback ----------------------------------------------------------
// Cholesky G = L L^T in place (lower); false if a pivot is not positive.
bool cholesky(std::vector<double>& G, int64_t b) {
  for (int64_t j = 0; j < b; ++j) {
    double d = G[j * b + j];
    for (int64_t l = 0; l < j; ++l) d -= G[j * b + l] * G[j * b + l];
    if (!(d > 0)) return false;
    d = std::sqrt(d);
    G[j * b + j] = d;
    for (int64_t i = j + 1; i < b; ++i) {
      double s = G[i * b + j];
      for (int64_t l = 0; l < j; ++l) s -= G[i * b + l] * G[j * b + l];
      G[i * b + j] = s / d;
    }
    for (int64_t i = 0; i < j; ++i) G[i * b + j] = 0;
  }
  return true;
}

std::vector<double> lower_inverse(const std::vector<double>& L, int64_t b) {
  std::vector<double> M(b * b, 0.0);
  for (int64_t c = 0; c < b; ++c) {
    M[c * b + c] = 1.0 / L[c * b + c];
    for (int64_t i = c + 1; i < b; ++i) {
      double s = 0;
      for (int64_t l = c; l < i; ++l) s += L[i * b + l] * M[l * b + c];
      M[i * b + c] = -s / L[i * b + i];
    }
  }
  return M;
}

// Upper-triangular product C = A B of (b, b) row-major matrices.
std::vector<double> matmul(const std::vector<double>& A, const std::vector<double>& B, int64_t b) {
  std::vector<double> C(b * b, 0.0);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t l = 0; l < b; ++l)
      for (int64_t j = 0; j < b; ++j) C[i * b + j] += A[i * b + l] * B[l * b + j];
  return C;
}

// Modified Gram-Schmidt, each projection applied twice.  Rows that are (numerically) dependent on
// the previous ones become zero rows with R[i, i] = 0.  Returns R (upper, W^T = Qb^T R).
template <typename T>
std::vector<double> mgs2(T* W, int64_t b, int64_t P) {
  std::vector<double> R(b * b, 0.0);
  std::vector<char> live(b, 0);
  const double tol = 16 * double(std::numeric_limits<T>::epsilon()) * std::sqrt(double(b));
  for (int64_t i = 0; i < b; ++i) {
    T* w = W + i * P;
    const double orig = std::sqrt(hc::sumsq<T>(w, P));
    for (int pass = 0; pass < 2; ++pass)
      for (int64_t l = 0; l < i; ++l) {
        if (!live[l]) continue;
        const double c = hc::dot1<T>(W + l * P, w, P);
        hc::axpy1<T>(w, W + l * P, T(c), P);
        R[l * b + i] += c;
      }
    const double nrm = std::sqrt(hc::sumsq<T>(w, P));
    if (!(nrm > tol * orig) || nrm == 0) {
      for (int64_t p = 0; p < P; ++p) w[p] = 0;
      continue;
    }
    live[i] = 1;
    R[i * b + i] = nrm;
    for (int64_t p = 0; p < P; ++p) w[p] = T(w[p] / nrm);
  }
  return R;
}

template <typename T>
std::string cholqr2_impl(T* W, int64_t b, int64_t P, T* Rout, int nt) {
  // CholeskyQR2 is backward stable while cond(W) <= 1/sqrt(100 u) (Yamamoto et al. 2015).
  const double max_cond = 1.0 / std::sqrt(100.0 * double(std::numeric_limits<T>::epsilon()));
  auto cond_ok = [&](const std::vector<double>& L) {
    double lo = L[0], hi = L[0];
    for (int64_t i = 1; i < b; ++i) {
      lo = std::min(lo, L[i * b + i]);
      hi = std::max(hi, L[i * b + i]);
    }
    return hi <= max_cond * lo;
  };
  auto transpose = [&](const std::vector<double>& A) {
    std::vector<double> B(b * b);
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = 0; j < b; ++j) B[j * b + i] = A[i * b + j];
    return B;
  };
  std::vector<double> G(b * b), R;
  std::string method = "cholqr2";
  hc::gram<T>(W, b, P, G.data(), nt);
  if (cholesky(G, b) && cond_ok(G)) {
    const std::vector<double> R1 = transpose(G);
    std::vector<double> G2(b * b);
    hc::apply_small<T>(W, b, P, lower_inverse(G, b).data(), G2.data(), nt);
    if (cholesky(G2, b)) {
      hc::apply_small<T>(W, b, P, lower_inverse(G2, b).data(), nullptr, nt);
      R = matmul(transpose(G2), R1, b);
    } else {
      R = matmul(mgs2<T>(W, b, P), R1, b);
      method = "cholqr+mgs";
    }
  } else {
    R = mgs2<T>(W, b, P);
    method = "mgs";
  }
  for (int64_t i = 0; i < b * b; ++i) Rout[i] = T(R[i]);
  return method;
}

std::string cholqr2(py::array W, py::array R, int nt) {
  const std::string fn = "cholqr2";
  const bool f64 = is_f64(fn, W, "W");
  check(fn, "W", W, {-1, -1}, W.dtype(), true, true, "a writable C-contiguous (b, P) array");
  const int64_t b = W.shape(0), P = W.shape(1);
  if (b == 0) return "empty";
  check(fn, "R", R, {b, b}, W.dtype(), true, true,
        "a writable C-contiguous (" + std::to_string(b) + ", " + std::to_string(b) + ") array of dtype " + dtype_str(W));
  py::gil_scoped_release nogil;
  if (f64)
    return cholqr2_impl<double>(static_cast<double*>(W.mutable_data()), b, P,
                                static_cast<double*>(R.mutable_data()), nt);
  return cholqr2_impl<float>(static_cast<float*>(W.mutable_data()), b, P,
                             static_cast<float*>(R.mutable_data()), nt);
}

// ---- Streamed squared-HVP accumulation --------------------------------------------------------
void sqhvp(py::array U, py::array V, py::array sum_u, py::array sum_sq, py::array sum_vu, int nt) {
  const std::string fn = "sqhvp";
  const bool f64 = is_f64(fn, U, "U");
  check(fn, "U", U, {-1, -1, -1}, U.dtype(), false, true, "a C-contiguous (c, b, P) array");
  const int64_t c = U.shape(0), b = U.shape(1), P = U.shape(2);
  const std::string bp = "(" + std::to_string(b) + ", " + std::to_string(P) + ")";
  check(fn, "V", V, {b, P}, U.dtype(), false, true, "a C-contiguous " + bp + " array of U's dtype " + dtype_str(U));
  check(fn, "sum_u", sum_u, {b, P}, U.dtype(), true, true, "a writable C-contiguous " + bp + " array of U's dtype " + dtype_str(U));
  const auto f8 = py::dtype::of<double>();
  const std::string b1 = "a writable float64 (" + std::to_string(b) + ",) array";
  check(fn, "sum_sq", sum_sq, {b}, f8, true, true, b1);
  check(fn, "sum_vu", sum_vu, {b}, f8, true, true, b1);
  py::gil_scoped_release nogil;
  double* sq = static_cast<double*>(sum_sq.mutable_data());
  double* vu = static_cast<double*>(sum_vu.mutable_data());
  if (f64)
    hc::sqhvp<double>(static_cast<const double*>(U.data()), c, b, P,
                      static_cast<const double*>(V.data()),
                      static_cast<double*>(sum_u.mutable_data()), sq, vu, nt);
  else
    hc::sqhvp<float>(static_cast<const float*>(U.data()), c, b, P,
                     static_cast<const float*>(V.data()),
                     static_cast<float*>(sum_u.mutable_data()), sq, vu, nt);
}

}  // namespace

PYBIND11_MODULE(_kernels_cpu, m) {
  m.doc() = "hessfast CPU kernels (fused CGS2, CholeskyQR2, streamed squared-HVP); see hessfast.kernels";
  m.def("cgs2", &cgs2, py::arg("Q"), py::arg("k"), py::arg("W"), py::arg("coeffs"),
        py::arg("norms"), py::arg("num_threads"),
        "Fused CGS2: W <- (I - Q_k^T Q_k)^2 W in three passes over Q_k = Q[:k]; fills coeffs "
        "(b, k) = h1 + h2 and norms (b,).");
  m.def("cholqr2", &cholqr2, py::arg("W"), py::arg("R"), py::arg("num_threads"),
        "CholeskyQR2 of the rows of W (b, P) in place (MGS fallback when ill-conditioned); fills "
        "R (b, b) upper with W^T = Qb^T R; returns the method used.");
  m.def("sqhvp", &sqhvp, py::arg("U"), py::arg("V"), py::arg("sum_u"), py::arg("sum_sq"),
        py::arg("sum_vu"), py::arg("num_threads"),
        "Accumulate a chunk U (c, b, P) of per-sample HVPs for probes V (b, P) in one pass.");
#ifdef _OPENMP
  m.attr("openmp") = _OPENMP;
#else
  m.attr("openmp") = 0;
#endif
#ifdef __VERSION__
  m.attr("compiler") = __VERSION__;
#endif
}
