// Dispatch routing kernel: interface for host code. Plain C++ types only; the
// FFI handler (ffi/handlers/route.cc) fills RouteParams from XLA buffers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace jax_ep {

// Largest EP group the routing kernels support (a token's destinations are a
// 64-bit mask; the intranode kernels stop at 64 ranks too).
inline constexpr int64_t kRouteMaxRanks = 64;

struct RouteParams {
  const int32_t* topk_idx;  // [num_tokens, num_topk], global expert ids
  int32_t* slot;            // [num_tokens, num_ranks]: position of t among my tokens for r, or -1
  int32_t* sent;            // [num_ranks]: my tokens for each rank
  int64_t num_tokens;       // T >= 0
  int64_t num_topk;         // K >= 0
  int64_t num_experts;      // E >= 1
  int64_t num_ranks;        // R in [1, kRouteMaxRanks], E % R == 0
};

// Enqueues the routing computation on `stream` (no host synchronisation):
// token t goes to rank r when one of its ids e in [0, E) has e / (E / R) == r
// (other ids mean "no expert"); slot[t, r] counts the tokens before t that go
// to r. Same values as jax_ep._routing.route. Returns cudaErrorInvalidValue
// for parameters outside the limits above, else the launch status.
// `scratch` holds RouteScratchInts(num_tokens, num_ranks) int32 (per-chunk
// counts between the two kernels).
int64_t RouteScratchInts(int64_t num_tokens, int64_t num_ranks);
cudaError_t LaunchRoute(const RouteParams& params, int32_t* scratch, cudaStream_t stream);

}  // namespace jax_ep
