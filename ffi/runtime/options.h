// Run-time options both communicator runtimes take (intranode_runtime.cc:
// comm_set_options, low_latency_runtime.cc: nvshmem_ll_set_options): the
// spin-wait timeout and the grid size of the kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace jax_ep {

inline constexpr double kDefaultTimeoutSeconds = 60.0;
inline constexpr int kMaxNumBlocks = 1 << 16;

// Throws std::runtime_error("jax_ep: <caller>: ...") unless timeout_s is a
// positive, finite number of seconds (at most 1e9) and num_blocks is in
// [0, kMaxNumBlocks] (0 = automatic).
inline void CheckTimeoutAndBlocks(const char* caller, double timeout_s, int num_blocks) {
  const std::string where = std::string("jax_ep: ") + caller + ": ";
  if (!(timeout_s > 0.0) || !std::isfinite(timeout_s) || timeout_s > 1e9) {
    throw std::runtime_error(where + "timeout_s must be a positive number of seconds, got " +
                             std::to_string(timeout_s));
  }
  if (num_blocks < 0 || num_blocks > kMaxNumBlocks) {
    throw std::runtime_error(where + "num_blocks must be in [0, " + std::to_string(kMaxNumBlocks) +
                             "] (0 = automatic), got " + std::to_string(num_blocks));
  }
}

// The kernels' spin-wait limit for a timeout in seconds.
inline uint64_t TimeoutNs(double timeout_s) { return static_cast<uint64_t>(timeout_s * 1e9); }

}  // namespace jax_ep
