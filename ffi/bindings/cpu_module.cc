// nanobind module jax_ep._jax_ep_cpu: always built; reports compile-time
// facts about this build (compiler, XLA FFI API version of the headers,
// whether the CUDA ops were built).
#include <string>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

namespace {

std::string Compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

nb::dict BuildInfo() {
  nb::dict d;
  d["version"] = JAX_EP_VERSION;
  d["build_type"] = JAX_EP_BUILD_TYPE;
  d["compiler"] = Compiler();
  d["cxx_standard"] = static_cast<long>(__cplusplus);
  d["ffi_api_version"] =
      nb::make_tuple(static_cast<int>(XLA_FFI_API_MAJOR), static_cast<int>(XLA_FFI_API_MINOR));
  d["cuda_built"] = static_cast<bool>(JAX_EP_WITH_CUDA);
#ifdef JAX_EP_WITH_NVSHMEM
  d["nvshmem_built"] = static_cast<bool>(JAX_EP_WITH_NVSHMEM);
#else
  d["nvshmem_built"] = false;
#endif
  return d;
}

}  // namespace

NB_MODULE(_jax_ep_cpu, m) {
  m.doc() = "jax_ep build facts (always built).";
  m.def("build_info", &BuildInfo,
        "Compile-time facts: version, build_type, compiler, cxx_standard, ffi_api_version "
        "(major, minor) of the XLA FFI headers, cuda_built (CUDA module built alongside), "
        "nvshmem_built (NVSHMEM low-latency module built alongside).");
}
