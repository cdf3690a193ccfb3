// CUDA error handling of the runtime calls (see cuda_check.h).
#include "ffi/runtime/cuda_check.h"

#include <stdexcept>

namespace jax_ep {

std::string CudaMessage(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

void CudaFail(int device, const std::string& what, cudaError_t err) {
  cudaGetLastError();  // clear a non-sticky error so later calls are not confused
  throw std::runtime_error("jax_ep: " + what + " on CUDA device " + std::to_string(device) +
                           " failed (" + CudaMessage(err) + ")");
}

DeviceGuard::DeviceGuard(int device) {
  if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
  CudaCheck(cudaSetDevice(device), device, "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

}  // namespace jax_ep
