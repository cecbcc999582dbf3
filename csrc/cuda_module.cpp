// pybind11 front of hessfast._kernels_cuda (compiled by the host compiler, linked with the nvcc
// objects of csrc/cuda/ and static cudart).  Tensors arrive as raw device pointers
// (tensor.data_ptr()) and the stream as an integer (torch.cuda.current_stream().cuda_stream);
// hessfast/kernels/ checks shapes, dtypes, devices and contiguity before calling, and sets
// the current device to the tensors' device.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cuda/kernels_cuda.h"

namespace py = pybind11;
namespace hc = hessfast::cuda;

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("hessfast._kernels_cuda.") + what + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
}

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

cudaStream_t stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void need_itemsize(int itemsize, const char* what) {
  if (itemsize != 4 && itemsize != 8)
    throw py::value_error(std::string("hessfast._kernels_cuda.") + what +
                          ": itemsize must be 4 (float32) or 8 (float64), got " + std::to_string(itemsize));
}

hc::Plan plan_for(int64_t k, int64_t b, int64_t P, int itemsize) {
  hc::Plan plan;
  check(hc::make_plan(k, b, P, itemsize, &plan), "plan");
  return plan;
}

// Fused CGS2 on raw device pointers (see hessfast/kernels/reorth.py for the arguments' meaning).
void cgs2(int itemsize, int q_itemsize, uintptr_t Q, int64_t ldq, int64_t k, uintptr_t W, int64_t b, int64_t P,
          uintptr_t coeffs, uintptr_t norms, uintptr_t work, uintptr_t s) {
  need_itemsize(itemsize, "cgs2");
  if (q_itemsize != itemsize && !(q_itemsize == 2 && itemsize == 4))
    throw py::value_error("hessfast._kernels_cuda.cgs2: the basis must have the block's dtype, or be bfloat16 "
                          "(q_itemsize 2) with a float32 block; got itemsizes " + std::to_string(q_itemsize) +
                          " and " + std::to_string(itemsize));
  const hc::Plan plan = plan_for(k, b, P, q_itemsize);
  py::gil_scoped_release nogil;
  if (q_itemsize == 2)
    check(hc::cgs2<float, __nv_bfloat16>(ptr<const __nv_bfloat16>(Q), ldq, k, ptr<float>(W), b, P,
                                         ptr<float>(coeffs), ptr<float>(norms), ptr<float>(work), plan,
                                         stream(s)), "cgs2");
  else if (itemsize == 8)
    check(hc::cgs2<double>(ptr<const double>(Q), ldq, k, ptr<double>(W), b, P, ptr<double>(coeffs),
                           ptr<double>(norms), ptr<double>(work), plan, stream(s)), "cgs2");
  else
    check(hc::cgs2<float>(ptr<const float>(Q), ldq, k, ptr<float>(W), b, P, ptr<float>(coeffs),
                          ptr<float>(norms), ptr<float>(work), plan, stream(s)), "cgs2");
}

}  // namespace

PYBIND11_MODULE(_kernels_cuda, m) {
  m.doc() = "hessfast CUDA kernels (raw device pointers; see hessfast.kernels)";
  m.def("device_status", [] {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess)
      return py::make_tuple(int(err), std::string("no usable CUDA device: ") + cudaGetErrorName(err) + " (" +
                                          cudaGetErrorString(err) + ")");
    if (n == 0) return py::make_tuple(-1, std::string("no CUDA device found"));
    return py::make_tuple(0, std::to_string(n) + " device(s)");
  }, "(code, message): code 0 when a CUDA device is usable, else the cudaError_t (or -1) and why.");
  m.def("device_count", [] {
    int n = 0;
    check(cudaGetDeviceCount(&n), "device_count");
    return n;
  });
  m.def("workspace", [](int64_t k, int64_t b, int64_t P, int q_itemsize) {
    if (q_itemsize != 2) need_itemsize(q_itemsize, "workspace");
    return plan_for(k, b, P, q_itemsize).work;
  }, py::arg("k"), py::arg("b"), py::arg("P"), py::arg("q_itemsize"),
     "Elements (of the block's dtype) of workspace cgs2 / gram need on the current device; q_itemsize is "
     "the basis element size (2 for a bfloat16 basis).");
  m.def("cgs2", &cgs2, "Fused CGS2 on raw pointers: Q (k rows, stride ldq; the block's dtype or bfloat16), W (b, P) in "
     "place, coeffs (b, k), norms (b,).");
  m.def("gram", [](int itemsize, uintptr_t W, int64_t b, int64_t P, uintptr_t G, uintptr_t work, uintptr_t s) {
    need_itemsize(itemsize, "gram");
    const hc::Plan plan = plan_for(b, b, P, itemsize);
    py::gil_scoped_release nogil;
    if (itemsize == 8)
      check(hc::gram<double>(ptr<const double>(W), b, P, ptr<double>(G), ptr<double>(work), plan, stream(s)), "gram");
    else
      check(hc::gram<float>(ptr<const float>(W), b, P, ptr<float>(G), ptr<float>(work), plan, stream(s)), "gram");
  }, "G (b, b) = W W^T; work needs workspace(b, b, P, itemsize) elements.");
  m.def("apply_small", [](int itemsize, uintptr_t W, int64_t b, int64_t P, uintptr_t M, uintptr_t out, uintptr_t s) {
    need_itemsize(itemsize, "apply_small");
    py::gil_scoped_release nogil;
    if (itemsize == 8)
      check(hc::apply_small<double>(ptr<const double>(W), b, P, ptr<const double>(M), ptr<double>(out), stream(s)),
            "apply_small");
    else
      check(hc::apply_small<float>(ptr<const float>(W), b, P, ptr<const float>(M), ptr<float>(out), stream(s)),
            "apply_small");
  }, "out (b, P) = M (b, b) @ W (b, P).");
  m.def("sqhvp_grid", [](int64_t P) {
    int dev = 0, sms = 1;
    check(cudaGetDevice(&dev), "sqhvp_grid");
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "sqhvp_grid");
    const int64_t chunks = (P + 255) / 256;
    return int(std::max<int64_t>(1, std::min<int64_t>(chunks, int64_t(8) * sms)));
  });
  m.def("sqhvp", [](int itemsize, uintptr_t U, int64_t c, int64_t b, int64_t P, uintptr_t V, uintptr_t sum_u,
                    uintptr_t part, int grid, uintptr_t s) {
    need_itemsize(itemsize, "sqhvp");
    py::gil_scoped_release nogil;
    if (itemsize == 8)
      check(hc::sqhvp<double>(ptr<const double>(U), c, b, P, ptr<const double>(V), ptr<double>(sum_u),
                              ptr<double>(part), grid, stream(s)), "sqhvp");
    else
      check(hc::sqhvp<float>(ptr<const float>(U), c, b, P, ptr<const float>(V), ptr<float>(sum_u),
                             ptr<float>(part), grid, stream(s)), "sqhvp");
  }, "sum_u += sum_i U[i]; part (grid, 2, b) = per-block sums of |U|^2 and V.U.");
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  m.attr("runtime_version") = rt;
#ifdef HESSFAST_CUDA_ARCHS
  m.attr("archs") = HESSFAST_CUDA_ARCHS;
#else
  m.attr("archs") = "";
#endif
}
