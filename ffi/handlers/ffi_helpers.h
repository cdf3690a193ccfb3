// Helpers of the XLA FFI handlers in ffi/handlers/*.cc (intranode, layout,
// low-latency): shape strings and checks, XLA dtypes as the kernels' element
// types, CUDA errors as ffi::Error, the runtime lookup, and the binding
// prefix of the op handlers. Header-only: the handlers of both Python
// extension modules include it.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include <cuda_runtime.h>

#include "ffi/kernels/common/elem_type.h"
#include "ffi/runtime/host_runs.h"
#include "xla/ffi/api/ffi.h"

// Returns from the enclosing function (which returns ffi::Error) with the
// error of `expr` if it is a failure.
#define JAX_EP_RETURN_IF_ERROR(expr)                                         \
  do {                                                                       \
    if (::xla::ffi::Error jax_ep_error_ = (expr); jax_ep_error_.failure()) { \
      return jax_ep_error_;                                                  \
    }                                                                        \
  } while (0)

// The traits of every jax_ep handler (XLA_FFI_DEFINE_HANDLER_SYMBOL's last
// argument): it may be captured into XLA's CUDA graphs (command buffers). What
// makes that true, for every handler: its host code only checks shapes and
// launches on XLA's stream (no allocation, synchronisation, peer mapping or
// host read of device data), and everything that changes from call to call
// (op counters, epochs, buffer-set parity, task counters) lives in device
// memory the kernels advance, because a captured handler's host code runs
// when XLA records the graph, not on each replay. Checked by
// tests/cuda/test_graph_safety.py.
#define JAX_EP_GRAPH_SAFE {::xla::ffi::Traits::kCmdBufferCompatible}

namespace jax_ep::ffi_util {

namespace ffi = xla::ffi;

inline std::string Str(int64_t v) { return std::to_string(v); }

// "[a, b, c]" of a dimension list.
template <typename Container>
std::string JoinDims(const Container& dims) {
  std::string s = "[";
  size_t i = 0;
  for (int64_t d : dims) {
    if (i++) s += ", ";
    s += std::to_string(d);
  }
  return s + "]";
}
inline std::string Dims(ffi::Span<const int64_t> dims) { return JoinDims(dims); }
inline std::string Shape(std::initializer_list<int64_t> want) { return JoinDims(want); }

inline bool SameDims(ffi::Span<const int64_t> dims, std::initializer_list<int64_t> want) {
  if (dims.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want) {
    if (dims[i++] != w) return false;
  }
  return true;
}

// InvalidArgument "<where><name> must have shape [..], got [..]" unless
// dims == want.
inline ffi::Error ExpectShape(const std::string& where, const char* name,
                              ffi::Span<const int64_t> dims, std::initializer_list<int64_t> want) {
  if (SameDims(dims, want)) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(where + name + " must have shape " + Shape(want) + ", got " +
                                     Dims(dims));
}

// Internal "<where>CUDA error <name>: <description>".
inline ffi::Error CudaError(const std::string& where, cudaError_t err) {
  return ffi::Error::Internal(where + "CUDA error " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

// The kernels' element type of an XLA dtype; false for any other dtype.
inline bool ToElemType(ffi::DataType dtype, ElemType* out) {
  switch (dtype) {
    case ffi::DataType::BF16:
      *out = ElemType::kBF16;
      return true;
    case ffi::DataType::F16:
      *out = ElemType::kF16;
      return true;
    case ffi::DataType::F32:
      *out = ElemType::kF32;
      return true;
    case ffi::DataType::F8E4M3FN:
      *out = ElemType::kF8E4M3FN;
      return true;
    default:
      return false;
  }
}

// Success, or the launch's CUDA error as CudaError: how every handler ends.
inline ffi::Error LaunchStatus(const std::string& where, cudaError_t err) {
  if (err != cudaSuccess) return CudaError(where, err);
  return ffi::Error::Success();
}

// ResourceExhausted "<where><message>" (the comm buffer or region is too small).
inline ffi::Error TooLarge(const std::string& where, const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kResourceExhausted, where + message);
}

// Looks up this device's communicator with a runtime's Acquire* call
// (AcquireIntranodeComm, AcquireLowLatency); its error message becomes an
// Internal error prefixed with `where`.
template <typename Comm, typename Hold>
ffi::Error AcquireComm(bool (*acquire)(int, Comm*, Hold*, std::string*), const std::string& where,
                       int32_t device, Comm* comm, Hold* hold) {
  CountHandlerHostRun();
  std::string error;
  if (!acquire(device, comm, hold, &error)) return ffi::Error::Internal(where + error);
  return ffi::Error::Success();
}

// Every op handler starts with XLA's stream and the device ordinal.
inline auto BindStreamAndDevice() {
  return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>();
}

}  // namespace jax_ep::ffi_util
