// Intranode (NVLink / same-GPU CUDA IPC) dispatch and combine: interface for
// host code. Plain C++ types only; the FFI handlers
// (ffi/handlers/intranode.cc) fill these structs from XLA buffers, the
// runtime (ffi/runtime/intranode_runtime.*) owns the buffers the kernels
// communicate through. The buffer layout and the synchronisation protocol
// are described at the top of intranode.cu; the semantics in
// docs/design.md §2, the kernel direction in §5.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "ffi/kernels/common/elem_type.h"
#include "ffi/kernels/common/live_check.h"
#include "ffi/kernels/common/timeout_record.h"

namespace jax_ep {

// Largest EP group the intranode kernels support (flags and the count matrix
// in the signal area are sized for it; warps handle 64 ranks with 2 ballots).
inline constexpr int kIntranodeMaxRanks = 64;
// Most payload arrays one dispatch moves (x, scales, topk ids, weights, ...).
inline constexpr int kIntranodeMaxParts = 8;
// Most elements per combine row (hidden).
inline constexpr int64_t kIntranodeMaxHidden = int64_t{1} << 24;
// Every rank's comm buffer = signal area (this many bytes) + data area.
inline constexpr size_t kIntranodeSignalBytes = 64 * 1024;

// Byte offsets inside the signal area (see intranode.cu).
inline constexpr size_t kSignalEpochOffset = 0;         // uint64: ops started (owner only)
inline constexpr size_t kSignalSendCounterOffset = 8;   // uint32: last-block counter (owner only)
inline constexpr size_t kSignalBarrierFlagsOffset = 256;  // uint64[kIntranodeMaxRanks]
inline constexpr size_t kSignalDataFlagsOffset = 768;     // uint64[kIntranodeMaxRanks]
inline constexpr size_t kSignalCountsOffset = 2048;  // int32[2][kIntranodeMaxRanks][kIntranodeMaxRanks]
// uint64[2][kIntranodeMaxRanks][kSignatureWords]: sig[e & 1][s] = the op signature of rank s's op e
inline constexpr size_t kSignalSignaturesOffset = 36864;
static_assert(kSignalCountsOffset + 2 * kIntranodeMaxRanks * kIntranodeMaxRanks * 4 <=
                  kSignalSignaturesOffset,
              "counts overlap the signatures");
static_assert(kSignalSignaturesOffset + 2 * kIntranodeMaxRanks * kSignatureWords * 8 <=
                  kIntranodeSignalBytes,
              "signal area too small");

// Which op / which wait timed out (TimeoutRecord fields).
enum IntranodeOp : int32_t {
  kOpDispatch = 0,
  kOpCachedDispatch = 1,
  kOpCombine = 2,
};
enum IntranodeWait : int32_t {
  kWaitBarrier = 0,
  kWaitCounts = 1,
  kWaitData = 2,
  kWaitSignature = 3,  // not a wait: rank `peer` runs another op or other shapes (signatures differ)
  kWaitRankOrder = 4,  // not a wait: a call's EP axis index differs from the rank of initialize
};

// An op signature (TimeoutRecord::mine / theirs): what every rank's call of
// one op must agree on, compared by the notify kernel before any row moves.
//   [0] op | num_parts << 8 | dtype << 16 (dtype: ElemType of a combine's y,
//       0xff for a dispatch)   [1] capacity   [2] num_tokens
//   [3] bytes of a row, all payloads together   [4] the call's EP axis index
//   (the rank the call's mesh gives this device; must equal the rank of
//   initialize; not compared between ranks)   [5] 0
inline constexpr int kSignatureAxisIndex = 4;

// What a kernel needs to know about its rank's communicator.
struct IntranodeComm {
  uint8_t* const* peer_bases;  // device array [num_ranks]: comm buffer base of every rank (self too)
  uint8_t* local_base;         // this rank's comm buffer (== peer_bases[rank])
  size_t data_bytes;           // size of the data area behind the signal area
  int32_t rank;
  int32_t num_ranks;           // 1 .. kIntranodeMaxRanks
  TimeoutRecord* timeout_record;  // device-visible pointer to host-mapped memory
  uint64_t timeout_ns;         // spin-wait limit
  int32_t num_blocks;          // grid size of the data kernels (>= 1)
  LiveCheck live;              // the notify kernel stops if shutdown freed these buffers
};

// One payload array of a dispatch: [T, ...] rows -> [capacity, ...] rows.
struct IntranodePart {
  const void* src;    // [num_tokens, row_bytes] on this rank
  void* dst;          // [capacity, row_bytes] on this rank (the XLA result)
  int64_t row_bytes;  // any value >= 0; 16-byte copies when rows and pointers allow
};

struct IntranodeDispatchArgs {
  const int32_t* axis_index;  // []: this call's position on the EP axis (lax.axis_index)
  const int32_t* slot;   // [T, R]: position of token t among my tokens to rank r, or -1
  const int32_t* sent;   // [R]: my tokens per destination; nullptr = cached dispatch
  int32_t* rank_counts;  // [R, R]: written (from all ranks' `sent`) unless cached, else read
  int64_t num_tokens;    // T >= 0
  int64_t capacity;      // receive rows >= 0
  int32_t num_parts;     // 0 .. kIntranodeMaxParts
  IntranodePart parts[kIntranodeMaxParts];
};

struct IntranodeCombineArgs {
  const int32_t* axis_index;   // []: this call's position on the EP axis (lax.axis_index)
  const void* y;               // [capacity, hidden] rows this rank received in dispatch
  const int32_t* token_slot;   // [T, R]: post-drop slot of my token t on rank r, or -1
  const int32_t* rank_counts;  // [R, R] count matrix of the matching dispatch
  void* out;                   // [T, hidden]
  int64_t num_tokens;          // T
  int64_t capacity;
  int64_t hidden;
  ElemType dtype;              // bf16 | f16 | f32 | f8e4m3fn
};

// Blocks of the spinning receive kernels (dispatch and combine) one SM of the
// current device holds at once (the least over their variants), from the
// occupancy API: ranks sharing a GPU must leave room for each other's sends.
int IntranodeRecvBlocksPerSm();

// Data-area bytes one dispatch needs: capacity * sum of row_bytes (payload
// p's sub-area starts at capacity * sum_{q<p} row_bytes[q]).
size_t IntranodeDispatchDataBytes(int64_t capacity, const int64_t* row_bytes, int num_parts);
// Data-area bytes one combine needs: num_ranks * num_tokens * row_bytes.
size_t IntranodeCombineDataBytes(int64_t num_ranks, int64_t num_tokens, int64_t row_bytes);

// Enqueue notify (count exchange, or a plain barrier when args.sent is
// nullptr), send and receive kernels on `stream`; no host synchronisation.
// Returns cudaErrorInvalidValue for parameters outside the limits above (the
// handlers check them first with better messages), else the launch status.
cudaError_t LaunchIntranodeDispatch(const IntranodeComm& comm, const IntranodeDispatchArgs& args,
                                    cudaStream_t stream);
// Enqueue barrier, send and receive-and-reduce kernels on `stream`.
cudaError_t LaunchIntranodeCombine(const IntranodeComm& comm, const IntranodeCombineArgs& args,
                                   cudaStream_t stream);

// The same ops one phase at a time (phases must be enqueued in order, each
// exactly once per op): the hook for split send / receive custom calls, and
// for tests that run several ranks as streams of one process (there, enqueue
// phase p of every rank before phase p+1 of any, so that no stream-ordered
// wait at the head of a shared hardware queue blocks a peer's notify).
enum IntranodePhase : int32_t { kPhaseNotify = 0, kPhaseSend = 1, kPhaseRecv = 2 };
cudaError_t LaunchIntranodeDispatchPhase(const IntranodeComm& comm,
                                         const IntranodeDispatchArgs& args, IntranodePhase phase,
                                         cudaStream_t stream);
cudaError_t LaunchIntranodeCombinePhase(const IntranodeComm& comm, const IntranodeCombineArgs& args,
                                        IntranodePhase phase, cudaStream_t stream);

}  // namespace jax_ep
