// XLA FFI handlers of the low-latency (NVSHMEM) ops (kernels:
// ffi/kernels/low_latency/low_latency.h; runtime: ffi/runtime/low_latency_runtime.h). They
// find this device's PE context, check shapes, fill plain structs and launch
// on XLA's stream. No math, no host synchronisation.
//
// Notation: R = PEs (EP size), M = max_tokens_per_rank, E = num_experts,
// L = E / R, RM = R * M; x / y dtypes bf16 | f16 | f32. Every target takes the
// attributes max_tokens_per_rank (i64) and num_experts (i64).
//
// jax_ep_ll_dispatch            attrs use_fp8 (bool), zero_fill (bool)
//   operands  x [T, H], topk_idx s32[T, K]
//   results   recv_x [L, RM, H] (x dtype, or f8e4m3fn with use_fp8), recv_count s32[L],
//             recv_src s32[L, RM], slot s32[T, K], then recv_scales f32[L, RM, H/128]
//             only with use_fp8
// jax_ep_ll_dispatch_send       attrs use_fp8
//   operands  x [T, H], topk_idx s32[T, K]      results  token s32[2]
// jax_ep_ll_dispatch_recv       attrs use_fp8, zero_fill
//   operands  token s32[2], topk_idx s32[T, K]  results  as jax_ep_ll_dispatch
// jax_ep_ll_combine
//   operands  y [L, RM, H], topk_idx s32[T, K], topk_weights f32[T, K], recv_src s32[L, RM],
//             recv_count s32[L], slot s32[T, K] (jax_ep_ll_dispatch's)
//   results   out [T, H] (y dtype)
// jax_ep_ll_combine_send
//   operands  y [L, RM, H], recv_src s32[L, RM], recv_count s32[L]   results  token s32[2]
// jax_ep_ll_combine_recv
//   operands  token s32[2], topk_idx s32[T, K], topk_weights f32[T, K]
//   results   out [T, H] (dtype of the y that was sent)
// jax_ep_ll_gather
//   operands  y [L, RM, H], topk_idx s32[T, K], recv_src s32[L, RM], recv_count s32[L], slot
//   results   out [T, K, H] (y dtype)
// At one PE the fused combine and gather read the rows from y (row slot of
// the expert) instead of moving them; so does the streamed combine for a
// PE's own experts' rows at several PEs.
// jax_ep_ll_dispatch_cached     attrs zero_fill
//   operands  x [T, H], topk_idx s32[T, K], slot s32[T, K], recv_count s32[L],
//             optional scale f32[T, K]
//   results   out [L, RM, H] (x dtype)
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include <cuda_runtime.h>

#include "ffi/handlers/ffi_helpers.h"
#include "ffi/handlers/low_latency_handlers.h"
#include "ffi/kernels/low_latency/low_latency.h"
#include "ffi/runtime/low_latency_runtime.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jax_ep::ffi_util;  // Dims, Shape, SameDims, ExpectShape, CudaError, ...

// x / y / out: bf16, f16 or f32 (FP8 only comes out of the dispatch's cast).
bool ToLLElemType(ffi::DataType dtype, jax_ep::ElemType* out) {
  return ToElemType(dtype, out) && jax_ep::LLElemBytes(*out) != 0;
}

// The PE context of `device` plus the call geometry (R, M, E checked).
ffi::Error Acquire(const std::string& where, int32_t device, int64_t max_tokens,
                   int64_t num_experts, jax_ep::LLComm* comm,
                   std::shared_ptr<const jax_ep::LLContext>* hold) {
  JAX_EP_RETURN_IF_ERROR(AcquireComm(jax_ep::AcquireLowLatency, where, device, comm, hold));
  const int64_t R = comm->num_ranks;
  if (max_tokens < 1 || max_tokens > jax_ep::kLLMaxTokens) {
    return ffi::Error::InvalidArgument(where + "max_tokens_per_rank must be in [1, " +
                                       Str(jax_ep::kLLMaxTokens) + "], got " + Str(max_tokens));
  }
  if (num_experts < R || num_experts % R != 0) {
    return ffi::Error::InvalidArgument(where + "num_experts (" + Str(num_experts) +
                                       ") must be a positive multiple of the " + Str(R) +
                                       " NVSHMEM PEs (EP ranks)");
  }
  return ffi::Error::Success();
}

ffi::Error CheckFits(const std::string& where, const char* why) {
  if (why == nullptr) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kResourceExhausted, where + why);
}

// topk_idx [T, K] with 1 <= K <= 32 and T <= M.
ffi::Error CheckTopk(const std::string& where, ffi::Span<const int64_t> dims, int64_t max_tokens,
                     int64_t* T, int64_t* K) {
  *T = dims[0];
  *K = dims[1];
  if (*K < 1 || *K > jax_ep::kLLMaxTopK) {
    return ffi::Error::InvalidArgument(where + "top-k must be in [1, " +
                                       Str(jax_ep::kLLMaxTopK) + "], topk_idx is " + Dims(dims));
  }
  if (*T > max_tokens) {
    return ffi::Error::InvalidArgument(where + "topk_idx has " + Str(*T) +
                                       " tokens, more than max_tokens_per_rank = " +
                                       Str(max_tokens));
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- dispatch

struct DispatchResults {
  ffi::Result<ffi::AnyBuffer> recv_x;
  ffi::Result<ffi::Buffer<ffi::S32, 1>> recv_count;
  ffi::Result<ffi::Buffer<ffi::S32, 2>> recv_src;
  ffi::Result<ffi::Buffer<ffi::S32, 2>> slot;
  ffi::RemainingRets extra;
};

// Checks the dispatch results and fills the receive side of `args`.
ffi::Error DispatchOutputs(const std::string& where, const DispatchResults& r, bool use_fp8,
                           int64_t R, int64_t L, int64_t M, int64_t T, int64_t K,
                           jax_ep::LLDispatchArgs* args, int64_t* hidden,
                           jax_ep::ElemType* recv_dtype) {
  const int64_t RM = R * M;
  const auto x_dims = r.recv_x->dimensions();
  if (x_dims.size() != 3 || x_dims[0] != L || x_dims[1] != RM) {
    return ffi::Error::InvalidArgument(where + "recv_x must have shape [L=" + Str(L) + ", R*M=" +
                                       Str(RM) + ", H], got " + Dims(x_dims));
  }
  *hidden = x_dims[2];
  if (use_fp8) {
    if (r.recv_x->element_type() != ffi::DataType::F8E4M3FN) {
      return ffi::Error::InvalidArgument(where + "with use_fp8 recv_x must be float8_e4m3fn");
    }
    if (*hidden % jax_ep::kLLFp8Block != 0) {
      return ffi::Error::InvalidArgument(where + "use_fp8 needs H to be a multiple of 128, got " +
                                         Str(*hidden));
    }
    if (r.extra.size() != 1) {
      return ffi::Error::InvalidArgument(where + "with use_fp8 there must be a fifth result, "
                                         "recv_scales f32[L, R*M, H/128]");
    }
    auto scales = r.extra.get<ffi::AnyBuffer>(0);
    if (!scales.has_value()) return ffi::Error::InvalidArgument(where + scales.error().message());
    ffi::AnyBuffer s = *scales.value();
    if (s.element_type() != ffi::DataType::F32 ||
        !SameDims(s.dimensions(), {L, RM, *hidden / jax_ep::kLLFp8Block})) {
      return ffi::Error::InvalidArgument(where + "recv_scales must be f32" +
                                         Shape({L, RM, *hidden / jax_ep::kLLFp8Block}) + ", got " +
                                         Dims(s.dimensions()));
    }
    args->recv_scales = static_cast<float*>(s.untyped_data());
  } else {
    if (!ToLLElemType(r.recv_x->element_type(), recv_dtype)) {
      return ffi::Error::InvalidArgument(where + "recv_x must be bfloat16, float16 or float32");
    }
    if (r.extra.size() != 0) {
      return ffi::Error::InvalidArgument(where + "without use_fp8 there is no recv_scales result");
    }
  }
  JAX_EP_RETURN_IF_ERROR(ExpectShape(where, "recv_count", r.recv_count->dimensions(), {L}));
  JAX_EP_RETURN_IF_ERROR(ExpectShape(where, "recv_src", r.recv_src->dimensions(), {L, RM}));
  JAX_EP_RETURN_IF_ERROR(ExpectShape(where, "slot", r.slot->dimensions(), {T, K}));
  args->recv_x = r.recv_x->untyped_data();
  args->recv_count = r.recv_count->typed_data();
  args->recv_src = r.recv_src->typed_data();
  args->slot = r.slot->typed_data();
  return ffi::Error::Success();
}

ffi::Error DispatchImpl(const std::string& where, jax_ep::LLPhase phase, cudaStream_t stream,
                        int32_t device, const ffi::AnyBuffer* x, const int32_t* token_in,
                        ffi::Span<const int64_t> token_dims, ffi::Buffer<ffi::S32, 2> topk_idx,
                        const DispatchResults* results, int32_t* token_out,
                        ffi::Span<const int64_t> token_out_dims, bool use_fp8, bool zero_fill,
                        int64_t max_tokens, int64_t num_experts) {
  jax_ep::LLComm comm;
  std::shared_ptr<const jax_ep::LLContext> hold;
  JAX_EP_RETURN_IF_ERROR(Acquire(where, device, max_tokens, num_experts, &comm, &hold));
  const int64_t R = comm.num_ranks, M = max_tokens, E = num_experts, L = E / R;
  int64_t T = 0, K = 0;
  JAX_EP_RETURN_IF_ERROR(CheckTopk(where, topk_idx.dimensions(), M, &T, &K));

  jax_ep::LLDispatchArgs args;
  args.topk_idx = topk_idx.typed_data();
  args.use_fp8 = use_fp8;
  args.zero_fill = zero_fill;
  int64_t H = 0;
  if (x != nullptr) {  // send half
    if (!ToLLElemType(x->element_type(), &args.dtype)) {
      return ffi::Error::InvalidArgument(where + "x must be bfloat16, float16 or float32");
    }
    const auto dims = x->dimensions();
    if (dims.size() != 2 || dims[0] != T) {
      return ffi::Error::InvalidArgument(where + "x must have shape [T=" + Str(T) +
                                         ", H] like topk_idx, got " + Dims(dims));
    }
    H = dims[1];
    args.x = x->untyped_data();
  }
  if (results != nullptr) {  // receive half
    int64_t recv_h = 0;
    jax_ep::ElemType recv_dtype = args.dtype;
    JAX_EP_RETURN_IF_ERROR(DispatchOutputs(where, *results, use_fp8, R, L, M, T, K, &args,
                                           &recv_h, &recv_dtype));
    if (x != nullptr && recv_h != H) {
      return ffi::Error::InvalidArgument(where + "recv_x's H (" + Str(recv_h) +
                                         ") differs from x's (" + Str(H) + ")");
    }
    if (x != nullptr && !use_fp8 && recv_dtype != args.dtype) {
      return ffi::Error::InvalidArgument(where + "recv_x must have x's dtype");
    }
    H = recv_h;
    if (x == nullptr) args.dtype = recv_dtype;
  }
  if (token_in != nullptr) {
    if (!SameDims(token_dims, {2})) {
      return ffi::Error::InvalidArgument(where + "token must be s32[2] (from the send half), got " +
                                         Dims(token_dims));
    }
    args.token_in = token_in;
  }
  if (token_out != nullptr) {
    if (!SameDims(token_out_dims, {2})) {
      return ffi::Error::InvalidArgument(where + "the token result must be s32[2], got " +
                                         Dims(token_out_dims));
    }
    args.token_out = token_out;
  }
  if (use_fp8 && H % jax_ep::kLLFp8Block != 0) {
    return ffi::Error::InvalidArgument(where + "use_fp8 needs H to be a multiple of 128, got " +
                                       Str(H));
  }
  args.shape = jax_ep::LLShape{T, H, K, E, M};
  JAX_EP_RETURN_IF_ERROR(CheckFits(
      where, jax_ep::LLCheckDispatch(comm, args.shape, jax_ep::ElemTypeBytes(args.dtype), use_fp8)));
  const cudaError_t err = jax_ep::LaunchLLDispatch(comm, args, phase, stream);
  if (err != cudaSuccess) return CudaError(where, err);
  return ffi::Error::Success();
}

ffi::Error LLDispatch(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                      ffi::Buffer<ffi::S32, 2> topk_idx, ffi::Result<ffi::AnyBuffer> recv_x,
                      ffi::Result<ffi::Buffer<ffi::S32, 1>> recv_count,
                      ffi::Result<ffi::Buffer<ffi::S32, 2>> recv_src,
                      ffi::Result<ffi::Buffer<ffi::S32, 2>> slot, ffi::RemainingRets extra,
                      bool use_fp8, bool zero_fill, int64_t max_tokens, int64_t num_experts) {
  const DispatchResults r{recv_x, recv_count, recv_src, slot, extra};
  return DispatchImpl("jax_ep_ll_dispatch: ", jax_ep::kLLFused, stream, device, &x, nullptr, {},
                      topk_idx, &r, nullptr, {}, use_fp8, zero_fill, max_tokens, num_experts);
}

ffi::Error LLDispatchSend(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                          ffi::Buffer<ffi::S32, 2> topk_idx,
                          ffi::Result<ffi::Buffer<ffi::S32, 1>> token, bool use_fp8,
                          int64_t max_tokens, int64_t num_experts) {
  return DispatchImpl("jax_ep_ll_dispatch_send: ", jax_ep::kLLSendOnly, stream, device, &x,
                      nullptr, {}, topk_idx, nullptr, token->typed_data(), token->dimensions(),
                      use_fp8, true, max_tokens, num_experts);
}

ffi::Error LLDispatchRecv(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::S32, 1> token,
                          ffi::Buffer<ffi::S32, 2> topk_idx, ffi::Result<ffi::AnyBuffer> recv_x,
                          ffi::Result<ffi::Buffer<ffi::S32, 1>> recv_count,
                          ffi::Result<ffi::Buffer<ffi::S32, 2>> recv_src,
                          ffi::Result<ffi::Buffer<ffi::S32, 2>> slot, ffi::RemainingRets extra,
                          bool use_fp8, bool zero_fill, int64_t max_tokens, int64_t num_experts) {
  const DispatchResults r{recv_x, recv_count, recv_src, slot, extra};
  return DispatchImpl("jax_ep_ll_dispatch_recv: ", jax_ep::kLLRecvOnly, stream, device, nullptr,
                      token.typed_data(), token.dimensions(), topk_idx, &r, nullptr, {}, use_fp8,
                      zero_fill, max_tokens, num_experts);
}

// ---------------------------------------------------------------- combine / gather

// The operands of a combine target (nullptr: the target does not take it).
struct CombineIn {
  const ffi::AnyBuffer* y = nullptr;                    // send (fused: receive too)
  const ffi::Buffer<ffi::S32, 2>* recv_src = nullptr;   // send
  const ffi::Buffer<ffi::S32, 1>* recv_count = nullptr; // send
  const ffi::Buffer<ffi::S32, 2>* topk_idx = nullptr;   // receive
  const ffi::Buffer<ffi::F32, 2>* weights = nullptr;    // receive (combine)
  const ffi::Buffer<ffi::S32, 2>* slot = nullptr;       // receive (fused)
  const ffi::Buffer<ffi::S32, 1>* token = nullptr;      // receive only
};

ffi::Error CombineImpl(const std::string& where, jax_ep::LLPhase phase, bool gather,
                       cudaStream_t stream, int32_t device, const CombineIn& in,
                       ffi::AnyBuffer* out, ffi::Buffer<ffi::S32, 1>* token_out,
                       int64_t max_tokens, int64_t num_experts) {
  jax_ep::LLComm comm;
  std::shared_ptr<const jax_ep::LLContext> hold;
  JAX_EP_RETURN_IF_ERROR(Acquire(where, device, max_tokens, num_experts, &comm, &hold));
  const int64_t R = comm.num_ranks, M = max_tokens, E = num_experts, L = E / R, RM = R * M;
  jax_ep::LLCombineArgs args;
  args.gather = gather;
  int64_t H = -1, T = 0, K = 1;
  bool have_dtype = false;
  if (in.y != nullptr) {
    if (!ToLLElemType(in.y->element_type(), &args.dtype)) {
      return ffi::Error::InvalidArgument(where + "y must be bfloat16, float16 or float32");
    }
    have_dtype = true;
    const auto dims = in.y->dimensions();
    if (dims.size() != 3 || dims[0] != L || dims[1] != RM) {
      return ffi::Error::InvalidArgument(where + "y must have shape [L=" + Str(L) + ", R*M=" +
                                         Str(RM) + ", H], got " + Dims(dims));
    }
    H = dims[2];
    args.y = in.y->untyped_data();
  }
  if (in.recv_src != nullptr) {
    JAX_EP_RETURN_IF_ERROR(ExpectShape(where, "recv_src", in.recv_src->dimensions(), {L, RM}));
    JAX_EP_RETURN_IF_ERROR(ExpectShape(where, "recv_count", in.recv_count->dimensions(), {L}));
    args.recv_src = in.recv_src->typed_data();
    args.recv_count = in.recv_count->typed_data();
  }
  if (in.topk_idx != nullptr) {
    JAX_EP_RETURN_IF_ERROR(CheckTopk(where, in.topk_idx->dimensions(), M, &T, &K));
    args.topk_idx = in.topk_idx->typed_data();
    if (!gather) {
      JAX_EP_RETURN_IF_ERROR(
          ExpectShape(where, "topk_weights", in.weights->dimensions(), {T, K}));
      args.topk_weights = in.weights->typed_data();
    }
    if (in.slot != nullptr) {
      JAX_EP_RETURN_IF_ERROR(ExpectShape(where, "slot", in.slot->dimensions(), {T, K}));
      args.slot = in.slot->typed_data();
    }
    jax_ep::ElemType out_dtype;
    if (!ToLLElemType(out->element_type(), &out_dtype) || (have_dtype && out_dtype != args.dtype)) {
      return ffi::Error::InvalidArgument(where + "the result must have y's dtype (bfloat16, "
                                         "float16 or float32)");
    }
    args.dtype = out_dtype;
    const auto od = out->dimensions();
    const int64_t out_h = od.size() == 0 ? -1 : od[od.size() - 1];
    if (H >= 0 && out_h != H) {
      return ffi::Error::InvalidArgument(where + "the result's H (" + Str(out_h) +
                                         ") differs from y's (" + Str(H) + ")");
    }
    H = out_h;
    const bool ok = gather ? SameDims(od, {T, K, H}) : SameDims(od, {T, H});
    if (!ok || H < 1) {
      return ffi::Error::InvalidArgument(where + "the result must have shape " +
                                         (gather ? Shape({T, K, H}) : Shape({T, H})) + ", got " +
                                         Dims(od));
    }
    args.out = out->untyped_data();
  }
  if (in.token != nullptr) {
    if (!SameDims(in.token->dimensions(), {2})) {
      return ffi::Error::InvalidArgument(where + "token must be s32[2] (from the send half), got " +
                                         Dims(in.token->dimensions()));
    }
    args.token_in = in.token->typed_data();
  }
  if (token_out != nullptr) {
    if (!SameDims(token_out->dimensions(), {2})) {
      return ffi::Error::InvalidArgument(where + "the token result must be s32[2], got " +
                                         Dims(token_out->dimensions()));
    }
    args.token_out = token_out->typed_data();
  }
  // The send half alone knows no top-k: check against the allocation's.
  if (in.topk_idx == nullptr) K = comm.layout.top_k;
  args.shape = jax_ep::LLShape{T, H, K, E, M};
  JAX_EP_RETURN_IF_ERROR(CheckFits(
      where, jax_ep::LLCheckCombine(comm, args.shape, jax_ep::ElemTypeBytes(args.dtype))));
  const cudaError_t err = jax_ep::LaunchLLCombine(comm, args, phase, stream);
  if (err != cudaSuccess) return CudaError(where, err);
  return ffi::Error::Success();
}

ffi::Error LLCombine(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                     ffi::Buffer<ffi::S32, 2> topk_idx, ffi::Buffer<ffi::F32, 2> topk_weights,
                     ffi::Buffer<ffi::S32, 2> recv_src, ffi::Buffer<ffi::S32, 1> recv_count,
                     ffi::Buffer<ffi::S32, 2> slot, ffi::Result<ffi::AnyBuffer> out,
                     int64_t max_tokens, int64_t num_experts) {
  const CombineIn in{&y, &recv_src, &recv_count, &topk_idx, &topk_weights, &slot};
  return CombineImpl("jax_ep_ll_combine: ", jax_ep::kLLFused, false, stream, device, in, &*out,
                     nullptr, max_tokens, num_experts);
}

ffi::Error LLCombineSend(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                         ffi::Buffer<ffi::S32, 2> recv_src, ffi::Buffer<ffi::S32, 1> recv_count,
                         ffi::Result<ffi::Buffer<ffi::S32, 1>> token, int64_t max_tokens,
                         int64_t num_experts) {
  const CombineIn in{&y, &recv_src, &recv_count};
  return CombineImpl("jax_ep_ll_combine_send: ", jax_ep::kLLSendOnly, false, stream, device, in,
                     nullptr, &*token, max_tokens, num_experts);
}

ffi::Error LLCombineRecv(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::S32, 1> token,
                         ffi::Buffer<ffi::S32, 2> topk_idx, ffi::Buffer<ffi::F32, 2> topk_weights,
                         ffi::Result<ffi::AnyBuffer> out, int64_t max_tokens,
                         int64_t num_experts) {
  const CombineIn in{nullptr, nullptr, nullptr, &topk_idx, &topk_weights, nullptr, &token};
  return CombineImpl("jax_ep_ll_combine_recv: ", jax_ep::kLLRecvOnly, false, stream, device, in,
                     &*out, nullptr, max_tokens, num_experts);
}

ffi::Error LLGather(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                    ffi::Buffer<ffi::S32, 2> topk_idx, ffi::Buffer<ffi::S32, 2> recv_src,
                    ffi::Buffer<ffi::S32, 1> recv_count, ffi::Buffer<ffi::S32, 2> slot,
                    ffi::Result<ffi::AnyBuffer> out, int64_t max_tokens, int64_t num_experts) {
  const CombineIn in{&y, &recv_src, &recv_count, &topk_idx, nullptr, &slot};
  return CombineImpl("jax_ep_ll_gather: ", jax_ep::kLLFused, true, stream, device, in, &*out,
                     nullptr, max_tokens, num_experts);
}

// ---------------------------------------------------------------- cached dispatch

ffi::Error LLDispatchCached(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                            ffi::Buffer<ffi::S32, 2> topk_idx, ffi::Buffer<ffi::S32, 2> slot,
                            ffi::Buffer<ffi::S32, 1> recv_count, ffi::RemainingArgs rest,
                            ffi::Result<ffi::AnyBuffer> out, bool zero_fill, int64_t max_tokens,
                            int64_t num_experts) {
  const std::string where = "jax_ep_ll_dispatch_cached: ";
  jax_ep::LLComm comm;
  std::shared_ptr<const jax_ep::LLContext> hold;
  JAX_EP_RETURN_IF_ERROR(Acquire(where, device, max_tokens, num_experts, &comm, &hold));
  const int64_t R = comm.num_ranks, M = max_tokens, E = num_experts, L = E / R, RM = R * M;
  int64_t T = 0, K = 0;
  JAX_EP_RETURN_IF_ERROR(CheckTopk(where, topk_idx.dimensions(), M, &T, &K));
  jax_ep::LLCachedDispatchArgs args;
  if (!ToLLElemType(x.element_type(), &args.dtype)) {
    return ffi::Error::InvalidArgument(where + "x must be bfloat16, float16 or float32");
  }
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[0] != T) {
    return ffi::Error::InvalidArgument(where + "x must have shape [T=" + Str(T) + ", H], got " +
                                       Dims(xd));
  }
  const int64_t H = xd[1];
  JAX_EP_RETURN_IF_ERROR(ExpectShape(where, "slot", slot.dimensions(), {T, K}));
  JAX_EP_RETURN_IF_ERROR(ExpectShape(where, "recv_count", recv_count.dimensions(), {L}));
  if (rest.size() > 1) {
    return ffi::Error::InvalidArgument(where + "at most one extra operand (scale f32[T, K])");
  }
  if (rest.size() == 1) {
    auto scale = rest.get<ffi::AnyBuffer>(0);
    if (!scale.has_value()) return ffi::Error::InvalidArgument(where + scale.error().message());
    const ffi::AnyBuffer s = scale.value();
    if (s.element_type() != ffi::DataType::F32 || !SameDims(s.dimensions(), {T, K})) {
      return ffi::Error::InvalidArgument(where + "scale must be f32" + Shape({T, K}) + ", got " +
                                         Dims(s.dimensions()));
    }
    args.scale = static_cast<const float*>(s.untyped_data());
  }
  if (out->element_type() != x.element_type() || !SameDims(out->dimensions(), {L, RM, H})) {
    return ffi::Error::InvalidArgument(where + "the result must be " + Shape({L, RM, H}) +
                                       " with x's dtype, got " + Dims(out->dimensions()));
  }
  args.shape = jax_ep::LLShape{T, H, K, E, M};
  args.x = x.untyped_data();
  args.topk_idx = topk_idx.typed_data();
  args.slot = slot.typed_data();
  args.recv_count = recv_count.typed_data();
  args.zero_fill = zero_fill;
  args.out = out->untyped_data();
  JAX_EP_RETURN_IF_ERROR(CheckFits(
      where, jax_ep::LLCheckCachedDispatch(comm, args.shape, jax_ep::ElemTypeBytes(args.dtype))));
  const cudaError_t err = jax_ep::LaunchLLDispatchCached(comm, args, stream);
  if (err != cudaSuccess) return CudaError(where, err);
  return ffi::Error::Success();
}

// Binding pieces the targets share (see also BindStreamAndDevice).

// The attributes every target takes, last.
template <typename Binding>
auto WithGeometryAttrs(Binding&& b) {
  return std::move(b)
      .template Attr<int64_t>("max_tokens_per_rank")
      .template Attr<int64_t>("num_experts");
}

// The results and attributes of jax_ep_ll_dispatch and jax_ep_ll_dispatch_recv.
template <typename Binding>
auto WithDispatchResults(Binding&& b) {
  return std::move(b)
      .template Ret<ffi::AnyBuffer>()           // recv_x
      .template Ret<ffi::BufferR1<ffi::S32>>()  // recv_count
      .template Ret<ffi::BufferR2<ffi::S32>>()  // recv_src
      .template Ret<ffi::BufferR2<ffi::S32>>()  // slot
      .RemainingRets()                          // recv_scales (use_fp8)
      .template Attr<bool>("use_fp8")
      .template Attr<bool>("zero_fill");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLDispatch, LLDispatch,
    WithGeometryAttrs(WithDispatchResults(BindStreamAndDevice()
                                              .Arg<ffi::AnyBuffer>()               // x
                                              .Arg<ffi::BufferR2<ffi::S32>>())));  // topk_idx

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLDispatchSend, LLDispatchSend,
    WithGeometryAttrs(BindStreamAndDevice()
                          .Arg<ffi::AnyBuffer>()           // x
                          .Arg<ffi::BufferR2<ffi::S32>>()  // topk_idx
                          .Ret<ffi::BufferR1<ffi::S32>>()  // token
                          .Attr<bool>("use_fp8")));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLDispatchRecv, LLDispatchRecv,
    WithGeometryAttrs(WithDispatchResults(BindStreamAndDevice()
                                              .Arg<ffi::BufferR1<ffi::S32>>()      // token
                                              .Arg<ffi::BufferR2<ffi::S32>>())));  // topk_idx

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLCombine, LLCombine,
    WithGeometryAttrs(BindStreamAndDevice()
                          .Arg<ffi::AnyBuffer>()           // y
                          .Arg<ffi::BufferR2<ffi::S32>>()  // topk_idx
                          .Arg<ffi::BufferR2<ffi::F32>>()  // topk_weights
                          .Arg<ffi::BufferR2<ffi::S32>>()  // recv_src
                          .Arg<ffi::BufferR1<ffi::S32>>()  // recv_count
                          .Arg<ffi::BufferR2<ffi::S32>>()  // slot
                          .Ret<ffi::AnyBuffer>()));        // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLCombineSend, LLCombineSend,
    WithGeometryAttrs(BindStreamAndDevice()
                          .Arg<ffi::AnyBuffer>()             // y
                          .Arg<ffi::BufferR2<ffi::S32>>()    // recv_src
                          .Arg<ffi::BufferR1<ffi::S32>>()    // recv_count
                          .Ret<ffi::BufferR1<ffi::S32>>()));  // token

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLCombineRecv, LLCombineRecv,
    WithGeometryAttrs(BindStreamAndDevice()
                          .Arg<ffi::BufferR1<ffi::S32>>()  // token
                          .Arg<ffi::BufferR2<ffi::S32>>()  // topk_idx
                          .Arg<ffi::BufferR2<ffi::F32>>()  // topk_weights
                          .Ret<ffi::AnyBuffer>()));        // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLGather, LLGather,
    WithGeometryAttrs(BindStreamAndDevice()
                          .Arg<ffi::AnyBuffer>()           // y
                          .Arg<ffi::BufferR2<ffi::S32>>()  // topk_idx
                          .Arg<ffi::BufferR2<ffi::S32>>()  // recv_src
                          .Arg<ffi::BufferR1<ffi::S32>>()  // recv_count
                          .Arg<ffi::BufferR2<ffi::S32>>()  // slot
                          .Ret<ffi::AnyBuffer>()));        // out [T, K, H]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLDispatchCached, LLDispatchCached,
    WithGeometryAttrs(BindStreamAndDevice()
                          .Arg<ffi::AnyBuffer>()           // x
                          .Arg<ffi::BufferR2<ffi::S32>>()  // topk_idx
                          .Arg<ffi::BufferR2<ffi::S32>>()  // slot
                          .Arg<ffi::BufferR1<ffi::S32>>()  // recv_count
                          .RemainingArgs()                 // scale f32[T, K] (optional)
                          .Ret<ffi::AnyBuffer>()           // out
                          .Attr<bool>("zero_fill")));
