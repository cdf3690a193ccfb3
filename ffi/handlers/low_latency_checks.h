// Checks every low-latency (NVSHMEM) handler shares (ffi/handlers/
// low_latency_*.cc): the PE context and call geometry, topk_idx, the split
// form's token, the x / y element types, whether a call fits the region,
// and the geometry attributes every target takes.
//
// Notation: R = PEs (EP size), M = max_tokens_per_rank, E = num_experts,
// L = E / R, RM = R * M.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "ffi/kernels/low_latency/low_latency.h"
#include "ffi/runtime/low_latency_runtime.h"
#include "xla/ffi/api/ffi.h"

namespace jax_ep::ll_checks {

namespace ffi = xla::ffi;

// What every target starts with: this device's PE context (comm for the
// launch; hold keeps the context alive while it runs) and the call's
// geometry, M and E checked against the context.
struct LLCall {
  LLComm comm;
  std::shared_ptr<const LLContext> hold;
  int64_t R = 0, M = 0, E = 0, L = 0, RM = 0;
};
ffi::Error BeginLLCall(const std::string& where, int32_t device, int64_t max_tokens,
                       int64_t num_experts, LLCall* call);

// topk_idx [T, K] with 1 <= K <= 32 and T <= M; sets *T and *K.
ffi::Error CheckTopk(const std::string& where, ffi::Span<const int64_t> dims, int64_t max_tokens,
                     int64_t* T, int64_t* K);

// The split form's token s32[2]: the send half's result, the receive half's operand.
ffi::Error CheckTokenOut(const std::string& where, ffi::Span<const int64_t> dims);
ffi::Error CheckTokenIn(const std::string& where, ffi::Span<const int64_t> dims);

// The expert rows of a call (a dispatch's recv_x, a combine's or gather's y,
// a cached dispatch's out): padded [L, RM, H] (*ragged_rows = 0) or ragged
// [N, H] (*ragged_rows = N), with N = want_rows when want_rows > 0 (a
// dispatch, which knows its K), else any 1 <= N <= L * RM (the kernels read
// no row past N). Sets *hidden.
ffi::Error ExpertRows(const std::string& where, const char* name, ffi::Span<const int64_t> dims,
                      int64_t L, int64_t RM, int64_t want_rows, int64_t* ragged_rows,
                      int64_t* hidden);

// N of a ragged dispatch: every source token reaches at most min(K, L) of my
// experts, so R*M*min(K, L) rows hold any routing.
int64_t RaggedRows(int64_t RM, int64_t K, int64_t L);

// x / y / out: bf16, f16 or f32 (FP8 only comes out of the dispatch's cast).
bool ToLLElemType(ffi::DataType dtype, ElemType* out);

// ResourceExhausted with the LLCheck* sentence, Success when it is nullptr.
ffi::Error CheckFits(const std::string& where, const char* why);

// The attributes every target takes, last.
template <typename Binding>
auto WithGeometryAttrs(Binding&& b) {
  return std::move(b)
      .template Attr<int64_t>("max_tokens_per_rank")
      .template Attr<int64_t>("num_experts");
}

}  // namespace jax_ep::ll_checks
