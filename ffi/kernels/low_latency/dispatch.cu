// Low-latency dispatch (fused, or its send / receive halves): tokens to the
// per-expert slots of their experts' PEs, FP8-cast in the kernel when asked;
// the receive compacts them into [L, R*M] rows in (source, token) order.
// Protocol and region: low_latency/device.cuh.
#include "ffi/kernels/low_latency/device.cuh"

namespace jax_ep {
namespace {

constexpr float kFp8Max = 448.0f;      // largest finite e4m3
constexpr float kFp8MinAmax = 1e-4f;   // floor of a block's amax (no zero scales)
constexpr int64_t kMaskSmemBytes = 64 * 1024;  // largest token-mask table (else TokensBefore)

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

// ------------------------------------------------------------ routing helpers

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

// The same count from per-expert token masks in shared memory: bit t of
// s_mask[e * words + t / 32] is set when token t names e. A few popcounts
// instead of TokensBefore's pass over the earlier tokens' ids, whose serial
// loads made the send phase latency-bound.
__device__ __forceinline__ int TokensBeforeFromMasks(const uint32_t* s_mask, int64_t words,
                                                     int64_t t, int32_t e) {
  if (e < 0) return 0;
  const uint32_t* m = s_mask + e * words;
  int j = 0;
  for (int64_t w = 0; w < (t >> 5); ++w) j += __popc(m[w]);
  return j + __popc(m[t >> 5] & ((1u << (t & 31)) - 1u));
}

// Fills the masks of TokensBeforeFromMasks (E * words words) from idx [T, K]
// with the whole block; a token naming e twice sets its bit twice.
__device__ __forceinline__ void BuildTokenMasks(const int32_t* __restrict__ idx, int64_t T,
                                                int64_t K, int64_t E, int64_t words,
                                                uint32_t* s_mask) {
  for (int64_t i = threadIdx.x; i < E * words; i += blockDim.x) s_mask[i] = 0u;
  __syncthreads();
  for (int64_t q = threadIdx.x; q < T * K; q += blockDim.x) {
    const int32_t e = __ldg(idx + q);
    const int64_t t = q / K;
    if (e >= 0 && e < E) atomicOr(s_mask + e * words + (t >> 5), 1u << (t & 31));
  }
  __syncthreads();
}

// ------------------------------------------------------------ dispatch

// The rows a dispatch warp writes one token to: lane k's row in a mapped
// peer (nullptr: no expert, a PE an earlier lane writes, or reached by put)
// and the staging row of the token (nullptr: nothing goes by put).
// rows(write) calls write(row) for each.
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
// written to every row of `rows` (layout: H e4m3, H / 128 f32
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
  if (blk1 - blk0 > 2 * kU) {
    WarpPrefetchL2(src + blk0 * kLLFp8Block, (blk1 - blk0) * kLLFp8Block * sizeof(*src), lane);
  }
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
      float* scale_dst = reinterpret_cast<float*>(row + hidden);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t blk = it + 2 * u + half;
        if (blk < blk1) {
          *reinterpret_cast<uint2*>(row + blk * kLLFp8Block + l16 * 8) = q[u];
          if (l16 == 0) scale_dst[blk] = scale[u];
        }
      }
    });
  }
}

// 16-byte vectors [v0, v1) of one token row, written to the payload of every
// row of `rows`. The loop is warp-uniform (lane in the index, not the bound):
// `rows` shuffles with the full mask, which hangs when some lanes have left
// the loop (rows of fewer than 32 * kUnroll vectors, e.g. H = 128 bf16).
__device__ __forceinline__ void CopyToRows(const uint4* __restrict__ src, int64_t v0, int64_t v1,
                                           int lane, const TokenRows& rows) {
  if (v1 - v0 > 32 * kUnroll) WarpPrefetchL2(src + v0, (v1 - v0) * sizeof(uint4), lane);
  for (int64_t base = v0; base < v1; base += 32 * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + 32 * u + lane;
      if (i < v1) v[u] = __ldg(src + i);
    }
    rows([&](uint8_t* row) {
      uint4* dst = reinterpret_cast<uint4*>(row);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + 32 * u + lane;
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
  int32_t mask_words;     // words per expert of the send's token masks; 0: TokensBefore
  int64_t stride;         // row bytes in the set and the staging buffer (payload rounded to 16)
  int64_t payload_bytes;  // H * x_bytes, or H + 4 * H / 128
  int64_t ragged_rows;    // 0: recv_x / recv_scales padded; N: ragged [N, ...]
  uint8_t* recv_x;
  float* recv_scales;
  int32_t* recv_count;
  int32_t* recv_src;
  int32_t* slot;
  int32_t* token_out;
  const int32_t* token_in;
};

// The last send block: counts[b][me][*] of every PE <- scratch, then the
// done signals; scratch is zeroed for the next op of this parity.
__device__ __forceinline__ void PublishCounts(const LLComm& c, uint8_t* const* s_peer,
                                              int32_t* scratch, uint64_t n, int b, int R, int me,
                                              int64_t E) {
  const size_t counts_off = CountsOffset(c.layout, b, me, E);
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
  TracePoint(c, n, kLLTraceSignalled, kOpLLDispatch);
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) scratch[e] = 0;
}

// Padding rows: recv_src = -1 (and zeros), by every thread of the grid.
// Ragged: the zeros go to the tail, rows [total, N).
__device__ __forceinline__ void MarkPaddingRows(const DispatchParams& p, const int32_t* s_prefix,
                                                int R, int64_t L, int64_t RM, int64_t total,
                                                int64_t out_row_bytes, int64_t scale_row_bytes,
                                                int64_t gtid, int64_t gthreads) {
  for (int64_t i = gtid; i < L * RM; i += gthreads) {
    const int64_t l = i / RM;
    if (i - l * RM >= s_prefix[l * (R + 1) + R]) p.recv_src[i] = -1;
  }
  if (p.zero_fill && p.ragged_rows > 0) {
    const int64_t tail = max(p.ragged_rows - total, int64_t{0});
    GridZero(p.recv_x + total * out_row_bytes, tail * out_row_bytes, gtid, gthreads);
    if (p.use_fp8) {
      GridZero(reinterpret_cast<uint8_t*>(p.recv_scales) + total * scale_row_bytes,
               tail * scale_row_bytes, gtid, gthreads);
    }
  } else if (p.zero_fill) {
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
}

// slot[t, k] = rows of sources before me for its expert + my position.
__device__ __forceinline__ void WriteSlots(const DispatchParams& p, const int32_t* counts,
                                           const int32_t* jpos, int me, int64_t T, int64_t K,
                                           int64_t E, int64_t M, int64_t gtid, int64_t gthreads) {
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
}

// Send: one warp per (token, part of its row); the row is read (and FP8-cast)
// once and written once to each PE holding one of the token's experts, the
// token's number to the index slot of each of them; j(t, k) into jpos, the
// per-expert counts as atomicMax(j + 1) into scratch.
template <typename XElem>
__device__ __forceinline__ void SendTokens(const LLComm& c, const DispatchParams& p,
                                           uint8_t* const* s_peer, int32_t* s_expert,
                                           int32_t* s_dyn, int32_t* jpos, int32_t* scratch,
                                           size_t set_off, size_t rows_off, int R, int me,
                                           int64_t T, int64_t H, int64_t K, int64_t E, int64_t M,
                                           int64_t L, int lane, int64_t gw, int64_t W) {
  const int64_t units = p.use_fp8 ? H / kLLFp8Block : (p.vec_x ? H * p.x_bytes / 16 : 1);
  const int parts =
      c.any_put ? 1 : PartsPerRow(T, W, units, p.use_fp8 ? 8 : kPartVectors);
  int32_t* s_e = s_expert + (threadIdx.x & ~31);
  uint32_t* s_mask = reinterpret_cast<uint32_t*>(s_dyn);
  if (p.mask_words > 0 && static_cast<int64_t>(blockIdx.x) * kWarps < T * parts) {
    BuildTokenMasks(p.idx, T, K, E, p.mask_words, s_mask);
  }
  for (int64_t q = gw; q < T * parts; q += W) {
    const int64_t t = q / parts;
    const int part = static_cast<int>(q - t * parts);
    const int32_t e = ExpertOfLane(p.idx, t, K, E, lane);
    if (__ballot_sync(kFull, e >= 0) == 0u) continue;
    const int j = p.mask_words > 0 ? TokensBeforeFromMasks(s_mask, p.mask_words, t, e)
                                   : TokensBefore(p.idx, t, K, e, s_e, lane);
    int r = -1;  // the PE of this lane's expert
    if (e >= 0) {
      r = static_cast<int>(e / L);
      if (part == 0) {  // token t is my j-th for e: index[l][me][j] = t in PE r
        jpos[t * K + lane] = j;
        atomicMax(scratch + e, j + 1);
        const size_t index_off =
            set_off + static_cast<size_t>(((e - r * L) * R + me) * M + j) * 4;
        if (s_peer[r] != nullptr) {
          *reinterpret_cast<int32_t*>(s_peer[r] + index_off) = static_cast<int32_t>(t);
        } else {
          PutInt32(c.base + index_off, static_cast<int32_t>(t), r);
        }
      }
    }
    // The row goes once to each PE (to rows[me][t]), by the first lane naming it.
    bool first_of_pe = r >= 0;
    for (int k = 0; k < K; ++k) {
      const int rk = __shfl_sync(kFull, r, k);
      first_of_pe &= !(k < lane && rk == r);
    }
    const size_t off = set_off + rows_off + static_cast<size_t>(me * M + t) * p.stride;
    TokenRows rows{nullptr, 0u, nullptr};
    if (first_of_pe && s_peer[r] != nullptr) rows.lane_row = s_peer[r] + off;
    rows.mask = __ballot_sync(kFull, rows.lane_row != nullptr);
    const unsigned int put_mask = __ballot_sync(kFull, first_of_pe && rows.lane_row == nullptr);
    if (put_mask != 0u) rows.staged = StagingRow(c, t, p.stride);
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
      rows([&](uint8_t* row) { WarpCopy<false>(row, src, row_bytes, lane); });
    }
    if (put_mask != 0u) {  // one staged row, put to each PE reached by put
      __threadfence_system();
      __syncwarp();
      for (unsigned int m = put_mask; m != 0u; m &= m - 1u) {
        PutRowWarp(c.base + off, rows.staged, p.payload_bytes,
                   __shfl_sync(kFull, r, __ffs(m) - 1));
      }
    }
  }
}

// One dispatch, or one half of it (p.phase).
// Send: SendTokens, then the last block broadcasts the per-expert counts
// (PublishCounts).
// Receive: one warp per (valid received row, part), rows compacted from the
// index [l][s][j] into (s, j) order; then every thread of the grid marks (and
// zeroes) the padding rows (MarkPaddingRows) and writes slot (WriteSlots).
template <typename XElem>
struct LLDispatchKernel {
  static __device__ __forceinline__ void Run(const LLComm& c, const DispatchParams& p) {
    // Send: token masks [E][mask_words]; receive (after a barrier): [L][R + 1], then [L + 1].
    extern __shared__ int32_t s_dyn[];
    int32_t* s_prefix = s_dyn;
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
    const size_t rows_off = DispatchRowsOffset(E, M);  // in set b: int32 index, then the rows
    TracePoint(c, n, kLLTraceStart, kOpLLDispatch);

    if (p.phase != kLLRecvOnly) {
      // ---------------- send
      WriteToken(p.token_out, n);
      WaitReleased(c, n, kOpLLDispatch);  // ends with __syncthreads (s_peer ready)
      TracePoint(c, n, kLLTraceReleased, kOpLLDispatch);

      SendTokens<XElem>(c, p, s_peer, s_expert, s_dyn, jpos, scratch, set_off, rows_off, R, me, T,
                        H, K, E, M, L, lane, gw, W);

      TracePoint(c, n, kLLTraceSent, kOpLLDispatch);
      if (LastToSend(c)) PublishCounts(c, s_peer, scratch, n, b, R, me, E);
    }
    if (p.phase == kLLSendOnly) return;

    // ---------------- receive
    WaitAllDone(c, n, kOpLLDispatch);
    TracePoint(c, n, kLLTraceArrived, kOpLLDispatch);
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
    const int32_t* index = reinterpret_cast<const int32_t*>(set);
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
      const int32_t t = min(max(__ldcg(index + (l * R + s) * M + (pos - pre[s])), 0),
                            static_cast<int32_t>(M - 1));
      const uint8_t* src = set + rows_off + (s * M + t) * p.stride;
      const int64_t row = l * RM + pos;
      // Ragged: received rows are already in expert order, v is the final row.
      const int64_t out_row = p.ragged_rows > 0 ? v : row;
      if (part == 0 && lane == 0) p.recv_src[row] = static_cast<int32_t>(s * M + t);
      if (p.ragged_rows > 0 && out_row >= p.ragged_rows) continue;  // warp-uniform
      uint8_t* out = p.recv_x + out_row * out_row_bytes;
      if (p.vec_out) {
        const UnitRange range = PartOf(out_units, part, rparts);
        WarpPrefetchL2(src + range.begin * 16, (range.end - range.begin) * 16, lane);
      }
      if (part == 0) {
        if (p.use_fp8) {  // H / 128 scales (a plain loop: WarpCopy here makes the kernel spill)
          const float* scales = reinterpret_cast<const float*>(src + H);
          float* scales_out = p.recv_scales + out_row * (H / kLLFp8Block);
          for (int64_t i = lane; i < H / kLLFp8Block; i += 32) scales_out[i] = __ldcg(scales + i);
        }
      }
      if (p.vec_out) {
        const UnitRange range = PartOf(out_units, part, rparts);
        WarpCopyVecRange<true, kRowUnroll>(reinterpret_cast<uint4*>(out),
                                           reinterpret_cast<const uint4*>(src), range.begin,
                                           range.end, lane);
      } else {
        WarpCopy<true>(out, src, out_row_bytes, lane);
      }
    }
    TracePoint(c, n, kLLTraceCopied, kOpLLDispatch);
    const int64_t gtid = GlobalThread(), gthreads = GridThreads();
    MarkPaddingRows(p, s_prefix, R, L, RM, total, out_row_bytes, scale_row_bytes, gtid,
                    gthreads);
    WriteSlots(p, counts, jpos, me, T, K, E, M, gtid, gthreads);
    TracePoint(c, n, kLLTraceEnd, kOpLLDispatch);
    if (LastToReceive(c)) FinishRecv(c, s_peer, n);
  }
};

}  // namespace

int LLDispatchBlocksPerSm(const LLLayout& lay) {
  const int64_t R = lay.num_ranks, E = lay.num_experts, L = E / std::max<int64_t>(R, 1);
  const int64_t masks = E * ((lay.max_tokens + 31) / 32) * 4;
  const size_t smem = static_cast<size_t>(
      std::max(masks <= kMaskSmemBytes ? masks : int64_t{0}, (L * (R + 1) + L + 1) * 4));
  return std::min({BlocksPerSm<LLDispatchKernel<Bf16Elem>, DispatchParams>(smem),
                   BlocksPerSm<LLDispatchKernel<F16Elem>, DispatchParams>(smem),
                   BlocksPerSm<LLDispatchKernel<F32Elem>, DispatchParams>(smem)});
}

cudaError_t LaunchLLDispatch(const LLComm& comm, const LLDispatchArgs& a, LLPhase phase,
                             cudaStream_t stream) {
  const int xb = LLElemBytes(a.dtype);
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
  const LLComm c = Signed(comm, kOpLLDispatch, a.shape, xb, a.use_fp8, a.axis_index);
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
  p.ragged_rows = a.ragged_rows;
  p.recv_x = static_cast<uint8_t*>(a.recv_x);
  p.recv_scales = a.recv_scales;
  p.recv_count = a.recv_count;
  p.recv_src = a.recv_src;
  p.slot = a.slot;
  p.token_out = phase == kLLSendOnly ? a.token_out : nullptr;
  p.token_in = a.token_in;
  const int64_t L = a.shape.num_experts / comm.num_ranks;
  const int64_t words = (a.shape.num_tokens + 31) / 32;
  p.mask_words = send && a.shape.num_experts * words * 4 <= kMaskSmemBytes
                     ? static_cast<int32_t>(words) : 0;
  const size_t send_smem = static_cast<size_t>(a.shape.num_experts * p.mask_words) * 4;
  const size_t recv_smem =
      recv ? static_cast<size_t>(L * (comm.num_ranks + 1) + L + 1) * 4 : 0;
  const size_t smem = std::max(send_smem, recv_smem);
  const int grid = GridFor(comm);
  switch (a.dtype) {
    case ElemType::kBF16:
      return Launch<LLDispatchKernel<Bf16Elem>>(grid, smem, stream, c, p);
    case ElemType::kF16:
      return Launch<LLDispatchKernel<F16Elem>>(grid, smem, stream, c, p);
    case ElemType::kF32:
      return Launch<LLDispatchKernel<F32Elem>>(grid, smem, stream, c, p);
    case ElemType::kF8E4M3FN:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace jax_ep
