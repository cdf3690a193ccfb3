// Low-latency combine, streamed: the fused combine at several PEs when every
// PE runs on this GPU (LLComm::gpu_scope: peers mapped, GPU-scope flags). Not
// with puts, not gather, not the split form, and not across GPUs: those run
// the plain kernel (combine.cu). Across GPUs the per-row system-scope fence
// costs more than the early start gains (see docs/optimisation-log.md); the
// kernel's system-scope branches stay correct (tested on one GPU with the
// system_scope option) but are not launched.
//
// The plain kernel reduces after every source's done signal. Here a token is
// reduced as soon as its own rows are in:
//  - my own tokens' rows are not sent: the receive reads them from y at
//    the dispatch's slot (1/R of the rows: no copy, no second write);
//  - sends go in token-bucket order (every PE sends the rows of its early
//    tokens first, so tokens complete roughly in order everywhere);
//  - after each row its writer adds 1 to arrive[b][t] at the token's owner
//    (fence, then the add: a release);
//  - a receiving warp takes the next (token, segment) from a task counter and
//    waits until arrive[b][t] reaches the token's distinct valid experts on
//    other PEs (the rows the dispatch made there), or until every source
//    signalled done (what ends a wait whatever the ids); lanes k find the
//    token's K rows once, every lane then reduces its chunks;
//  - kEarlyRecvWarps warps per block receive from the start, the others once
//    the send tasks run out; the last send warp of the grid signals done;
//  - the last receiving block waits for every done signal (no add of op n can
//    still arrive), zeroes arrive[b] and the task counter, then releases set
//    b as the plain kernel does.
// Faster than the plain kernel because the receive starts without waiting for
// the done-signal round; see docs/optimisation-log.md for the measurements.
#include "ffi/kernels/low_latency/combine.cuh"

namespace jax_ep {
namespace {

constexpr int kStreamBuckets = 8;   // token buckets of the send order
// Warps per block that receive from the start (more slowed the send).
constexpr int kEarlyRecvWarps = 2;

__device__ __forceinline__ int TokenBucket(int32_t code, int64_t M) {
  if (code < 0) return 0;
  return static_cast<int>((code % M) * kStreamBuckets / M);
}

// A row the send copies: a valid source other than me (my own experts' rows
// stay in y, where the receive reads them).
__device__ __forceinline__ bool SentRow(int32_t code, int64_t M, int R, int me) {
  if (code < 0) return false;
  const int64_t s = code / M;
  return s < R && s != me;
}

__device__ __forceinline__ unsigned int* RecvTask(uint8_t* base) {
  return reinterpret_cast<unsigned int*>(base + kLLRecvTaskOffset);
}

// arrive[b][t] in any PE's region.
__device__ __forceinline__ size_t ArriveOffset(const LLLayout& lay, int b, int64_t t) {
  return lay.arrive_offset + (static_cast<size_t>(b) * lay.max_tokens + t) * 8;
}

// Position among expert l's rows (its `count` entries of recv_src) of the
// r-th sent row whose token is in bucket q, and its code (-1, -1 if none):
// the warp scans 32 entries at a time.
__device__ __forceinline__ int2 NthRowInBucket(const int32_t* src_l, int32_t count, int q,
                                               int64_t r, int64_t M, int R, int me, int lane) {
  for (int32_t p0 = 0; p0 < count; p0 += 32) {
    const int32_t pos = p0 + lane;
    const int32_t code = pos < count ? __ldg(src_l + pos) : -1;
    const unsigned hits = __ballot_sync(kFull, SentRow(code, M, R, me) && TokenBucket(code, M) == q);
    const int n = __popc(hits);
    if (r < n) {
      const int from = static_cast<int>(__fns(hits, 0, static_cast<int>(r) + 1));
      return make_int2(p0 + from, __shfl_sync(kFull, code, from));
    }
    r -= n;
  }
  return make_int2(-1, -1);
}

// The warp waits until token t's rows are all in (arrive >= its distinct
// valid experts on other PEs) or every source signalled op n done.
__device__ __forceinline__ void WaitTokenRows(const LLComm& c, const CombineParams& p,
                                              const uint64_t* arrive, int64_t t, uint64_t n,
                                              int lane) {
  const int64_t K = p.s.top_k, E = p.s.num_experts;
  const int32_t e = lane < K ? __ldg(p.idx + t * K + lane) : -1;
  const bool valid = e >= 0 && e < E && (e < p.e0 || e >= p.e0 + p.num_local);
  const unsigned same = __match_any_sync(kFull, valid ? e : -1 - lane);
  const uint64_t expected = __popc(__ballot_sync(kFull, valid && __ffs(same) - 1 == lane));
  const bool gpu = c.gpu_scope != 0;
  uint64_t start = 0;
  for (uint32_t spins = 0;; ++spins) {
    const uint64_t seen = lane == 0 ? LoadAcquire(arrive, gpu) : 0;
    if (__shfl_sync(kFull, seen >= expected, 0)) break;
    int missing = -1;  // a source whose done signal of op n this lane has not seen
    uint64_t signal = 0;
    for (int r = lane; r < c.num_ranks && missing < 0; r += 32) {
      const uint64_t* flag = reinterpret_cast<const uint64_t*>(c.base + DoneOffset(n & 1, r));
      signal = LoadAcquire(flag, gpu);
      if ((signal >> 4) < n) missing = r;
    }
    const unsigned waiting = __ballot_sync(kFull, missing >= 0);
    if (waiting == 0u) break;
    if (spins == 0) start = GlobalTimerNs();
    if (spins >= 16) __nanosleep(64);
    if (GlobalTimerNs() - start > c.timeout_ns) {
      const int from = __ffs(waiting) - 1;
      if (lane == from) {
        RecordTimeoutAndTrap(c.timeout_record, c.rank, kOpLLCombine, kWaitLLData, missing,
                             c.timeout_ns, n, signal);
      }
    }
  }
  __syncwarp();  // the lanes' row loads after lane 0's acquire
}

// Channels `range` of token t: lane k < K finds row k once (my own
// experts' rows in y at the dispatch's slot, the others in the set), every
// lane takes the K pointers, then sums its chunks in k order. K > kKChunk:
// ReduceChunk per chunk.
template <typename Elem, int kNE>
__device__ __forceinline__ void ReduceTokenRange(const CombineParams& p, const uint8_t* set,
                                                 int64_t t, UnitRange range, int lane,
                                                 const int32_t* y_start) {
  using V = typename VecOf<kNE * sizeof(typename Elem::Raw)>::Type;
  const int64_t K = p.s.top_k, E = p.s.num_experts;
  if (K > kKChunk) {
    for (int64_t ch = range.begin + lane; ch < range.end; ch += 32) {
      if (ch + 32 < range.end) PrefetchRows<V, true>(p, set, t, ch + 32, y_start);
      ReduceChunk<Elem, kNE, true>(p, set, t, ch, y_start);
    }
    return;
  }
  const V* mine = nullptr;
  float w_mine = 0.0f;
  if (lane < K) {
    const int32_t e = __ldg(p.idx + t * K + lane);
    if (e >= 0 && e < E) {
      mine = RowOf<true, V>(p, set, e, t, t * K + lane, y_start);
      w_mine = __ldg(p.w + t * K + lane);
    }
  }
  const V* rows[kKChunk];
  float w[kKChunk];
  bool ok[kKChunk];
#pragma unroll
  for (int u = 0; u < kKChunk; ++u) {
    rows[u] = reinterpret_cast<const V*>(
        __shfl_sync(kFull, reinterpret_cast<unsigned long long>(mine), u));
    w[u] = __shfl_sync(kFull, w_mine, u);
    ok[u] = rows[u] != nullptr;
  }
  for (int64_t ch = range.begin + lane; ch < range.end; ch += 32) {
    if (ch + 32 < range.end) {
#pragma unroll
      for (int u = 0; u < kKChunk; ++u) {
        if (ok[u]) asm volatile("prefetch.global.L2 [%0];" ::"l"(rows[u] + ch + 32));
      }
    }
    V v[kKChunk];
#pragma unroll
    for (int u = 0; u < kKChunk; ++u) {
      v[u] = ok[u] ? LoadVec<true>(rows[u] + ch) : V{};  // V{}: no value carried across chunks
    }
    float acc[kNE];
#pragma unroll
    for (int i = 0; i < kNE; ++i) acc[i] = 0.0f;
    AddWeightedRows<Elem, kNE>(v, w, ok, acc);
    StoreOutChunk<Elem, kNE>(p, t, ch, acc);
  }
}

template <typename Elem, int kNE>
struct LLStreamedCombineKernel {
  static __device__ __forceinline__ void Run(const LLComm& c, const CombineParams& p) {
    extern __shared__ int32_t s_mem[];  // s_base[L + 1], s_hist[Q * L], s_qbase[Q * L + 1]
    __shared__ uint8_t* s_peer[kLLMaxRanks];

    const LLLayout& lay = c.layout;
    const int R = c.num_ranks;
    const int me = c.rank;
    const int64_t H = p.s.hidden, E = p.s.num_experts, M = p.s.max_tokens, T = p.s.num_tokens;
    const int64_t L = E / R;
    const int64_t RM = R * M;
    const int64_t QL = kStreamBuckets * L;
    const int lane = threadIdx.x & 31;
    const bool gpu = c.gpu_scope != 0;
    LoadPeers(c, s_peer);

    const uint64_t n = StartOp(c);
    const int b = static_cast<int>(n & 1);
    const size_t set_off = SetOffset(lay, b);
    TracePoint(c, n, kLLTraceStart, kOpLLCombine);
    WaitReleased(c, n, kOpLLCombine);
    TracePoint(c, n, kLLTraceReleased, kOpLLCombine);

    // Send order: bucket-major, then expert, then row (s_qbase over [q][l]);
    // rows from my own tokens are not sent.
    int32_t* s_base = s_mem;
    int32_t* s_hist = s_base + L + 1;
    int32_t* s_qbase = s_hist + QL;
    for (int64_t i = threadIdx.x; i < QL; i += blockDim.x) s_hist[i] = 0;
    RowBases(p.recv_count, L, static_cast<int32_t>(RM), s_base);
    const int64_t total = s_base[L];
    const bool ragged = p.ragged_rows > 0;  // y's rows start at s_base[l]
    for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
      const int l = UpperIndex(s_base, static_cast<int>(L), static_cast<int32_t>(i));
      const int32_t code = __ldg(p.recv_src + l * RM + (i - s_base[l]));
      if (SentRow(code, M, R, me)) atomicAdd(&s_hist[TokenBucket(code, M) * L + l], 1);
    }
    __syncthreads();
    BlockExclusiveScan(QL, [&](int64_t j) { return s_hist[j]; }, s_qbase);
    const int64_t sent = s_qbase[QL];

    if ((threadIdx.x >> 5) < kWarps - kEarlyRecvWarps) {
      // ---------------- send: my experts' rows, early tokens first
      const int64_t row_bytes = H * p.y_bytes;
      for (int64_t task = NextWarpTask(SendTask(c.base), lane); task < sent;
           task = NextWarpTask(SendTask(c.base), lane)) {
        const int ql = UpperIndex(s_qbase, static_cast<int>(QL), static_cast<int32_t>(task));
        const int q = ql / static_cast<int>(L);
        const int l = ql - q * static_cast<int>(L);
        const int2 row = NthRowInBucket(p.recv_src + l * RM, s_base[l + 1] - s_base[l], q,
                                        task - s_qbase[ql], M, R, me, lane);
        if (row.y < 0) continue;
        const int s = row.y / static_cast<int32_t>(M);
        const int64_t t = row.y - static_cast<int64_t>(s) * M;
        const int64_t e = static_cast<int64_t>(me) * L + l;
        uint8_t* dst = s_peer[s] + set_off + CombineSetRow(e, t, E) * p.stride;
        // A ragged row past the end of y goes back as zeros (its token waits for it).
        const int64_t y_row = ragged ? s_base[l] + row.x : l * RM + row.x;
        const uint8_t* src = p.y + y_row * row_bytes;
        if (!ragged || y_row < p.ragged_rows) {
          WarpPrefetchL2(src, row_bytes, lane);
          WarpCopyVecRange<false, kRowUnroll>(reinterpret_cast<uint4*>(dst),
                                              reinterpret_cast<const uint4*>(src), 0,
                                              row_bytes / 16, lane);
        } else {
          WarpZero(dst, row_bytes, lane);
        }
        __syncwarp();
        if (lane == 0) {
          Fence(gpu);
          auto* count = reinterpret_cast<unsigned long long*>(s_peer[s] + ArriveOffset(lay, b, t));
          if (gpu) {
            atomicAdd(count, 1ull);
          } else {
            atomicAdd_system(count, 1ull);
          }
        }
      }
      TracePoint(c, n, kLLTraceSent, kOpLLCombine);
      // The last send warp of the grid signals done (as FinishSend, per warp).
      __syncwarp();
      bool last = false;
      if (lane == 0) {
        Fence(gpu);
        const unsigned int send_warps = gridDim.x * (kWarps - kEarlyRecvWarps);
        last = atomicAdd(SendArrive(c.base), 1u) == send_warps - 1;
        if (last) Fence(gpu);
      }
      if (__shfl_sync(kFull, last, 0)) {
        __syncwarp();
        PublishDone(c, s_peer, n, kOpLLCombine, lane, 32);
      }
    }

    // ---------------- receive: my tokens in order, each once its rows are in
    TracePoint(c, n, kLLTraceArrived, kOpLLCombine);
    const uint8_t* set = c.base + set_off;
    const uint64_t* arrive = reinterpret_cast<const uint64_t*>(c.base + ArriveOffset(lay, b, 0));
    const int64_t chunks = H / kNE;
    const int64_t segs = max(int64_t{1}, min((GridWarps() + T - 1) / max(T, int64_t{1}),
                                             (chunks + 31) / 32));
    for (int64_t unit = NextWarpTask(RecvTask(c.base), lane); unit < T * segs;
         unit = NextWarpTask(RecvTask(c.base), lane)) {
      const int64_t t = unit / segs;
      WaitTokenRows(c, p, arrive + t, t, n, lane);
      const UnitRange range = PartOf(chunks, static_cast<int>(unit - t * segs), static_cast<int>(segs));
      ReduceTokenRange<Elem, kNE>(p, set, t, range, lane, ragged ? s_base : nullptr);
    }
    TracePoint(c, n, kLLTraceCopied, kOpLLCombine);
    TracePoint(c, n, kLLTraceEnd, kOpLLCombine);
    if (LastToReceive(c)) {
      WaitAllDone(c, n, kOpLLCombine);
      uint64_t* mine = reinterpret_cast<uint64_t*>(c.base + ArriveOffset(lay, b, 0));
      for (int64_t t = threadIdx.x; t < M; t += blockDim.x) mine[t] = 0;
      if (threadIdx.x == 0) *reinterpret_cast<volatile unsigned int*>(RecvTask(c.base)) = 0u;
      __syncthreads();
      FinishRecv(c, s_peer, n);
    }
  }
};

}  // namespace

int LLStreamedCombineBlocksPerSm(const LLLayout& lay) {
  const int64_t L = lay.num_experts / std::max(lay.num_ranks, 1);
  const size_t smem = static_cast<size_t>(L + 2 + 2 * kStreamBuckets * L) * 4;
  if (smem > 96 * 1024) return 1 << 30;  // the plain combine runs instead
  return std::min({BlocksPerSm<LLStreamedCombineKernel<Bf16Elem, 8>, CombineParams>(smem),
                   BlocksPerSm<LLStreamedCombineKernel<F16Elem, 8>, CombineParams>(smem),
                   BlocksPerSm<LLStreamedCombineKernel<F32Elem, 4>, CombineParams>(smem)});
}

size_t LLStreamedCombineSmem(const LLComm& comm, const LLCombineArgs& a, LLPhase phase, bool vec) {
  // The receive reads my own experts' rows from y at the dispatch's slot.
  const bool y_rows = reinterpret_cast<uintptr_t>(a.y) % 16 == 0 &&
                      (a.slot != nullptr || a.shape.num_tokens == 0);
  if (!comm.stream_combine || phase != kLLFused || a.gather || !vec || !y_rows) {
    return 0;
  }
  const int64_t L = a.shape.num_experts / comm.num_ranks;
  const size_t smem = static_cast<size_t>(L + 2 + 2 * kStreamBuckets * L) * 4;
  return smem <= 96 * 1024 ? smem : 0;
}

cudaError_t LaunchLLStreamedCombine(const LLComm& comm, const CombineParams& p, ElemType dtype,
                                    size_t smem, cudaStream_t stream) {
  const int grid = GridFor(comm);
  switch (dtype) {
    case ElemType::kBF16:
      return Launch<LLStreamedCombineKernel<Bf16Elem, 8>>(grid, smem, stream, comm, p);
    case ElemType::kF16:
      return Launch<LLStreamedCombineKernel<F16Elem, 8>>(grid, smem, stream, comm, p);
    case ElemType::kF32:
      return Launch<LLStreamedCombineKernel<F32Elem, 4>>(grid, smem, stream, comm, p);
    case ElemType::kF8E4M3FN:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace jax_ep
