// Low-latency (decode) dispatch / combine over NVSHMEM: interface for host
// code. Plain C++ types only; the FFI handlers (ffi/handlers/low_latency_*.cc)
// fill these structs from XLA buffers, the runtime
// (ffi/runtime/low_latency_runtime.*) owns the NVSHMEM symmetric region the
// kernels communicate through. Buffer layout and protocol: the comment at the
// top of low_latency/device.cuh; the semantics: docs/design.md §2.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "ffi/kernels/common/elem_type.h"
#include "ffi/kernels/common/live_check.h"
#include "ffi/kernels/common/timeout_record.h"  // the same host-mapped record + watchdog scheme

namespace jax_ep {

// ------------------------------------------------------------------ limits
inline constexpr int kLLMaxRanks = 64;           // PEs of the EP group (= NVSHMEM world)
inline constexpr int64_t kLLMaxTopK = 32;        // K
inline constexpr int64_t kLLMaxTokens = 4096;    // M (max_tokens_per_rank)
inline constexpr int64_t kLLMaxHidden = 65536;   // H
inline constexpr int64_t kLLMaxExperts = 4096;   // E
inline constexpr int64_t kLLFp8Block = 128;      // channels per FP8 scale

// ------------------------------------------------------------------ region layout
// Byte offsets inside the region (identical on every PE; see low_latency/device.cuh).
inline constexpr size_t kLLOpCounterOffset = 0;    // u64: LL ops started on this PE (owner only)
inline constexpr size_t kLLSendArriveOffset = 8;   // u32: last-block counter of send phases
inline constexpr size_t kLLRecvArriveOffset = 12;  // u32: last-block counter of receive phases
inline constexpr size_t kLLSendTaskOffset = 16;    // u32: next warp task of a combine send
inline constexpr size_t kLLRecvTaskOffset = 20;    // u32: next warp task of a streamed combine receive
inline constexpr size_t kLLDoneOffset = 256;       // u64 done[2][kLLMaxRanks]: written by sources
inline constexpr size_t kLLAckOffset = kLLDoneOffset + 2 * kLLMaxRanks * 8;  // u64 ack[2][kLLMaxRanks]
// u64 sig[2][kLLMaxRanks][kLLSignatureWords]: the op signature of source s's op n (LLComm::op_sig)
inline constexpr size_t kLLSignatureOffset = kLLAckOffset + 2 * kLLMaxRanks * 8;
inline constexpr int kLLSignatureWords = 3;
inline constexpr size_t kLLControlBytes = 8192;
static_assert(kLLSignatureOffset + 2 * kLLMaxRanks * kLLSignatureWords * 8 <= kLLControlBytes,
              "control area too small");

// Where everything lives in the symmetric region. Made once at allocation
// from the largest problem (M, H, E, K, itemsize); every call checks that its
// own problem fits (LLFits*). All offsets are multiples of 256.
struct LLLayout {
  int32_t num_ranks = 0;      // R
  int64_t max_tokens = 0;     // M the region was sized for
  int64_t hidden = 0;         // H
  int64_t num_experts = 0;    // E
  int64_t top_k = 0;          // K
  int64_t itemsize = 0;       // bytes per element of x / y (2 or 4)
  size_t counts_offset = 0;   // int32 counts[2][R][E]: counts[b][s][e] written by source s
  size_t scratch_offset = 0;  // int32 scratch[2][E]: this PE's per-expert token counts (local)
  size_t jpos_offset = 0;     // int32 jpos[2][M * K]: position of (t, k) among my tokens for its expert (local)
  size_t arrive_offset = 0;   // u64 arrive[2][M]: rows of my token t written so far (streamed combine)
  size_t set_offset = 0;      // data sets [2][set_bytes]
  size_t set_bytes = 0;       // E * M * max(dispatch row stride, combine row stride)
  size_t send_offset = 0;     // staging of rows for NVSHMEM puts (0 bytes without send buffer)
  size_t send_bytes = 0;
  size_t total_bytes = 0;
};

// Row strides (bytes, multiples of 16).
int64_t LLDispatchRowStride(int64_t hidden, int64_t x_itemsize, bool use_fp8);  // payload, rounded
int64_t LLPlainRowStride(int64_t hidden, int64_t itemsize);                     // combine / cached
// Dispatch's use of a data set: the int32 index [E / R][R][M] (256-byte
// rounded), then R * M rows of the dispatch stride.
__host__ __device__ inline constexpr int64_t LLDispatchIndexBytes(int64_t num_experts, int64_t max_tokens) {
  return (num_experts * max_tokens * 4 + 255) / 256 * 256;
}
__host__ __device__ inline constexpr int64_t LLDispatchSetBytes(int num_ranks, int64_t max_tokens,
                                                                int64_t num_experts,
                                                                int64_t stride) {
  return LLDispatchIndexBytes(num_experts, max_tokens) + num_ranks * max_tokens * stride;
}
// Send-buffer rows needed: dispatch T*K pair rows, combine the received rows
// (at most min(E*M, R*M*K)).
int64_t LLSendRows(int64_t num_ranks, int64_t max_tokens, int64_t num_experts, int64_t top_k);
// Layout for a region sized for these maxima. itemsize in {2, 4}.
LLLayout MakeLLLayout(int num_ranks, int64_t max_tokens, int64_t hidden, int64_t num_experts,
                      int64_t top_k, int64_t itemsize, bool send_buffer);

// Which op / which wait (TimeoutRecord fields op / what; intranode uses 0..2).
enum LLOp : int32_t {
  kOpLLDispatch = 16,
  kOpLLCombine = 17,
  kOpLLDispatchCached = 18,
  kOpLLGather = 19,
};
enum LLWait : int32_t {
  kWaitLLData = 16,      // a source's done signal (its rows of this op)
  kWaitLLRelease = 17,   // a receiver's release (ack) of the buffer set two ops back
  kWaitLLMismatch = 18,  // a source signalled this op number for a different op kind
  kWaitLLShapeMismatch = 19,  // not a wait: a source's op signature differs (other shapes / dtype)
  kWaitLLRankOrder = 20,      // not a wait: a call's EP axis index is not the PE's rank
};

// What a kernel needs to know about its PE.
struct LLComm {
  uint8_t* base = nullptr;               // this PE's region (a symmetric address)
  uint8_t* const* peer_base = nullptr;   // device [R]: region of PE r mapped here, nullptr = use puts
  LLLayout layout;
  int32_t rank = 0;
  int32_t num_ranks = 0;
  int32_t num_blocks = 1;                // grid size (co-resident: see low_latency_runtime.cc)
  int32_t any_put = 0;                   // some peer_base is nullptr (needs the send buffer)
  int32_t gpu_scope = 0;                 // every PE on this GPU, none by put: GPU-scope signals
  int32_t pdl = 0;                       // launch with programmatic dependent launch
  int32_t stream_combine = 0;            // R > 1 at GPU scope: the fused combine reduces tokens as rows arrive
  TimeoutRecord* timeout_record = nullptr;  // device-visible host-mapped record
  uint64_t timeout_ns = 0;
  uint64_t* trace = nullptr;             // phase timestamps (phase_trace option), nullptr: off
  LiveCheck live;                        // every kernel stops if shutdown freed these buffers
  // Per call (set by the launchers, Signed): what every PE's call of this op
  // must agree on, published with the done signal and checked by receivers.
  //   op_sig[0] = op | elem bytes << 8 | use_fp8 << 16 | K << 24 | E << 32
  //   op_sig[1] = H | M << 32;   the third word is the call's EP axis index
  uint64_t op_sig[2] = {0, 0};
  const int32_t* axis_index = nullptr;   // [] lax.axis_index of the call, nullptr: not checked
};

// Phase trace (diagnostics, nvshmem_ll_alloc(phase_trace=<path>)): thread 0
// of every block stores %globaltimer at each event into trace[op n %
// kLLTraceOps][block][event] (blocks past kLLTraceBlocks share the last row);
// event kLLTraceTag holds (n << 8) | op kind, written by block 0. Written to
// <path>.pe<rank> at finalize (low_latency_runtime.cc); read by
// benchmarks/ll_phases.py.
inline constexpr int kLLTraceOps = 256;
inline constexpr int kLLTraceBlocks = 160;
inline constexpr int kLLTraceEvents = 8;
enum LLTraceEvent : int32_t {
  kLLTraceStart = 0,      // kernel entry
  kLLTraceReleased = 1,   // set b released by every PE (send)
  kLLTraceSent = 2,       // this block's rows written (send)
  kLLTraceSignalled = 3,  // done signals stored (last send block)
  kLLTraceArrived = 4,    // every source's done seen (receive)
  kLLTraceCopied = 5,     // this block's rows read out (receive)
  kLLTraceEnd = 6,        // this block finished (receive)
  kLLTraceTag = 7,
};

// Bytes per element of an x / y type the kernels take (bf16, f16, f32), 0
// for FP8 (FP8 rows only come out of the dispatch's own cast).
inline constexpr int LLElemBytes(ElemType type) {
  return type == ElemType::kF8E4M3FN ? 0 : ElemTypeBytes(type);
}

// Fused op, or one half of the split form.
enum LLPhase : int32_t { kLLFused = 0, kLLSendOnly = 1, kLLRecvOnly = 2 };

// Geometry of a call (identical on every PE).
// Layouts of the expert rows (recv_x of a dispatch, y of a combine or
// gather, out of a cached dispatch). Padded [L, R*M, ...]: local expert l's
// rows at l * R*M + p, p < recv_count[l]. Ragged [N, ...] (ragged_rows = N):
// the same rows concatenated in expert order, row start[l] + p with start the
// exclusive prefix sum of recv_count, rows [sum, N) the tail (zeroed with
// zero_fill). The kernels place rows there directly; recv_src and slot stay
// per expert ([L, R*M], row among the expert's R*M) in both layouts. A ragged
// row index >= N is never read or written (a y shorter than the rows counted
// contributes nothing past its end).
struct LLShape {
  int64_t num_tokens = 0;   // T <= M
  int64_t hidden = 0;       // H
  int64_t top_k = 0;        // K
  int64_t num_experts = 0;  // E, multiple of R
  int64_t max_tokens = 0;   // M
};

struct LLDispatchArgs {
  LLShape shape;
  const int32_t* axis_index = nullptr;  // [] the call's EP axis index (lax.axis_index)
  const void* x = nullptr;           // [T, H] (send)
  ElemType dtype = ElemType::kBF16;  // x's dtype (the plain recv_x dtype)
  const int32_t* topk_idx = nullptr; // [T, K] (send and receive)
  bool use_fp8 = false;
  bool zero_fill = true;             // zero recv_x / recv_scales rows past the count
  int64_t ragged_rows = 0;           // 0: padded; N: ragged recv_x / recv_scales (see below)
  void* recv_x = nullptr;            // [L, R*M, H] x dtype, or e4m3 with use_fp8; ragged [N, H]
  float* recv_scales = nullptr;      // [L, R*M, H/128] with use_fp8; ragged [N, H/128]
  int32_t* recv_count = nullptr;     // [L]
  int32_t* recv_src = nullptr;       // [L, R*M]: s*M + t, -1 past the count
  int32_t* slot = nullptr;           // [T, K]: row of (t, k) among its expert's R*M rows, -1
  int32_t* token_out = nullptr;      // [2] (send only): op number lo, hi
  const int32_t* token_in = nullptr; // [2] (receive only)
};

struct LLCombineArgs {
  LLShape shape;
  const int32_t* axis_index = nullptr;  // [] the call's EP axis index (lax.axis_index)
  bool gather = false;                  // out [T, K, H] rows instead of the weighted sum
  ElemType dtype = ElemType::kBF16;     // y's dtype = out's dtype
  const void* y = nullptr;              // [L, R*M, H] (send; fused at one PE: receive too)
  int64_t ragged_rows = 0;              // 0: y padded; N: y ragged [N, H] (see below)
  const int32_t* recv_src = nullptr;    // [L, R*M] (send)
  const int32_t* recv_count = nullptr;  // [L] (send)
  const int32_t* topk_idx = nullptr;    // [T, K] (receive)
  const float* topk_weights = nullptr;  // [T, K] (receive, combine only)
  const int32_t* slot = nullptr;        // [T, K] the dispatch's slot (fused at one PE)
  void* out = nullptr;                  // [T, H] or [T, K, H]
  int32_t* token_out = nullptr;
  const int32_t* token_in = nullptr;
};

struct LLCachedDispatchArgs {
  LLShape shape;
  const int32_t* axis_index = nullptr;  // [] the call's EP axis index (lax.axis_index)
  const void* x = nullptr;              // [T, H]
  ElemType dtype = ElemType::kBF16;
  const int32_t* topk_idx = nullptr;    // [T, K]
  const int32_t* slot = nullptr;        // [T, K] (from ll_dispatch)
  const float* scale = nullptr;         // [T, K] or nullptr (= 1)
  const int32_t* recv_count = nullptr;  // [L] (receive: rows to copy, the rest is zeroed)
  bool zero_fill = true;
  int64_t ragged_rows = 0;              // 0: out padded; N: out ragged [N, H] (see below)
  void* out = nullptr;                  // [L, R*M, H] x dtype
};

// Blocks of each kernel family one SM of the current device holds at once,
// for the largest call the layout allows (the least over element types and
// variants; occupancy API). The fused kernels need their whole grid, and the
// grids of every PE sharing the GPU, resident together.
int LLDispatchBlocksPerSm(const LLLayout& lay);
int LLCombineBlocksPerSm(const LLLayout& lay);
int LLStreamedCombineBlocksPerSm(const LLLayout& lay);
int LLCachedDispatchBlocksPerSm(const LLLayout& lay);

// nullptr when the call fits the region, else a sentence saying what does not.
const char* LLCheckDispatch(const LLComm& comm, const LLShape& s, int64_t x_itemsize, bool use_fp8);
const char* LLCheckCombine(const LLComm& comm, const LLShape& s, int64_t y_itemsize);
const char* LLCheckCachedDispatch(const LLComm& comm, const LLShape& s, int64_t x_itemsize);

// Enqueue on `stream`; no host synchronisation. cudaErrorInvalidValue for
// arguments the handlers should have rejected, else the launch status.
cudaError_t LaunchLLDispatch(const LLComm& comm, const LLDispatchArgs& args, LLPhase phase,
                             cudaStream_t stream);
cudaError_t LaunchLLCombine(const LLComm& comm, const LLCombineArgs& args, LLPhase phase,
                            cudaStream_t stream);
cudaError_t LaunchLLDispatchCached(const LLComm& comm, const LLCachedDispatchArgs& args,
                                   cudaStream_t stream);

}  // namespace jax_ep
