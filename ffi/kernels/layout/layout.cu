// Dispatch layout kernel: per-rank / per-expert token counts and the
// token-in-rank mask from a [T, K] table of global expert ids.
//
// Blocks walk tiles of tokens. Per tile, a block keeps the tile's
// token-in-rank mask as a bitset in shared memory (bit t * R + r):
//   1. clear the bitset;
//   2. one thread per (token, k): skip invalid ids, count the expert in a
//      shared histogram, and set the (token, rank) bit with atomicOr; the
//      thread that flips the bit from 0 to 1 counts the rank, so a token
//      counts once per rank however many of its experts live there;
//   3. expand the bitset into the bool mask with 16-byte stores.
// At the end each block adds its shared histograms to the outputs with
// integer atomics. Integer sums are exact and each bit flips exactly once,
// so the results do not depend on thread or block order (deterministic).
#include "ffi/kernels/layout/layout.h"

#include <algorithm>
#include <cstdint>

namespace jax_ep {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxTileTokens = 128;
// Tiles hold a multiple of this many tokens, so every tile's mask rows start
// 16-byte aligned (given an aligned output buffer).
constexpr int64_t kTileQuantum = 16;
// Default dynamic shared memory limit (48 KiB), counted in 32-bit words.
constexpr int64_t kSharedBudgetWords = 48 * 1024 / 4;
// Enough blocks to fill an H100/H200 twice over; more only adds flush atomics.
constexpr int64_t kMaxBlocks = 264;

// Spreads the low 4 bits of `nibble` into the low bit of 4 bytes.
__device__ __forceinline__ uint32_t NibbleToBytes(uint32_t nibble) {
  return (nibble & 1u) | ((nibble & 2u) << 7) | ((nibble & 4u) << 14) | ((nibble & 8u) << 21);
}

__global__ void __launch_bounds__(kThreads)
    DispatchLayoutKernel(LayoutParams p, int tile_tokens, bool mask_aligned16) {
  extern __shared__ uint32_t smem[];
  const int E = static_cast<int>(p.num_experts);
  const int R = static_cast<int>(p.num_ranks);
  const int K = static_cast<int>(p.num_topk);
  const int experts_per_rank = E / R;
  const int bitset_words = (tile_tokens * R + 31) / 32;

  uint32_t* s_expert_count = smem;              // [E]
  uint32_t* s_rank_count = s_expert_count + E;  // [R]
  uint32_t* s_bits = s_rank_count + R;          // [bitset_words], bit t * R + r

  for (int i = threadIdx.x; i < E + R; i += blockDim.x) smem[i] = 0;

  const int64_t num_tiles = (p.num_tokens + tile_tokens - 1) / tile_tokens;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t t0 = tile * tile_tokens;
    const int n_tok = static_cast<int>(min(static_cast<int64_t>(tile_tokens), p.num_tokens - t0));
    const int32_t* ids = p.topk_idx + t0 * K;
    uint8_t* mask = reinterpret_cast<uint8_t*>(p.is_token_in_rank + t0 * R);

    for (int i = threadIdx.x; i < bitset_words; i += blockDim.x) s_bits[i] = 0;
    __syncthreads();

    for (int i = threadIdx.x; i < n_tok * K; i += blockDim.x) {
      const int32_t e = ids[i];
      if (e < 0 || e >= E) continue;  // -1 or invalid: no expert
      atomicAdd(&s_expert_count[e], 1u);
      const int r = e / experts_per_rank;
      const int bit = (i / K) * R + r;
      const uint32_t flag = 1u << (bit & 31);
      if ((atomicOr(&s_bits[bit >> 5], flag) & flag) == 0) atomicAdd(&s_rank_count[r], 1u);
    }
    __syncthreads();

    // Expand bits to bytes: 16 flags per 16-byte store, then the tail.
    const int n_bytes = n_tok * R;
    int done = 0;
    if (mask_aligned16) {
      const int n_vec = n_bytes / 16;
      for (int v = threadIdx.x; v < n_vec; v += blockDim.x) {
        const uint32_t bits16 = (s_bits[v >> 1] >> ((v & 1) * 16)) & 0xFFFFu;
        uint4 out;
        out.x = NibbleToBytes(bits16);
        out.y = NibbleToBytes(bits16 >> 4);
        out.z = NibbleToBytes(bits16 >> 8);
        out.w = NibbleToBytes(bits16 >> 12);
        reinterpret_cast<uint4*>(mask)[v] = out;
      }
      done = n_vec * 16;
    }
    for (int b = done + threadIdx.x; b < n_bytes; b += blockDim.x) {
      mask[b] = static_cast<uint8_t>((s_bits[b >> 5] >> (b & 31)) & 1u);
    }
    __syncthreads();  // before the next tile clears s_bits; before the flush
  }

  for (int i = threadIdx.x; i < E; i += blockDim.x) {
    if (s_expert_count[i] != 0) {
      atomicAdd(reinterpret_cast<uint32_t*>(&p.num_tokens_per_expert[i]), s_expert_count[i]);
    }
  }
  for (int i = threadIdx.x; i < R; i += blockDim.x) {
    if (s_rank_count[i] != 0) {
      atomicAdd(reinterpret_cast<uint32_t*>(&p.num_tokens_per_rank[i]), s_rank_count[i]);
    }
  }
}

}  // namespace

cudaError_t LaunchDispatchLayout(const LayoutParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.num_topk < 0 || p.num_topk > kLayoutMaxTopk ||
      p.num_experts < 1 || p.num_experts > kLayoutMaxExperts || p.num_ranks < 1 ||
      p.num_experts % p.num_ranks != 0) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaMemsetAsync(p.num_tokens_per_expert, 0,
                                    p.num_experts * sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(p.num_tokens_per_rank, 0, p.num_ranks * sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  if (p.num_tokens == 0) return cudaSuccess;  // nothing to count, empty mask

  // Tile size: as many tokens as the shared budget allows (<= 128), but small
  // enough to give every block work when T is small; a multiple of 16.
  const int64_t free_bits = (kSharedBudgetWords - p.num_experts - p.num_ranks) * 32;
  const int64_t fit = free_bits / p.num_ranks / kTileQuantum * kTileQuantum;
  const int64_t spread = (p.num_tokens + kMaxBlocks - 1) / kMaxBlocks;
  const int64_t want = (spread + kTileQuantum - 1) / kTileQuantum * kTileQuantum;
  const int64_t tile_tokens = std::min({kMaxTileTokens, fit, want});
  if (tile_tokens < 1) return cudaErrorInvalidValue;  // unreachable within the limits

  const int64_t num_tiles = (p.num_tokens + tile_tokens - 1) / tile_tokens;
  const int blocks = static_cast<int>(std::min(num_tiles, kMaxBlocks));
  const int64_t bitset_words = (tile_tokens * p.num_ranks + 31) / 32;
  const size_t shared_bytes = (p.num_experts + p.num_ranks + bitset_words) * sizeof(uint32_t);
  const bool aligned16 = reinterpret_cast<uintptr_t>(p.is_token_in_rank) % 16 == 0;
  DispatchLayoutKernel<<<blocks, kThreads, shared_bytes, stream>>>(
      p, static_cast<int>(tile_tokens), aligned16);
  return cudaGetLastError();
}

}  // namespace jax_ep
