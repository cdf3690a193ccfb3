// Dispatch routing kernel: for each destination rank, which of my tokens go
// there and in what order (an exclusive prefix count over tokens).
//
// One block per rank r walks the tokens in rounds of 4096: each thread
// decides whether its 4 consecutive tokens go to r, the round is scanned with
// warp shuffles plus one pass over the warp totals, and a running count
// carries across rounds. Integer counts in token order: deterministic. This replaces an XLA
// cumsum over [T, R] that took ~48 µs for T = 4096 on an H200 (reduce-window
// lowering), more than the dispatch kernels themselves.
#include "ffi/kernels/route.h"

#include <algorithm>
#include <climits>

namespace jax_ep {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kTokensPerThread = 4;  // consecutive tokens per thread and round
constexpr int kRoundTokens = kThreads * kTokensPerThread;

// Whether token t (ids row `ids`, K of them) has a valid expert on rank r.
// 16-byte loads when K and the row allow: all of a row's loads are in flight
// at once (the first version's scalar loop took 12.8 µs for T = 4096).
__device__ __forceinline__ bool GoesTo(const int32_t* __restrict__ ids, int32_t K, int32_t E,
                                       int32_t per_rank, int32_t r, bool vec4) {
  bool goes = false;
  if (vec4) {
    for (int32_t k = 0; k < K; k += 4) {
      const int4 v = __ldg(reinterpret_cast<const int4*>(ids + k));
      const int32_t e[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) goes |= e[i] >= 0 && e[i] < E && e[i] / per_rank == r;
    }
  } else {
    for (int32_t k = 0; k < K; ++k) {
      const int32_t e = __ldg(ids + k);
      goes |= e >= 0 && e < E && e / per_rank == r;
    }
  }
  return goes;
}

__global__ void __launch_bounds__(kThreads) RouteKernel(RouteParams p, bool vec4) {
  __shared__ int32_t s_warp_total[kWarps];
  __shared__ int32_t s_carry;
  const int32_t r = static_cast<int32_t>(blockIdx.x);
  const int R = static_cast<int>(p.num_ranks);
  const int32_t K = static_cast<int32_t>(p.num_topk);
  const int32_t E = static_cast<int32_t>(p.num_experts);
  const int32_t per_rank = E / R;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) s_carry = 0;
  __syncthreads();

  for (int64_t t0 = 0; t0 < p.num_tokens; t0 += kRoundTokens) {
    const int64_t first = t0 + static_cast<int64_t>(threadIdx.x) * kTokensPerThread;
    bool goes[kTokensPerThread];
    int32_t mine = 0;
#pragma unroll
    for (int j = 0; j < kTokensPerThread; ++j) {
      const int64_t t = first + j;
      goes[j] = t < p.num_tokens && GoesTo(p.topk_idx + t * K, K, E, per_rank, r, vec4);
      mine += goes[j] ? 1 : 0;
    }
    // Exclusive scan of `mine` over the block: within the warp, then the warps.
    int32_t incl = mine;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int32_t up = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += up;
    }
    if (lane == 31) s_warp_total[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      const int32_t total = s_warp_total[lane];
      int32_t warp_incl = total;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int32_t up = __shfl_up_sync(0xffffffffu, warp_incl, d);
        if (lane >= d) warp_incl += up;
      }
      s_warp_total[lane] = warp_incl - total;
    }
    __syncthreads();
    int32_t before = s_carry + s_warp_total[warp] + incl - mine;
#pragma unroll
    for (int j = 0; j < kTokensPerThread; ++j) {
      const int64_t t = first + j;
      if (t < p.num_tokens) p.slot[t * R + r] = goes[j] ? before : -1;
      before += goes[j] ? 1 : 0;
    }
    __syncthreads();  // everyone read s_carry and s_warp_total
    if (threadIdx.x == kThreads - 1) s_carry = before;
    __syncthreads();
  }
  if (threadIdx.x == 0) p.sent[r] = s_carry;
}

}  // namespace

cudaError_t LaunchRoute(const RouteParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.num_topk < 0 || p.num_topk > INT32_MAX || p.num_experts < 1 ||
      p.num_experts > INT32_MAX || p.num_ranks < 1 ||
      p.num_ranks > kRouteMaxRanks || p.num_experts % p.num_ranks != 0) {
    return cudaErrorInvalidValue;
  }
  const bool vec4 = p.num_topk % 4 == 0 && reinterpret_cast<uintptr_t>(p.topk_idx) % 16 == 0;
  RouteKernel<<<static_cast<unsigned>(p.num_ranks), kThreads, 0, stream>>>(p, vec4);
  return cudaGetLastError();
}

}  // namespace jax_ep
