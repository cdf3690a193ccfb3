// nanobind module jax_ep._jax_ep_cuda: hands the CUDA XLA FFI handlers to
// Python as PyCapsules (registered lazily by jax_ep/_ffi.py) and reports
// what this module was compiled for.
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "ffi/handlers/handlers.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

// FFI target name -> handler capsule, for jax.ffi.register_ffi_target(...,
// platform="CUDA"). Add one line per new handler.
nb::dict Registrations() {
  nb::dict d;
  d["jax_ep_get_dispatch_layout"] = Capsule(JaxEpGetDispatchLayout);
  return d;
}

// CMAKE_CUDA_ARCHITECTURES at build time, e.g. "90a" or "90a;100a".
std::vector<std::string> CudaArchs() {
  std::vector<std::string> out;
  std::string archs = JAX_EP_CUDA_ARCHS;
  size_t start = 0;
  while (start <= archs.size()) {
    size_t end = archs.find(';', start);
    if (end == std::string::npos) end = archs.size();
    if (end > start) out.push_back(archs.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

}  // namespace

NB_MODULE(_jax_ep_cuda, m) {
  m.doc() = "jax_ep CUDA FFI handlers (PyCapsules) and build facts.";
  m.def("registrations", &Registrations,
        "Dict of FFI target name -> PyCapsule of its XLA FFI handler (platform CUDA).");
  m.def("cuda_archs", &CudaArchs, "CUDA architectures the kernels were compiled for.");
  m.def("cudart_version", [] { return CUDART_VERSION; },
        "CUDA runtime version compiled in (statically linked), e.g. 13000.");
}
