// Low-latency (decode) dispatch / combine over NVSHMEM, DeepEP-LL style but
// deterministic: static per-expert slots, rows ordered by (source rank,
// source token), fp32 reductions in a fixed order. One kernel per op (or one
// per half in the split send / receive form), no host synchronisation.
//
// This header holds what the kernels share: the protocol (below), region
// accessors, signals and puts, warp copies, row sharing between warps, and
// the launch helper. The kernels: dispatch.cu,
// combine.cu (combine and gather), cached_dispatch.cu (cached
// dispatch, the backward of combine); the region layout and argument checks:
// region_layout.cc.
//
// Notation: R PEs (= EP ranks), me = this PE, T <= M tokens, K top-k, E
// experts, L = E / R local experts, expert e lives on PE e / L as local
// expert e % L. n = the op number (1, 2, ...), b = n & 1 the buffer set.
//
// REGION. One symmetric NVSHMEM allocation per PE (nvshmem_align, zeroed
// once at initialize), same layout on every PE (LLLayout, low_latency.h):
//   control  +0    u64 op counter (LL ops this PE started; owner only)
//            +8    u32 / +12 u32  last-block counters of send / receive phases
//            +16   u32 next row task of a combine send (zeroed by its last block)
//            +20   u32 next token task of a streamed combine receive (zeroed by its last block)
//            +256  u64 done[2][64]  done[b][s] = (n << 4) | op of source s's op n
//            +1280 u64 ack[2][64]   ack[b][r]  = n once PE r finished reading set b of op n
//   counts   int32 [2][R][E]        counts[b][s][e] = tokens source s sent to expert e in op n
//   scratch  int32 [2][E]           my per-expert counts (local, then broadcast; all zero
//                                   between ops: the op that used it zeroes it)
//   jpos     int32 [2][M*K]         j(t, k): position of token t among my tokens for its expert
//   arrive   u64 [2][M]             streamed combine: rows of my token t written so far in set b
//                                   (adds by the rows' writers; zeroed by my last receive block)
//   sets     [2][set_bytes]         receive area of ops with parity b:
//              dispatch:  int32 index [L][R][M], then rows [R][M] of the payload (x row,
//                         or e4m3 row + H/128 f32 scales), 16-byte rounded. Source
//                         s writes token t once per PE that holds any of its experts, at
//                         rows[s][t], and t at index[l][s][j] for each of its experts
//                         there (its j-th token, in token order, for local expert l): where
//                         a row or an entry goes depends on nothing but the source's own
//                         top-k ids. One row per PE, not per expert: at DeepEP's decode
//                         routing (top-8 of 256 over 8 PEs) a token reaches ~5.3 PEs for
//                         8 experts, so a third fewer rows to write and read.
//              combine /  rows [M][E] of H * itemsize: the owner of expert e writes the
//              gather:    output row of (source me, token t) at [t][e] (a token's rows side
//                         by side; a token naming e twice reads the same row twice: no
//                         special case); fused at one PE the rows stay in y, where the
//                         receive reads them
//              cached:    rows [L][R*M]: the source writes straight to the final row (slot)
//   send     staging rows for NVSHMEM puts (only with a send buffer): the source of a put
//            must be symmetric memory, so rows are built here and then put (dispatch:
//            one row per token, put to each of its experts; combine: one per row).
// Sizes (allocation maxima M, H, E, K, itemsize; stride = round16(H * itemsize),
// which also covers the FP8 row H + 4 H / 128):
//   set_bytes  = max(E * M * stride, round256(4 E M) + R * M * stride)   (x2: double buffered)
//   send_bytes = max(M * K, min(E * M, R * M * K)) * stride   (0 without send buffer)
//   total      = 4 KiB + 8 R E + 8 E + 8 M K + 16 M (each rounded to 256) + 2 set_bytes
//                + send_bytes
// e.g. R = 8, M = 128, H = 7168, E = 256, K = 8, bf16: 896 MiB (1008 MiB with send buffer).
//
// PEERS. peer_base[r] = nvshmem_ptr(region, r) when PE r's memory is mapped
// here (NVLink / same GPU): rows are written with 16-byte stores straight into
// the peer and signals are st.release.sys, or .gpu (fences and acquires too)
// when every PE runs on this GPU (LLComm::gpu_scope). Otherwise (another
// node, or the force_put option) rows are staged in the send buffer and moved
// with nvshmemx_putmem_nbi_warp; signals are nvshmemx_signal_op(SET).
//
// PROTOCOL of op n (every PE runs the same LL ops in the same order):
//  send phase (all blocks):
//   1. n = op counter + 1; wait until ack[b][r] >= n - 2 for every r: every PE
//      has finished reading set b of op n - 2, the previous user of set b.
//   2. write rows into set b of their owners. Dispatch: one warp per (token,
//      part of its row) reads the token once (FP8 cast once), stores it
//      once into each PE holding one of its experts and its index entry for
//      each distinct expert; j(t, e) comes from per-expert token bit masks
//      in shared memory (popcount of the bits below t; one pass over the
//      earlier tokens' ids when the masks do not fit); jpos for my slots;
//      the per-expert counts as atomicMax(scratch[e], j + 1). Combine: warps
//      take the rows from the task counter, one row (part) at a time.
//   3. the last block to finish (atomic counter after a fence;
//      it runs nvshmem_quiet() first when some rows went by put) broadcasts
//      scratch into counts[b][me][*] of every PE (dispatch), then sets
//      done[b][me] = (n << 4) | op in every PE, stores n in the op counter,
//      zeroes the task counter, and scratch for the next dispatch of parity b.
//  receive phase (all blocks):
//   4. wait until done[b][s] >> 4 >= n for every s (and check the op kind).
//   5. read set b into the XLA outputs (dispatch: one warp per (received
//      row, part), compacting the index [l][s][j] into rows ordered by
//      (s, j) using counts[b][*][e], each read from rows[s][index], written
//      at its padded or ragged row (low_latency.h: layouts); all
//      threads mark and zero the padding rows (ragged: the tail); compute
//      slot = sum_{s<me} counts[b][s][e] + j; combine: reduce in k order).
//   6. the last block sets ack[b][me] = n in every PE.
// The split form runs 1-3 in the send kernel (which returns n as a token) and
// 4-6 in the receive kernel (which takes it). The streamed combine (fused, R >
// 1, every PE on this GPU; combine_streamed.cu) runs 1-6 per token:
// each row's writer adds 1 to arrive[b][t] at the row's owner after the row
// (release), and 4-5 for token t wait for arrive[b][t] = its distinct valid
// experts (or every done signal); its last receive block waits for every done
// signal before it zeroes arrive[b] and runs 6. The fused combine / gather at
// one PE moves no rows: it runs 1, 5 (from y) and the signals of 3 and 6.
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
// (ffi/runtime/watchdog.h, messages in low_latency_runtime.cc) prints which PE
// waited for what from whom.
//
// CO-RESIDENCY. The fused kernels spin on signals produced by other blocks of
// the same grid (the last send block signals my own receive) and by other
// PEs' kernels, so the grid is sized to be co-resident with the kernels of
// every PE sharing the GPU (low_latency_runtime.cc: num_blocks).
#pragma once

#include <algorithm>
#include <cstring>

#include <nvshmem.h>
#include <nvshmemx.h>

#include "ffi/kernels/common/device_copy.cuh"
#include "ffi/kernels/common/device_sync.cuh"
#include "ffi/kernels/common/elem_types.cuh"
#include "ffi/kernels/low_latency/low_latency.h"

namespace jax_ep {
// Internal linkage on purpose: each kernel file gets its own copy of these
// device helpers (relocatable device code would otherwise see the
// out-of-line ones, e.g. PutRowWarp, defined in several objects).
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;   // vectors per lane in flight in warp copies
// ... in the copies of whole rows (dispatch receive, streamed combine send):
// deeper than kUnroll where the kernel has the registers (more would spill;
// see docs/optimisation-log.md).
constexpr int kRowUnroll = 8;
constexpr int kPartVectors = 128;  // fewest 16-byte vectors per row part
constexpr unsigned kFull = 0xffffffffu;


// ------------------------------------------------------------ region accessors
// (acquire / release, timer, spin-wait, record + trap, ArriveLast:
// device_sync.cuh)


__device__ __forceinline__ uint64_t* OpCounter(uint8_t* base) {
  return reinterpret_cast<uint64_t*>(base + kLLOpCounterOffset);
}
__device__ __forceinline__ unsigned int* SendArrive(uint8_t* base) {
  return reinterpret_cast<unsigned int*>(base + kLLSendArriveOffset);
}
__device__ __forceinline__ unsigned int* RecvArrive(uint8_t* base) {
  return reinterpret_cast<unsigned int*>(base + kLLRecvArriveOffset);
}
__device__ __forceinline__ unsigned int* SendTask(uint8_t* base) {
  return reinterpret_cast<unsigned int*>(base + kLLSendTaskOffset);
}

// True in the last block of the grid to finish its send (receive) phase
// (ArriveLast, device_sync.cuh), with fences at the comm's scope.
__device__ __forceinline__ bool LastToSend(const LLComm& c) {
  return ArriveLast(SendArrive(c.base), c.gpu_scope != 0);
}
__device__ __forceinline__ bool LastToReceive(const LLComm& c) {
  return ArriveLast(RecvArrive(c.base), c.gpu_scope != 0);
}

// The warp's next task from a phase's counter (lane 0 takes it; past the
// phase's tasks: none left). Blocks whose copies go faster take more rows:
// a static split left the blocks of a combine send finishing far apart (the
// dispatch receive was faster static and keeps it; see
// docs/optimisation-log.md).
__device__ __forceinline__ int64_t NextWarpTask(unsigned int* counter, int lane) {
  unsigned int task = 0u;
  if (lane == 0) task = atomicAdd(counter, 1u);
  return static_cast<int64_t>(__shfl_sync(kFull, task, 0));
}

__host__ __device__ __forceinline__ size_t DoneOffset(int b, int s) {
  return kLLDoneOffset + (static_cast<size_t>(b) * kLLMaxRanks + s) * 8;
}
__host__ __device__ __forceinline__ size_t AckOffset(int b, int r) {
  return kLLAckOffset + (static_cast<size_t>(b) * kLLMaxRanks + r) * 8;
}
__host__ __device__ __forceinline__ size_t SignatureOffset(int b, int s) {
  return kLLSignatureOffset + (static_cast<size_t>(b) * kLLMaxRanks + s) * kLLSignatureWords * 8;
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
// Dispatch in set b: the int32 index [L][R][M] (source s's j-th token for
// local expert l), then the rows [R][M] (source s's token t) at this offset.
__device__ __forceinline__ size_t DispatchRowsOffset(int64_t E, int64_t M) {
  return static_cast<size_t>(LLDispatchIndexBytes(E, M));
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
__device__ __noinline__ void PutInt32(void* dest, int32_t value, int pe) {
  nvshmem_int32_p(static_cast<int32_t*>(dest), value, pe);
}
__device__ __noinline__ void QuietAll() { nvshmem_quiet(); }
// A source's op signature to PE pe, delivered before what it sends next.
__device__ __noinline__ void PutSignature(uint64_t* dest, const uint64_t* words, int pe) {
  for (int i = 0; i < kLLSignatureWords; ++i) nvshmem_uint64_p(dest + i, words[i], pe);
  nvshmem_fence();
}

// This call's op signature (LLComm::op_sig plus its EP axis index).
__device__ __forceinline__ void MySignature(const LLComm& c, uint64_t* words) {
  words[0] = c.op_sig[0];
  words[1] = c.op_sig[1];
  words[2] = c.axis_index != nullptr ? static_cast<uint32_t>(*c.axis_index)
                                     : static_cast<uint32_t>(c.rank);
}

// Source s's signature of op n (it arrived before its done signal) against
// mine: another EP axis position than its PE, or other shapes, stop here.
// Out of line: the common path stays small.
__device__ __noinline__ void CheckSignature(const LLComm& c, uint64_t n, int s, int32_t op) {
  uint64_t mine[kSignatureWords] = {0}, theirs[kSignatureWords] = {0};
  MySignature(c, mine);
  const volatile uint64_t* slot =
      reinterpret_cast<const volatile uint64_t*>(c.base + SignatureOffset(n & 1, s));
  for (int i = 0; i < kLLSignatureWords; ++i) theirs[i] = slot[i];
  if (theirs[2] != static_cast<uint64_t>(s)) {
    RecordTimeoutAndTrap(c.timeout_record, c.rank, op, kWaitLLRankOrder, s, c.timeout_ns, n,
                         theirs[2], mine, theirs);
  }
  if (theirs[0] != mine[0] || theirs[1] != mine[1]) {
    RecordTimeoutAndTrap(c.timeout_record, c.rank, op, kWaitLLShapeMismatch, s, c.timeout_ns, n,
                         0, mine, theirs);
  }
}

// Threads [0, R) of the block wait until every PE released set b of op n - 2
// (ack >= n - 2; the record gets n as the epoch).
__device__ __forceinline__ void WaitReleased(const LLComm& c, uint64_t n, int32_t op) {
  const int r = threadIdx.x;
  if (n > 2 && r < c.num_ranks) {
    const uint64_t* flag = reinterpret_cast<const uint64_t*>(c.base + AckOffset(n & 1, r));
    SpinWaitAtLeast(flag, n - 2, /*shift=*/0, /*sleep_ns=*/64,
                    TimeoutSite{c.timeout_record, c.rank, op, kWaitLLRelease, r, c.timeout_ns, n},
                    c.gpu_scope != 0);
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
                        TimeoutSite{c.timeout_record, c.rank, op, kWaitLLData, s, c.timeout_ns, n},
                        c.gpu_scope != 0);
    if ((seen >> 4) == n && static_cast<int32_t>(seen & 15) != (op & 15)) {
      RecordTimeoutAndTrap(c.timeout_record, c.rank, op, kWaitLLMismatch, s, c.timeout_ns, n,
                           seen);
    }
    if ((seen >> 4) == n) CheckSignature(c, n, s, op);
    // A peer reached by puts: NVSHMEM's own wait, already satisfied, runs the
    // consistency step proxy transports (IBRC, some UCX) need before this
    // PE's loads see the rows the puts delivered; the spin above skips it.
    if (c.any_put && c.peer_base[s] == nullptr) {
      nvshmem_signal_wait_until(const_cast<uint64_t*>(flag), NVSHMEM_CMP_GE, n << 4);
    }
  }
  __syncthreads();
}

__device__ __forceinline__ void SignalPe(const LLComm& c, uint8_t* mapped, int pe, size_t offset,
                                         uint64_t value) {
  if (mapped != nullptr) {
    StoreRelease(reinterpret_cast<uint64_t*>(mapped + offset), value, c.gpu_scope != 0);
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

// done[b][me] = (n << 4) | op in every PE, by threads i, i + step, ... of
// the caller (after whatever orders the send's writes before it); thread
// i == 0 then stores n in the op counter and clears the send's counters.
__device__ __forceinline__ void PublishDone(const LLComm& c, uint8_t* const* s_peer, uint64_t n,
                                            int32_t op, int i, int step) {
  uint64_t sig[kLLSignatureWords];
  MySignature(c, sig);
  const size_t sig_off = SignatureOffset(n & 1, c.rank);
  for (int r = i; r < c.num_ranks; r += step) {
    // The signature first: the done signal's release (or the fence) orders it before.
    if (s_peer[r] != nullptr) {
      volatile uint64_t* dst = reinterpret_cast<volatile uint64_t*>(s_peer[r] + sig_off);
      for (int w = 0; w < kLLSignatureWords; ++w) dst[w] = sig[w];
    } else {
      PutSignature(reinterpret_cast<uint64_t*>(c.base + sig_off), sig, r);
    }
    SignalPe(c, s_peer[r], r, DoneOffset(n & 1, c.rank), (n << 4) | static_cast<uint64_t>(op & 15));
  }
  if (i == 0) {
    *reinterpret_cast<volatile uint64_t*>(OpCounter(c.base)) = n;
    *reinterpret_cast<volatile unsigned int*>(SendArrive(c.base)) = 0u;
    *reinterpret_cast<volatile unsigned int*>(SendTask(c.base)) = 0u;
  }
}

// End of a send phase, in the last block: drain puts, publish done[b][me] in
// every PE, advance the op counter.
__device__ __forceinline__ void FinishSend(const LLComm& c, uint8_t* const* s_peer, uint64_t n,
                                           int32_t op) {
  if (c.any_put) {
    __syncthreads();
    if (threadIdx.x == 0) QuietAll();
  }
  // Mapped peers: the barrier orders this block's writes (dispatch: the
  // counts) before each signal's release store: one fence per signal, not
  // one per thread (cheaper; see docs/optimisation-log.md).
  if (c.any_put) __threadfence_system();
  __syncthreads();
  PublishDone(c, s_peer, n, op, threadIdx.x, blockDim.x);
}

// End of a receive phase, in the last block: release set b in every PE.
__device__ __forceinline__ void FinishRecv(const LLComm& c, uint8_t* const* s_peer, uint64_t n) {
  const int r = threadIdx.x;
  if (r < c.num_ranks) SignalPe(c, s_peer[r], r, AckOffset(n & 1, c.rank), n);
  if (threadIdx.x == 0) *reinterpret_cast<volatile unsigned int*>(RecvArrive(c.base)) = 0u;
}

// Phase trace (LLComm::trace, low_latency.h): thread 0 of the block stamps
// `event` of op n; block 0 also tags the op.
__device__ __forceinline__ void TracePoint(const LLComm& c, uint64_t n, int event, int32_t op) {
  if (c.trace == nullptr || threadIdx.x != 0) return;
  const int block = min(static_cast<int>(blockIdx.x), kLLTraceBlocks - 1);
  uint64_t* row = c.trace + ((n % kLLTraceOps) * kLLTraceBlocks + block) * kLLTraceEvents;
  row[event] = GlobalTimerNs();
  if (blockIdx.x == 0) row[kLLTraceTag] = (n << 8) | static_cast<uint64_t>(op & 255);
}

// First thing in every low-latency kernel (LLKernelEntry): under
// programmatic dependent launch, wait until the previous kernel of the
// stream completed and its writes are visible (a no-op for a normal launch).
__device__ __forceinline__ void WaitPreviousKernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
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


// ------------------------------------------------------------ warp copies
// kPeer: the source was written by another agent in this op (LoadVec,
// device_copy.cuh), else it is a read-only input.

// L2 prefetch of bytes [p, p + n) by one warp, one prefetch per 128-byte
// line: the loads that follow find their lines in L2 or on the way, so a
// warp has a whole row part in flight rather than kUnroll vectors per lane
// (the copies were latency-bound, and registers allow no deeper unroll).
__device__ __forceinline__ void WarpPrefetchL2(const void* p, int64_t n, int lane) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + n;
  for (uintptr_t a = (reinterpret_cast<uintptr_t>(p) & ~uintptr_t{127}) + lane * 128; a < end;
       a += 32 * 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(a));
  }
}

// Vectors [begin, n) by one warp, kU per lane in flight. A vector past n is
// zero, not left unset: nvcc kept an unset one's previous value alive across
// passes, which cost time and made a deeper unroll spill.
template <bool kPeer, int kU = kUnroll, typename V>
__device__ __forceinline__ void WarpCopyVecRange(V* __restrict__ dst, const V* __restrict__ src,
                                                 int64_t begin, int64_t n, int lane) {
  for (int64_t base = begin + lane; base < n; base += 32 * kU) {
    V v[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t i = base + 32 * u;
      v[u] = i < n ? LoadVec<kPeer>(src + i) : V{};
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
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

// s_base[l] = sum_{l' < l} min(count[l'], cap), s_base[L] = total: where
// local expert l's rows start in the ragged layout.
__device__ __forceinline__ void RowBases(const int32_t* count, int64_t L, int32_t cap,
                                         int32_t* s_base) {
  BlockExclusiveScan(L, [&](int64_t l) { return min(max(__ldg(count + l), 0), cap); }, s_base);
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

// ------------------------------------------------------------ launch

int GridFor(const LLComm& c) { return std::max(1, c.num_blocks); }

// The call's comm with its op signature (LLComm::op_sig): every receiver
// compares it with its own when the done signal arrives.
LLComm Signed(const LLComm& comm, int32_t op, const LLShape& s, int elem_bytes, bool use_fp8,
              const int32_t* axis_index) {
  LLComm c = comm;
  c.op_sig[0] = static_cast<uint64_t>(op & 0xff) | static_cast<uint64_t>(elem_bytes) << 8 |
                static_cast<uint64_t>(use_fp8 ? 1 : 0) << 16 |
                static_cast<uint64_t>(s.top_k & 0xff) << 24 |
                static_cast<uint64_t>(s.num_experts) << 32;
  c.op_sig[1] = static_cast<uint64_t>(s.hidden) | static_cast<uint64_t>(s.max_tokens) << 32;
  c.axis_index = axis_index;
  return c;
}

// The one __global__ entry of every low-latency kernel. `Kernel` is a struct
// with `static __device__ void Run(const LLComm&, const Params&)`; the entry
// waits for the previous kernel of the stream before Run reads anything, so
// no kernel launched with programmatic dependent launch can forget to (a
// dependent grid may start before its predecessor's writes are visible).
template <typename Kernel, typename Params>
__global__ void __launch_bounds__(kThreads, 1) LLKernelEntry(LLComm c, Params p) {
  WaitPreviousKernel();
  CheckLive(c.live);  // a CUDA graph recorded before shutdown stops here
  Kernel::Run(c, p);
}

// Blocks of LLKernelEntry<Kernel> one SM of the current device holds at once
// with `smem` bytes of dynamic shared memory (0 when it cannot run at all).
template <typename Kernel, typename Params>
int BlocksPerSm(size_t smem) {
  void (*kernel)(LLComm, Params) = LLKernelEntry<Kernel, Params>;
  int n = 0;
  if ((smem <= 48 * 1024 ||
       cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            static_cast<int>(smem)) == cudaSuccess) &&
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem) == cudaSuccess) {
    return n;
  }
  cudaGetLastError();
  return 0;
}

// Launches LLKernelEntry<Kernel>: the only way a low-latency kernel starts.
template <typename Kernel, typename Params>
cudaError_t Launch(int grid, size_t smem, cudaStream_t stream, const LLComm& c,
                   const Params& params) {
  void (*kernel)(LLComm, Params) = LLKernelEntry<Kernel, Params>;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  if (!c.pdl) {
    kernel<<<grid, kThreads, smem, stream>>>(c, params);
    return cudaGetLastError();
  }
  // Programmatic dependent launch: the grid is scheduled as the previous
  // kernel's blocks exit, not after its completion is processed; the entry
  // waits for that completion first thing (WaitPreviousKernel).
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, c, params);
}

}  // namespace
}  // namespace jax_ep
