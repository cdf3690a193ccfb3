// Low-latency combine / gather: what the plain kernels (combine.cu)
// and the streamed combine (combine_streamed.cu) share: the
// parameters, where a row lives in a receive set, and the reduction of one
// output chunk in k order. Protocol and region: low_latency/device.cuh.
#pragma once

#include "ffi/kernels/low_latency/device.cuh"

namespace jax_ep {

struct CombineParams {
  LLShape s;
  int32_t gather;
  int32_t phase;
  int32_t y_bytes;
  int32_t vec_y;      // rows of y are whole 16-byte vectors (aligned, H * y_bytes % 16 == 0)
  int64_t stride;     // row bytes in the set and the send buffer (multiple of 16)
  int64_t send_rows;  // capacity of the send buffer in rows
  int64_t ragged_rows;  // 0: y padded [L, R*M, H]; N: y ragged [N, H]
  const uint8_t* y;
  const int32_t* recv_src;
  const int32_t* recv_count;
  const int32_t* idx;
  const float* w;
  const int32_t* slot;  // [T, K] the dispatch's slot: row of (t, k) among its expert's R * M
  int64_t e0;           // my first expert (rank * L)
  int64_t num_local;    // L
  int64_t expert_rows;  // R * M
  uint8_t* out;
  int32_t* token_out;
  const int32_t* token_in;
};

// The streamed combine (LLComm::stream_combine, fused, not gather): the
// dynamic shared memory it needs for this call, 0 where it does not apply
// (then the plain kernel runs); and its launch.
size_t LLStreamedCombineSmem(const LLComm& comm, const LLCombineArgs& a, LLPhase phase, bool vec);
cudaError_t LaunchLLStreamedCombine(const LLComm& comm, const CombineParams& p, ElemType dtype,
                                    size_t smem, cudaStream_t stream);

namespace {

constexpr int kKChunk = 8;  // combine rows per thread in flight

// Row of (expert e, token t) in a combine receive set: [M][E], a token's
// rows side by side: its receive reads them together ([E][M] was slower; see
// docs/optimisation-log.md).
__device__ __forceinline__ int64_t CombineSetRow(int64_t e, int64_t t, int64_t E) {
  return t * E + e;
}

// Where row (t, k) of expert e is (e valid; tk = t * K + k): with kSelfRows
// (fused, one PE) one of my experts' rows straight from y (row slot[tk] of
// local expert e - e0; nullptr for a slot out of range), else in set b,
// where its owner wrote it. A
// template flag, not a run-time one: the slot loads alone, not taken, cost
// the 8-PE receive as much as reading y. y_start: with a ragged y, the first
// row of each local expert ([L + 1], RowBases in shared memory), else nullptr.
template <bool kSelfRows, typename V>
__device__ __forceinline__ const V* RowOf(const CombineParams& p, const uint8_t* set, int64_t e,
                                          int64_t t, int64_t tk, const int32_t* y_start) {
  if (kSelfRows && e >= p.e0 && e < p.e0 + p.num_local) {
    const int32_t row_in_expert = __ldg(p.slot + tk);
    if (row_in_expert < 0 || row_in_expert >= p.expert_rows) return nullptr;
    const int64_t l = e - p.e0;
    int64_t row = l * p.expert_rows + row_in_expert;
    if (y_start != nullptr) {
      if (row_in_expert >= y_start[l + 1] - y_start[l]) return nullptr;
      row = y_start[l] + row_in_expert;
      if (row >= p.ragged_rows) return nullptr;
    }
    return reinterpret_cast<const V*>(p.y + row * p.s.hidden * p.y_bytes);
  }
  return reinterpret_cast<const V*>(
      set + CombineSetRow(e, t, p.s.num_experts) * p.stride);
}

// Issues an L2 prefetch of chunk c of token t's K rows.
template <typename V, bool kSelfRows>
__device__ __forceinline__ void PrefetchRows(const CombineParams& p, const uint8_t* set, int64_t t,
                                             int64_t c, const int32_t* y_start) {
  const int64_t K = p.s.top_k, E = p.s.num_experts;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t e = __ldg(p.idx + t * K + k);
    const V* row =
        e >= 0 && e < E ? RowOf<kSelfRows, V>(p, set, e, t, t * K + k, y_start) : nullptr;
    if (row != nullptr) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + c));
  }
}

// acc += w[u] * v[u] for the rows u < kKChunk present (ok[u]), in u order:
// the one accumulation order of every combine (bitwise reproducible).
template <typename Elem, int kNE, typename V>
__device__ __forceinline__ void AddWeightedRows(const V* v, const float* w, const bool* ok,
                                                float* acc) {
  using Raw = typename Elem::Raw;
#pragma unroll
  for (int u = 0; u < kKChunk; ++u) {
    if (!ok[u]) continue;
    Raw raw[kNE];
    memcpy(raw, &v[u], sizeof(V));
#pragma unroll
    for (int i = 0; i < kNE; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w[u], Elem::ToFloat(raw[i])));
  }
}

// Output chunk c of token t = acc rounded to the output type.
template <typename Elem, int kNE>
__device__ __forceinline__ void StoreOutChunk(const CombineParams& p, int64_t t, int64_t c,
                                              const float* acc) {
  using Raw = typename Elem::Raw;
  using V = typename VecOf<kNE * sizeof(Raw)>::Type;
  Raw res[kNE];
#pragma unroll
  for (int i = 0; i < kNE; ++i) res[i] = Elem::FromFloat(acc[i]);
  V packed;
  memcpy(&packed, res, sizeof(V));
  reinterpret_cast<V*>(p.out + t * p.s.hidden * sizeof(Raw))[c] = packed;
}

// Output chunk c (kNE channels) of token t: its K rows loaded kKChunk at a
// time (all of them for K <= 8), then summed in k order.
template <typename Elem, int kNE, bool kSelfRows>
__device__ __forceinline__ void ReduceChunk(const CombineParams& p, const uint8_t* set, int64_t t,
                                            int64_t c, const int32_t* y_start) {
  using V = typename VecOf<kNE * sizeof(typename Elem::Raw)>::Type;
  const int64_t K = p.s.top_k, E = p.s.num_experts;
  const int32_t* idx_row = p.idx + t * K;
  float acc[kNE];
#pragma unroll
  for (int i = 0; i < kNE; ++i) acc[i] = 0.0f;
  for (int64_t k0 = 0; k0 < K; k0 += kKChunk) {
    V v[kKChunk];
    float w[kKChunk];
    bool ok[kKChunk];
#pragma unroll
    for (int u = 0; u < kKChunk; ++u) {
      const int64_t k = k0 + u;
      const int32_t e = k < K ? __ldg(idx_row + k) : -1;
      const V* row =
          e >= 0 && e < E ? RowOf<kSelfRows, V>(p, set, e, t, t * K + k, y_start) : nullptr;
      ok[u] = row != nullptr;
      // Left unset when !ok: zeroing (as ReduceTokenRange does) made the
      // plain combine slower (see docs/optimisation-log.md).
      if (ok[u]) {
        v[u] = LoadVec<true>(row + c);
        w[u] = __ldg(p.w + t * K + k);
      }
    }
    AddWeightedRows<Elem, kNE>(v, w, ok, acc);
  }
  StoreOutChunk<Elem, kNE>(p, t, c, acc);
}

}  // namespace
}  // namespace jax_ep
