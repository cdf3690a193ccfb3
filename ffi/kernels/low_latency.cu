// Low-latency (decode) dispatch / combine over NVSHMEM, DeepEP-LL style but
// deterministic: static per-expert slots, rows ordered by (source rank,
// source token), fp32 reductions in a fixed order. One kernel per op (or one
// per half in the split send / receive form), no host synchronisation.
//
// Notation: R PEs (= EP ranks), me = this PE, T <= M tokens, K top-k, E
// experts, L = E / R local experts, expert e lives on PE e / L as local
// expert e % L. n = the op number (1, 2, ...), b = n & 1 the buffer set.
//
// REGION. One symmetric NVSHMEM allocation per PE (nvshmem_align, zeroed
// once at initialize), same layout on every PE (LLLayout, low_latency.h):
//   control  +0    u64 op counter (LL ops this PE started; owner only)
//            +8    u32 / +12 u32  last-block counters of send / receive phases
//            +256  u64 done[2][64]  done[b][s] = (n << 4) | op of source s's op n
//            +1280 u64 ack[2][64]   ack[b][r]  = n once PE r finished reading set b of op n
//   counts   int32 [2][R][E]        counts[b][s][e] = tokens source s sent to expert e in op n
//   scratch  int32 [2][E]           my per-expert counts (local, then broadcast; all zero
//                                   between ops: the op that used it zeroes it)
//   jpos     int32 [2][M*K]         j(t, k): position of token t among my tokens for its expert
//   sets     [2][set_bytes]         receive area of ops with parity b:
//              dispatch:  rows [L][R][M] of (16-byte header {t} + payload), payload = x row or
//                         e4m3 row + H/128 f32 scales; source s writes its j-th token (in
//                         token order) for local expert l at [l][s][j]: where a row goes
//                         depends on nothing but the source's own top-k ids
//              combine /  rows [E][M] of H * itemsize: the owner of expert e writes the
//              gather:    output row of (source me, token t) at [e][t] (a token naming e
//                         twice reads the same row twice: no special case)
//              cached:    rows [L][R*M]: the source writes straight to the final row (slot)
//   send     staging rows for NVSHMEM puts (only with a send buffer): the source of a put
//            must be symmetric memory, so rows are built here and then put (dispatch:
//            one row per token, put to each of its experts; combine: one per row).
// Sizes (allocation maxima M, H, E, K, itemsize; stride = round16(16 + H * itemsize),
// which also covers the FP8 row 16 + H + 4 H / 128):
//   set_bytes  = E * M * stride                       (x2: double buffered)
//   send_bytes = max(M * K, min(E * M, R * M * K)) * stride   (0 without send buffer)
//   total      = 4 KiB + 8 R E + 8 E + 8 M K (each rounded to 256) + 2 set_bytes + send_bytes
// e.g. R = 8, M = 128, H = 7168, E = 256, K = 8, bf16: 897 MiB (1009 MiB with send buffer).
//
// PEERS. peer_base[r] = nvshmem_ptr(region, r) when PE r's memory is mapped
// here (NVLink / same GPU): rows are written with 16-byte stores straight into
// the peer and signals are st.release.sys. Otherwise (another node, or the
// force_put option) rows are staged in the send buffer and moved with
// nvshmemx_putmem_nbi_warp; signals are nvshmemx_signal_op(SET).
//
// PROTOCOL of op n (every PE runs the same LL ops in the same order):
//  send phase (all blocks):
//   1. n = op counter + 1; wait until ack[b][r] >= n - 2 for every r: every PE
//      has finished reading set b of op n - 2, the previous user of set b.
//   2. write rows into set b of their owners. Dispatch: one warp per (token,
//      part of its row) reads the token once (FP8 cast once) and stores it
//      into the slot of each distinct expert of its top-k; j(t, e) comes from
//      one pass over the earlier tokens' ids; jpos for my slots; the
//      per-expert counts as atomicMax(scratch[e], j + 1).
//   3. the last block to finish (atomic counter after __threadfence_system;
//      it runs nvshmem_quiet() first when some rows went by put) broadcasts
//      scratch into counts[b][me][*] of every PE (dispatch), then sets
//      done[b][me] = (n << 4) | op in every PE, stores n in the op counter,
//      and zeroes scratch for the next dispatch of parity b.
//  receive phase (all blocks):
//   4. wait until done[b][s] >> 4 >= n for every s (and check the op kind).
//   5. read set b into the XLA outputs (dispatch: one warp per (received
//      row, part), compacting [l][s][j] into rows ordered by (s, j) using
//      counts[b][*][e]; all threads mark and zero the padding rows; compute
//      slot = sum_{s<me} counts[b][s][e] + j; combine: reduce in k order).
//   6. the last block sets ack[b][me] = n in every PE.
// The split form runs 1-3 in the send kernel (which returns n as a token) and
// 4-6 in the receive kernel (which takes it).
//
// WHY IT IS SAFE. Set b is written in op n only (parity), and only after
// step 1, i.e. after every PE (me included: my own scratch / jpos / counts
// live in set-b slots too) acknowledged that it finished reading set b in op
// n - 2. Nobody acknowledges n - 2 before its own receive of n - 2 ended, so
// a fast PE cannot overwrite rows or counts a slow PE still reads, even when
// XLA interleaves split halves (send n, send n+1, recv n, recv n+1): two ops
// in flight per PE is the limit, a third send waits for the first receive (a
// send issued before the receive of n - 2 on the same PE waits for itself and
// times out with a message instead of corrupting data). Signal values grow
// with n (done: n << 4, ack: n), so nothing is ever reset; stale values of
// op n - 2 are smaller. The op counter and the last-block counters are only
// touched by this PE's kernels, which run in stream order. The send buffer is
// drained by nvshmem_quiet() before a send phase ends.
//
// Every spin-wait reads %globaltimer; past the timeout it fills the
// host-mapped TimeoutRecord and traps (device_sync.cuh); the watchdog
// (ffi/runtime/watchdog.h, messages in nvshmem_context.cc) prints which PE
// waited for what from whom.
//
// CO-RESIDENCY. The fused kernels spin on signals produced by other blocks of
// the same grid (the last send block signals my own receive) and by other
// PEs' kernels, so the grid is sized to be co-resident with the kernels of
// every PE sharing the GPU (nvshmem_context.cc: num_blocks).
#include "ffi/kernels/low_latency.h"

#include <algorithm>
#include <cstring>

#include <nvshmem.h>
#include <nvshmemx.h>

#include "ffi/kernels/device_copy.cuh"
#include "ffi/kernels/device_sync.cuh"
#include "ffi/kernels/elem_types.cuh"

namespace jax_ep {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;   // vectors per lane in flight in warp copies
constexpr int kPartVectors = 128;  // fewest 16-byte vectors per row part
constexpr int kKChunk = 8;   // combine rows per thread in flight
constexpr unsigned kFull = 0xffffffffu;
constexpr float kFp8Max = 448.0f;
constexpr float kFp8MinAmax = 1e-4f;

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ------------------------------------------------------------ region accessors
// (acquire / release, timer, spin-wait, record + trap, ArriveLast:
// device_sync.cuh)

struct Region {
  uint8_t* base;
  const LLLayout* lay;
};

__device__ __forceinline__ uint64_t* OpCounter(uint8_t* base) {
  return reinterpret_cast<uint64_t*>(base + kLLOpCounterOffset);
}
__device__ __forceinline__ unsigned int* SendArrive(uint8_t* base) {
  return reinterpret_cast<unsigned int*>(base + kLLSendArriveOffset);
}
__device__ __forceinline__ unsigned int* RecvArrive(uint8_t* base) {
  return reinterpret_cast<unsigned int*>(base + kLLRecvArriveOffset);
}
__host__ __device__ __forceinline__ size_t DoneOffset(int b, int s) {
  return kLLDoneOffset + (static_cast<size_t>(b) * kLLMaxRanks + s) * 8;
}
__host__ __device__ __forceinline__ size_t AckOffset(int b, int r) {
  return kLLAckOffset + (static_cast<size_t>(b) * kLLMaxRanks + r) * 8;
}
// counts[b][s][e] for the call's E (the slab of set b is R * E_alloc ints).
__device__ __forceinline__ size_t CountsOffset(const LLLayout& lay, int b, int s, int64_t E) {
  return lay.counts_offset +
         (static_cast<size_t>(b) * lay.num_ranks * lay.num_experts + static_cast<size_t>(s) * E) * 4;
}
__device__ __forceinline__ size_t ScratchOffset(const LLLayout& lay, int b) {
  return lay.scratch_offset + static_cast<size_t>(b) * lay.num_experts * 4;
}
__device__ __forceinline__ size_t JposOffset(const LLLayout& lay, int b) {
  return lay.jpos_offset + static_cast<size_t>(b) * lay.max_tokens * lay.top_k * 4;
}
__device__ __forceinline__ size_t SetOffset(const LLLayout& lay, int b) {
  return lay.set_offset + static_cast<size_t>(b) * lay.set_bytes;
}

// ------------------------------------------------------------ signals and puts

// NVSHMEM calls of the put path, out of line: the direct (mapped) path is
// the common one and should not pay their register pressure.
__device__ __noinline__ void PutRowWarp(void* dest, const void* src, size_t bytes, int pe) {
  nvshmemx_putmem_nbi_warp(dest, src, bytes, pe);
}
__device__ __noinline__ void SignalSetPe(uint64_t* sig, uint64_t value, int pe) {
  nvshmemx_signal_op(sig, value, NVSHMEM_SIGNAL_SET, pe);
}
__device__ __noinline__ void QuietAll() { nvshmem_quiet(); }

// Threads [0, R) of the block wait until every PE released set b of op n - 2
// (ack >= n - 2; the record gets n as the epoch).
__device__ __forceinline__ void WaitReleased(const LLComm& c, uint64_t n, int32_t op) {
  const int r = threadIdx.x;
  if (n > 2 && r < c.num_ranks) {
    const uint64_t* flag = reinterpret_cast<const uint64_t*>(c.base + AckOffset(n & 1, r));
    SpinWaitAtLeast(flag, n - 2, /*shift=*/0, /*sleep_ns=*/64,
                    TimeoutSite{c.timeout_record, c.rank, op, kWaitLLRelease, r, c.timeout_ns, n});
  }
  __syncthreads();
}

// Threads [0, R) of the block wait for every source's done signal of op n
// (done >> 4 >= n), then check that it names the same op kind.
__device__ __forceinline__ void WaitAllDone(const LLComm& c, uint64_t n, int32_t op) {
  const int s = threadIdx.x;
  if (s < c.num_ranks) {
    const uint64_t* flag = reinterpret_cast<const uint64_t*>(c.base + DoneOffset(n & 1, s));
    const uint64_t seen =
        SpinWaitAtLeast(flag, n, /*shift=*/4, /*sleep_ns=*/64,
                        TimeoutSite{c.timeout_record, c.rank, op, kWaitLLData, s, c.timeout_ns, n});
    if ((seen >> 4) == n && static_cast<int32_t>(seen & 15) != (op & 15)) {
      RecordTimeoutAndTrap(c.timeout_record, c.rank, op, kWaitLLMismatch, s, c.timeout_ns, n,
                           seen);
    }
  }
  __syncthreads();
}

__device__ __forceinline__ void SignalPe(const LLComm& c, uint8_t* mapped, int pe, size_t offset,
                                         uint64_t value) {
  if (mapped != nullptr) {
    StoreReleaseSys(reinterpret_cast<uint64_t*>(mapped + offset), value);
  } else {
    SignalSetPe(reinterpret_cast<uint64_t*>(c.base + offset), value, pe);
  }
}

__device__ __forceinline__ uint64_t StartOp(const LLComm& c) {
  return *reinterpret_cast<volatile uint64_t*>(OpCounter(c.base)) + 1;
}

__device__ __forceinline__ uint64_t TokenOp(const int32_t* token) {
  const uint32_t lo = static_cast<uint32_t>(__ldcg(token));
  const uint32_t hi = static_cast<uint32_t>(__ldcg(token + 1));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

// End of a send phase, in the last block: drain puts, publish done[b][me] in
// every PE, advance the op counter.
__device__ __forceinline__ void FinishSend(const LLComm& c, uint8_t* const* s_peer, uint64_t n,
                                           int32_t op) {
  if (c.any_put) {
    __syncthreads();
    if (threadIdx.x == 0) QuietAll();
  }
  __threadfence_system();
  __syncthreads();
  const int r = threadIdx.x;
  if (r < c.num_ranks) {
    SignalPe(c, s_peer[r], r, DoneOffset(n & 1, c.rank), (n << 4) | static_cast<uint64_t>(op & 15));
  }
  if (threadIdx.x == 0) {
    *reinterpret_cast<volatile uint64_t*>(OpCounter(c.base)) = n;
    *reinterpret_cast<volatile unsigned int*>(SendArrive(c.base)) = 0u;
  }
}

// End of a receive phase, in the last block: release set b in every PE.
__device__ __forceinline__ void FinishRecv(const LLComm& c, uint8_t* const* s_peer, uint64_t n) {
  const int r = threadIdx.x;
  if (r < c.num_ranks) SignalPe(c, s_peer[r], r, AckOffset(n & 1, c.rank), n);
  if (threadIdx.x == 0) *reinterpret_cast<volatile unsigned int*>(RecvArrive(c.base)) = 0u;
}

__device__ __forceinline__ void LoadPeers(const LLComm& c, uint8_t** s_peer) {
  for (int r = threadIdx.x; r < c.num_ranks; r += blockDim.x) s_peer[r] = c.peer_base[r];
}

// Split form: the send half hands its op number n to the receive half
// (TokenOp reads it back).
__device__ __forceinline__ void WriteToken(int32_t* token_out, uint64_t n) {
  if (token_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    token_out[0] = static_cast<int32_t>(static_cast<uint32_t>(n));
    token_out[1] = static_cast<int32_t>(static_cast<uint32_t>(n >> 32));
  }
}

// Row i of the send buffer (staging for NVSHMEM puts).
__device__ __forceinline__ uint8_t* StagingRow(const LLComm& c, int64_t i, int64_t stride) {
  return c.base + c.layout.send_offset + static_cast<size_t>(i) * stride;
}

// A row this warp wrote into the send buffer: make the stores visible, then
// put it to `off` in PE pe's region.
__device__ __forceinline__ void PutStagedRow(const LLComm& c, size_t off, const uint8_t* staged,
                                             size_t bytes, int pe) {
  __threadfence_system();
  __syncwarp();
  PutRowWarp(c.base + off, staged, bytes, pe);
}

// The call's sizes as the kernels name them: T, H, K, E, M, L = E / R and
// RM = R * M.
struct Geometry {
  int64_t T, H, K, E, M, L, RM;
};
__device__ __forceinline__ Geometry GeometryOf(const LLShape& s, int R) {
  return {s.num_tokens, s.hidden, s.top_k, s.num_experts, s.max_tokens, s.num_experts / R,
          R * s.max_tokens};
}

// Grid coordinates: threads, and warps (lane = threadIdx.x & 31).
__device__ __forceinline__ int64_t GlobalThread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t GridThreads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}
__device__ __forceinline__ int64_t GlobalWarp() { return GlobalThread() >> 5; }
__device__ __forceinline__ int64_t GridWarps() {
  return static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
}

// ------------------------------------------------------------ element types
// (Bf16Elem, F16Elem, F32Elem: elem_types.cuh; VecOf: device_copy.cuh)

// Eight consecutive elements (16-byte aligned for 2-byte types, 32 for f32).
template <typename Elem>
__device__ __forceinline__ void Load8(const typename Elem::Raw* p, float v[8]) {
  if constexpr (sizeof(typename Elem::Raw) == 2) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = Elem::ToFloat(static_cast<unsigned short>(w[i] & 0xffffu));
      v[2 * i + 1] = Elem::ToFloat(static_cast<unsigned short>(w[i] >> 16));
    }
  } else {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
}

// ------------------------------------------------------------ warp copies
// kPeer: the source was written by another agent in this op (LoadVec,
// device_copy.cuh), else it is a read-only input.

// Vectors [begin, n) by one warp, kUnroll per lane in flight. Not StridedCopy
// (device_copy.cuh): there the registers of vectors past n are zeroed, which
// nvcc compiles differently; this loop keeps the code the GPU runs tested.
template <bool kPeer, typename V>
__device__ __forceinline__ void WarpCopyVecRange(V* __restrict__ dst, const V* __restrict__ src,
                                                 int64_t begin, int64_t n, int lane) {
  for (int64_t base = begin + lane; base < n; base += 32 * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + 32 * u;
      if (i < n) v[u] = LoadVec<kPeer>(src + i);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + 32 * u;
      if (i < n) dst[i] = v[u];
    }
  }
}
template <bool kPeer, typename V>
__device__ __forceinline__ void WarpCopyVec(V* __restrict__ dst, const V* __restrict__ src,
                                            int64_t n, int lane) {
  WarpCopyVecRange<kPeer>(dst, src, 0, n, lane);
}

// One warp copies n bytes with the widest access both pointers and n allow.
template <bool kPeer>
__device__ __forceinline__ void WarpCopy(uint8_t* dst, const uint8_t* src, int64_t n, int lane) {
  const uint64_t bits = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                        static_cast<uint64_t>(n);
  if ((bits & 15) == 0) {
    WarpCopyVec<kPeer>(reinterpret_cast<uint4*>(dst), reinterpret_cast<const uint4*>(src), n / 16,
                       lane);
  } else if ((bits & 7) == 0) {
    WarpCopyVec<kPeer>(reinterpret_cast<uint2*>(dst), reinterpret_cast<const uint2*>(src), n / 8,
                       lane);
  } else if ((bits & 3) == 0) {
    WarpCopyVec<kPeer>(reinterpret_cast<unsigned int*>(dst),
                       reinterpret_cast<const unsigned int*>(src), n / 4, lane);
  } else {
    for (int64_t i = lane; i < n; i += 32) dst[i] = LoadVec<kPeer>(src + i);
  }
}

__device__ __forceinline__ void WarpZero(uint8_t* dst, int64_t n, int lane) {
  const uint64_t bits = reinterpret_cast<uintptr_t>(dst) | static_cast<uint64_t>(n);
  if ((bits & 15) == 0) {
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (int64_t i = lane; i < n / 16; i += 32) d[i] = make_uint4(0, 0, 0, 0);
  } else if ((bits & 3) == 0) {
    unsigned int* d = reinterpret_cast<unsigned int*>(dst);
    for (int64_t i = lane; i < n / 4; i += 32) d[i] = 0u;
  } else {
    for (int64_t i = lane; i < n; i += 32) dst[i] = 0;
  }
}

// dst[i] = Elem(float(src[i]) * s), rounded to nearest (16-byte chunks when
// aligned, else element by element).
template <typename Elem>
__device__ __forceinline__ void WarpScaleRow(uint8_t* dst, const uint8_t* src, int64_t hidden,
                                             float s, int lane) {
  using Raw = typename Elem::Raw;
  constexpr int kNE = 16 / sizeof(Raw);
  const uint64_t bits = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                        static_cast<uint64_t>(hidden * sizeof(Raw));
  if ((bits & 15) == 0) {
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    const int64_t n = hidden / kNE;
    for (int64_t base = lane; base < n; base += 32 * kUnroll) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + 32 * u;
        if (i < n) v[u] = __ldg(s4 + i);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + 32 * u;
        if (i < n) {
          Raw in[kNE], out[kNE];
          memcpy(in, &v[u], 16);
#pragma unroll
          for (int e = 0; e < kNE; ++e) out[e] = Elem::FromFloat(__fmul_rn(Elem::ToFloat(in[e]), s));
          uint4 o;
          memcpy(&o, out, 16);
          d4[i] = o;
        }
      }
    }
  } else {
    const Raw* sr = reinterpret_cast<const Raw*>(src);
    Raw* dr = reinterpret_cast<Raw*>(dst);
    for (int64_t i = lane; i < hidden; i += 32) {
      dr[i] = Elem::FromFloat(__fmul_rn(Elem::ToFloat(sr[i]), s));
    }
  }
}

// ------------------------------------------------------------ sharing a row between warps

// Units [begin, end) of a row of `units` units that part `part` of `parts`
// takes (units: 16-byte vectors or FP8 blocks).
struct UnitRange {
  int64_t begin, end;
};
__device__ __forceinline__ UnitRange PartOf(int64_t units, int part, int parts) {
  return {units * part / parts, units * (part + 1) / parts};
}

// Warps per row: when rows are fewer than the warps of the grid, several
// warps share a row (at most one per `min_units` units) so that every warp
// has loads in flight; 1 when rows are many.
__device__ __forceinline__ int PartsPerRow(int64_t rows, int64_t warps, int64_t units,
                                           int64_t min_units) {
  if (rows <= 0) return 1;
  const int64_t most = max(int64_t{1}, units / min_units);
  return static_cast<int>(max(int64_t{1}, min(warps / rows, most)));
}

// Largest i with a[i] <= v in the non-decreasing a[0..n] (a[0] <= v).
__device__ __forceinline__ int UpperIndex(const int32_t* a, int n, int32_t v) {
  int lo = 0, hi = n;  // a[lo] <= v, answer in [lo, hi)
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] <= v) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// out[i] = value(0) + ... + value(i - 1) for i <= n (out[n] = total), by
// warp 0 of the block; every thread returns after a __syncthreads.
template <typename Value>
__device__ __forceinline__ void BlockExclusiveScan(int64_t n, const Value& value, int32_t* out) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int32_t carry = 0;
    for (int64_t i0 = 0; i0 < n; i0 += 32) {
      const int64_t i = i0 + lane;
      const int32_t v = i < n ? value(i) : 0;
      int32_t incl = v;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int32_t o = __shfl_up_sync(kFull, incl, d);
        if (lane >= d) incl += o;
      }
      if (i < n) out[i] = carry + incl - v;
      carry += __shfl_sync(kFull, incl, 31);
    }
    if (lane == 0) out[n] = carry;
  }
  __syncthreads();
}

// n bytes at dst zeroed by all threads of the grid (16-byte stores when
// aligned).
__device__ __forceinline__ void GridZero(uint8_t* dst, int64_t n, int64_t gtid, int64_t gthreads) {
  if (n <= 0) return;
  if (((reinterpret_cast<uintptr_t>(dst) | static_cast<uint64_t>(n)) & 15) == 0) {
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (int64_t i = gtid; i < n / 16; i += gthreads) d[i] = make_uint4(0, 0, 0, 0);
  } else {
    for (int64_t i = gtid; i < n; i += gthreads) dst[i] = 0;
  }
}

// ------------------------------------------------------------ routing helpers

// Token t's distinct experts, one per lane: lane k < K holds idx[t, k], or -1
// when that id is out of range or an earlier k names the same expert.
__device__ __forceinline__ int32_t ExpertOfLane(const int32_t* __restrict__ idx, int64_t t,
                                                int64_t K, int64_t E, int lane) {
  const int32_t mine = lane < K ? __ldg(idx + t * K + lane) : -1;
  bool earlier_same = false;
  for (int k = 0; k < K; ++k) {
    const int32_t other = __shfl_sync(kFull, mine, k);
    earlier_same |= k < lane && other == mine;
  }
  return (lane < K && !earlier_same && mine >= 0 && mine < E) ? mine : -1;
}

// For the expert e of each lane (-1: none): how many tokens t' < t name e
// (each token once), i.e. token t's position among this PE's tokens for e.
// One pass over the earlier tokens serves all K experts. s_e: 32 ints of
// shared memory that belong to this warp.
__device__ __forceinline__ int TokensBefore(const int32_t* __restrict__ idx, int64_t t, int64_t K,
                                            int32_t e, int32_t* s_e, int lane) {
  s_e[lane] = e;
  __syncwarp();
  int j = 0;
  for (int64_t base = 0; base < t; base += 32) {
    const int64_t u = base + lane;
    unsigned int names = 0u;  // bit k: token u names s_e[k]
    if (u < t) {
      const int32_t* row = idx + u * K;
      for (int64_t k2 = 0; k2 < K; ++k2) {
        const int32_t id = __ldg(row + k2);
        if (id < 0) continue;
        for (int k = 0; k < K; ++k) names |= static_cast<unsigned int>(id == s_e[k]) << k;
      }
    }
    for (int k = 0; k < K; ++k) {
      const int c = __popc(__ballot_sync(kFull, (names >> k) & 1u));
      if (lane == k) j += c;
    }
  }
  __syncwarp();
  return j;
}

// The pair (t, k) as seen by a whole warp: its expert, or -1 when the id is
// out of range or an earlier k of the same token names the same expert.
__device__ __forceinline__ int32_t FirstExpertOfPair(const int32_t* __restrict__ idx, int64_t t,
                                                     int k, int64_t K, int64_t E, int lane) {
  const int32_t mine = lane < K ? __ldg(idx + t * K + lane) : -1;
  const int32_t e = __shfl_sync(kFull, mine, k);
  const bool earlier_same = lane < k && mine == e;
  if (__ballot_sync(kFull, earlier_same) != 0u) return -1;
  return (e >= 0 && e < E) ? e : -1;
}

// ------------------------------------------------------------ dispatch

// The rows a dispatch warp writes one token to: lane k's row in a mapped
// peer (nullptr: no expert, or reached by put) and the staging row of the
// token (nullptr: nothing goes by put). rows(write) calls write(row) for each.
struct TokenRows {
  uint8_t* lane_row;
  unsigned int mask;  // lanes with a lane_row
  uint8_t* staged;
  template <typename Write>
  __device__ __forceinline__ void operator()(const Write& write) const {
    for (unsigned int m = mask; m != 0u; m &= m - 1u) {
      const int k = __ffs(m) - 1;
      write(reinterpret_cast<uint8_t*>(
          __shfl_sync(kFull, reinterpret_cast<unsigned long long>(lane_row), k)));
    }
    if (staged != nullptr) write(staged);
  }
};

// FP8 cast of blocks [blk0, blk1) of one token row (hidden % 128 == 0),
// written to every row of `rows` (layout: header, H e4m3, H / 128 f32
// scales). Half-warp per 128-channel block, 8 channels per lane; scale =
// max(amax, 1e-4) * (1/448) (float32), q = satfinite_e4m3(x / scale), round
// to nearest even.
template <typename Elem>
__device__ __forceinline__ void CastFp8ToRows(const typename Elem::Raw* __restrict__ src,
                                              int64_t hidden, int64_t blk0, int64_t blk1,
                                              int lane, const TokenRows& rows) {
  constexpr int kU = 4;
  const int half = lane >> 4;
  const int l16 = lane & 15;
  const float inv_max = 1.0f / kFp8Max;
  for (int64_t it = blk0; it < blk1; it += 2 * kU) {
    float v[kU][8];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t blk = it + 2 * u + half;
      if (blk < blk1) {
        Load8<Elem>(src + blk * kLLFp8Block + l16 * 8, v[u]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[u][i] = 0.0f;
      }
    }
    uint2 q[kU];
    float scale[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      float amax = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[u][i]));
      amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, 8));
      amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, 4));
      amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, 2));
      amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, 1));
      scale[u] = __fmul_rn(fmaxf(amax, kFp8MinAmax), inv_max);
      unsigned int packed[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const __nv_fp8x2_storage_t lo = __nv_cvt_float2_to_fp8x2(
            make_float2(__fdiv_rn(v[u][4 * i], scale[u]), __fdiv_rn(v[u][4 * i + 1], scale[u])),
            __NV_SATFINITE, __NV_E4M3);
        const __nv_fp8x2_storage_t hi = __nv_cvt_float2_to_fp8x2(
            make_float2(__fdiv_rn(v[u][4 * i + 2], scale[u]), __fdiv_rn(v[u][4 * i + 3], scale[u])),
            __NV_SATFINITE, __NV_E4M3);
        packed[i] = static_cast<unsigned int>(lo) | (static_cast<unsigned int>(hi) << 16);
      }
      q[u] = make_uint2(packed[0], packed[1]);
    }
    rows([&](uint8_t* row) {
      uint8_t* q_dst = row + kLLRowHeaderBytes;
      float* scale_dst = reinterpret_cast<float*>(q_dst + hidden);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t blk = it + 2 * u + half;
        if (blk < blk1) {
          *reinterpret_cast<uint2*>(q_dst + blk * kLLFp8Block + l16 * 8) = q[u];
          if (l16 == 0) scale_dst[blk] = scale[u];
        }
      }
    });
  }
}

// 16-byte vectors [v0, v1) of one token row, written to the payload of every
// row of `rows`.
__device__ __forceinline__ void CopyToRows(const uint4* __restrict__ src, int64_t v0, int64_t v1,
                                           int lane, const TokenRows& rows) {
  for (int64_t base = v0 + lane; base < v1; base += 32 * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + 32 * u;
      if (i < v1) v[u] = __ldg(src + i);
    }
    rows([&](uint8_t* row) {
      uint4* dst = reinterpret_cast<uint4*>(row + kLLRowHeaderBytes);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + 32 * u;
        if (i < v1) dst[i] = v[u];
      }
    });
  }
}

struct DispatchParams {
  LLShape s;
  const uint8_t* x;
  const int32_t* idx;
  int32_t use_fp8;
  int32_t zero_fill;
  int32_t x_bytes;
  int32_t phase;
  int32_t vec_x;          // x rows are whole 16-byte vectors (aligned, H * x_bytes % 16 == 0)
  int32_t vec_out;        // so are the rows of recv_x
  int64_t stride;         // staging row bytes (header + payload, multiple of 16)
  int64_t payload_bytes;  // H * x_bytes, or H + 4 * H / 128
  uint8_t* recv_x;
  float* recv_scales;
  int32_t* recv_count;
  int32_t* recv_src;
  int32_t* slot;
  int32_t* token_out;
  const int32_t* token_in;
};

// Send: one warp per (token, part of its row); the row is read (and FP8-cast)
// once and written to the slot of each distinct expert of the token. The
// per-expert counts grow by atomicMax(j + 1) in scratch, which the last block
// broadcasts and then zeroes for the next op of this parity.
// Receive: one warp per (valid received row, part), rows compacted from
// [l][s][j] into (s, j) order; the padding rows are marked (and zeroed) by
// all threads.
template <typename XElem>
__global__ void __launch_bounds__(kThreads, 1) LLDispatchKernel(LLComm c, DispatchParams p) {
  extern __shared__ int32_t s_prefix[];  // [L][R + 1], then [L + 1] (receive)
  __shared__ uint8_t* s_peer[kLLMaxRanks];
  __shared__ int32_t s_expert[kThreads];  // 32 per warp (TokensBefore)

  const LLLayout& lay = c.layout;
  const int R = c.num_ranks;
  const int me = c.rank;
  const auto [T, H, K, E, M, L, RM] = GeometryOf(p.s, R);
  const int lane = threadIdx.x & 31;
  const int64_t gw = GlobalWarp(), W = GridWarps();
  LoadPeers(c, s_peer);

  uint64_t n;
  if (p.phase == kLLRecvOnly) {
    n = TokenOp(p.token_in);
  } else {
    n = StartOp(c);
  }
  const int b = static_cast<int>(n & 1);
  int32_t* jpos = reinterpret_cast<int32_t*>(c.base + JposOffset(lay, b));
  int32_t* scratch = reinterpret_cast<int32_t*>(c.base + ScratchOffset(lay, b));
  const size_t set_off = SetOffset(lay, b);

  if (p.phase != kLLRecvOnly) {
    // ---------------- send
    WriteToken(p.token_out, n);
    WaitReleased(c, n, kOpLLDispatch);  // ends with __syncthreads (s_peer ready)

    const int64_t units = p.use_fp8 ? H / kLLFp8Block : (p.vec_x ? H * p.x_bytes / 16 : 1);
    const int parts =
        c.any_put ? 1 : PartsPerRow(T, W, units, p.use_fp8 ? 8 : kPartVectors);
    int32_t* s_e = s_expert + (threadIdx.x & ~31);
    for (int64_t q = gw; q < T * parts; q += W) {
      const int64_t t = q / parts;
      const int part = static_cast<int>(q - t * parts);
      const int32_t e = ExpertOfLane(p.idx, t, K, E, lane);
      if (__ballot_sync(kFull, e >= 0) == 0u) continue;
      const int j = TokensBefore(p.idx, t, K, e, s_e, lane);
      TokenRows rows{nullptr, 0u, nullptr};
      size_t off = 0;
      int r = 0;
      if (e >= 0) {
        r = static_cast<int>(e / L);
        const int64_t l = e - r * L;
        off = set_off + static_cast<size_t>((l * R + me) * M + j) * p.stride;
        if (s_peer[r] != nullptr) rows.lane_row = s_peer[r] + off;
        if (part == 0) {
          jpos[t * K + lane] = j;
          atomicMax(scratch + e, j + 1);
        }
      }
      rows.mask = __ballot_sync(kFull, rows.lane_row != nullptr);
      const unsigned int put_mask = __ballot_sync(kFull, e >= 0 && rows.lane_row == nullptr);
      if (put_mask != 0u) rows.staged = StagingRow(c, t, p.stride);
      if (part == 0) {
        const int4 header = make_int4(static_cast<int>(t), 0, 0, 0);
        if (rows.lane_row != nullptr) *reinterpret_cast<int4*>(rows.lane_row) = header;
        if (rows.staged != nullptr && lane == 0) *reinterpret_cast<int4*>(rows.staged) = header;
      }
      const UnitRange range = PartOf(units, part, parts);
      if (p.use_fp8) {
        CastFp8ToRows<XElem>(reinterpret_cast<const typename XElem::Raw*>(p.x) + t * H, H,
                             range.begin, range.end, lane, rows);
      } else if (p.vec_x) {
        CopyToRows(reinterpret_cast<const uint4*>(p.x + t * H * p.x_bytes), range.begin,
                   range.end, lane, rows);
      } else {
        const int64_t row_bytes = H * p.x_bytes;
        const uint8_t* src = p.x + t * row_bytes;
        rows([&](uint8_t* row) { WarpCopy<false>(row + kLLRowHeaderBytes, src, row_bytes, lane); });
      }
      if (put_mask != 0u) {  // one staged row, put to each expert reached by put
        __threadfence_system();
        __syncwarp();
        for (unsigned int m = put_mask; m != 0u; m &= m - 1u) {
          const int k = __ffs(m) - 1;
          const size_t off_k = __shfl_sync(kFull, static_cast<unsigned long long>(off), k);
          PutRowWarp(c.base + off_k, rows.staged, kLLRowHeaderBytes + p.payload_bytes,
                     __shfl_sync(kFull, r, k));
        }
      }
    }

    if (ArriveLast(SendArrive(c.base))) {
      // counts[b][me][*] of every PE <- scratch.
      const size_t counts_off = CountsOffset(lay, b, me, E);
      if ((E & 3) == 0 && (counts_off & 15) == 0 &&
          (reinterpret_cast<uintptr_t>(scratch) & 15) == 0) {  // 16-byte stores
        const int64_t E4 = E / 4;
        const int4* src4 = reinterpret_cast<const int4*>(scratch);
        for (int64_t i = threadIdx.x; i < R * E4; i += blockDim.x) {
          const int r = static_cast<int>(i / E4);
          if (s_peer[r] == nullptr) continue;
          const int64_t e4 = i - r * E4;
          reinterpret_cast<int4*>(s_peer[r] + counts_off)[e4] = __ldcg(src4 + e4);
        }
      } else {
        for (int64_t i = threadIdx.x; i < R * E; i += blockDim.x) {
          const int r = static_cast<int>(i / E);
          if (s_peer[r] == nullptr) continue;
          const int64_t e = i - r * E;
          reinterpret_cast<int32_t*>(s_peer[r] + counts_off)[e] = __ldcg(scratch + e);
        }
      }
      if (c.any_put) {
        for (int r = threadIdx.x >> 5; r < R; r += kWarps) {
          if (s_peer[r] == nullptr) {
            PutRowWarp(c.base + counts_off, scratch, static_cast<size_t>(E) * 4, r);
          }
        }
      }
      FinishSend(c, s_peer, n, kOpLLDispatch);  // drains the puts of scratch, then syncs
      for (int64_t e = threadIdx.x; e < E; e += blockDim.x) scratch[e] = 0;
    }
  }
  if (p.phase == kLLSendOnly) return;

  // ---------------- receive
  WaitAllDone(c, n, kOpLLDispatch);
  const int32_t* counts = reinterpret_cast<const int32_t*>(c.base + CountsOffset(lay, b, 0, E));
  const int me_e0 = me * static_cast<int>(L);
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
    int32_t acc = 0;
    for (int s = 0; s < R; ++s) {
      s_prefix[l * (R + 1) + s] = acc;
      acc += min(max(__ldcg(counts + s * E + me_e0 + l), 0), static_cast<int32_t>(M));
    }
    s_prefix[l * (R + 1) + R] = acc;
  }
  __syncthreads();
  int32_t* s_lbase = s_prefix + L * (R + 1);  // received rows before local expert l
  BlockExclusiveScan(L, [&](int64_t l) { return s_prefix[l * (R + 1) + R]; }, s_lbase);
  if (blockIdx.x == 0) {
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) p.recv_count[l] = s_prefix[l * (R + 1) + R];
  }
  const uint8_t* set = c.base + set_off;
  const int64_t out_row_bytes = p.use_fp8 ? H : H * p.x_bytes;
  const int64_t scale_row_bytes = p.use_fp8 ? (H / kLLFp8Block) * 4 : 0;
  const int64_t total = s_lbase[L];
  const int64_t out_units = p.vec_out ? out_row_bytes / 16 : 1;
  const int rparts = p.vec_out ? PartsPerRow(total, W, out_units, kPartVectors) : 1;
  for (int64_t i = gw; i < total * rparts; i += W) {
    const int64_t v = i / rparts;
    const int part = static_cast<int>(i - v * rparts);
    const int l = UpperIndex(s_lbase, static_cast<int>(L), static_cast<int32_t>(v));
    const int32_t pos = static_cast<int32_t>(v - s_lbase[l]);
    const int32_t* pre = s_prefix + l * (R + 1);
    const int s = UpperIndex(pre, R, pos);
    const uint8_t* src = set + ((l * R + s) * M + (pos - pre[s])) * p.stride;
    const int64_t row = l * RM + pos;
    uint8_t* out = p.recv_x + row * out_row_bytes;
    if (part == 0) {
      if (lane == 0) {
        p.recv_src[row] = static_cast<int32_t>(s * M + __ldcg(reinterpret_cast<const int32_t*>(src)));
      }
      if (p.use_fp8) {  // H / 128 scales (a plain loop: WarpCopy here makes the kernel spill)
        const float* scales = reinterpret_cast<const float*>(src + kLLRowHeaderBytes + H);
        float* scales_out = p.recv_scales + row * (H / kLLFp8Block);
        for (int64_t i = lane; i < H / kLLFp8Block; i += 32) scales_out[i] = __ldcg(scales + i);
      }
    }
    if (p.vec_out) {
      const UnitRange range = PartOf(out_units, part, rparts);
      WarpCopyVecRange<true>(reinterpret_cast<uint4*>(out),
                             reinterpret_cast<const uint4*>(src + kLLRowHeaderBytes), range.begin,
                             range.end, lane);
    } else {
      WarpCopy<true>(out, src + kLLRowHeaderBytes, out_row_bytes, lane);
    }
  }
  // Padding rows: recv_src = -1 (and zeros), by every thread of the grid.
  const int64_t gtid = GlobalThread(), gthreads = GridThreads();
  for (int64_t i = gtid; i < L * RM; i += gthreads) {
    const int64_t l = i / RM;
    if (i - l * RM >= s_prefix[l * (R + 1) + R]) p.recv_src[i] = -1;
  }
  if (p.zero_fill) {
    for (int64_t l = 0; l < L; ++l) {
      const int64_t count = s_prefix[l * (R + 1) + R];
      GridZero(p.recv_x + (l * RM + count) * out_row_bytes, (RM - count) * out_row_bytes, gtid,
               gthreads);
      if (p.use_fp8) {
        GridZero(reinterpret_cast<uint8_t*>(p.recv_scales) + (l * RM + count) * scale_row_bytes,
                 (RM - count) * scale_row_bytes, gtid, gthreads);
      }
    }
  }
  // slot[t, k] = rows of sources before me for its expert + my position.
  for (int64_t q = gtid; q < T * K; q += gthreads) {
    const int64_t t = q / K;
    const int64_t k = q - t * K;
    const int32_t e = __ldg(p.idx + q);
    int32_t slot = -1;
    if (e >= 0 && e < E) {
      int64_t first = 0;
      while (first < k && __ldg(p.idx + t * K + first) != e) ++first;
      int32_t before = 0;
      for (int s = 0; s < me; ++s) {
        before += min(max(__ldcg(counts + s * E + e), 0), static_cast<int32_t>(M));
      }
      slot = before + __ldcg(jpos + t * K + first);
    }
    p.slot[q] = slot;
  }
  if (ArriveLast(RecvArrive(c.base))) FinishRecv(c, s_peer, n);
}

// ------------------------------------------------------------ combine / gather

struct CombineParams {
  LLShape s;
  int32_t gather;
  int32_t phase;
  int32_t y_bytes;
  int32_t vec_y;      // rows of y are whole 16-byte vectors (aligned, H * y_bytes % 16 == 0)
  int64_t stride;     // row bytes in the set and the send buffer (multiple of 16)
  int64_t send_rows;  // capacity of the send buffer in rows
  const uint8_t* y;
  const int32_t* recv_src;
  const int32_t* recv_count;
  const int32_t* idx;
  const float* w;
  uint8_t* out;
  int32_t* token_out;
  const int32_t* token_in;
};

// s_base[l] = sum_{l' < l} min(count[l'], cap), s_base[L] = total (warp 0).
__device__ __forceinline__ void RowBases(const int32_t* count, int64_t L, int32_t cap,
                                         int32_t* s_base) {
  BlockExclusiveScan(L, [&](int64_t l) { return min(max(__ldg(count + l), 0), cap); }, s_base);
}

// One thread per (token, kNE channels): the K rows are loaded kKChunk at a
// time (all of them for K <= 8), then summed in k order.
template <typename Elem, int kNE>
__device__ __forceinline__ void CombineReduce(const CombineParams& p, const uint8_t* set,
                                              int64_t gtid, int64_t gthreads) {
  using Raw = typename Elem::Raw;
  using V = typename VecOf<kNE * sizeof(Raw)>::Type;
  const int64_t T = p.s.num_tokens, H = p.s.hidden, K = p.s.top_k, E = p.s.num_experts;
  const int64_t M = p.s.max_tokens;
  const int64_t chunks = H / kNE;
  const int64_t items = T * chunks;
  for (int64_t item = gtid; item < items; item += gthreads) {
    const int64_t t = item / chunks;
    const int64_t c = item - t * chunks;
    const int32_t* idx_row = p.idx + t * K;
    float acc[kNE];
#pragma unroll
    for (int i = 0; i < kNE; ++i) acc[i] = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += kKChunk) {
      V v[kKChunk];
      float w[kKChunk];
      bool ok[kKChunk];
#pragma unroll
      for (int u = 0; u < kKChunk; ++u) {
        const int64_t k = k0 + u;
        const int32_t e = k < K ? __ldg(idx_row + k) : -1;
        ok[u] = e >= 0 && e < E;
        if (ok[u]) {
          v[u] = __ldcg(reinterpret_cast<const V*>(set + (e * M + t) * p.stride) + c);
          w[u] = __ldg(p.w + t * K + k);
        }
      }
#pragma unroll
      for (int u = 0; u < kKChunk; ++u) {
        if (!ok[u]) continue;
        Raw raw[kNE];
        memcpy(raw, &v[u], sizeof(V));
#pragma unroll
        for (int i = 0; i < kNE; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w[u], Elem::ToFloat(raw[i])));
      }
    }
    Raw res[kNE];
#pragma unroll
    for (int i = 0; i < kNE; ++i) res[i] = Elem::FromFloat(acc[i]);
    V packed;
    memcpy(&packed, res, sizeof(V));
    reinterpret_cast<V*>(p.out + t * H * sizeof(Raw))[c] = packed;
  }
}

template <typename Elem, int kNE>
__device__ __forceinline__ void GatherRows(const CombineParams& p, const uint8_t* set,
                                           int64_t gtid, int64_t gthreads) {
  using Raw = typename Elem::Raw;
  using V = typename VecOf<kNE * sizeof(Raw)>::Type;
  const int64_t T = p.s.num_tokens, H = p.s.hidden, K = p.s.top_k, E = p.s.num_experts;
  const int64_t M = p.s.max_tokens;
  const int64_t chunks = H / kNE;
  const int64_t items = T * K * chunks;
  for (int64_t item = gtid; item < items; item += gthreads) {
    const int64_t tk = item / chunks;
    const int64_t c = item - tk * chunks;
    const int64_t t = tk / K;
    const int32_t e = __ldg(p.idx + tk);
    V v{};
    if (e >= 0 && e < E) v = __ldcg(reinterpret_cast<const V*>(set + (e * M + t) * p.stride) + c);
    reinterpret_cast<V*>(p.out + tk * H * sizeof(Raw))[c] = v;
  }
}

template <typename Elem, int kNE>
__global__ void __launch_bounds__(kThreads, 1) LLCombineKernel(LLComm c, CombineParams p) {
  extern __shared__ int32_t s_base[];  // [L + 1] (send)
  __shared__ uint8_t* s_peer[kLLMaxRanks];

  const LLLayout& lay = c.layout;
  const int R = c.num_ranks;
  const int me = c.rank;
  const int64_t H = p.s.hidden, E = p.s.num_experts, M = p.s.max_tokens;
  const int64_t L = E / R;
  const int64_t RM = R * M;
  const int32_t op = p.gather ? kOpLLGather : kOpLLCombine;
  const int lane = threadIdx.x & 31;
  const int64_t gw = GlobalWarp(), W = GridWarps();
  LoadPeers(c, s_peer);

  const uint64_t n = p.phase == kLLRecvOnly ? TokenOp(p.token_in) : StartOp(c);
  const int b = static_cast<int>(n & 1);
  const size_t set_off = SetOffset(lay, b);

  if (p.phase != kLLRecvOnly) {
    // ---------------- send: expert rows back to their source tokens
    WriteToken(p.token_out, n);
    WaitReleased(c, n, op);
    RowBases(p.recv_count, L, static_cast<int32_t>(RM), s_base);
    const int64_t total = s_base[L];
    const int64_t row_bytes = H * p.y_bytes;
    const int64_t units = p.vec_y ? row_bytes / 16 : 1;
    const int parts = (c.any_put || !p.vec_y) ? 1 : PartsPerRow(total, W, units, kPartVectors);
    for (int64_t task = gw; task < total * parts; task += W) {
      const int64_t i = task / parts;
      const int part = static_cast<int>(task - i * parts);
      const int l = UpperIndex(s_base, static_cast<int>(L), static_cast<int32_t>(i));
      const int64_t pos = i - s_base[l];
      const int32_t code = __ldg(p.recv_src + l * RM + pos);
      if (code < 0) continue;
      const int s = code / static_cast<int32_t>(M);
      const int64_t t = code - static_cast<int64_t>(s) * M;
      if (s >= R) continue;
      const int64_t e = static_cast<int64_t>(me) * L + l;
      const size_t off = set_off + static_cast<size_t>(e * M + t) * p.stride;
      const uint8_t* src = p.y + (l * RM + pos) * row_bytes;
      uint8_t* mapped = s_peer[s];
      if (mapped != nullptr && parts > 1) {
        const UnitRange range = PartOf(units, part, parts);
        WarpCopyVecRange<false>(reinterpret_cast<uint4*>(mapped + off),
                                reinterpret_cast<const uint4*>(src), range.begin, range.end, lane);
      } else if (mapped != nullptr) {
        WarpCopy<false>(mapped + off, src, row_bytes, lane);
      } else if (i < p.send_rows) {
        uint8_t* staged = StagingRow(c, i, p.stride);
        WarpCopy<false>(staged, src, row_bytes, lane);
        PutStagedRow(c, off, staged, row_bytes, s);
      }
    }
    if (ArriveLast(SendArrive(c.base))) FinishSend(c, s_peer, n, op);
  }
  if (p.phase == kLLSendOnly) return;

  // ---------------- receive: my tokens' rows, reduced in k order
  WaitAllDone(c, n, op);
  const uint8_t* set = c.base + set_off;
  const int64_t gtid = GlobalThread(), gthreads = GridThreads();
  if (p.gather) {
    GatherRows<Elem, kNE>(p, set, gtid, gthreads);
  } else {
    CombineReduce<Elem, kNE>(p, set, gtid, gthreads);
  }
  if (ArriveLast(RecvArrive(c.base))) FinishRecv(c, s_peer, n);
}

// ------------------------------------------------------------ cached dispatch

struct CachedParams {
  LLShape s;
  int32_t x_bytes;
  int32_t zero_fill;
  int64_t stride;
  const uint8_t* x;
  const int32_t* idx;
  const int32_t* slot;
  const float* scale;
  const int32_t* recv_count;
  uint8_t* out;
};

template <typename XElem>
__global__ void __launch_bounds__(kThreads, 1) LLCachedDispatchKernel(LLComm c, CachedParams p) {
  __shared__ uint8_t* s_peer[kLLMaxRanks];
  const LLLayout& lay = c.layout;
  const int R = c.num_ranks;
  const auto [T, H, K, E, M, L, RM] = GeometryOf(p.s, R);
  const int lane = threadIdx.x & 31;
  const int64_t gw = GlobalWarp(), W = GridWarps();
  LoadPeers(c, s_peer);

  const uint64_t n = StartOp(c);
  const int b = static_cast<int>(n & 1);
  const size_t set_off = SetOffset(lay, b);
  const int64_t row_bytes = H * p.x_bytes;

  // ---------------- send: x[t] * (sum of the scales of the k naming e) to its slot
  WaitReleased(c, n, kOpLLDispatchCached);
  for (int64_t q = gw; q < T * K; q += W) {
    const int64_t t = q / K;
    const int k = static_cast<int>(q - t * K);
    const int32_t e = FirstExpertOfPair(p.idx, t, k, K, E, lane);
    if (e < 0) continue;
    const int32_t row_slot = __ldg(p.slot + q);
    if (row_slot < 0 || row_slot >= RM) continue;
    const int r = static_cast<int>(e / L);
    const int64_t l = e - r * L;
    const size_t off = set_off + static_cast<size_t>(l * RM + row_slot) * p.stride;
    uint8_t* mapped = s_peer[r];
    uint8_t* row = mapped != nullptr ? mapped + off : StagingRow(c, q, p.stride);
    const uint8_t* src = p.x + t * row_bytes;
    if (p.scale != nullptr) {
      float sum = 0.0f;
      for (int64_t kk = 0; kk < K; ++kk) {
        if (__ldg(p.idx + t * K + kk) == e) sum = __fadd_rn(sum, __ldg(p.scale + t * K + kk));
      }
      WarpScaleRow<XElem>(row, src, H, sum, lane);
    } else {
      WarpCopy<false>(row, src, row_bytes, lane);
    }
    if (mapped == nullptr) PutStagedRow(c, off, row, row_bytes, r);
  }
  if (ArriveLast(SendArrive(c.base))) FinishSend(c, s_peer, n, kOpLLDispatchCached);

  // ---------------- receive: rows [0, count) of each local expert, zeros after
  WaitAllDone(c, n, kOpLLDispatchCached);
  const uint8_t* set = c.base + set_off;
  for (int64_t row = gw; row < L * RM; row += W) {
    const int64_t l = row / RM;
    const int64_t pos = row - l * RM;
    uint8_t* out = p.out + row * row_bytes;
    const int64_t count = min(max(static_cast<int64_t>(__ldg(p.recv_count + l)), int64_t{0}), RM);
    if (pos < count) {
      WarpCopy<true>(out, set + row * p.stride, row_bytes, lane);
    } else if (p.zero_fill) {
      WarpZero(out, row_bytes, lane);
    }
  }
  if (ArriveLast(RecvArrive(c.base))) FinishRecv(c, s_peer, n);
}

// ------------------------------------------------------------ host helpers

bool ValidComm(const LLComm& c) {
  return c.base != nullptr && c.peer_base != nullptr && c.num_ranks >= 1 &&
         c.num_ranks <= kLLMaxRanks && c.rank >= 0 && c.rank < c.num_ranks &&
         c.num_blocks >= 1 && c.layout.num_ranks == c.num_ranks;
}

int GridFor(const LLComm& c) { return std::max(1, c.num_blocks); }

template <typename Kernel, typename Params>
cudaError_t Launch(Kernel kernel, int grid, size_t smem, cudaStream_t stream, const LLComm& c,
                   const Params& params) {
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, kThreads, smem, stream>>>(c, params);
  return cudaGetLastError();
}

}  // namespace

// ------------------------------------------------------------ public host API

int LLDtypeBytes(LLDtype dtype) {
  switch (dtype) {
    case LLDtype::kBF16:
    case LLDtype::kF16:
      return 2;
    case LLDtype::kF32:
      return 4;
  }
  return 0;
}

int64_t LLDispatchRowStride(int64_t hidden, int64_t x_itemsize, bool use_fp8) {
  const int64_t payload = use_fp8 ? hidden + 4 * (hidden / kLLFp8Block) : hidden * x_itemsize;
  return RoundUp(kLLRowHeaderBytes + payload, 16);
}

int64_t LLPlainRowStride(int64_t hidden, int64_t itemsize) { return RoundUp(hidden * itemsize, 16); }

int64_t LLSendRows(int64_t num_ranks, int64_t max_tokens, int64_t num_experts, int64_t top_k) {
  return std::max(max_tokens * top_k,
                  std::min(num_experts * max_tokens, num_ranks * max_tokens * top_k));
}

LLLayout MakeLLLayout(int num_ranks, int64_t max_tokens, int64_t hidden, int64_t num_experts,
                      int64_t top_k, int64_t itemsize, bool send_buffer) {
  LLLayout lay;
  lay.num_ranks = num_ranks;
  lay.max_tokens = max_tokens;
  lay.hidden = hidden;
  lay.num_experts = num_experts;
  lay.top_k = top_k;
  lay.itemsize = itemsize;
  const int64_t stride = std::max(LLDispatchRowStride(hidden, itemsize, false),
                                  LLDispatchRowStride(hidden, itemsize, true));
  size_t off = kLLControlBytes;
  lay.counts_offset = off;
  off += RoundUp(2 * static_cast<int64_t>(num_ranks) * num_experts * 4, 256);
  lay.scratch_offset = off;
  off += RoundUp(2 * num_experts * 4, 256);
  lay.jpos_offset = off;
  off += RoundUp(2 * max_tokens * top_k * 4, 256);
  lay.set_offset = off;
  lay.set_bytes = static_cast<size_t>(RoundUp(num_experts * max_tokens * stride, 256));
  off += 2 * lay.set_bytes;
  lay.send_offset = off;
  lay.send_bytes = send_buffer ? static_cast<size_t>(RoundUp(
                                     LLSendRows(num_ranks, max_tokens, num_experts, top_k) * stride,
                                     256))
                               : 0;
  off += lay.send_bytes;
  lay.total_bytes = off;
  return lay;
}

namespace {

const char* CheckCommon(const LLComm& c, const LLShape& s) {
  if (!ValidComm(c)) return "the NVSHMEM low-latency context is not set up";
  if (s.top_k < 1 || s.top_k > kLLMaxTopK) return "top_k must be in [1, 32]";
  if (s.hidden < 1 || s.hidden > kLLMaxHidden) return "hidden must be in [1, 65536]";
  if (s.max_tokens < 1 || s.max_tokens > kLLMaxTokens) {
    return "max_tokens_per_rank must be in [1, 4096]";
  }
  if (s.num_tokens < 0 || s.num_tokens > s.max_tokens) {
    return "the number of tokens exceeds max_tokens_per_rank";
  }
  if (s.num_experts < c.num_ranks || s.num_experts % c.num_ranks != 0) {
    return "num_experts must be a positive multiple of the number of PEs";
  }
  if (s.num_experts > c.layout.num_experts) {
    return "num_experts exceeds the num_experts the low-latency buffer was allocated for";
  }
  return nullptr;
}

}  // namespace

const char* LLCheckDispatch(const LLComm& c, const LLShape& s, int64_t x_itemsize, bool use_fp8) {
  if (const char* why = CheckCommon(c, s)) return why;
  if (use_fp8 && s.hidden % kLLFp8Block != 0) return "use_fp8 needs hidden to be a multiple of 128";
  if (s.max_tokens * s.top_k > c.layout.max_tokens * c.layout.top_k) {
    return "max_tokens_per_rank * top_k exceeds what the low-latency buffer was allocated for";
  }
  const int64_t stride = LLDispatchRowStride(s.hidden, x_itemsize, use_fp8);
  if (static_cast<size_t>(s.num_experts * s.max_tokens * stride) > c.layout.set_bytes) {
    return "num_experts * max_tokens_per_rank * row bytes exceeds the low-latency buffer (allocate "
           "it for a larger hidden / itemsize / max_tokens_per_rank)";
  }
  if (c.any_put && static_cast<size_t>(s.num_tokens * s.top_k * stride) > c.layout.send_bytes) {
    return "the send buffer for NVSHMEM puts is too small (or missing: allocate with "
           "send_buffer=True)";
  }
  return nullptr;
}

const char* LLCheckCombine(const LLComm& c, const LLShape& s, int64_t y_itemsize) {
  if (const char* why = CheckCommon(c, s)) return why;
  const int64_t stride = LLPlainRowStride(s.hidden, y_itemsize);
  if (static_cast<size_t>(s.num_experts * s.max_tokens * stride) > c.layout.set_bytes) {
    return "num_experts * max_tokens_per_rank * row bytes exceeds the low-latency buffer (allocate "
           "it for a larger hidden / itemsize / max_tokens_per_rank)";
  }
  if (s.top_k > c.layout.top_k) return "top_k exceeds the top_k the low-latency buffer was allocated for";
  if (c.any_put && c.layout.send_bytes == 0) {
    return "NVSHMEM puts need the send buffer (allocate with send_buffer=True)";
  }
  return nullptr;
}

const char* LLCheckCachedDispatch(const LLComm& c, const LLShape& s, int64_t x_itemsize) {
  if (const char* why = CheckCommon(c, s)) return why;
  if (s.max_tokens * s.top_k > c.layout.max_tokens * c.layout.top_k) {
    return "max_tokens_per_rank * top_k exceeds what the low-latency buffer was allocated for";
  }
  const int64_t stride = LLPlainRowStride(s.hidden, x_itemsize);
  if (static_cast<size_t>(s.num_experts * s.max_tokens * stride) > c.layout.set_bytes) {
    return "num_experts * max_tokens_per_rank * row bytes exceeds the low-latency buffer";
  }
  if (c.any_put && static_cast<size_t>(s.num_tokens * s.top_k * stride) > c.layout.send_bytes) {
    return "the send buffer for NVSHMEM puts is too small (or missing: allocate with "
           "send_buffer=True)";
  }
  return nullptr;
}

cudaError_t LaunchLLDispatch(const LLComm& comm, const LLDispatchArgs& a, LLPhase phase,
                             cudaStream_t stream) {
  const int xb = LLDtypeBytes(a.dtype);
  if (xb == 0 || LLCheckDispatch(comm, a.shape, xb, a.use_fp8) != nullptr) {
    return cudaErrorInvalidValue;
  }
  const bool send = phase != kLLRecvOnly, recv = phase != kLLSendOnly;
  const bool tokens = a.shape.num_tokens > 0;  // zero-sized XLA buffers may be null
  if ((send && tokens && a.x == nullptr) || (tokens && a.topk_idx == nullptr) ||
      (phase == kLLSendOnly && a.token_out == nullptr) ||
      (phase == kLLRecvOnly && a.token_in == nullptr) ||
      (recv && (a.recv_x == nullptr || a.recv_count == nullptr || a.recv_src == nullptr ||
                (tokens && a.slot == nullptr) || (a.use_fp8 && a.recv_scales == nullptr)))) {
    return cudaErrorInvalidValue;
  }
  DispatchParams p{};
  p.s = a.shape;
  p.x = static_cast<const uint8_t*>(a.x);
  p.idx = a.topk_idx;
  p.use_fp8 = a.use_fp8;
  p.zero_fill = a.zero_fill;
  p.x_bytes = xb;
  p.phase = phase;
  p.stride = LLDispatchRowStride(a.shape.hidden, xb, a.use_fp8);
  p.payload_bytes = a.use_fp8 ? a.shape.hidden + 4 * (a.shape.hidden / kLLFp8Block)
                              : a.shape.hidden * xb;
  p.vec_x = (a.shape.hidden * xb) % 16 == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0;
  p.vec_out = p.use_fp8 ? a.shape.hidden % 16 == 0 : (a.shape.hidden * xb) % 16 == 0;
  p.vec_out = p.vec_out && reinterpret_cast<uintptr_t>(a.recv_x) % 16 == 0;
  p.recv_x = static_cast<uint8_t*>(a.recv_x);
  p.recv_scales = a.recv_scales;
  p.recv_count = a.recv_count;
  p.recv_src = a.recv_src;
  p.slot = a.slot;
  p.token_out = phase == kLLSendOnly ? a.token_out : nullptr;
  p.token_in = a.token_in;
  const int64_t L = a.shape.num_experts / comm.num_ranks;
  const size_t smem = recv ? static_cast<size_t>(L * (comm.num_ranks + 1) + L + 1) * 4 : 0;
  const int grid = GridFor(comm);
  switch (a.dtype) {
    case LLDtype::kBF16:
      return Launch(LLDispatchKernel<Bf16Elem>, grid, smem, stream, comm, p);
    case LLDtype::kF16:
      return Launch(LLDispatchKernel<F16Elem>, grid, smem, stream, comm, p);
    case LLDtype::kF32:
      return Launch(LLDispatchKernel<F32Elem>, grid, smem, stream, comm, p);
  }
  return cudaErrorInvalidValue;
}

cudaError_t LaunchLLCombine(const LLComm& comm, const LLCombineArgs& a, LLPhase phase,
                            cudaStream_t stream) {
  const int yb = LLDtypeBytes(a.dtype);
  if (yb == 0 || LLCheckCombine(comm, a.shape, yb) != nullptr) return cudaErrorInvalidValue;
  const bool send = phase != kLLRecvOnly, recv = phase != kLLSendOnly;
  const bool tokens = a.shape.num_tokens > 0;  // zero-sized XLA buffers may be null
  if ((send && (a.y == nullptr || a.recv_src == nullptr || a.recv_count == nullptr)) ||
      (recv && tokens &&
       (a.topk_idx == nullptr || a.out == nullptr || (!a.gather && a.topk_weights == nullptr))) ||
      (phase == kLLSendOnly && a.token_out == nullptr) ||
      (phase == kLLRecvOnly && a.token_in == nullptr)) {
    return cudaErrorInvalidValue;
  }
  CombineParams p{};
  p.s = a.shape;
  p.gather = a.gather;
  p.phase = phase;
  p.y_bytes = yb;
  p.stride = LLPlainRowStride(a.shape.hidden, yb);
  p.send_rows = p.stride > 0 ? static_cast<int64_t>(comm.layout.send_bytes) / p.stride : 0;
  p.vec_y = (a.shape.hidden * yb) % 16 == 0 && reinterpret_cast<uintptr_t>(a.y) % 16 == 0;
  p.y = static_cast<const uint8_t*>(a.y);
  p.recv_src = a.recv_src;
  p.recv_count = a.recv_count;
  p.idx = a.topk_idx;
  p.w = a.topk_weights;
  p.out = static_cast<uint8_t*>(a.out);
  p.token_out = phase == kLLSendOnly ? a.token_out : nullptr;
  p.token_in = a.token_in;
  const int64_t L = a.shape.num_experts / comm.num_ranks;
  const size_t smem = send ? static_cast<size_t>(L + 1) * 4 : 0;
  const int grid = GridFor(comm);
  // 16-byte chunks when every row and the output are 16-byte aligned.
  const bool vec = (a.shape.hidden * yb) % 16 == 0 &&
                   (reinterpret_cast<uintptr_t>(a.out) % 16 == 0 || !recv);
  switch (a.dtype) {
    case LLDtype::kBF16:
      return vec ? Launch(LLCombineKernel<Bf16Elem, 8>, grid, smem, stream, comm, p)
                 : Launch(LLCombineKernel<Bf16Elem, 1>, grid, smem, stream, comm, p);
    case LLDtype::kF16:
      return vec ? Launch(LLCombineKernel<F16Elem, 8>, grid, smem, stream, comm, p)
                 : Launch(LLCombineKernel<F16Elem, 1>, grid, smem, stream, comm, p);
    case LLDtype::kF32:
      return vec ? Launch(LLCombineKernel<F32Elem, 4>, grid, smem, stream, comm, p)
                 : Launch(LLCombineKernel<F32Elem, 1>, grid, smem, stream, comm, p);
  }
  return cudaErrorInvalidValue;
}

cudaError_t LaunchLLDispatchCached(const LLComm& comm, const LLCachedDispatchArgs& a,
                                   cudaStream_t stream) {
  const int xb = LLDtypeBytes(a.dtype);
  if (xb == 0 || LLCheckCachedDispatch(comm, a.shape, xb) != nullptr) return cudaErrorInvalidValue;
  const bool tokens = a.shape.num_tokens > 0;  // zero-sized XLA buffers may be null
  if ((tokens && (a.x == nullptr || a.topk_idx == nullptr || a.slot == nullptr)) ||
      a.recv_count == nullptr || a.out == nullptr) {
    return cudaErrorInvalidValue;
  }
  CachedParams p{};
  p.s = a.shape;
  p.x_bytes = xb;
  p.zero_fill = a.zero_fill;
  p.stride = LLPlainRowStride(a.shape.hidden, xb);
  p.x = static_cast<const uint8_t*>(a.x);
  p.idx = a.topk_idx;
  p.slot = a.slot;
  p.scale = a.scale;
  p.recv_count = a.recv_count;
  p.out = static_cast<uint8_t*>(a.out);
  const int grid = GridFor(comm);
  switch (a.dtype) {
    case LLDtype::kBF16:
      return Launch(LLCachedDispatchKernel<Bf16Elem>, grid, 0, stream, comm, p);
    case LLDtype::kF16:
      return Launch(LLCachedDispatchKernel<F16Elem>, grid, 0, stream, comm, p);
    case LLDtype::kF32:
      return Launch(LLCachedDispatchKernel<F32Elem>, grid, 0, stream, comm, p);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jax_ep
