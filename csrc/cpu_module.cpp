// pybind11 front of hessfast._kernels_cpu.
//
// Arguments are numpy arrays (zero-copy views of CPU tensors made by `tensor.numpy()`), so the
// module is built without torch and does not depend on the installed torch version.  Every array
// is checked here (dtype, shape, contiguity, writability) with a message naming it; the kernels in
// csrc/cpu/ then work on raw pointers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

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
                        (a.writeable() ? "" : " (read-only)") +
                        ((a.flags() & py::array::c_style) ? "" : " (not C-contiguous)"));
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

// ---- CholeskyQR2 passes ---------------------------------------------------------------------
// The two passes over the block that hessfast.kernels.cholqr2 drives; the b x b algebra and the
// MGS fallback run in Python.
void gram(py::array W, py::array G, int nt) {
  const std::string fn = "gram";
  const bool f64 = is_f64(fn, W, "W");
  check(fn, "W", W, {-1, -1}, W.dtype(), false, true, "a C-contiguous (b, P) float32 or float64 array");
  const int64_t b = W.shape(0), P = W.shape(1);
  check(fn, "G", G, {b, b}, py::dtype::of<double>(), true, true,
        "a writable C-contiguous float64 (" + std::to_string(b) + ", " + std::to_string(b) + ") array");
  py::gil_scoped_release nogil;
  double* g = static_cast<double*>(G.mutable_data());
  if (f64)
    hc::gram<double>(static_cast<const double*>(W.data()), b, P, g, nt);
  else
    hc::gram<float>(static_cast<const float*>(W.data()), b, P, g, nt);
}

void apply_small(py::array W, py::array M, py::object G, int nt) {
  const std::string fn = "apply_small";
  const bool f64 = is_f64(fn, W, "W");
  check(fn, "W", W, {-1, -1}, W.dtype(), true, true, "a writable C-contiguous (b, P) float32 or float64 array");
  const int64_t b = W.shape(0), P = W.shape(1);
  const std::string bb = "(" + std::to_string(b) + ", " + std::to_string(b) + ")";
  const auto f8 = py::dtype::of<double>();
  check(fn, "M", M, {b, b}, f8, false, true, "a C-contiguous float64 " + bb + " array");
  double* g = nullptr;
  if (!G.is_none()) {
    py::array Ga = G.cast<py::array>();
    check(fn, "G", Ga, {b, b}, f8, true, true, "None or a writable C-contiguous float64 " + bb + " array");
    g = static_cast<double*>(Ga.mutable_data());
  }
  const double* m = static_cast<const double*>(M.data());
  py::gil_scoped_release nogil;
  if (f64)
    hc::apply_small<double>(static_cast<double*>(W.mutable_data()), b, P, m, g, nt);
  else
    hc::apply_small<float>(static_cast<float*>(W.mutable_data()), b, P, m, g, nt);
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
  m.doc() = "hessfast CPU kernels (fused CGS2, CholeskyQR2 passes, streamed squared-HVP); see hessfast.kernels";
  m.def("cgs2", &cgs2, py::arg("Q"), py::arg("k"), py::arg("W"), py::arg("coeffs"),
        py::arg("norms"), py::arg("num_threads"),
        "Fused CGS2: W <- (I - Q_k^T Q_k)^2 W in three passes over Q_k = Q[:k]; fills coeffs "
        "(b, k) = h1 + h2 and norms (b,).");
  m.def("gram", &gram, py::arg("W"), py::arg("G"), py::arg("num_threads"),
        "G (b, b) float64 = W W^T for W (b, P), accumulated in double across tiles.");
  m.def("apply_small", &apply_small, py::arg("W"), py::arg("M"), py::arg("G"), py::arg("num_threads"),
        "W <- M W in place for M (b, b) float64 (rounded to W's dtype); if G is not None also "
        "G = W W^T of the result, in the same pass.");
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
