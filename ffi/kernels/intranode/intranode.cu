// Intranode dispatch / combine over peer pointers (NVLink UVA peers in one
// process, or CUDA IPC mappings of other processes' buffers, possibly on the
// same GPU under MPS). Pure copies plus an fp32 rank-ordered sum: bitwise
// deterministic.
//
// BUFFERS. Every rank owns one comm buffer (cudaMalloc, zeroed once, mapped
// into every peer at initialize): a 64 KiB signal area, then the data area.
//   signal +0      u64 epoch           ops this rank has started (owner only)
//          +8      u32 send counter    last-block counter of the send kernels
//          +256    u64 barrier[64]     barrier[s] = last epoch rank s reached
//          +768    u64 data[64]        data[s]    = last epoch rank s finished sending
//          +2048   i32 counts[2][64][64]  counts[e & 1][s][r] = C[s][r] of epoch e
//   data   dispatch: per payload p a [capacity, row_bytes_p] sub-area at
//            capacity * sum_{q<p} row_bytes_q; the row of (source s, j-th
//            token of s for me) is offset(s, me) + j, offset = exclusive
//            column prefix of C, so senders write rows straight into place.
//          combine: [R][T][hidden bytes]; rank r writes its rows for my
//            tokens at [r][j], j = my token's slot on r.
// Peers only ever write into the receiver's buffer; the owner reads it.
//
// PROTOCOL. Every op is notify/barrier -> send -> recv, three kernels on XLA's
// stream, no host synchronisation (so they can live in a CUDA graph).
//  1. notify (1 block): e = ++epoch. Dispatch first writes its `sent` row into
//     counts[e & 1][me][*] of every peer. Then every rank release-stores e
//     into barrier[me] of every peer and waits until its own barrier[s] >= e
//     for all s (>=: a fast peer can already be in op e+1). Dispatch then
//     copies the count matrix C out of counts[e & 1] into rank_counts.
//     Because each rank finished op e-1 (stream order) before it announced e,
//     after the barrier nobody reads a data area of op e-1 any more: ONE data
//     area serves all ops. The counts are double-buffered by epoch parity: a
//     peer at op e+1 may write counts before I read those of e, but it cannot
//     reach e+2 before I announce e+1.
//  2. send (num_blocks blocks): rows are copied straight into the peers' data
//     areas with 16-byte vector loads/stores (4- or 1-byte when rows or
//     pointers are not aligned). A rank's rows for itself skip the data area:
//     dispatch writes them into its own outputs, combine leaves them in y.
//     The last block to finish (atomic counter, __threadfence_system before
//     it) release-stores data[me] = e into every peer.
//  3. recv: every block waits for data[s] >= e of all senders (acquire), then
//     dispatch copies rows [0, num_recv) of its data area into the XLA outputs
//     (all but its own rows) and zeroes the rest; combine sums, per token and
//     in rank order, the rows its peers sent back (its own from y), in fp32.
// Every spin-wait reads %globaltimer; past the timeout it writes a
// TimeoutRecord into host-mapped memory and traps (device_sync.cuh), and a
// host watchdog (ffi/runtime/watchdog.h, messages in intranode_runtime.cc)
// reports which rank waited for what.
//
// WORK MAPPING (256-thread blocks, grid <= num_blocks).
//  dispatch send: one warp per token; lanes read the token's R slots, a
//    ballot gives its destinations; each 2 KiB chunk of the row is loaded
//    once (4 x 16 B per lane) and stored to every destination.
//  dispatch recv: per payload one grid-strided flat copy of the first
//    num_recv rows (contiguous) and a zero fill of the rest.
//  combine send: a source's rows are contiguous on both sides, so R flat
//    copies y[begin_s, end_s) -> area[me][0..) of rank s.
//  combine recv: a block takes a chunk of tokens, puts their routes (rank,
//    slot) in shared memory, then each thread reduces 4 vectors of 16 B at a
//    time, 2 ranks deep (up to 8 loads in flight), in fp32.
//
// RULES FOR CALLERS. Every rank must run the same ops in the same order.
// Kernels of several ranks sharing one GPU (MPS) spin while they wait, so the
// runtime scales num_blocks down by the ranks sharing the GPU. Several ranks
// as streams of ONE process (tests only) must enqueue phase p of every rank
// before phase p+1 of any (LaunchIntranode*Phase): a stream-ordered kernel
// waiting at the head of a shared hardware queue would block a peer's notify.
#include "ffi/kernels/intranode/intranode.h"

#include <algorithm>
#include <cstring>

#include "ffi/kernels/common/device_copy.cuh"
#include "ffi/kernels/common/device_sync.cuh"
#include "ffi/kernels/common/elem_types.cuh"
#include "ffi/kernels/common/signature.cuh"

namespace jax_ep {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;
constexpr int kMaxRanks = kIntranodeMaxRanks;
constexpr int kMaxParts = kIntranodeMaxParts;
constexpr int kMaxTokensPerChunk = 32;  // combine receive: tokens whose routes sit in shared memory
constexpr int kItems = 4;       // combine receive: vectors one thread reduces at once
constexpr int kRankUnroll = 2;  // combine receive: ranks loaded at once per vector
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxHidden = kIntranodeMaxHidden;

// ------------------------------------------------------------ signal area
// (acquire / release, timer, record + trap: device_sync.cuh)

__device__ __forceinline__ uint64_t* EpochPtr(uint8_t* base) {
  return reinterpret_cast<uint64_t*>(base + kSignalEpochOffset);
}
__device__ __forceinline__ unsigned int* SendCounterPtr(uint8_t* base) {
  return reinterpret_cast<unsigned int*>(base + kSignalSendCounterOffset);
}
__device__ __forceinline__ uint64_t* BarrierFlags(uint8_t* base) {
  return reinterpret_cast<uint64_t*>(base + kSignalBarrierFlagsOffset);
}
__device__ __forceinline__ uint64_t* DataFlags(uint8_t* base) {
  return reinterpret_cast<uint64_t*>(base + kSignalDataFlagsOffset);
}
__device__ __forceinline__ int32_t* CountMatrix(uint8_t* base, uint64_t epoch) {
  return reinterpret_cast<int32_t*>(base + kSignalCountsOffset) +
         (epoch & 1) * kMaxRanks * kMaxRanks;
}
__device__ __forceinline__ uint64_t* SignatureSlot(uint8_t* base, uint64_t epoch, int sender) {
  return reinterpret_cast<uint64_t*>(base + kSignalSignaturesOffset) +
         ((epoch & 1) * kMaxRanks + sender) * kSignatureWords;
}
__device__ __forceinline__ uint8_t* DataArea(uint8_t* base) { return base + kIntranodeSignalBytes; }

// The epoch of the op in flight, set by its notify kernel (an earlier kernel
// on the same stream).
__device__ __forceinline__ uint64_t CurrentEpoch(const IntranodeComm& c) {
  return *reinterpret_cast<volatile uint64_t*>(EpochPtr(c.local_base));
}

// ------------------------------------------------------------ timeouts

// Spins until *flag >= target (acquire, system scope) or the timeout passes;
// the record gets the target as the epoch. Sleeps 128 ns between late polls
// (leaves issue slots to co-resident copy kernels).
__device__ __forceinline__ void WaitAtLeast(const IntranodeComm& c, const uint64_t* flag,
                                            uint64_t target, int32_t op, int32_t what,
                                            int32_t peer) {
  SpinWaitAtLeast(flag, target, /*shift=*/0, /*sleep_ns=*/128,
                  TimeoutSite{c.timeout_record, c.rank, op, what, peer, c.timeout_ns, target});
}

// Threads [0, R) of the block each wait for one sender's data flag.
__device__ __forceinline__ void WaitForAllSenders(const IntranodeComm& c, int32_t op) {
  if (static_cast<int>(threadIdx.x) < c.num_ranks) {
    const uint64_t e = CurrentEpoch(c);
    WaitAtLeast(c, DataFlags(c.local_base) + threadIdx.x, e, op, kWaitData,
                static_cast<int32_t>(threadIdx.x));
  }
  __syncthreads();
}

// Send kernels end here: the last block of the grid to finish publishes
// data[me] = epoch in every peer, after all blocks' stores are visible.
__device__ __forceinline__ void SignalDataWhenGridDone(const IntranodeComm& c) {
  if (!ArriveLast(SendCounterPtr(c.local_base))) return;
  const uint64_t e = CurrentEpoch(c);
  if (static_cast<int>(threadIdx.x) < c.num_ranks) {
    StoreReleaseSys(DataFlags(c.peer_bases[threadIdx.x]) + c.rank, e);
  }
  // The next op's send kernel runs after this grid (stream order).
  if (threadIdx.x == 0) atomicExch(SendCounterPtr(c.local_base), 0u);
}

// ------------------------------------------------------------ notify / barrier

// This op's signature (intranode.h, IntranodeOpSignature words), the axis
// index word read in the kernel from the call's operand.
struct OpSignature {
  uint64_t words[kSignatureWords];
  const int32_t* axis_index;
};

// sent != nullptr: count exchange (dispatch), else a plain barrier. Every
// rank also leaves its op signature with every peer and checks theirs.
__global__ void __launch_bounds__(kThreads)
    NotifyKernel(IntranodeComm c, const int32_t* sent, int32_t* rank_counts, int32_t op,
                 OpSignature sig) {
  CheckLive(c.live);  // first of every op: a CUDA graph recorded before shutdown stops here
  const int R = c.num_ranks;
  const int me = c.rank;
  const int tid = threadIdx.x;
  const uint64_t e = CurrentEpoch(c) + 1;
  __syncthreads();  // everyone has read the old epoch
  if (tid == 0) *reinterpret_cast<volatile uint64_t*>(EpochPtr(c.local_base)) = e;

  if (sent != nullptr) {
    for (int i = tid; i < R * R; i += blockDim.x) {
      const int r = i / R;
      const int k = i - r * R;
      CountMatrix(c.peer_bases[r], e)[me * kMaxRanks + k] = sent[k];
    }
  }
  uint64_t mine[kSignatureWords];
  for (int i = 0; i < kSignatureWords; ++i) mine[i] = sig.words[i];
  mine[kSignatureAxisIndex] = static_cast<uint64_t>(static_cast<uint32_t>(*sig.axis_index));
  if (tid < R) {
    uint64_t* slot = SignatureSlot(c.peer_bases[tid], e, me);
    for (int i = 0; i < kSignatureWords; ++i) slot[i] = mine[i];
  }
  __threadfence_system();
  __syncthreads();
  if (tid < R) {
    StoreReleaseSys(BarrierFlags(c.peer_bases[tid]) + me, e);
    WaitAtLeast(c, BarrierFlags(c.local_base) + tid, e, op,
                sent != nullptr ? kWaitCounts : kWaitBarrier, tid);
    CheckPeerSignature(SignatureSlot(c.local_base, e, tid), tid, mine, kSignatureAxisIndex,
                       SignatureSite{c.timeout_record, c.rank, op, kWaitRankOrder,
                                     kWaitSignature, c.timeout_ns, e});
  }
  __syncthreads();
  if (sent != nullptr) {
    const volatile int32_t* counts = CountMatrix(c.local_base, e);
    for (int i = tid; i < R * R; i += blockDim.x) {
      const int s = i / R;
      rank_counts[i] = counts[s * kMaxRanks + (i - s * R)];
    }
  }
}

// ------------------------------------------------------------ copy helpers
// (VecOf, StridedCopy: device_copy.cuh)

// Grid-strided copy of n vectors; src is read-only for the whole kernel.
template <typename V>
__device__ __forceinline__ void GridCopy(const V* __restrict__ src, V* __restrict__ dst, int64_t n,
                                         int64_t gtid, int64_t stride) {
  StridedCopy</*kPeer=*/false, kUnroll>(src, dst, n, n, gtid, stride);
}

// Grid-strided copy of the first n_valid vectors (written by peers: read
// through L2 only) and zero fill up to n_total.
template <typename V>
__device__ __forceinline__ void GridCopyThenZero(const V* __restrict__ src, V* __restrict__ dst,
                                                 int64_t n_valid, int64_t n_total, int64_t gtid,
                                                 int64_t stride) {
  StridedCopy</*kPeer=*/true, kUnroll>(src, dst, n_valid, n_total, gtid, stride);
}

// One warp copies a row of n vectors to every destination in the list: each
// chunk of the source is loaded once and stored n_dest times. Rows for peers
// go into their data areas; my own rows go straight into my output `self_dst`
// (the receive copy skips them), so a rank's tokens for itself move once.
template <typename V>
__device__ __forceinline__ void WarpScatterRow(const V* __restrict__ src, int64_t n,
                                               uint8_t* const* peer_data, const int32_t* dest_rank,
                                               const int64_t* dest_row, int n_dest,
                                               uint64_t area_offset, uint8_t* self_dst, int me,
                                               int64_t row_bytes, int lane) {
  for (int64_t base = 0; base < n; base += 32 * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      v[u] = i < n ? __ldg(src + i) : V{};
    }
    for (int k = 0; k < n_dest; ++k) {
      const int r = dest_rank[k];
      uint8_t* rows = r == me ? self_dst : peer_data[r] + area_offset;
      V* dst = reinterpret_cast<V*>(rows + dest_row[k] * row_bytes);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * 32 + lane;
        if (i < n) dst[i] = v[u];
      }
    }
  }
}

// ------------------------------------------------------------ dispatch

struct PartDesc {
  const uint8_t* src;    // [T, row_bytes]
  uint8_t* dst;          // [capacity, row_bytes]
  int64_t row_bytes;
  uint64_t area_offset;  // of the sub-area inside the data area
  int32_t send_vec;      // 16, 4 or 1: access width of the send (src, area and dst rows)
  int32_t recv_vec;      // 16, 4 or 1: access width of the receive copy (area and dst rows)
};

struct DispatchKernelArgs {
  const int32_t* slot;         // [T, R]
  const int32_t* rank_counts;  // [R, R]
  int64_t num_tokens;
  int64_t capacity;
  int32_t num_parts;
  PartDesc parts[kMaxParts];
};

__device__ __forceinline__ void LoadParts(const DispatchKernelArgs& a, PartDesc* s_parts) {
  CopyTableToShared(a.parts, a.num_parts, s_parts);
}

__global__ void __launch_bounds__(kThreads)
    DispatchSendKernel(IntranodeComm c, DispatchKernelArgs a) {
  __shared__ uint8_t* s_peer_data[kMaxRanks];
  __shared__ int64_t s_first_row[kMaxRanks];  // my first row on rank r
  __shared__ PartDesc s_parts[kMaxParts];
  __shared__ int32_t s_dest_rank[kWarps][kMaxRanks];
  __shared__ int64_t s_dest_row[kWarps][kMaxRanks];

  const int R = c.num_ranks;
  const int me = c.rank;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  for (int r = tid; r < R; r += blockDim.x) {
    s_peer_data[r] = DataArea(c.peer_bases[r]);
    int64_t first = 0;
    for (int s = 0; s < me; ++s) first += max(a.rank_counts[s * R + r], 0);
    s_first_row[r] = first;
  }
  LoadParts(a, s_parts);
  __syncthreads();

  const int64_t T = a.num_tokens;
  const int64_t capacity = a.capacity;
  const int num_parts = a.num_parts;
  const unsigned below = (1u << lane) - 1u;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp; t < T;
       t += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int32_t* slot_row = a.slot + t * R;
    int64_t row_lo = -1, row_hi = -1;
    if (lane < R) {
      const int32_t s = slot_row[lane];
      if (s >= 0 && s_first_row[lane] + s < capacity) row_lo = s_first_row[lane] + s;
    }
    if (lane + 32 < R) {
      const int32_t s = slot_row[lane + 32];
      if (s >= 0 && s_first_row[lane + 32] + s < capacity) row_hi = s_first_row[lane + 32] + s;
    }
    const unsigned lo = __ballot_sync(kFullMask, row_lo >= 0);
    const unsigned hi = __ballot_sync(kFullMask, row_hi >= 0);
    const int n_lo = __popc(lo);
    const int n_dest = n_lo + __popc(hi);
    if (n_dest == 0) continue;
    if (row_lo >= 0) {
      const int k = __popc(lo & below);
      s_dest_rank[warp][k] = lane;
      s_dest_row[warp][k] = row_lo;
    }
    if (row_hi >= 0) {
      const int k = n_lo + __popc(hi & below);
      s_dest_rank[warp][k] = lane + 32;
      s_dest_row[warp][k] = row_hi;
    }
    __syncwarp();
    for (int p = 0; p < num_parts; ++p) {
      const PartDesc& part = s_parts[p];
      const int64_t rb = part.row_bytes;
      const uint8_t* src = part.src + t * rb;
      if (part.send_vec == 16) {
        WarpScatterRow(reinterpret_cast<const uint4*>(src), rb / 16, s_peer_data,
                       s_dest_rank[warp], s_dest_row[warp], n_dest, part.area_offset, part.dst, me, rb,
                       lane);
      } else if (part.send_vec == 4) {
        WarpScatterRow(reinterpret_cast<const unsigned int*>(src), rb / 4, s_peer_data,
                       s_dest_rank[warp], s_dest_row[warp], n_dest, part.area_offset, part.dst, me, rb,
                       lane);
      } else {
        WarpScatterRow(reinterpret_cast<const unsigned char*>(src), rb, s_peer_data,
                       s_dest_rank[warp], s_dest_row[warp], n_dest, part.area_offset, part.dst, me, rb,
                       lane);
      }
    }
    __syncwarp();  // the destination list is rewritten for the next token
  }
  SignalDataWhenGridDone(c);
}

__global__ void __launch_bounds__(kThreads)
    DispatchRecvKernel(IntranodeComm c, DispatchKernelArgs a, int32_t op) {
  __shared__ PartDesc s_parts[kMaxParts];
  __shared__ int64_t s_num_recv, s_self_lo, s_self_hi;
  const int R = c.num_ranks;
  const int me = c.rank;
  if (threadIdx.x == 0) {
    int64_t total = 0, self_lo = 0;
    for (int s = 0; s < R; ++s) {
      if (s == me) self_lo = total;
      total += max(a.rank_counts[s * R + me], 0);
    }
    const int64_t num_recv = min(total, a.capacity);
    s_num_recv = num_recv;
    // My rows for myself: the send kernel wrote them into the outputs already.
    s_self_lo = min(self_lo, num_recv);
    s_self_hi = min(self_lo + max(a.rank_counts[me * R + me], 0), num_recv);
  }
  LoadParts(a, s_parts);
  WaitForAllSenders(c, op);  // ends with __syncthreads

  const uint8_t* data = DataArea(c.local_base);
  const int64_t num_recv = s_num_recv;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int p = 0; p < a.num_parts; ++p) {
    const PartDesc& part = s_parts[p];
    const int64_t rb = part.row_bytes;
    // Rows [0, self_lo) and [self_hi, num_recv) come from the data area, rows
    // [num_recv, capacity) are zeroed.
    const uint8_t* head = data + part.area_offset;
    const int64_t head_bytes = s_self_lo * rb;
    const uint8_t* tail = head + s_self_hi * rb;
    uint8_t* tail_dst = part.dst + s_self_hi * rb;
    const int64_t tail_valid = (num_recv - s_self_hi) * rb;
    const int64_t tail_total = (a.capacity - s_self_hi) * rb;
    if (part.recv_vec == 16) {
      GridCopyThenZero(reinterpret_cast<const uint4*>(head), reinterpret_cast<uint4*>(part.dst),
                       head_bytes / 16, head_bytes / 16, gtid, stride);
      GridCopyThenZero(reinterpret_cast<const uint4*>(tail), reinterpret_cast<uint4*>(tail_dst),
                       tail_valid / 16, tail_total / 16, gtid, stride);
    } else if (part.recv_vec == 4) {
      GridCopyThenZero(reinterpret_cast<const unsigned int*>(head),
                       reinterpret_cast<unsigned int*>(part.dst), head_bytes / 4, head_bytes / 4,
                       gtid, stride);
      GridCopyThenZero(reinterpret_cast<const unsigned int*>(tail),
                       reinterpret_cast<unsigned int*>(tail_dst), tail_valid / 4, tail_total / 4,
                       gtid, stride);
    } else {
      GridCopyThenZero(head, part.dst, head_bytes, head_bytes, gtid, stride);
      GridCopyThenZero(tail, tail_dst, tail_valid, tail_total, gtid, stride);
    }
  }
}

// ------------------------------------------------------------ combine

struct CombineKernelArgs {
  const uint8_t* y;            // [capacity, row_bytes]
  const int32_t* token_slot;   // [T, R]
  const int32_t* rank_counts;  // [R, R]
  uint8_t* out;                // [T, row_bytes]
  int64_t num_tokens;
  int64_t capacity;
  int64_t hidden;
  int64_t row_bytes;
  int32_t send_vec;            // 16, 4 or 1
  int32_t tokens_per_chunk;    // 1 .. kMaxTokensPerChunk
};

// Row i < num_recv of y came from source s with begin[s] <= i < begin[s+1]
// (begin = exclusive prefix of C[:, me]) as s's (i - begin[s])-th token for
// me: the rows for one source are contiguous on both sides, so the send is
// R - 1 flat copies into area[me] of each other source.
__global__ void __launch_bounds__(kThreads) CombineSendKernel(IntranodeComm c, CombineKernelArgs a) {
  __shared__ int64_t s_begin[kMaxRanks + 1];
  __shared__ uint8_t* s_dst[kMaxRanks];
  const int R = c.num_ranks;
  const int me = c.rank;
  const int64_t T = a.num_tokens;
  const int64_t rb = a.row_bytes;
  if (threadIdx.x == 0) {
    int64_t acc = 0;
    for (int s = 0; s < R; ++s) {
      s_begin[s] = acc;
      // A source sends each token at most once: clamp so that bad counts
      // cannot make us write past its [me] slice.
      acc += min(static_cast<int64_t>(max(a.rank_counts[s * R + me], 0)), T);
    }
    s_begin[R] = acc;
  }
  for (int s = threadIdx.x; s < R; s += blockDim.x) {
    s_dst[s] = DataArea(c.peer_bases[s]) + static_cast<uint64_t>(me) * T * rb;
  }
  __syncthreads();

  const int64_t num_recv = min(s_begin[R], a.capacity);
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int s = 0; s < R; ++s) {
    const int64_t begin = s_begin[s];
    const int64_t end = min(s_begin[s + 1], num_recv);
    // My own rows stay in y: the receive kernel reads them there.
    if (end <= begin || s == me) continue;
    const uint8_t* src = a.y + begin * rb;
    const int64_t bytes = (end - begin) * rb;
    if (a.send_vec == 16) {
      GridCopy(reinterpret_cast<const uint4*>(src), reinterpret_cast<uint4*>(s_dst[s]), bytes / 16,
               gtid, stride);
    } else if (a.send_vec == 4) {
      GridCopy(reinterpret_cast<const unsigned int*>(src),
               reinterpret_cast<unsigned int*>(s_dst[s]), bytes / 4, gtid, stride);
    } else {
      GridCopy(src, s_dst[s], bytes, gtid, stride);
    }
  }
  SignalDataWhenGridDone(c);
}

// Element types (Bf16Elem, F16Elem, F32Elem, F8E4M3Elem): elem_types.cuh.

// The routes of a combine-receive chunk's tokens t0 .. t0 + n_tok - 1 (one
// warp per token): s_rank[g][*] the ranks holding a row of token t0 + g, in
// order, s_slot[g][*] its slot there, s_count[g] how many.
__device__ __forceinline__ void LoadChunkRoutes(const CombineKernelArgs& a, int64_t t0, int n_tok,
                                                int R, int me, int64_t T, int64_t self_begin,
                                                int64_t self_end, int lane, int warp,
                                                unsigned below, int32_t* s_count,
                                                int32_t (*s_rank)[kMaxRanks],
                                                int32_t (*s_slot)[kMaxRanks]) {
  for (int g = warp; g < n_tok; g += kWarps) {
    const int32_t* slot_row = a.token_slot + (t0 + g) * R;
    const int32_t s_lo = lane < R ? slot_row[lane] : -1;
    const int32_t s_hi = lane + 32 < R ? slot_row[lane + 32] : -1;
    // A slot on myself must also name a row of y (bounds, not semantics).
    const bool v_lo = s_lo >= 0 && s_lo < T && (lane != me || self_begin + s_lo < self_end);
    const bool v_hi =
        s_hi >= 0 && s_hi < T && (lane + 32 != me || self_begin + s_hi < self_end);
    const unsigned lo = __ballot_sync(kFullMask, v_lo);
    const unsigned hi = __ballot_sync(kFullMask, v_hi);
    const int n_lo = __popc(lo);
    if (v_lo) {
      const int k = __popc(lo & below);
      s_rank[g][k] = lane;
      s_slot[g][k] = s_lo;
    }
    if (v_hi) {
      const int k = n_lo + __popc(hi & below);
      s_rank[g][k] = lane + 32;
      s_slot[g][k] = s_hi;
    }
    if (lane == 0) s_count[g] = n_lo + __popc(hi);
  }
}

// Each thread reduces kItems vectors at once, up to kRankUnroll ranks each,
// so that up to kItems * kRankUnroll loads are in flight (memory-level
// parallelism even when tokens have a single route, e.g. R = 1).
template <typename Elem, int kVec>
__device__ __forceinline__ void ReduceChunkItems(const CombineKernelArgs& a, const uint8_t* area,
                                                 int64_t t0, int n_tok, int vecs_per_token, int R,
                                                 int me, int64_t T, int64_t rb,
                                                 int64_t self_begin, int tid,
                                                 const int32_t* s_count,
                                                 const int32_t (*s_rank)[kMaxRanks],
                                                 const int32_t (*s_slot)[kMaxRanks]) {
  using Raw = typename Elem::Raw;
  using V = typename VecOf<kVec * sizeof(Raw)>::Type;
  const int items = n_tok * vecs_per_token;
  for (int base = tid; base < items; base += blockDim.x * kItems) {
    int g[kItems], n[kItems], prev[kItems];
    int64_t byte_in_row[kItems];
    float acc[kItems][kVec];
    int n_max = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int item = base + i * static_cast<int>(blockDim.x);
      g[i] = 0;
      n[i] = -1;  // no item
      byte_in_row[i] = 0;
      if (item < items) {
        g[i] = item / vecs_per_token;
        byte_in_row[i] =
            static_cast<int64_t>(item - g[i] * vecs_per_token) * static_cast<int64_t>(sizeof(V));
        n[i] = s_count[g[i]];
        n_max = max(n_max, n[i]);
      }
      prev[i] = -1;
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[i][e] = -0.0f;
    }
    for (int k0 = 0; k0 < n_max; k0 += kRankUnroll) {
      V v[kItems][kRankUnroll];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
#pragma unroll
        for (int u = 0; u < kRankUnroll; ++u) {
          const int k = k0 + u;
          if (k < n[i]) {
            const int r = s_rank[g[i]][k];
            const int64_t j = s_slot[g[i]][k];
            const uint8_t* row = r == me ? a.y + (self_begin + j) * rb : area + (r * T + j) * rb;
            v[i][u] = __ldcg(reinterpret_cast<const V*>(row + byte_in_row[i]));
          } else {
            v[i][u] = V{};
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
#pragma unroll
        for (int u = 0; u < kRankUnroll; ++u) {
          const int k = k0 + u;
          if (k < n[i]) {
            const int r = s_rank[g[i]][k];
            if (r != prev[i] + 1) {
#pragma unroll
              for (int e = 0; e < kVec; ++e) acc[i][e] += 0.0f;
            }
            prev[i] = r;
            Raw raw[kVec];
            memcpy(raw, &v[i][u], sizeof(V));
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[i][e] += Elem::ToFloat(raw[e]);
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (n[i] < 0) continue;
      if (prev[i] != R - 1) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[i][e] += 0.0f;
      }
      Raw res[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) res[e] = Elem::FromFloat(acc[i][e]);
      V packed;
      memcpy(&packed, res, sizeof(V));
      *reinterpret_cast<V*>(a.out + (t0 + g[i]) * rb + byte_in_row[i]) = packed;
    }
  }
}

// out[t] = sum over r in 0..R-1 of (slot[t, r] >= 0 ? row(r, slot) : 0) in
// fp32, row(r, j) = area[r][j] for peers and y[begin[me] + j] for myself,
// one chunk of tokens at a time (LoadChunkRoutes, then ReduceChunkItems). The
// accumulator starts at -0.0f and every absent rank adds +0.0f, so the result
// is bitwise the reference's acc = term(0); acc += term(r): adding +0.0f only
// matters for a -0.0f sum, so one add per gap is enough.
template <typename Elem, int kVec>
__global__ void __launch_bounds__(kThreads, 2)  // two blocks per SM: <= 128 registers
    CombineRecvKernel(IntranodeComm c, CombineKernelArgs a) {
  using Raw = typename Elem::Raw;
  using V = typename VecOf<kVec * sizeof(Raw)>::Type;
  static_assert(sizeof(V) == kVec * sizeof(Raw), "vector width");

  __shared__ int32_t s_count[kMaxTokensPerChunk];
  __shared__ int32_t s_rank[kMaxTokensPerChunk][kMaxRanks];
  __shared__ int32_t s_slot[kMaxTokensPerChunk][kMaxRanks];
  __shared__ int64_t s_self_begin, s_self_end;  // my rows for myself in y

  if (threadIdx.x == 0) {
    // The same clamped prefix as CombineSendKernel's begin[].
    int64_t begin = 0;
    for (int s = 0; s < c.rank; ++s) {
      begin += min(static_cast<int64_t>(max(a.rank_counts[s * c.num_ranks + c.rank], 0)),
                   a.num_tokens);
    }
    const int64_t mine = min(
        static_cast<int64_t>(max(a.rank_counts[c.rank * c.num_ranks + c.rank], 0)), a.num_tokens);
    s_self_begin = begin;
    s_self_end = min(begin + mine, a.capacity);
  }
  WaitForAllSenders(c, kOpCombine);

  const int R = c.num_ranks;
  const int me = c.rank;
  const int64_t self_begin = s_self_begin;
  const int64_t self_end = s_self_end;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const unsigned below = (1u << lane) - 1u;
  const int64_t T = a.num_tokens;
  const int64_t rb = a.row_bytes;
  // The launcher keeps hidden <= kMaxHidden, so a chunk's items fit in int.
  const int vecs_per_token = static_cast<int>(a.hidden / kVec);
  const int G = a.tokens_per_chunk;
  const int64_t num_chunks = (T + G - 1) / G;
  const uint8_t* area = DataArea(c.local_base);

  for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    const int64_t t0 = chunk * G;
    const int n_tok = static_cast<int>(min(static_cast<int64_t>(G), T - t0));
    LoadChunkRoutes(a, t0, n_tok, R, me, T, self_begin, self_end, lane, warp, below, s_count,
                    s_rank, s_slot);
    __syncthreads();

    ReduceChunkItems<Elem, kVec>(a, area, t0, n_tok, vecs_per_token, R, me, T, rb, self_begin,
                                 tid, s_count, s_rank, s_slot);
    __syncthreads();  // the next chunk rewrites the routes
  }
}

// ------------------------------------------------------------ host helpers

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Widest access (16, 4 or 1 bytes) that rows of row_bytes starting at the
// addresses ptr and (data area, 64 KiB aligned) + area_offset allow.
int32_t AccessWidth(int64_t row_bytes, const void* ptr, uint64_t area_offset = 0) {
  const uint64_t bits = static_cast<uint64_t>(row_bytes) |
                        static_cast<uint64_t>(reinterpret_cast<uintptr_t>(ptr)) | area_offset;
  if (bits % 16 == 0) return 16;
  if (bits % 4 == 0) return 4;
  return 1;
}

int GridSize(const IntranodeComm& comm, int64_t work_items, int64_t items_per_block) {
  const int64_t want = (work_items + items_per_block - 1) / items_per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, comm.num_blocks)));
}

bool ValidComm(const IntranodeComm& comm) {
  return comm.peer_bases != nullptr && comm.local_base != nullptr && comm.num_ranks >= 1 &&
         comm.num_ranks <= kMaxRanks && comm.rank >= 0 && comm.rank < comm.num_ranks &&
         comm.num_blocks >= 1;
}

// Tokens per combine-receive chunk: at least ~kItems vectors per thread, and
// the count that wastes the fewest thread slots in the chunk's last round.
int TokensPerChunk(int64_t vecs_per_token) {
  if (vecs_per_token <= 0) return kMaxTokensPerChunk;
  const int64_t g_min = std::min<int64_t>(
      kMaxTokensPerChunk,
      std::max<int64_t>(1, (kItems * kThreads + vecs_per_token - 1) / vecs_per_token));
  int best = static_cast<int>(g_min);
  double best_waste = 2.0;
  for (int64_t g = g_min; g <= std::min<int64_t>(kMaxTokensPerChunk, 4 * g_min); ++g) {
    const int64_t items = g * vecs_per_token;
    const int64_t slots = RoundUp(items, kItems * kThreads);
    const double waste = static_cast<double>(slots - items) / static_cast<double>(slots);
    if (waste < best_waste - 1e-9) {
      best_waste = waste;
      best = static_cast<int>(g);
    }
  }
  return best;
}

template <typename Elem>
void LaunchCombineRecv(const IntranodeComm& comm, const CombineKernelArgs& k, bool vectorized,
                       int blocks, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(typename Elem::Raw);
  if (vectorized) {
    CombineRecvKernel<Elem, kVec><<<blocks, kThreads, 0, stream>>>(comm, k);
  } else {
    CombineRecvKernel<Elem, 1><<<blocks, kThreads, 0, stream>>>(comm, k);
  }
}

}  // namespace

int IntranodeRecvBlocksPerSm() {
  int least = 1 << 30;
  auto take = [&](const void* kernel) {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0) != cudaSuccess) {
      n = 0;
    }
    least = std::min(least, n);
  };
  take(reinterpret_cast<const void*>(DispatchRecvKernel));
  take(reinterpret_cast<const void*>(CombineRecvKernel<Bf16Elem, 8>));
  take(reinterpret_cast<const void*>(CombineRecvKernel<Bf16Elem, 1>));
  take(reinterpret_cast<const void*>(CombineRecvKernel<F32Elem, 4>));
  take(reinterpret_cast<const void*>(CombineRecvKernel<F32Elem, 1>));
  take(reinterpret_cast<const void*>(CombineRecvKernel<F8E4M3Elem, 16>));
  cudaGetLastError();
  return least;
}

size_t IntranodeDispatchDataBytes(int64_t capacity, const int64_t* row_bytes, int num_parts) {
  size_t total = 0;
  for (int p = 0; p < num_parts; ++p) {
    total += static_cast<size_t>(capacity) * static_cast<size_t>(row_bytes[p]);
  }
  return total;
}

size_t IntranodeCombineDataBytes(int64_t num_ranks, int64_t num_tokens, int64_t row_bytes) {
  return static_cast<size_t>(num_ranks) * static_cast<size_t>(num_tokens) *
         static_cast<size_t>(row_bytes);
}

namespace {

// Validated kernel arguments of a dispatch; false for parameters outside the
// limits in intranode.h.
OpSignature DispatchSignature(const IntranodeDispatchArgs& args, int32_t op) {
  OpSignature sig{};
  uint64_t row_bytes = 0;
  for (int p = 0; p < args.num_parts; ++p) {
    row_bytes += static_cast<uint64_t>(args.parts[p].row_bytes);
  }
  sig.words[0] = static_cast<uint64_t>(op) | static_cast<uint64_t>(args.num_parts) << 8 |
                 uint64_t{0xff} << 16;
  sig.words[1] = static_cast<uint64_t>(args.capacity);
  sig.words[2] = static_cast<uint64_t>(args.num_tokens);
  sig.words[3] = row_bytes;
  sig.axis_index = args.axis_index;
  return sig;
}

OpSignature CombineSignature(const IntranodeCombineArgs& args) {
  OpSignature sig{};
  sig.words[0] = static_cast<uint64_t>(kOpCombine) | uint64_t{1} << 8 |
                 static_cast<uint64_t>(args.dtype) << 16;
  sig.words[1] = static_cast<uint64_t>(args.capacity);
  sig.words[2] = static_cast<uint64_t>(args.num_tokens);
  sig.words[3] = static_cast<uint64_t>(args.hidden) * ElemTypeBytes(args.dtype);
  sig.axis_index = args.axis_index;
  return sig;
}

bool PrepareDispatch(const IntranodeComm& comm, const IntranodeDispatchArgs& args,
                     DispatchKernelArgs* k, int64_t* recv_bytes) {
  if (!ValidComm(comm) || args.num_parts < 0 || args.num_parts > kMaxParts ||
      args.num_tokens < 0 || args.capacity < 0 || args.rank_counts == nullptr ||
      args.axis_index == nullptr || (args.num_tokens > 0 && args.slot == nullptr)) {
    return false;
  }
  *k = DispatchKernelArgs{};
  k->slot = args.slot;
  k->rank_counts = args.rank_counts;
  k->num_tokens = args.num_tokens;
  k->capacity = args.capacity;
  uint64_t offset = 0;
  *recv_bytes = 0;
  for (int p = 0; p < args.num_parts; ++p) {
    const IntranodePart& in = args.parts[p];
    if (in.row_bytes < 0) return false;
    if (in.row_bytes == 0) continue;  // nothing to move (pointers may be null)
    if ((args.num_tokens > 0 && in.src == nullptr) || (args.capacity > 0 && in.dst == nullptr)) {
      return false;
    }
    PartDesc& d = k->parts[k->num_parts++];
    d.src = static_cast<const uint8_t*>(in.src);
    d.dst = static_cast<uint8_t*>(in.dst);
    d.row_bytes = in.row_bytes;
    d.area_offset = offset;
    d.send_vec = std::min(AccessWidth(in.row_bytes, in.src, offset),
                          AccessWidth(in.row_bytes, in.dst));
    d.recv_vec = AccessWidth(in.row_bytes, in.dst, offset);
    offset += static_cast<uint64_t>(args.capacity) * static_cast<uint64_t>(in.row_bytes);
    *recv_bytes += args.capacity * in.row_bytes;
  }
  return offset <= comm.data_bytes;
}

bool PrepareCombine(const IntranodeComm& comm, const IntranodeCombineArgs& args,
                    CombineKernelArgs* k, bool* vectorized) {
  const int elem_bytes = ElemTypeBytes(args.dtype);
  if (!ValidComm(comm) || elem_bytes == 0 || args.num_tokens < 0 || args.capacity < 0 ||
      args.hidden < 0 || args.hidden > kMaxHidden || args.rank_counts == nullptr ||
      args.axis_index == nullptr || (args.num_tokens > 0 && args.token_slot == nullptr)) {
    return false;
  }
  const int64_t rb = args.hidden * elem_bytes;
  if (IntranodeCombineDataBytes(comm.num_ranks, args.num_tokens, rb) > comm.data_bytes) {
    return false;
  }
  if (rb > 0 && ((args.capacity > 0 && args.y == nullptr) ||
                 (args.num_tokens > 0 && args.out == nullptr))) {
    return false;
  }
  *k = CombineKernelArgs{};
  k->y = static_cast<const uint8_t*>(args.y);
  k->token_slot = args.token_slot;
  k->rank_counts = args.rank_counts;
  k->out = static_cast<uint8_t*>(args.out);
  k->num_tokens = args.num_tokens;
  k->capacity = args.capacity;
  k->hidden = args.hidden;
  k->row_bytes = rb;
  k->send_vec = AccessWidth(rb, args.y);
  // The receive reads my own rows from y and writes out: both must allow 16 B.
  *vectorized = AccessWidth(rb, args.out) == 16 && AccessWidth(rb, args.y) == 16;
  k->tokens_per_chunk = TokensPerChunk(args.hidden / (*vectorized ? 16 / elem_bytes : 1));
  return true;
}

}  // namespace

cudaError_t LaunchIntranodeDispatchPhase(const IntranodeComm& comm,
                                         const IntranodeDispatchArgs& args, IntranodePhase phase,
                                         cudaStream_t stream) {
  DispatchKernelArgs k;
  int64_t recv_bytes = 0;
  if (!PrepareDispatch(comm, args, &k, &recv_bytes)) return cudaErrorInvalidValue;
  const int32_t op = args.sent != nullptr ? kOpDispatch : kOpCachedDispatch;
  switch (phase) {
    case kPhaseNotify:
      NotifyKernel<<<1, kThreads, 0, stream>>>(comm, args.sent, args.rank_counts, op,
                                               DispatchSignature(args, op));
      break;
    case kPhaseSend:
      DispatchSendKernel<<<GridSize(comm, args.num_tokens, kWarps), kThreads, 0, stream>>>(comm,
                                                                                          k);
      break;
    case kPhaseRecv:
      DispatchRecvKernel<<<GridSize(comm, recv_bytes / 16, static_cast<int64_t>(kThreads) * kUnroll),
                           kThreads, 0, stream>>>(comm, k, op);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t LaunchIntranodeCombinePhase(const IntranodeComm& comm, const IntranodeCombineArgs& args,
                                        IntranodePhase phase, cudaStream_t stream) {
  CombineKernelArgs k;
  bool vectorized = false;
  if (!PrepareCombine(comm, args, &k, &vectorized)) return cudaErrorInvalidValue;
  const bool has_rows = k.row_bytes > 0;
  switch (phase) {
    case kPhaseNotify:
      NotifyKernel<<<1, kThreads, 0, stream>>>(comm, nullptr, nullptr, kOpCombine,
                                               CombineSignature(args));
      break;
    case kPhaseSend:
      // With no rows the send still runs: it publishes the data flags.
      CombineSendKernel<<<GridSize(comm, has_rows ? args.capacity * k.row_bytes / 16 : 0,
                                   static_cast<int64_t>(kThreads) * kUnroll),
                          kThreads, 0, stream>>>(comm, k);
      break;
    case kPhaseRecv: {
      const int blocks = has_rows ? GridSize(comm, args.num_tokens, k.tokens_per_chunk) : 1;
      if (!has_rows) k.num_tokens = 0;  // wait for the peers, touch nothing
      switch (args.dtype) {
        case ElemType::kBF16:
          LaunchCombineRecv<Bf16Elem>(comm, k, vectorized, blocks, stream);
          break;
        case ElemType::kF16:
          LaunchCombineRecv<F16Elem>(comm, k, vectorized, blocks, stream);
          break;
        case ElemType::kF32:
          LaunchCombineRecv<F32Elem>(comm, k, vectorized, blocks, stream);
          break;
        case ElemType::kF8E4M3FN:
          LaunchCombineRecv<F8E4M3Elem>(comm, k, vectorized, blocks, stream);
          break;
      }
      break;
    }
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

namespace {

// Notify, send and receive of one op, in order; stops at the first error.
template <typename Args>
cudaError_t LaunchAllPhases(cudaError_t (*launch_phase)(const IntranodeComm&, const Args&,
                                                        IntranodePhase, cudaStream_t),
                            const IntranodeComm& comm, const Args& args, cudaStream_t stream) {
  for (IntranodePhase phase : {kPhaseNotify, kPhaseSend, kPhaseRecv}) {
    const cudaError_t err = launch_phase(comm, args, phase, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t LaunchIntranodeDispatch(const IntranodeComm& comm, const IntranodeDispatchArgs& args,
                                    cudaStream_t stream) {
  return LaunchAllPhases(LaunchIntranodeDispatchPhase, comm, args, stream);
}

cudaError_t LaunchIntranodeCombine(const IntranodeComm& comm, const IntranodeCombineArgs& args,
                                   cudaStream_t stream) {
  return LaunchAllPhases(LaunchIntranodeCombinePhase, comm, args, stream);
}

}  // namespace jax_ep
