// Internode dispatch / combine: a token crosses to each destination node once
// (NVSHMEM put-with-signal to the rank with my local index there, its
// relay), the relay forwards it over NVLink to every rank of its node that
// holds one of the token's experts; combine reduces inside the node at the
// relay, sends one partial sum per (token, node) back, and the source sums
// the partials in node order. Only NVSHMEM's generic device API crosses
// nodes (put-with-signal, signal, quiet), so any NVSHMEM transport should work;
// inside a node the kernels store through nvshmem_ptr mappings. Still
// unverified on a real NIC (IBGDA, IBRC, UCX, libfabric).
//
// REGION (internode.h, InternodeLayout; zeroed once at initialize):
//   epoch, last-block counters, the outbox (my notify record), barrier[R],
//   records[2][R] (rank s's sent[R] ++ node_sent[N] and op signature of op
//   e, at [e & 1][s]), relay flags [N][B], forward flags [R][B], combine
//   flags [G], partial flags [N][B], then areas a, b, c (rows of the call's
//   stride: the dispatch message, or the combine row rounded to 16 bytes).
//   A message is int32 pos[G] (padded to 16 bytes: the token's slot on each
//   rank of the destination node, -1 where it has no expert) followed by the
//   payload rows, each padded to 16 bytes.
//
// DISPATCH of op e (B = num_blocks blocks in every data kernel, the same on
// every rank: it is in the op signature):
//  1. notify (1 block): e = ++epoch; my record goes to every rank with
//     put-with-signal (barrier[me] = e); wait for every rank's signal; compare
//     signatures; copy the count matrix out. Every rank finished op e - 1
//     (stream order, puts quieted) before it announced e, so after this
//     barrier nobody reads or writes an area of op e - 1: one set of areas
//     serves every op.
//  2. send: block b takes tokens [b TB, (b + 1) TB); each token's message
//     is staged once per destination node n' at area_a[n'][node_slot[t, n']]
//     (its rows for n' are contiguous: node_slot grows with t), then one
//     put-with-signal per node moves the block's rows to area_b[n_me][...]
//     of the relay (n', g_me) and sets its relay flag [n_me][b] = e.
//  3. forward (relay): for each source node n, wait for the relay flags
//     [n][*] of source s = (n, g_me), then copy each of its rows (area_b[n][j])
//     to area_c[s][pos[g']] of every rank (n_me, g') with pos[g'] >= 0, and
//     record pos in relay_pos[n][j] (the handle: combine needs it); then set
//     forward flag [s][b] = e in each rank of my node.
//  4. receive: wait for every forward flag, then copy the rows into the XLA
//     outputs in (source rank, slot) order (row = offset(s) + slot, offset =
//     exclusive prefix of the count matrix's column), zeroing the rest.
// COMBINE of op e:
//  1. notify without counts (barrier + signatures).
//  2. send: each received row (s, slot) goes back over NVLink to the relay
//     of s on my node, (n_me, g_s), at area_c[g_me][n_s][slot]; the last
//     block sets combine flag [g_me] = e in every rank of my node.
//  3. reduce (relay): wait for the combine flags of my node; per source node
//     n and row j < relay_rows[n]: sum over g' in order the rows
//     area_c[g'][n][relay_pos[n][j][g']] that were kept (offset + slot <
//     capacity), in fp32, cast to y's dtype into area_a[n][j]; one
//     put-with-signal per (block, n) moves them to area_b[n_me][...] of the
//     source (n, g_me), partial flag [n_me][b] = e.
//  4. receive (source): wait for every partial flag; out[t] = sum over nodes
//     n' in order of area_b[n'][node_slot[t, n']] in fp32, cast.
// Sums start at -0.0f and add +0.0f for an absent term, which is bitwise the
// reference's acc = term(0); acc += term(i) over every term.
//
// Every spin-wait reads %globaltimer; past the timeout it fills the
// host-mapped TimeoutRecord and traps (device_sync.cuh); the runtime's
// watchdog (internode_runtime.cc) names the rank, node and what it waited for.
// A put's source (the staging area, the outbox) is rewritten only by the next
// op, after its notify barrier: every rank announces op e + 1 only after its
// op-e kernels waited for the signal of every put aimed at it, and a signal
// arrives after its data, so no put of op e is still reading its source.
// (The quiet by the last block of a putting kernel is not what makes it safe.)
// After a wait on a flag that a put sets, PutDataVisible runs NVSHMEM's
// consistency step, which proxy transports need before the data is read.
#include "ffi/kernels/internode/internode.h"

#include <algorithm>
#include <cstring>

#include <nvshmem.h>
#include <nvshmemx.h>

#include "ffi/kernels/common/device_copy.cuh"
#include "ffi/kernels/common/device_sync.cuh"
#include "ffi/kernels/common/elem_types.cuh"
#include "ffi/kernels/common/signature.cuh"

namespace jax_ep {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRanks = kInternodeMaxRanks;
constexpr int kMaxParts = kInternodeMaxParts;
constexpr int kMaxBlocks = kInternodeMaxBlocks;

// Last-block counters (arrive_offset + 4 i): one per kernel that elects one.
enum Counter : int { kSendCounter = 0, kCombineSendCounter = 1, kReduceCounter = 2 };

// ------------------------------------------------------------ region accessors

struct Geometry {
  int R, G, N, me, n_me, g_me;
};

__device__ __forceinline__ Geometry GeometryOf(const InternodeComm& c) {
  const int G = c.layout.ranks_per_node;
  return Geometry{c.layout.num_ranks, G, c.layout.num_nodes, c.rank, c.rank / G, c.rank % G};
}

__device__ __forceinline__ uint64_t* EpochPtr(uint8_t* base, const InternodeLayout& l) {
  return reinterpret_cast<uint64_t*>(base + l.epoch_offset);
}
__device__ __forceinline__ unsigned int* CounterPtr(uint8_t* base, const InternodeLayout& l,
                                                    Counter which) {
  return reinterpret_cast<unsigned int*>(base + l.arrive_offset) + which;
}
__device__ __forceinline__ uint64_t* BarrierFlag(uint8_t* base, const InternodeLayout& l, int s) {
  return reinterpret_cast<uint64_t*>(base + l.barrier_offset) + s;
}
__device__ __forceinline__ uint8_t* Record(uint8_t* base, const InternodeLayout& l, uint64_t e,
                                           int s) {
  return base + l.records_offset + ((e & 1) * l.num_ranks + s) * l.record_bytes;
}
// The signature words of a record (after the R + N counts, padded to 8 bytes).
__device__ __forceinline__ uint64_t* RecordSignature(uint8_t* record, const InternodeLayout& l) {
  const size_t counts = (4 * static_cast<size_t>(l.num_ranks + l.num_nodes) + 7) / 8 * 8;
  return reinterpret_cast<uint64_t*>(record + counts);
}
__device__ __forceinline__ uint64_t* RelayFlag(uint8_t* base, const InternodeLayout& l, int n,
                                               int b) {
  return reinterpret_cast<uint64_t*>(base + l.relay_flag_offset) + n * kMaxBlocks + b;
}
__device__ __forceinline__ uint64_t* ForwardFlag(uint8_t* base, const InternodeLayout& l, int s,
                                                 int b) {
  return reinterpret_cast<uint64_t*>(base + l.forward_flag_offset) + s * kMaxBlocks + b;
}
__device__ __forceinline__ uint64_t* CombineFlag(uint8_t* base, const InternodeLayout& l, int g) {
  return reinterpret_cast<uint64_t*>(base + l.combine_flag_offset) + g;
}
__device__ __forceinline__ uint64_t* PartialFlag(uint8_t* base, const InternodeLayout& l, int n,
                                                 int b) {
  return reinterpret_cast<uint64_t*>(base + l.partial_flag_offset) + n * kMaxBlocks + b;
}
// Row j of block `blk` (a node or a rank) of an area, rows of `stride` bytes.
__device__ __forceinline__ uint8_t* AreaRow(uint8_t* base, size_t area_offset,
                                            const InternodeLayout& l, int64_t blk, int64_t j,
                                            int64_t stride) {
  return base + area_offset + (blk * l.max_tokens + j) * stride;
}

__device__ __forceinline__ uint64_t CurrentEpoch(const InternodeComm& c) {
  return *reinterpret_cast<volatile uint64_t*>(EpochPtr(c.base, c.layout));
}

// After WaitFlag on a flag that an NVSHMEM put-with-signal sets: NVSHMEM's own
// wait, already satisfied, runs the consistency step proxy transports (IBRC,
// some UCX) need before this thread's loads see the data the put delivered;
// the spin in WaitFlag skips it. Then a __syncthreads publishes it to the block.
__device__ __forceinline__ void PutDataVisible(uint64_t* flag, uint64_t e) {
  nvshmem_signal_wait_until(flag, NVSHMEM_CMP_GE, e);
}

__device__ __forceinline__ void WaitFlag(const InternodeComm& c, const uint64_t* flag,
                                         uint64_t target, int32_t op, int32_t what, int32_t peer) {
  SpinWaitAtLeast(flag, target, /*shift=*/0, /*sleep_ns=*/128,
                  TimeoutSite{c.timeout_record, c.rank, op, what, peer, c.timeout_ns, target});
}

// ------------------------------------------------------------ copies

// A warp copies `bytes` from src to dst[d] + offset for each of the n_dst
// destinations (a list in shared memory), with the widest access the
// addresses and size allow; src is read once.
template <typename V>
__device__ __forceinline__ void WarpCopyTo(const uint8_t* src, uint8_t* const* dst, int n_dst,
                                           int64_t offset, int64_t bytes, int lane) {
  const int64_t n = bytes / static_cast<int64_t>(sizeof(V));
  const V* s = reinterpret_cast<const V*>(src);
  for (int64_t i = lane; i < n; i += 32) {
    const V v = __ldcg(s + i);
    for (int d = 0; d < n_dst; ++d) reinterpret_cast<V*>(dst[d] + offset)[i] = v;
  }
}

__device__ __forceinline__ void WarpCopyRow(const uint8_t* src, uint8_t* const* dst, int n_dst,
                                            int64_t offset, int64_t bytes, int lane) {
  uint64_t bits = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(src)) |
                  static_cast<uint64_t>(bytes) | static_cast<uint64_t>(offset);
  for (int d = 0; d < n_dst; ++d) bits |= static_cast<uint64_t>(reinterpret_cast<uintptr_t>(dst[d]));
  if (bits % 16 == 0) {
    WarpCopyTo<uint4>(src, dst, n_dst, offset, bytes, lane);
  } else if (bits % 4 == 0) {
    WarpCopyTo<unsigned int>(src, dst, n_dst, offset, bytes, lane);
  } else {
    WarpCopyTo<unsigned char>(src, dst, n_dst, offset, bytes, lane);
  }
}

__device__ __forceinline__ void WarpZeroRow(uint8_t* dst, int64_t bytes, int lane) {
  const uint64_t bits = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(dst)) |
                        static_cast<uint64_t>(bytes);
  if (bits % 16 == 0) {
    for (int64_t i = lane; i < bytes / 16; i += 32) reinterpret_cast<uint4*>(dst)[i] = uint4{};
  } else {
    for (int64_t i = lane; i < bytes; i += 32) dst[i] = 0;
  }
}

// out = sum over i < n of (rows[i] ? rows[i] : +0) in fp32 from -0.0f, cast
// to Elem (rows of `elems` elements; nullptr = an absent term). One warp.
template <typename Elem>
__device__ __forceinline__ void WarpSumRows(const uint8_t* const* rows, int n, int64_t elems,
                                            uint8_t* out, int lane) {
  using Raw = typename Elem::Raw;
  constexpr int kVec = 16 / sizeof(Raw);
  bool vec_ok = elems % kVec == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  for (int i = 0; i < n; ++i) {
    if (rows[i] != nullptr && reinterpret_cast<uintptr_t>(rows[i]) % 16 != 0) vec_ok = false;
  }
  if (vec_ok) {
    for (int64_t v = lane; v < elems / kVec; v += 32) {
      float acc[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] = -0.0f;
      for (int i = 0; i < n; ++i) {
        if (rows[i] == nullptr) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[e] += 0.0f;
          continue;
        }
        const uint4 raw4 = __ldcg(reinterpret_cast<const uint4*>(rows[i]) + v);
        Raw raw[kVec];
        memcpy(raw, &raw4, sizeof(raw4));
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] += Elem::ToFloat(raw[e]);
      }
      Raw res[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) res[e] = Elem::FromFloat(acc[e]);
      uint4 packed;
      memcpy(&packed, res, sizeof(packed));
      reinterpret_cast<uint4*>(out)[v] = packed;
    }
    return;
  }
  for (int64_t k = lane; k < elems; k += 32) {
    float acc = -0.0f;
    for (int i = 0; i < n; ++i) {
      acc += rows[i] == nullptr
                 ? 0.0f
                 : Elem::ToFloat(*reinterpret_cast<const volatile Raw*>(
                       reinterpret_cast<const Raw*>(rows[i]) + k));
    }
    reinterpret_cast<Raw*>(out)[k] = Elem::FromFloat(acc);
  }
}

template <typename Fn>
__device__ __forceinline__ void ForElem(ElemType t, Fn&& fn) {
  switch (t) {
    case ElemType::kBF16:
      fn(Bf16Elem{});
      break;
    case ElemType::kF16:
      fn(F16Elem{});
      break;
    default:
      fn(F32Elem{});
      break;
  }
}

// begin[s] = the first row of source s in my receive order (exclusive prefix
// of the count matrix's column, each count clamped to [0, T]); begin[R] = all.
__device__ __forceinline__ void SourceBegins(const int32_t* rank_counts, const Geometry& geo,
                                             int64_t T, int64_t* begin) {
  int64_t acc = 0;
  for (int s = 0; s < geo.R; ++s) {
    begin[s] = acc;
    acc += min(static_cast<int64_t>(max(rank_counts[s * geo.R + geo.me], 0)), T);
  }
  begin[geo.R] = acc;
}

// The source of receive row i < begin[R]: the last s with begin[s] <= i.
__device__ __forceinline__ int SourceOfRow(const int64_t* begin, int R, int64_t i) {
  int s = 0;
  while (s + 1 < R && begin[s + 1] <= i) ++s;
  return s;
}

// ------------------------------------------------------------ notify

struct Signature {
  uint64_t words[kSignatureWords];
  const int32_t* axis_index;
};

// e = ++epoch; my record (counts when `sent`, and the signature) to every
// rank with put-with-signal; wait for theirs; the count matrix and each
// source's node counts out of the records.
__global__ void __launch_bounds__(kThreads)
    NotifyKernel(InternodeComm c, const int32_t* sent, const int32_t* node_sent,
                 int32_t* rank_counts, int32_t op, Signature sig) {
  CheckLive(c.live);  // first of every op: a CUDA graph recorded before shutdown stops here
  const Geometry geo = GeometryOf(c);
  const InternodeLayout& l = c.layout;
  const int tid = threadIdx.x;
  const uint64_t e = CurrentEpoch(c) + 1;
  __syncthreads();
  if (tid == 0) *reinterpret_cast<volatile uint64_t*>(EpochPtr(c.base, l)) = e;

  uint8_t* outbox = c.base + l.outbox_offset;
  int32_t* counts = reinterpret_cast<int32_t*>(outbox);
  if (sent != nullptr) {
    for (int i = tid; i < geo.R; i += blockDim.x) counts[i] = sent[i];
    for (int i = tid; i < geo.N; i += blockDim.x) counts[geo.R + i] = node_sent[i];
  }
  uint64_t mine[kSignatureWords];
  for (int i = 0; i < kSignatureWords; ++i) mine[i] = sig.words[i];
  mine[kInternodeSignatureAxisIndex] = static_cast<uint64_t>(static_cast<uint32_t>(*sig.axis_index));
  // Word 5's high half: the op's number on this rank (its low 32 bits). A
  // rank that ran another number of internode ops disagrees here instead of
  // pairing its records and flags with another op's.
  mine[5] = (mine[5] & 0xffffffffull) | ((e & 0xffffffffull) << 32);
  if (tid == 0) {
    uint64_t* out_sig = RecordSignature(outbox, l);
    for (int i = 0; i < kSignatureWords; ++i) out_sig[i] = mine[i];
  }
  __threadfence_system();
  __syncthreads();
  if (tid < geo.R) {
    nvshmem_putmem_signal_nbi(Record(c.base, l, e, geo.me), outbox, l.record_bytes,
                              BarrierFlag(c.base, l, geo.me), e, NVSHMEM_SIGNAL_SET, tid);
    nvshmem_quiet();  // the outbox is rewritten by the next op
    WaitFlag(c, BarrierFlag(c.base, l, tid), e, op, kWaitInternodeBarrier, tid);
    PutDataVisible(BarrierFlag(c.base, l, tid), e);
    CheckPeerSignature(RecordSignature(Record(c.base, l, e, tid), l), tid, mine,
                       kInternodeSignatureAxisIndex,
                       SignatureSite{c.timeout_record, c.rank, op, kWaitInternodeRankOrder,
                                     kWaitInternodeSignature, c.timeout_ns, e});
  }
  __syncthreads();
  if (rank_counts != nullptr) {
    for (int i = tid; i < geo.R * geo.R; i += blockDim.x) {
      const int s = i / geo.R;
      rank_counts[i] =
          reinterpret_cast<const volatile int32_t*>(Record(c.base, l, e, s))[i - s * geo.R];
    }
  }
}

// ------------------------------------------------------------ dispatch

struct PartDesc {
  const uint8_t* src;  // [T, row_bytes]
  uint8_t* dst;        // [capacity, row_bytes]
  int64_t row_bytes;
  int64_t msg_offset;  // of the part inside a message
};

struct DispatchKernelArgs {
  const int32_t* slot;         // [T, R]
  const int32_t* node_slot;    // [T, N]
  const int32_t* rank_counts;  // [R, R] (the receive kernel)
  int32_t* relay_pos;          // [N, T, G] or nullptr
  const int32_t* relay_rows;   // [N] or nullptr (then from the records)
  int32_t* relay_rows_out;     // [N] or nullptr
  int64_t num_tokens;
  int64_t capacity;
  int64_t msg_bytes;           // message stride of this call
  int32_t num_parts;
  PartDesc parts[kMaxParts];
};

__device__ __forceinline__ void LoadParts(const DispatchKernelArgs& a, PartDesc* s_parts) {
  CopyTableToShared(a.parts, a.num_parts, s_parts);
}

// Block b's tokens: [b * per, min(T, (b + 1) * per)).
__device__ __forceinline__ void BlockRange(int64_t total, int64_t* lo, int64_t* hi) {
  const int64_t per = (total + gridDim.x - 1) / gridDim.x;
  *lo = min(total, static_cast<int64_t>(blockIdx.x) * per);
  *hi = min(total, *lo + per);
}

__global__ void __launch_bounds__(kThreads) SendKernel(InternodeComm c, DispatchKernelArgs a) {
  __shared__ PartDesc s_parts[kMaxParts];
  __shared__ uint8_t* s_dst[kWarps][kMaxRanks];
  __shared__ int64_t s_lo[kMaxRanks];
  __shared__ int64_t s_cnt[kMaxRanks];
  const Geometry geo = GeometryOf(c);
  const InternodeLayout& l = c.layout;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint64_t e = CurrentEpoch(c);
  LoadParts(a, s_parts);
  __syncthreads();

  int64_t t_lo, t_hi;
  BlockRange(a.num_tokens, &t_lo, &t_hi);
  const int64_t msg = a.msg_bytes;
  for (int64_t t = t_lo + warp; t < t_hi; t += kWarps) {
    const int32_t* ns = a.node_slot + t * geo.N;
    int n_dst = 0;
    for (int n = 0; n < geo.N; ++n) {
      const int32_t j = ns[n];
      if (j < 0 || j >= a.num_tokens) continue;
      uint8_t* row = AreaRow(c.base, l.area_a_offset, l, n, j, msg);
      // the token's slots on the ranks of node n
      for (int g = lane; g < geo.G; g += 32) {
        reinterpret_cast<int32_t*>(row)[g] = a.slot[t * geo.R + n * geo.G + g];
      }
      if (lane == 0) s_dst[warp][n_dst] = row;
      ++n_dst;
    }
    __syncwarp();
    for (int p = 0; p < a.num_parts; ++p) {
      const PartDesc& part = s_parts[p];
      WarpCopyRow(part.src + t * part.row_bytes, s_dst[warp], n_dst, part.msg_offset,
                  part.row_bytes, lane);
    }
    __syncwarp();
  }
  // The block's rows for node n are area_a[n][lo, lo + cnt): node_slot grows with t.
  for (int n = tid; n < geo.N; n += blockDim.x) {
    int64_t lo = -1, cnt = 0;
    for (int64_t t = t_lo; t < t_hi; ++t) {
      const int32_t j = a.node_slot[t * geo.N + n];
      if (j < 0 || j >= a.num_tokens) continue;
      if (lo < 0) lo = j;
      cnt = j - lo + 1;
    }
    s_lo[n] = max(lo, int64_t{0});
    s_cnt[n] = cnt;
  }
  __threadfence_system();  // staged rows visible to whoever moves them (NIC or peer loads)
  __syncthreads();
  for (int n = warp; n < geo.N; n += kWarps) {
    const int relay = n * geo.G + geo.g_me;
    uint64_t* flag = RelayFlag(c.base, l, geo.n_me, blockIdx.x);
    if (s_cnt[n] > 0) {
      nvshmemx_putmem_signal_nbi_warp(AreaRow(c.base, l.area_b_offset, l, geo.n_me, s_lo[n], msg),
                                      AreaRow(c.base, l.area_a_offset, l, n, s_lo[n], msg),
                                      static_cast<size_t>(s_cnt[n] * msg), flag, e,
                                      NVSHMEM_SIGNAL_SET, relay);
    } else if (lane == 0) {
      nvshmemx_signal_op(flag, e, NVSHMEM_SIGNAL_SET, relay);
    }
  }
  if (ArriveLast(CounterPtr(c.base, l, kSendCounter)) && tid == 0) {
    nvshmem_quiet();
    atomicExch(CounterPtr(c.base, l, kSendCounter), 0u);
  }
}

__global__ void __launch_bounds__(kThreads)
    ForwardKernel(InternodeComm c, DispatchKernelArgs a, int32_t op) {
  __shared__ uint8_t* s_peers[kMaxRanks];
  __shared__ uint8_t* s_dst[kWarps][kMaxRanks];
  __shared__ int32_t s_pos[kWarps][kMaxRanks];
  const Geometry geo = GeometryOf(c);
  const InternodeLayout& l = c.layout;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint64_t e = CurrentEpoch(c);
  const int64_t T = a.num_tokens;
  const int64_t msg = a.msg_bytes;
  for (int g = tid; g < geo.G; g += blockDim.x) s_peers[g] = c.node_peers[g];

  for (int n = 0; n < geo.N; ++n) {
    const int s = n * geo.G + geo.g_me;
    for (int b = tid; b < static_cast<int>(gridDim.x); b += blockDim.x) {
      WaitFlag(c, RelayFlag(c.base, l, n, b), e, op, kWaitInternodeRelayRows, s);
      PutDataVisible(RelayFlag(c.base, l, n, b), e);
    }
    __syncthreads();
    int64_t total = a.relay_rows != nullptr
                        ? a.relay_rows[n]
                        : reinterpret_cast<const volatile int32_t*>(
                              Record(c.base, l, e, s))[geo.R + geo.n_me];
    total = max(int64_t{0}, min(total, T));
    if (a.relay_rows_out != nullptr && blockIdx.x == 0 && tid == 0) {
      a.relay_rows_out[n] = static_cast<int32_t>(total);
    }
    if (a.relay_pos != nullptr) {  // rows past the node's count: no destination
      int64_t p_lo, p_hi;
      BlockRange(T - total, &p_lo, &p_hi);
      for (int64_t i = (total + p_lo) * geo.G + tid; i < (total + p_hi) * geo.G;
           i += blockDim.x) {
        a.relay_pos[n * T * geo.G + i] = -1;
      }
    }
    int64_t j_lo, j_hi;
    BlockRange(total, &j_lo, &j_hi);  // the rows with data, spread over every block
    for (int64_t j = j_lo + warp; j < j_hi; j += kWarps) {
      int32_t* pos_out = a.relay_pos != nullptr ? a.relay_pos + (n * T + j) * geo.G : nullptr;
      const uint8_t* row = AreaRow(c.base, l.area_b_offset, l, n, j, msg);
      for (int g = lane; g < geo.G; g += 32) {
        const int32_t pos = *reinterpret_cast<const volatile int32_t*>(
            reinterpret_cast<const int32_t*>(row) + g);
        s_pos[warp][g] = pos;
        if (pos_out != nullptr) pos_out[g] = pos;
      }
      __syncwarp();
      int n_dst = 0;
      for (int g = 0; g < geo.G; ++g) {
        const int32_t pos = s_pos[warp][g];
        if (pos < 0 || pos >= T) continue;
        if (lane == 0) s_dst[warp][n_dst] = AreaRow(s_peers[g], l.area_c_offset, l, s, pos, msg);
        ++n_dst;
      }
      __syncwarp();
      if (n_dst > 0) WarpCopyRow(row, s_dst[warp], n_dst, 0, msg, lane);
      __syncwarp();
    }
  }
  __threadfence_system();
  __syncthreads();
  for (int i = tid; i < geo.N * geo.G; i += blockDim.x) {
    const int n = i / geo.G, g = i - n * geo.G;
    StoreReleaseSys(ForwardFlag(s_peers[g], l, n * geo.G + geo.g_me, blockIdx.x), e);
  }
}

__global__ void __launch_bounds__(kThreads)
    ReceiveKernel(InternodeComm c, DispatchKernelArgs a, int32_t op) {
  __shared__ PartDesc s_parts[kMaxParts];
  __shared__ int64_t s_begin[kMaxRanks + 1];
  const Geometry geo = GeometryOf(c);
  const InternodeLayout& l = c.layout;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint64_t e = CurrentEpoch(c);
  LoadParts(a, s_parts);
  if (tid == 0) SourceBegins(a.rank_counts, geo, a.num_tokens, s_begin);
  const int B = gridDim.x;
  for (int i = tid; i < geo.R * B; i += blockDim.x) {
    const int s = i / B;
    WaitFlag(c, ForwardFlag(c.base, l, s, i - s * B), e, op, kWaitInternodeForwarded, s);
  }
  __syncthreads();
  const int64_t num_recv = min(s_begin[geo.R], a.capacity);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + warp; i < a.capacity; i += stride) {
    if (i >= num_recv) {
      for (int p = 0; p < a.num_parts; ++p) {
        WarpZeroRow(s_parts[p].dst + i * s_parts[p].row_bytes, s_parts[p].row_bytes, lane);
      }
      continue;
    }
    const int s = SourceOfRow(s_begin, geo.R, i);
    const uint8_t* msg = AreaRow(c.base, l.area_c_offset, l, s, i - s_begin[s], a.msg_bytes);
    for (int p = 0; p < a.num_parts; ++p) {
      uint8_t* dst = s_parts[p].dst;
      WarpCopyRow(msg + s_parts[p].msg_offset, &dst, 1, i * s_parts[p].row_bytes,
                  s_parts[p].row_bytes, lane);
    }
  }
}

// ------------------------------------------------------------ combine

struct CombineKernelArgs {
  const uint8_t* y;            // [capacity, row_bytes]
  const int32_t* node_slot;    // [T, N]
  const int32_t* rank_counts;  // [R, R]
  const int32_t* relay_pos;    // [N, T, G]
  const int32_t* relay_rows;   // [N]
  uint8_t* out;                // [T, row_bytes]
  int64_t num_tokens;
  int64_t capacity;
  int64_t hidden;
  int64_t row_bytes;
  int64_t stride;              // area rows: row_bytes rounded to 16
  ElemType dtype;
};

// Each received row back to the relay of its source on my node.
__global__ void __launch_bounds__(kThreads) CombineSendKernel(InternodeComm c, CombineKernelArgs a) {
  __shared__ int64_t s_begin[kMaxRanks + 1];
  const Geometry geo = GeometryOf(c);
  const InternodeLayout& l = c.layout;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint64_t e = CurrentEpoch(c);
  if (tid == 0) SourceBegins(a.rank_counts, geo, a.num_tokens, s_begin);
  __syncthreads();
  const int64_t num_recv = min(s_begin[geo.R], a.capacity);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + warp; i < num_recv; i += stride) {
    const int s = SourceOfRow(s_begin, geo.R, i);
    const int n_s = s / geo.G, g_s = s - n_s * geo.G;
    uint8_t* dst = AreaRow(c.node_peers[g_s], l.area_c_offset, l, geo.g_me * geo.N + n_s,
                           i - s_begin[s], a.stride);
    WarpCopyRow(a.y + i * a.row_bytes, &dst, 1, 0, a.row_bytes, lane);
  }
  if (ArriveLast(CounterPtr(c.base, l, kCombineSendCounter))) {
    for (int g = tid; g < geo.G; g += blockDim.x) {
      StoreReleaseSys(CombineFlag(c.node_peers[g], l, geo.g_me), e);
    }
    if (tid == 0) atomicExch(CounterPtr(c.base, l, kCombineSendCounter), 0u);
  }
}

// The relay's node partial sums, back to their sources.
__global__ void __launch_bounds__(kThreads) ReduceKernel(InternodeComm c, CombineKernelArgs a) {
  __shared__ int64_t s_off[kMaxRanks];  // [n * G + g']: first row of source (n, g_me) on (n_me, g')
  __shared__ const uint8_t* s_rows[kWarps][kMaxRanks];
  const Geometry geo = GeometryOf(c);
  const InternodeLayout& l = c.layout;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint64_t e = CurrentEpoch(c);
  const int64_t T = a.num_tokens;
  for (int i = tid; i < geo.N * geo.G; i += blockDim.x) {
    const int n = i / geo.G, g = i - n * geo.G;
    const int s = n * geo.G + geo.g_me, r = geo.n_me * geo.G + g;
    int64_t off = 0;
    for (int q = 0; q < s; ++q) off += min(static_cast<int64_t>(max(a.rank_counts[q * geo.R + r], 0)), T);
    s_off[i] = off;
  }
  for (int g = tid; g < geo.G; g += blockDim.x) {
    WaitFlag(c, CombineFlag(c.base, l, g), e, kOpInternodeCombine, kWaitInternodeCombineRows,
             geo.n_me * geo.G + g);
  }
  __syncthreads();
  for (int n = 0; n < geo.N; ++n) {
    const int s = n * geo.G + geo.g_me;
    const int64_t total = max(int64_t{0}, min(static_cast<int64_t>(a.relay_rows[n]), T));
    int64_t j_lo, j_hi;
    BlockRange(total, &j_lo, &j_hi);
    for (int64_t j = j_lo + warp; j < j_hi; j += kWarps) {
      const int32_t* pos = a.relay_pos + (n * T + j) * geo.G;
      for (int g = lane; g < geo.G; g += 32) {
        const int32_t p = pos[g];
        const bool kept = p >= 0 && p < T && s_off[n * geo.G + g] + p < a.capacity;
        s_rows[warp][g] = kept ? AreaRow(c.base, l.area_c_offset, l, g * geo.N + n, p, a.stride)
                               : nullptr;
      }
      __syncwarp();
      uint8_t* out = AreaRow(c.base, l.area_a_offset, l, n, j, a.stride);
      ForElem(a.dtype, [&](auto elem) {
        WarpSumRows<decltype(elem)>(s_rows[warp], geo.G, a.hidden, out, lane);
      });
      __syncwarp();
    }
    __threadfence_system();
    __syncthreads();
    if (warp == 0) {
      uint64_t* flag = PartialFlag(c.base, l, geo.n_me, blockIdx.x);
      if (j_hi > j_lo) {
        nvshmemx_putmem_signal_nbi_warp(AreaRow(c.base, l.area_b_offset, l, geo.n_me, j_lo, a.stride),
                                        AreaRow(c.base, l.area_a_offset, l, n, j_lo, a.stride),
                                        static_cast<size_t>((j_hi - j_lo) * a.stride), flag, e,
                                        NVSHMEM_SIGNAL_SET, s);
      } else if (lane == 0) {
        nvshmemx_signal_op(flag, e, NVSHMEM_SIGNAL_SET, s);
      }
    }
  }
  if (ArriveLast(CounterPtr(c.base, l, kReduceCounter)) && tid == 0) {
    nvshmem_quiet();
    atomicExch(CounterPtr(c.base, l, kReduceCounter), 0u);
  }
}

__global__ void __launch_bounds__(kThreads)
    CombineReceiveKernel(InternodeComm c, CombineKernelArgs a) {
  __shared__ const uint8_t* s_rows[kWarps][kMaxRanks];
  const Geometry geo = GeometryOf(c);
  const InternodeLayout& l = c.layout;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint64_t e = CurrentEpoch(c);
  const int B = gridDim.x;
  for (int i = tid; i < geo.N * B; i += blockDim.x) {
    const int n = i / B;
    WaitFlag(c, PartialFlag(c.base, l, n, i - n * B), e, kOpInternodeCombine,
             kWaitInternodePartials, n * geo.G + geo.g_me);
    PutDataVisible(PartialFlag(c.base, l, n, i - n * B), e);
  }
  __syncthreads();
  const int64_t T = a.num_tokens;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp; t < T; t += stride) {
    for (int n = lane; n < geo.N; n += 32) {
      const int32_t j = a.node_slot[t * geo.N + n];
      s_rows[warp][n] = j >= 0 && j < T ? AreaRow(c.base, l.area_b_offset, l, n, j, a.stride)
                                        : nullptr;
    }
    __syncwarp();
    uint8_t* out = a.out + t * a.row_bytes;
    ForElem(a.dtype, [&](auto elem) {
      WarpSumRows<decltype(elem)>(s_rows[warp], geo.N, a.hidden, out, lane);
    });
    __syncwarp();
  }
}

// ------------------------------------------------------------ host side

int64_t RoundUp16(int64_t x) { return (x + 15) / 16 * 16; }

bool CommOk(const InternodeComm& c) {
  const InternodeLayout& l = c.layout;
  return c.base != nullptr && c.node_peers != nullptr && l.num_ranks >= 1 &&
         l.num_ranks <= kMaxRanks && l.ranks_per_node >= 1 && l.num_nodes >= 1 &&
         l.num_nodes * l.ranks_per_node == l.num_ranks && c.rank >= 0 && c.rank < l.num_ranks &&
         c.num_blocks >= 1 && c.num_blocks <= kMaxBlocks;
}

Signature MakeSignature(const InternodeComm& c, int32_t op, int num_parts, uint32_t dtype,
                        int64_t capacity, int64_t num_tokens, int64_t row_bytes,
                        const int32_t* axis_index) {
  Signature sig{};
  sig.words[0] = static_cast<uint64_t>(op) | (static_cast<uint64_t>(num_parts) << 8) |
                 (static_cast<uint64_t>(dtype & 0xff) << 16) |
                 (static_cast<uint64_t>(c.num_blocks) << 32);
  sig.words[1] = static_cast<uint64_t>(capacity);
  sig.words[2] = static_cast<uint64_t>(num_tokens);
  sig.words[3] = static_cast<uint64_t>(row_bytes);
  sig.words[5] = static_cast<uint64_t>(c.layout.ranks_per_node);  // | op number << 32 (notify)
  sig.axis_index = axis_index;
  return sig;
}

}  // namespace

int InternodeBlocksPerSm() {
  int least = 1 << 30;
  const void* kernels[] = {reinterpret_cast<const void*>(&SendKernel),
                           reinterpret_cast<const void*>(&ForwardKernel),
                           reinterpret_cast<const void*>(&ReceiveKernel),
                           reinterpret_cast<const void*>(&CombineSendKernel),
                           reinterpret_cast<const void*>(&ReduceKernel),
                           reinterpret_cast<const void*>(&CombineReceiveKernel)};
  for (const void* k : kernels) {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k, kThreads, 0) != cudaSuccess) {
      cudaGetLastError();
      return 1;
    }
    least = std::min(least, n);
  }
  return std::max(least, 1);
}

cudaError_t LaunchInternodeDispatch(const InternodeComm& comm, const InternodeDispatchArgs& args,
                                    cudaStream_t stream) {
  if (!CommOk(comm) || args.num_parts < 0 || args.num_parts > kMaxParts || args.num_tokens < 0 ||
      args.num_tokens > comm.layout.max_tokens || args.capacity < 0 ||
      // zero-sized XLA buffers may be null
      (args.num_tokens > 0 && (args.slot == nullptr || args.node_slot == nullptr)) ||
      args.rank_counts == nullptr) {
    return cudaErrorInvalidValue;
  }
  const bool cached = args.sent == nullptr;
  const int32_t op = cached ? kOpInternodeDispatchCached : kOpInternodeDispatch;
  DispatchKernelArgs a{};
  a.slot = args.slot;
  a.node_slot = args.node_slot;
  a.rank_counts = args.rank_counts;
  a.relay_pos = args.relay_pos;
  a.relay_rows = cached ? args.relay_rows : nullptr;
  a.relay_rows_out = args.relay_rows_out;
  a.num_tokens = args.num_tokens;
  a.capacity = args.capacity;
  a.num_parts = args.num_parts;
  int64_t row_bytes[kMaxParts] = {};
  int64_t at = RoundUp16(4 * static_cast<int64_t>(comm.layout.ranks_per_node));
  for (int p = 0; p < args.num_parts; ++p) {
    a.parts[p] = PartDesc{static_cast<const uint8_t*>(args.parts[p].src),
                          static_cast<uint8_t*>(args.parts[p].dst), args.parts[p].row_bytes, at};
    row_bytes[p] = args.parts[p].row_bytes;
    at += RoundUp16(args.parts[p].row_bytes);
  }
  a.msg_bytes = InternodeMessageBytes(comm.layout.ranks_per_node, row_bytes, args.num_parts);
  if (a.msg_bytes > comm.layout.stride || (cached && args.relay_rows == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const Signature sig = MakeSignature(comm, op, args.num_parts, 0xff, args.capacity,
                                      args.num_tokens, a.msg_bytes, args.axis_index);
  NotifyKernel<<<1, kThreads, 0, stream>>>(comm, args.sent, args.node_sent,
                                          cached ? nullptr : args.rank_counts, op, sig);
  const int B = comm.num_blocks;
  SendKernel<<<B, kThreads, 0, stream>>>(comm, a);
  ForwardKernel<<<B, kThreads, 0, stream>>>(comm, a, op);
  ReceiveKernel<<<B, kThreads, 0, stream>>>(comm, a, op);
  return cudaGetLastError();
}

cudaError_t LaunchInternodeCombine(const InternodeComm& comm, const InternodeCombineArgs& args,
                                   cudaStream_t stream) {
  const int64_t elem = ElemTypeBytes(args.dtype);
  if (!CommOk(comm) || args.num_tokens < 0 || args.num_tokens > comm.layout.max_tokens ||
      args.capacity < 0 || args.hidden < 0 || args.dtype == ElemType::kF8E4M3FN ||
      RoundUp16(args.hidden * elem) > comm.layout.stride) {
    return cudaErrorInvalidValue;
  }
  CombineKernelArgs a{};
  a.y = static_cast<const uint8_t*>(args.y);
  a.node_slot = args.node_slot;
  a.rank_counts = args.rank_counts;
  a.relay_pos = args.relay_pos;
  a.relay_rows = args.relay_rows;
  a.out = static_cast<uint8_t*>(args.out);
  a.num_tokens = args.num_tokens;
  a.capacity = args.capacity;
  a.hidden = args.hidden;
  a.row_bytes = args.hidden * elem;
  a.stride = RoundUp16(a.row_bytes);
  a.dtype = args.dtype;
  const Signature sig =
      MakeSignature(comm, kOpInternodeCombine, 1, static_cast<uint32_t>(args.dtype),
                    args.capacity, args.num_tokens, a.row_bytes, args.axis_index);
  NotifyKernel<<<1, kThreads, 0, stream>>>(comm, nullptr, nullptr, nullptr, kOpInternodeCombine,
                                          sig);
  const int B = comm.num_blocks;
  CombineSendKernel<<<B, kThreads, 0, stream>>>(comm, a);
  ReduceKernel<<<B, kThreads, 0, stream>>>(comm, a);
  CombineReceiveKernel<<<B, kThreads, 0, stream>>>(comm, a);
  return cudaGetLastError();
}

}  // namespace jax_ep
