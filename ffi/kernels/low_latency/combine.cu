// Low-latency combine and gather (fused, or send / receive halves): expert
// rows back to their source tokens, reduced with fp32 weights in k order
// (combine) or returned per (token, k) (gather, for gradients). The fused
// combine at several PEs all on this GPU runs the streamed kernel instead
// (combine_streamed.cu). At one PE the fused ops move no
// rows: there is no send phase and the receive reads them straight from y at
// the token's slot (not the split form, whose receive does not hold y:
// keeping y alive through the overlap would cost its memory). At several PEs
// this kernel still sends a PE's rows to itself: reading them from y instead
// made it slower, for reasons not understood (the streamed kernel, which finds
// its row pointers once per token, does read them from y; see
// docs/optimisation-log.md). Protocol and region: low_latency/device.cuh.
#include "ffi/kernels/low_latency/combine.cuh"

namespace jax_ep {
namespace {

// The plain receive: one thread per (token, kNE channels), the rows of the
// thread's next item prefetched into L2 first (at 8 PEs on one GPU a thread
// reduces ~14 items one after the other).
template <typename Elem, int kNE, bool kSelfRows>
__device__ __forceinline__ void CombineReduceItems(const CombineParams& p, const uint8_t* set,
                                                   int64_t gtid, int64_t gthreads,
                                                   const int32_t* y_start) {
  using V = typename VecOf<kNE * sizeof(typename Elem::Raw)>::Type;
  const int64_t chunks = p.s.hidden / kNE;
  const int64_t items = p.s.num_tokens * chunks;
  for (int64_t item = gtid; item < items; item += gthreads) {
    if (item + gthreads < items) {
      const int64_t t_next = (item + gthreads) / chunks;
      PrefetchRows<V, kSelfRows>(p, set, t_next, item + gthreads - t_next * chunks, y_start);
    }
    const int64_t t = item / chunks;
    ReduceChunk<Elem, kNE, kSelfRows>(p, set, t, item - t * chunks, y_start);
  }
}

template <typename Elem, int kNE, bool kSelfRows>
__device__ __forceinline__ void GatherRows(const CombineParams& p, const uint8_t* set,
                                           int64_t gtid, int64_t gthreads,
                                           const int32_t* y_start) {
  using Raw = typename Elem::Raw;
  using V = typename VecOf<kNE * sizeof(Raw)>::Type;
  const int64_t T = p.s.num_tokens, H = p.s.hidden, K = p.s.top_k, E = p.s.num_experts;
  const int64_t chunks = H / kNE;
  const int64_t items = T * K * chunks;
  for (int64_t item = gtid; item < items; item += gthreads) {
    const int64_t tk = item / chunks;
    const int64_t c = item - tk * chunks;
    const int64_t t = tk / K;
    const int32_t e = __ldg(p.idx + tk);
    const V* row = e >= 0 && e < E ? RowOf<kSelfRows, V>(p, set, e, t, tk, y_start) : nullptr;
    V v{};
    if (row != nullptr) v = LoadVec<true>(row + c);
    reinterpret_cast<V*>(p.out + tk * H * sizeof(Raw))[c] = v;
  }
}

template <typename Elem, int kNE, bool kSelfRows>
struct LLCombineKernel {
  static __device__ __forceinline__ void Run(const LLComm& c, const CombineParams& p) {
    extern __shared__ int32_t s_base[];  // [L + 1] (send; fused at one PE with a ragged y)
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
    TracePoint(c, n, kLLTraceStart, op);

    // One PE, fused (kSelfRows): every row stays in y, so there is nothing to
    // send or to wait for; the op still waits for its set's release (the same
    // ordering errors time out as at several PEs), counts and signals (end).
    if (kSelfRows) WaitReleased(c, n, op);
    const bool ragged = p.ragged_rows > 0;
    if (kSelfRows && ragged) RowBases(p.recv_count, L, static_cast<int32_t>(RM), s_base);
    if (!kSelfRows && p.phase != kLLRecvOnly) {
      // ---------------- send: expert rows back to their source tokens
      WriteToken(p.token_out, n);
      WaitReleased(c, n, op);
      TracePoint(c, n, kLLTraceReleased, op);
      RowBases(p.recv_count, L, static_cast<int32_t>(RM), s_base);
      const int64_t total = s_base[L];
      const int64_t row_bytes = H * p.y_bytes;
      const int64_t units = p.vec_y ? row_bytes / 16 : 1;
      const int parts = (c.any_put || !p.vec_y) ? 1 : PartsPerRow(total, W, units, kPartVectors);
      for (int64_t task = NextWarpTask(SendTask(c.base), lane); task < total * parts;
           task = NextWarpTask(SendTask(c.base), lane)) {
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
        const size_t off = set_off + static_cast<size_t>(CombineSetRow(e, t, E)) * p.stride;
        // Ragged: i is the row (s_base is the exclusive prefix of the counts);
        // a row past the end of y goes back as zeros (the receiver reads it).
        const bool have = !ragged || i < p.ragged_rows;
        const uint8_t* src = p.y + (ragged ? i : l * RM + pos) * row_bytes;
        uint8_t* mapped = s_peer[s];
        if (mapped != nullptr && parts > 1) {
          const UnitRange range = PartOf(units, part, parts);
          if (have) {
            WarpPrefetchL2(src + range.begin * 16, (range.end - range.begin) * 16, lane);
            WarpCopyVecRange<false>(reinterpret_cast<uint4*>(mapped + off),
                                    reinterpret_cast<const uint4*>(src), range.begin, range.end,
                                    lane);
          } else {
            WarpZero(mapped + off + range.begin * 16, (range.end - range.begin) * 16, lane);
          }
        } else if (mapped != nullptr) {
          if (have) {
            WarpPrefetchL2(src, row_bytes, lane);
            WarpCopy<false>(mapped + off, src, row_bytes, lane);
          } else {
            WarpZero(mapped + off, row_bytes, lane);
          }
        } else if (i < p.send_rows) {
          uint8_t* staged = StagingRow(c, i, p.stride);
          if (have) {
            WarpCopy<false>(staged, src, row_bytes, lane);
          } else {
            WarpZero(staged, row_bytes, lane);
          }
          PutStagedRow(c, off, staged, row_bytes, s);
        }
      }
      TracePoint(c, n, kLLTraceSent, op);
      if (LastToSend(c)) {
        FinishSend(c, s_peer, n, op);
        TracePoint(c, n, kLLTraceSignalled, op);
      }
    }
    if (p.phase == kLLSendOnly) return;

    // ---------------- receive: my tokens' rows, reduced in k order
    if (!kSelfRows) WaitAllDone(c, n, op);
    TracePoint(c, n, kLLTraceArrived, op);
    const uint8_t* set = c.base + set_off;
    const int64_t gtid = GlobalThread(), gthreads = GridThreads();
    const int32_t* y_start = kSelfRows && ragged ? s_base : nullptr;
    if (p.gather) {
      GatherRows<Elem, kNE, kSelfRows>(p, set, gtid, gthreads, y_start);
    } else {
      CombineReduceItems<Elem, kNE, kSelfRows>(p, set, gtid, gthreads, y_start);
    }
    TracePoint(c, n, kLLTraceCopied, op);
    TracePoint(c, n, kLLTraceEnd, op);
    if (LastToReceive(c)) {
      if (kSelfRows) FinishSend(c, s_peer, n, op);  // done signal + op counter, after every block started
      FinishRecv(c, s_peer, n);
    }
  }
};

template <typename Elem, int kNE>
cudaError_t LaunchCombine(bool self_rows, int grid, size_t smem, cudaStream_t stream,
                          const LLComm& comm, const CombineParams& p) {
  return self_rows ? Launch<LLCombineKernel<Elem, kNE, true>>(grid, smem, stream, comm, p)
                   : Launch<LLCombineKernel<Elem, kNE, false>>(grid, smem, stream, comm, p);
}

}  // namespace

int LLCombineBlocksPerSm(const LLLayout& lay) {
  const size_t smem = static_cast<size_t>(lay.num_experts / std::max(lay.num_ranks, 1) + 1) * 4;
  return std::min({BlocksPerSm<LLCombineKernel<Bf16Elem, 16, true>, CombineParams>(smem),
                   BlocksPerSm<LLCombineKernel<Bf16Elem, 8, false>, CombineParams>(smem),
                   BlocksPerSm<LLCombineKernel<Bf16Elem, 1, false>, CombineParams>(smem),
                   BlocksPerSm<LLCombineKernel<F16Elem, 8, false>, CombineParams>(smem),
                   BlocksPerSm<LLCombineKernel<F32Elem, 4, false>, CombineParams>(smem),
                   BlocksPerSm<LLCombineKernel<F32Elem, 1, true>, CombineParams>(smem)});
}

cudaError_t LaunchLLCombine(const LLComm& comm, const LLCombineArgs& a, LLPhase phase,
                            cudaStream_t stream) {
  const int yb = LLElemBytes(a.dtype);
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
  const LLComm c = Signed(comm, a.gather ? kOpLLGather : kOpLLCombine, a.shape, yb, false,
                          a.axis_index);
  p.s = a.shape;
  p.gather = a.gather;
  p.phase = phase;
  p.y_bytes = yb;
  p.stride = LLPlainRowStride(a.shape.hidden, yb);
  p.send_rows = p.stride > 0 ? static_cast<int64_t>(comm.layout.send_bytes) / p.stride : 0;
  p.vec_y = (a.shape.hidden * yb) % 16 == 0 && reinterpret_cast<uintptr_t>(a.y) % 16 == 0;
  p.y = static_cast<const uint8_t*>(a.y);
  p.ragged_rows = a.ragged_rows;
  p.recv_src = a.recv_src;
  p.recv_count = a.recv_count;
  p.idx = a.topk_idx;
  p.w = a.topk_weights;
  p.slot = a.slot;
  p.num_local = a.shape.num_experts / comm.num_ranks;
  p.e0 = static_cast<int64_t>(comm.rank) * p.num_local;
  p.expert_rows = comm.num_ranks * a.shape.max_tokens;
  p.out = static_cast<uint8_t*>(a.out);
  p.token_out = phase == kLLSendOnly ? a.token_out : nullptr;
  p.token_in = a.token_in;
  const int64_t L = a.shape.num_experts / comm.num_ranks;
  const size_t smem = send ? static_cast<size_t>(L + 1) * 4 : 0;
  const int grid = GridFor(comm);
  // One PE, fused: rows of my own experts are read from y (kSelfRows, RowOf).
  const bool one = comm.num_ranks == 1 && phase == kLLFused;
  if (one && a.shape.num_tokens > 0 && a.slot == nullptr) return cudaErrorInvalidValue;
  // 16-byte chunks when every row the receive reads and the output are 16-byte aligned.
  const bool vec = (a.shape.hidden * yb) % 16 == 0 &&
                   ((reinterpret_cast<uintptr_t>(a.out) % 16 == 0 &&
                     (!one || reinterpret_cast<uintptr_t>(a.y) % 16 == 0)) || !recv);
  const size_t stream_smem = LLStreamedCombineSmem(comm, a, phase, vec);
  if (stream_smem > 0) return LaunchLLStreamedCombine(c, p, a.dtype, stream_smem, stream);
  switch (a.dtype) {
    case ElemType::kBF16:
      // One PE, fused: 16 channels (two 16-byte loads per row) per thread,
      // faster there; at several PEs the same width spilled registers in the
      // send and was slower (see docs/optimisation-log.md).
      if (one && vec && a.shape.hidden % 16 == 0) {
        return Launch<LLCombineKernel<Bf16Elem, 16, true>>(grid, smem, stream, c, p);
      }
      return vec ? LaunchCombine<Bf16Elem, 8>(one, grid, smem, stream, c, p)
                 : LaunchCombine<Bf16Elem, 1>(one, grid, smem, stream, c, p);
    case ElemType::kF16:
      return vec ? LaunchCombine<F16Elem, 8>(one, grid, smem, stream, c, p)
                 : LaunchCombine<F16Elem, 1>(one, grid, smem, stream, c, p);
    case ElemType::kF32:
      return vec ? LaunchCombine<F32Elem, 4>(one, grid, smem, stream, c, p)
                 : LaunchCombine<F32Elem, 1>(one, grid, smem, stream, c, p);
    case ElemType::kF8E4M3FN:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace jax_ep
