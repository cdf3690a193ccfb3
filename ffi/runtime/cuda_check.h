// CUDA error handling of the initialize-time runtime calls, shared by the
// intranode runtime (intranode_runtime.cc) and the NVSHMEM runtime
// (low_latency_runtime.cc): errors become std::runtime_error naming the device
// and the CUDA error, and a guard restores the caller's current device.
#pragma once

#include <string>

#include <cuda_runtime.h>

namespace jax_ep {

// "cudaErrorX: description".
std::string CudaMessage(cudaError_t err);

// Clears a non-sticky error (so later calls are not confused) and throws
// "jax_ep: <what> on CUDA device <device> failed (<CudaMessage>)".
[[noreturn]] void CudaFail(int device, const std::string& what, cudaError_t err);

// CudaFail unless err is cudaSuccess.
inline void CudaCheck(cudaError_t err, int device, const std::string& what) {
  if (err != cudaSuccess) CudaFail(device, what, err);
}

// Makes `device` current; restores the previous device on scope exit.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace jax_ep
