// Dispatch routing kernel: for each destination rank, which of my tokens go
// there and in what order (an exclusive prefix count over tokens).
//
// One block per rank r walks the tokens in rounds of blockDim.x: each thread
// decides whether its token goes to r, the round is scanned with warp ballots
// plus one pass over the warp totals, and a running count carries across
// rounds. Integer counts in token order: deterministic. This replaces an XLA
// cumsum over [T, R] that took ~48 µs for T = 4096 on an H200 (reduce-window
// lowering), more than the dispatch kernels themselves.
#include "ffi/kernels/route.h"

#include <algorithm>

namespace jax_ep {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

__global__ void __launch_bounds__(kThreads) RouteKernel(RouteParams p) {
  __shared__ int32_t s_warp_total[kWarps];
  __shared__ int32_t s_carry;
  const int r = blockIdx.x;
  const int R = static_cast<int>(p.num_ranks);
  const int64_t K = p.num_topk;
  const int64_t E = p.num_experts;
  const int64_t per_rank = E / R;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) s_carry = 0;
  __syncthreads();

  for (int64_t t0 = 0; t0 < p.num_tokens; t0 += kThreads) {
    const int64_t t = t0 + threadIdx.x;
    bool goes = false;
    if (t < p.num_tokens) {
      const int32_t* ids = p.topk_idx + t * K;
      for (int64_t k = 0; k < K; ++k) {
        const int32_t e = __ldg(ids + k);
        goes |= e >= 0 && e < E && e / per_rank == r;
      }
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, goes);
    if (lane == 0) s_warp_total[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {  // exclusive scan of the warp totals
      const int32_t total = s_warp_total[lane];
      int32_t incl = total;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int32_t up = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += up;
      }
      s_warp_total[lane] = incl - total;
    }
    __syncthreads();
    const int32_t carry = s_carry;
    const int32_t before = carry + s_warp_total[warp] + __popc(ballot & ((1u << lane) - 1u));
    if (t < p.num_tokens) p.slot[t * R + r] = goes ? before : -1;
    __syncthreads();  // everyone read s_carry and s_warp_total
    if (threadIdx.x == kThreads - 1) s_carry = before + (goes ? 1 : 0);
    __syncthreads();
  }
  if (threadIdx.x == 0) p.sent[r] = s_carry;
}

}  // namespace

cudaError_t LaunchRoute(const RouteParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.num_topk < 0 || p.num_experts < 1 || p.num_ranks < 1 ||
      p.num_ranks > kRouteMaxRanks || p.num_experts % p.num_ranks != 0) {
    return cudaErrorInvalidValue;
  }
  RouteKernel<<<static_cast<unsigned>(p.num_ranks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_ep
