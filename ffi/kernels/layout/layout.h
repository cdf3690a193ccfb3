// Dispatch layout kernel: interface for host code. Plain C++ types only; the
// FFI handler (ffi/handlers/layout.cc) fills LayoutParams from XLA buffers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace jax_ep {

// Limits the kernel supports; the handler rejects larger problems. Each
// block keeps histograms of all experts and ranks in shared memory.
inline constexpr int64_t kLayoutMaxExperts = 4096;
inline constexpr int64_t kLayoutMaxTopk = 65536;

struct LayoutParams {
  const int32_t* topk_idx;         // [num_tokens, num_topk], global expert ids
  int32_t* num_tokens_per_rank;    // [num_ranks]
  int32_t* num_tokens_per_expert;  // [num_experts]
  bool* is_token_in_rank;          // [num_tokens, num_ranks]
  int64_t num_tokens;              // T >= 0
  int64_t num_topk;                // K >= 0
  int64_t num_experts;             // E in [1, kLayoutMaxExperts]
  int64_t num_ranks;               // R >= 1, E % R == 0
};

// Enqueues the layout computation on `stream` (no host synchronisation).
// Expert e lives on rank e / (E / R). Ids outside [0, E) count as "no expert".
// Returns cudaErrorInvalidValue for parameters outside the limits above, else
// the launch status.
cudaError_t LaunchDispatchLayout(const LayoutParams& params, cudaStream_t stream);

}  // namespace jax_ep
