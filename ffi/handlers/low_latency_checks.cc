// Checks shared by the low-latency handlers (see low_latency_checks.h).
#include "ffi/handlers/low_latency_checks.h"

#include <algorithm>

#include "ffi/handlers/ffi_helpers.h"

namespace jax_ep::ll_checks {

using ffi_util::AcquireComm;
using ffi_util::Dims;
using ffi_util::SameDims;
using ffi_util::Str;

ffi::Error BeginLLCall(const std::string& where, int32_t device, int64_t max_tokens,
                       int64_t num_experts, LLCall* call) {
  JAX_EP_RETURN_IF_ERROR(AcquireComm(AcquireLowLatency, where, device, &call->comm, &call->hold));
  const int64_t R = call->comm.num_ranks;
  if (max_tokens < 1 || max_tokens > kLLMaxTokens) {
    return ffi::Error::InvalidArgument(where + "max_tokens_per_rank must be in [1, " +
                                       Str(kLLMaxTokens) + "], got " + Str(max_tokens));
  }
  if (num_experts < R || num_experts % R != 0) {
    return ffi::Error::InvalidArgument(where + "num_experts (" + Str(num_experts) +
                                       ") must be a positive multiple of the " + Str(R) +
                                       " NVSHMEM PEs (EP ranks)");
  }
  call->R = R;
  call->M = max_tokens;
  call->E = num_experts;
  call->L = num_experts / R;
  call->RM = R * max_tokens;
  return ffi::Error::Success();
}

ffi::Error CheckTopk(const std::string& where, ffi::Span<const int64_t> dims, int64_t max_tokens,
                     int64_t* T, int64_t* K) {
  *T = dims[0];
  *K = dims[1];
  if (*K < 1 || *K > kLLMaxTopK) {
    return ffi::Error::InvalidArgument(where + "top-k must be in [1, " + Str(kLLMaxTopK) +
                                       "], topk_idx is " + Dims(dims));
  }
  if (*T > max_tokens) {
    return ffi::Error::InvalidArgument(where + "topk_idx has " + Str(*T) +
                                       " tokens, more than max_tokens_per_rank = " +
                                       Str(max_tokens));
  }
  return ffi::Error::Success();
}

ffi::Error CheckTokenOut(const std::string& where, ffi::Span<const int64_t> dims) {
  if (SameDims(dims, {2})) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(where + "the token result must be s32[2], got " + Dims(dims));
}

ffi::Error CheckTokenIn(const std::string& where, ffi::Span<const int64_t> dims) {
  if (SameDims(dims, {2})) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(where + "token must be s32[2] (from the send half), got " +
                                     Dims(dims));
}

ffi::Error ExpertRows(const std::string& where, const char* name, ffi::Span<const int64_t> dims,
                      int64_t L, int64_t RM, int64_t want_rows, int64_t* ragged_rows,
                      int64_t* hidden) {
  if (dims.size() == 3 && dims[0] == L && dims[1] == RM) {
    *ragged_rows = 0;
    *hidden = dims[2];
    return ffi::Error::Success();
  }
  const bool rows_ok = dims.size() == 2 && (want_rows > 0 ? dims[0] == want_rows
                                                          : dims[0] >= 1 && dims[0] <= L * RM);
  if (rows_ok) {
    *ragged_rows = dims[0];
    *hidden = dims[1];
    return ffi::Error::Success();
  }
  const std::string ragged =
      want_rows > 0 ? "[N=" + Str(want_rows) + ", H]" : "[N, H] with 1 <= N <= L*R*M";
  return ffi::Error::InvalidArgument(where + name + " must be [L=" + Str(L) + ", R*M=" + Str(RM) +
                                     ", H] (padded) or " + ragged + " (ragged), got " +
                                     Dims(dims));
}

int64_t RaggedRows(int64_t RM, int64_t K, int64_t L) { return RM * std::min(K, L); }

bool ToLLElemType(ffi::DataType dtype, ElemType* out) {
  return ffi_util::ToElemType(dtype, out) && LLElemBytes(*out) != 0;
}

ffi::Error CheckFits(const std::string& where, const char* why) {
  if (why == nullptr) return ffi::Error::Success();
  return ffi_util::TooLarge(where, why);
}

}  // namespace jax_ep::ll_checks
