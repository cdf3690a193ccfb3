// Low-latency cached dispatch: rows (optionally scaled per (token, expert))
// straight to the slots a previous dispatch assigned; the backward of
// combine. Protocol and region: low_latency/device.cuh.
#include "ffi/kernels/low_latency/device.cuh"

namespace jax_ep {
namespace {


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
  int64_t ragged_rows;  // 0: out padded [L, R*M, H]; N: out ragged [N, H]
  uint8_t* out;
};

template <typename XElem>
struct LLCachedDispatchKernel {
  static __device__ __forceinline__ void Run(const LLComm& c, const CachedParams& p) {
    extern __shared__ int32_t s_base[];  // [L + 1] with a ragged out
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
      const int32_t e = __shfl_sync(kFull, ExpertOfLane(p.idx, t, K, E, lane), k);
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
    if (LastToSend(c)) {
      FinishSend(c, s_peer, n, kOpLLDispatchCached);
    }

    // ---------------- receive: rows [0, count) of each local expert, zeros after
    WaitAllDone(c, n, kOpLLDispatchCached);
    const uint8_t* set = c.base + set_off;
    if (p.ragged_rows > 0) {  // the experts' rows one after the other, then the zero tail
      RowBases(p.recv_count, L, static_cast<int32_t>(RM), s_base);
      const int64_t total = s_base[L];
      for (int64_t v = gw; v < p.ragged_rows; v += W) {
        uint8_t* out = p.out + v * row_bytes;
        if (v < total) {
          const int l = UpperIndex(s_base, static_cast<int>(L), static_cast<int32_t>(v));
          WarpCopy<true>(out, set + (l * RM + v - s_base[l]) * p.stride, row_bytes, lane);
        } else if (p.zero_fill) {
          WarpZero(out, row_bytes, lane);
        }
      }
      if (LastToReceive(c)) FinishRecv(c, s_peer, n);
      return;
    }
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
    if (LastToReceive(c)) FinishRecv(c, s_peer, n);
  }
};

}  // namespace

int LLCachedDispatchBlocksPerSm(const LLLayout& lay) {
  const size_t smem = static_cast<size_t>(lay.num_experts / std::max(lay.num_ranks, 1) + 1) * 4;
  return std::min({BlocksPerSm<LLCachedDispatchKernel<Bf16Elem>, CachedParams>(smem),
                   BlocksPerSm<LLCachedDispatchKernel<F16Elem>, CachedParams>(smem),
                   BlocksPerSm<LLCachedDispatchKernel<F32Elem>, CachedParams>(smem)});
}

cudaError_t LaunchLLDispatchCached(const LLComm& comm, const LLCachedDispatchArgs& a,
                                   cudaStream_t stream) {
  const int xb = LLElemBytes(a.dtype);
  if (xb == 0 || LLCheckCachedDispatch(comm, a.shape, xb) != nullptr) return cudaErrorInvalidValue;
  const bool tokens = a.shape.num_tokens > 0;  // zero-sized XLA buffers may be null
  if ((tokens && (a.x == nullptr || a.topk_idx == nullptr || a.slot == nullptr)) ||
      a.recv_count == nullptr || a.out == nullptr) {
    return cudaErrorInvalidValue;
  }
  CachedParams p{};
  const LLComm c = Signed(comm, kOpLLDispatchCached, a.shape, xb, false, a.axis_index);
  p.s = a.shape;
  p.x_bytes = xb;
  p.zero_fill = a.zero_fill;
  p.stride = LLPlainRowStride(a.shape.hidden, xb);
  p.x = static_cast<const uint8_t*>(a.x);
  p.idx = a.topk_idx;
  p.slot = a.slot;
  p.scale = a.scale;
  p.recv_count = a.recv_count;
  p.ragged_rows = a.ragged_rows;
  p.out = static_cast<uint8_t*>(a.out);
  const int grid = GridFor(comm);
  const size_t smem =
      a.ragged_rows > 0 ? static_cast<size_t>(a.shape.num_experts / comm.num_ranks + 1) * 4 : 0;
  switch (a.dtype) {
    case ElemType::kBF16:
      return Launch<LLCachedDispatchKernel<Bf16Elem>>(grid, smem, stream, c, p);
    case ElemType::kF16:
      return Launch<LLCachedDispatchKernel<F16Elem>>(grid, smem, stream, c, p);
    case ElemType::kF32:
      return Launch<LLCachedDispatchKernel<F32Elem>>(grid, smem, stream, c, p);
    case ElemType::kF8E4M3FN:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace jax_ep
