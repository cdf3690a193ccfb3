// Internode (NVLink + RDMA) dispatch and combine over NVSHMEM: interface for
// host code. Plain C++ types only; the FFI handlers (ffi/handlers/internode.cc)
// fill these structs from XLA buffers, the runtime
// (ffi/runtime/internode_runtime.*) owns the symmetric region. The protocol
// and the region are described at the top of internode.cu; the semantics
// (the node tree of combine) in docs/design.md §2.16, the plan in §5b.
//
// Notation: R ranks (= NVSHMEM PEs), G ranks per node, N = R / G nodes;
// rank r = n * G + g (node n, local index g); me = (n_me, g_me). A token
// crosses to node n' once, to its relay (n', g_me), which forwards it over
// NVLink to every rank of n' holding one of its experts.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "ffi/kernels/common/elem_type.h"
#include "ffi/kernels/common/live_check.h"
#include "ffi/kernels/common/timeout_record.h"

namespace jax_ep {

inline constexpr int kInternodeMaxRanks = 64;
inline constexpr int kInternodeMaxParts = 8;
// Flags are laid out for this many blocks per kernel (num_blocks is capped to it).
inline constexpr int kInternodeMaxBlocks = 128;
inline constexpr int64_t kInternodeMaxTokens = int64_t{1} << 20;

// Which op / which wait (TimeoutRecord fields; messages in internode_runtime.cc).
enum InternodeOp : int32_t {
  kOpInternodeDispatch = 0,
  kOpInternodeDispatchCached = 1,
  kOpInternodeCombine = 2,
};
enum InternodeWait : int32_t {
  kWaitInternodeBarrier = 0,    // peer's notify (counts / barrier) of this op
  kWaitInternodeRelayRows = 1,  // dispatch rows from source rank `peer` (sent to me as relay)
  kWaitInternodeForwarded = 2,  // rows relayed to me by rank `peer` (a rank of my node)
  kWaitInternodeCombineRows = 3,  // combine rows from rank `peer` of my node (I relay them)
  kWaitInternodePartials = 4,   // node partial sums from relay `peer`
  kWaitInternodeSignature = 5,  // not a wait: rank `peer` runs another op or other shapes
  kWaitInternodeRankOrder = 6,  // not a wait: the call's EP axis index is not the rank
};

// An op signature (what every rank's call must agree on; compared in the
// notify kernel before any row moves):
//   [0] op | num_parts << 8 | dtype << 16 (ElemType of a combine's y, 0xff
//       for a dispatch) | num_blocks << 32   [1] capacity   [2] num_tokens
//   [3] bytes of a message (dispatch) or combine row   [4] the call's EP axis
//   index (not compared between ranks; must equal the rank)   [5] ranks per node
inline constexpr int kInternodeSignatureAxisIndex = 4;

// The symmetric region (same on every PE; byte offsets from its base).
// Data areas hold rows of `stride` bytes, M = max_tokens rows per block:
//   area_a [N][M]  dispatch: my staged messages per destination node
//                  combine:  my node partial sums per source node (relay side)
//   area_b [N][M]  dispatch: messages from source (n, g_me) (relay side)
//                  combine:  partial sums from relay (n', g_me) (source side)
//   area_c [R][M]  dispatch: messages forwarded to me, [source rank][slot]
//                  combine:  rows for me to reduce, [g'][source node][slot]
struct InternodeLayout {
  int32_t num_ranks = 0;
  int32_t ranks_per_node = 0;
  int32_t num_nodes = 0;
  int64_t max_tokens = 0;   // M
  int64_t stride = 0;       // bytes of the largest row, multiple of 16
  size_t epoch_offset = 0;      // u64 ops this PE started (owner only)
  size_t arrive_offset = 0;     // u32 [4] last-block counters (owner only)
  // A notify record: i32 [R + N] (sent ++ node_sent, dispatch only), padded
  // to 8 bytes, then u64 [W] (the op signature).
  size_t record_bytes = 0;
  size_t outbox_offset = 0;     // my record of the op in flight (the put's source)
  size_t barrier_offset = 0;    // u64 [R]: barrier[s] = last op s announced
  size_t records_offset = 0;    // [2][R] records: [e & 1][s] = rank s's record of op e
  size_t relay_flag_offset = 0;    // u64 [N][B]: chunk b of source (n, g_me) is in area_b
  size_t forward_flag_offset = 0;  // u64 [R][B]: relay block b forwarded source s's rows to me
  size_t combine_flag_offset = 0;  // u64 [G]: rank (n_me, g') wrote its combine rows to me
  size_t partial_flag_offset = 0;  // u64 [N][B]: relay (n', g_me) block b sent me partials
  size_t area_a_offset = 0, area_b_offset = 0, area_c_offset = 0;
  size_t total_bytes = 0;
};

// The layout for these maxima: message rows of up to `message_bytes`
// (round16(4 G) of slots + the payloads, each rounded to 16) and combine
// rows of up to `combine_row_bytes`.
InternodeLayout MakeInternodeLayout(int num_ranks, int ranks_per_node, int64_t max_tokens,
                                    int64_t message_bytes, int64_t combine_row_bytes);

// Bytes of a message row carrying payload rows of these sizes.
int64_t InternodeMessageBytes(int ranks_per_node, const int64_t* row_bytes, int num_parts);

struct InternodeComm {
  uint8_t* base;                 // my region
  uint8_t* const* node_peers;    // device array [G]: region of rank (n_me, g') mapped here
  InternodeLayout layout;
  int32_t rank;
  int32_t num_blocks;            // grid of the data kernels, 1 .. kInternodeMaxBlocks
  TimeoutRecord* timeout_record;
  uint64_t timeout_ns;
  LiveCheck live;                // the notify kernel stops if shutdown freed these buffers
};

struct InternodePart {
  const void* src;    // [T, row_bytes]
  void* dst;          // [capacity, row_bytes] (XLA result)
  int64_t row_bytes;
};

struct InternodeDispatchArgs {
  const int32_t* axis_index;   // []
  const int32_t* slot;         // [T, R] position of t among my tokens to rank r (cached: post-drop), or -1
  const int32_t* node_slot;    // [T, N] position of t among my tokens to node n, or -1
  const int32_t* sent;         // [R] my tokens per rank; nullptr = cached dispatch
  const int32_t* node_sent;    // [N] my tokens per node; nullptr = cached dispatch
  int32_t* rank_counts;        // [R, R] written unless cached, else read
  int32_t* relay_pos;          // [N, T, G] written unless cached (nullptr then)
  const int32_t* relay_rows;   // [N] of the handle (cached); nullptr: from the counts
  int32_t* relay_rows_out;     // [N] written unless cached
  int64_t num_tokens;
  int64_t capacity;
  int32_t num_parts;
  InternodePart parts[kInternodeMaxParts];
};

struct InternodeCombineArgs {
  const int32_t* axis_index;   // []
  const void* y;               // [capacity, hidden]
  const int32_t* node_slot;    // [T, N]
  const int32_t* rank_counts;  // [R, R]
  const int32_t* relay_pos;    // [N, T, G]
  const int32_t* relay_rows;   // [N]
  void* out;                   // [T, hidden]
  int64_t num_tokens;
  int64_t capacity;
  int64_t hidden;
  ElemType dtype;              // bf16 | f16 | f32
};

// Blocks of the internode kernels one SM holds at once (the least over them).
int InternodeBlocksPerSm();

// Enqueue the op's kernels on `stream` (notify, send, forward / reduce,
// receive); no host synchronisation. cudaErrorInvalidValue for parameters
// outside the limits (the handlers check them first with better messages).
cudaError_t LaunchInternodeDispatch(const InternodeComm& comm, const InternodeDispatchArgs& args,
                                    cudaStream_t stream);
cudaError_t LaunchInternodeCombine(const InternodeComm& comm, const InternodeCombineArgs& args,
                                   cudaStream_t stream);

}  // namespace jax_ep
