// Dispatch routing kernels: for each destination rank, which of my tokens go
// there and in what order (an exclusive prefix count over tokens).
//
// Two kernels over chunks of 1024 tokens (one thread per token):
//  1. RouteChunkKernel: each thread builds its token's destination-rank mask
//     (one pass over its K ids), warp ballots per rank give positions inside
//     the warp, a scan over the 32 warps positions inside the chunk; slot gets
//     the chunk-local position, chunk_counts[chunk][r] the chunk's total.
//  2. RouteOffsetKernel: adds the totals of the earlier chunks to every slot
//     and writes sent[r] (the last chunk).
// Integer counts in token order: deterministic. A kernel because XLA's
// cumsum over [T, R] (a reduce-window) was slow; see docs/optimisation-log.md.
#include "ffi/kernels/layout/route.h"

#include <algorithm>
#include <climits>

namespace jax_ep {
namespace {

constexpr int kThreads = 1024;  // = tokens per chunk
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

// Bit r set: one of the token's K ids e in [0, E) lives on rank r = e / per_rank.
__device__ __forceinline__ uint64_t RankMask(const int32_t* __restrict__ ids, int32_t K,
                                             int32_t E, int32_t per_rank, bool vec4) {
  uint64_t mask = 0;
  if (vec4) {
    for (int32_t k = 0; k < K; k += 4) {
      const int4 v = __ldg(reinterpret_cast<const int4*>(ids + k));
      const int32_t e[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (e[i] >= 0 && e[i] < E) mask |= uint64_t{1} << (e[i] / per_rank);
      }
    }
  } else {
    for (int32_t k = 0; k < K; ++k) {
      const int32_t e = __ldg(ids + k);
      if (e >= 0 && e < E) mask |= uint64_t{1} << (e / per_rank);
    }
  }
  return mask;
}

__global__ void __launch_bounds__(kThreads)
    RouteChunkKernel(RouteParams p, int32_t* chunk_counts, bool vec4) {
  __shared__ int32_t s_warp[kRouteMaxRanks][kWarps];  // per-warp counts, then their prefix
  const int R = static_cast<int>(p.num_ranks);
  const int32_t K = static_cast<int32_t>(p.num_topk);
  const int32_t E = static_cast<int32_t>(p.num_experts);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const unsigned below = (1u << lane) - 1u;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const uint64_t mask =
      t < p.num_tokens ? RankMask(p.topk_idx + t * K, K, E, E / R, vec4) : uint64_t{0};

  for (int r = 0; r < R; ++r) {
    const unsigned b = __ballot_sync(kFull, (mask >> r) & 1);
    if (lane == 0) s_warp[r][warp] = __popc(b);
  }
  __syncthreads();
  for (int r = warp; r < R; r += kWarps) {  // exclusive scan over the warps, per rank
    const int32_t count = s_warp[r][lane];
    int32_t incl = count;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int32_t up = __shfl_up_sync(kFull, incl, d);
      if (lane >= d) incl += up;
    }
    s_warp[r][lane] = incl - count;
    if (lane == 31) chunk_counts[static_cast<int64_t>(blockIdx.x) * R + r] = incl;
  }
  __syncthreads();
  for (int r = 0; r < R; ++r) {
    const bool goes = (mask >> r) & 1;
    const unsigned b = __ballot_sync(kFull, goes);
    if (t < p.num_tokens) p.slot[t * R + r] = goes ? s_warp[r][warp] + __popc(b & below) : -1;
  }
}

__global__ void __launch_bounds__(kThreads)
    RouteOffsetKernel(RouteParams p, const int32_t* chunk_counts, int64_t num_chunks) {
  __shared__ int32_t s_offset[kRouteMaxRanks];  // tokens of earlier chunks, per rank
  const int R = static_cast<int>(p.num_ranks);
  const int64_t chunk = blockIdx.x;
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    int32_t acc = 0;
    for (int64_t c = 0; c < chunk; ++c) acc += chunk_counts[c * R + r];
    s_offset[r] = acc;
    if (chunk == num_chunks - 1) p.sent[r] = acc + chunk_counts[chunk * R + r];
  }
  __syncthreads();
  if (chunk == 0) return;  // offsets are all zero
  const int64_t t = chunk * kThreads + threadIdx.x;
  if (t >= p.num_tokens) return;
  int32_t* row = p.slot + t * R;
  for (int r = 0; r < R; ++r) {
    const int32_t s = row[r];
    if (s >= 0) row[r] = s + s_offset[r];
  }
}

}  // namespace

int64_t RouteScratchInts(int64_t num_tokens, int64_t num_ranks) {
  return std::max<int64_t>(1, (num_tokens + kThreads - 1) / kThreads) * num_ranks;
}

cudaError_t LaunchRoute(const RouteParams& p, int32_t* scratch, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.num_topk < 0 || p.num_topk > INT32_MAX || p.num_experts < 1 ||
      p.num_experts > INT32_MAX || p.num_ranks < 1 || p.num_ranks > kRouteMaxRanks ||
      p.num_experts % p.num_ranks != 0 || scratch == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens == 0) return cudaMemsetAsync(p.sent, 0, p.num_ranks * sizeof(int32_t), stream);
  const int64_t num_chunks = (p.num_tokens + kThreads - 1) / kThreads;
  const bool vec4 = p.num_topk % 4 == 0 && reinterpret_cast<uintptr_t>(p.topk_idx) % 16 == 0;
  RouteChunkKernel<<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(p, scratch, vec4);
  RouteOffsetKernel<<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(p, scratch,
                                                                               num_chunks);
  return cudaGetLastError();
}

}  // namespace jax_ep
