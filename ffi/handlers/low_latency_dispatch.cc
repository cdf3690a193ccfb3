// XLA FFI handlers of the low-latency dispatch (kernels: ffi/kernels/
// low_latency/low_latency.h; runtime: ffi/runtime/low_latency_runtime.h), one
// per target: find this device's PE context, check shapes, fill
// LLDispatchArgs and launch on XLA's stream. No math, no host
// synchronisation. Notation: low_latency_checks.h; x dtypes bf16 | f16 | f32.
// Every target takes the attributes max_tokens_per_rank (i64) and
// num_experts (i64), and first the operand axis_index s32[] (lax.axis_index
// of the call: the kernels stop with a message when it is not the PE's rank).
//
// jax_ep_ll_dispatch            attrs use_fp8 (bool), zero_fill (bool)
//   operands  x [T, H], topk_idx s32[T, K]
//   results   recv_x [L, RM, H] (x dtype, or f8e4m3fn with use_fp8), recv_count s32[L],
//             recv_src s32[L, RM], slot s32[T, K], then recv_scales f32[L, RM, H/128]
//             only with use_fp8; or the ragged layout: recv_x [N, H] and
//             recv_scales f32[N, H/128] with N = RM * min(K, L) (low_latency.h)
// jax_ep_ll_dispatch_send       attrs use_fp8
//   operands  x [T, H], topk_idx s32[T, K]      results  token s32[2]
// jax_ep_ll_dispatch_recv       attrs use_fp8, zero_fill
//   operands  token s32[2], topk_idx s32[T, K]  results  as jax_ep_ll_dispatch
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "ffi/handlers/ffi_helpers.h"
#include "ffi/handlers/low_latency_checks.h"
#include "ffi/handlers/low_latency_handlers.h"
#include "ffi/kernels/low_latency/low_latency.h"
#include "ffi/runtime/low_latency_runtime.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jax_ep::ffi_util;   // Dims, Shape, SameDims, ExpectShape, LaunchStatus, ...
using namespace jax_ep::ll_checks;  // BeginLLCall, CheckTopk, CheckToken*, CheckFits, ...

// The receive results of jax_ep_ll_dispatch and jax_ep_ll_dispatch_recv.
struct DispatchResults {
  ffi::Result<ffi::AnyBuffer> recv_x;
  ffi::Result<ffi::Buffer<ffi::S32, 1>> recv_count;
  ffi::Result<ffi::Buffer<ffi::S32, 2>> recv_src;
  ffi::Result<ffi::Buffer<ffi::S32, 2>> slot;
  ffi::RemainingRets extra;  // recv_scales (use_fp8)
};

// The arguments every dispatch target fills first.
jax_ep::LLDispatchArgs BaseArgs(const ffi::Buffer<ffi::S32, 2>& topk_idx, bool use_fp8,
                                bool zero_fill) {
  jax_ep::LLDispatchArgs args;
  args.topk_idx = topk_idx.typed_data();
  args.use_fp8 = use_fp8;
  args.zero_fill = zero_fill;
  return args;
}

// The send half's x [T, H]: sets args->x, args->dtype and *hidden.
ffi::Error DecodeX(const std::string& where, const ffi::AnyBuffer& x, int64_t T,
                   jax_ep::LLDispatchArgs* args, int64_t* hidden) {
  if (!ToLLElemType(x.element_type(), &args->dtype)) {
    return ffi::Error::InvalidArgument(where + "x must be bfloat16, float16 or float32");
  }
  const auto dims = x.dimensions();
  if (dims.size() != 2 || dims[0] != T) {
    return ffi::Error::InvalidArgument(where + "x must have shape [T=" + Str(T) +
                                       ", H] like topk_idx, got " + Dims(dims));
  }
  *hidden = dims[1];
  args->x = x.untyped_data();
  return ffi::Error::Success();
}

// recv_scales f32[rows..., H/128], the fifth result of an FP8 dispatch (rows:
// [L, R*M] padded, [N] ragged, as recv_x).
ffi::Error DecodeScales(const std::string& where, const ffi::RemainingRets& extra,
                        std::initializer_list<int64_t> rows, int64_t hidden,
                        jax_ep::LLDispatchArgs* args) {
  std::vector<int64_t> want(rows);
  want.push_back(hidden / jax_ep::kLLFp8Block);
  const std::string shape = JoinDims(want);
  if (extra.size() != 1) {
    return ffi::Error::InvalidArgument(where + "with use_fp8 there must be a fifth result, "
                                       "recv_scales f32" + shape);
  }
  auto scales = extra.get<ffi::AnyBuffer>(0);
  if (!scales.has_value()) return ffi::Error::InvalidArgument(where + scales.error().message());
  ffi::AnyBuffer s = *scales.value();
  const auto dims = s.dimensions();
  const bool same = dims.size() == want.size() && std::equal(want.begin(), want.end(), dims.begin());
  if (s.element_type() != ffi::DataType::F32 || !same) {
    return ffi::Error::InvalidArgument(where + "recv_scales must be f32" + shape + ", got " +
                                       Dims(dims));
  }
  args->recv_scales = static_cast<float*>(s.untyped_data());
  return ffi::Error::Success();
}

// The receive results: fills the receive side of *args (recv_x padded
// [L, R*M, H] or ragged [N = R*M*min(K, L), H]), sets *hidden (recv_x's H)
// and *recv_dtype (recv_x's element type; left alone with use_fp8).
ffi::Error DecodeResults(const std::string& where, const DispatchResults& r, bool use_fp8,
                         int64_t R, int64_t L, int64_t M, int64_t T, int64_t K,
                         jax_ep::LLDispatchArgs* args, int64_t* hidden,
                         jax_ep::ElemType* recv_dtype) {
  const int64_t RM = R * M;
  const int64_t N = RaggedRows(RM, K, L);
  JAX_EP_RETURN_IF_ERROR(ExpertRows(where, "recv_x", r.recv_x->dimensions(), L, RM, N,
                                    &args->ragged_rows, hidden));
  if (use_fp8) {
    if (r.recv_x->element_type() != ffi::DataType::F8E4M3FN) {
      return ffi::Error::InvalidArgument(where + "with use_fp8 recv_x must be float8_e4m3fn");
    }
    if (*hidden % jax_ep::kLLFp8Block != 0) {
      return ffi::Error::InvalidArgument(where + "use_fp8 needs H to be a multiple of 128, got " +
                                         Str(*hidden));
    }
    if (args->ragged_rows > 0) {
      JAX_EP_RETURN_IF_ERROR(DecodeScales(where, r.extra, {N}, *hidden, args));
    } else {
      JAX_EP_RETURN_IF_ERROR(DecodeScales(where, r.extra, {L, RM}, *hidden, args));
    }
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

// How every dispatch target ends: the call's shape checked against the
// region, then the launch.
ffi::Error Launch(const std::string& where, const jax_ep::LLComm& comm,
                  jax_ep::LLDispatchArgs& args, jax_ep::LLShape shape, jax_ep::LLPhase phase,
                  cudaStream_t stream) {
  if (args.use_fp8 && shape.hidden % jax_ep::kLLFp8Block != 0) {
    return ffi::Error::InvalidArgument(where + "use_fp8 needs H to be a multiple of 128, got " +
                                       Str(shape.hidden));
  }
  args.shape = shape;
  JAX_EP_RETURN_IF_ERROR(CheckFits(
      where, jax_ep::LLCheckDispatch(comm, shape, jax_ep::LLElemBytes(args.dtype), args.use_fp8)));
  return LaunchStatus(where, jax_ep::LaunchLLDispatch(comm, args, phase, stream));
}

ffi::Error LLDispatch(cudaStream_t stream, int32_t device,
                      ffi::Buffer<ffi::S32, 0> axis_index, ffi::AnyBuffer x,
                      ffi::Buffer<ffi::S32, 2> topk_idx, ffi::Result<ffi::AnyBuffer> recv_x,
                      ffi::Result<ffi::Buffer<ffi::S32, 1>> recv_count,
                      ffi::Result<ffi::Buffer<ffi::S32, 2>> recv_src,
                      ffi::Result<ffi::Buffer<ffi::S32, 2>> slot, ffi::RemainingRets extra,
                      bool use_fp8, bool zero_fill, int64_t max_tokens, int64_t num_experts) {
  const std::string where = "jax_ep_ll_dispatch: ";
  LLCall call;
  JAX_EP_RETURN_IF_ERROR(BeginLLCall(where, device, max_tokens, num_experts, &call));
  const int64_t R = call.R, M = call.M, E = call.E, L = call.L;
  int64_t T = 0, K = 0, H = 0, recv_h = 0;
  JAX_EP_RETURN_IF_ERROR(CheckTopk(where, topk_idx.dimensions(), M, &T, &K));
  jax_ep::LLDispatchArgs args = BaseArgs(topk_idx, use_fp8, zero_fill);
  args.axis_index = axis_index.typed_data();
  JAX_EP_RETURN_IF_ERROR(DecodeX(where, x, T, &args, &H));
  jax_ep::ElemType recv_dtype = args.dtype;
  const DispatchResults results{recv_x, recv_count, recv_src, slot, extra};
  JAX_EP_RETURN_IF_ERROR(
      DecodeResults(where, results, use_fp8, R, L, M, T, K, &args, &recv_h, &recv_dtype));
  if (recv_h != H) {
    return ffi::Error::InvalidArgument(where + "recv_x's H (" + Str(recv_h) +
                                       ") differs from x's (" + Str(H) + ")");
  }
  if (!use_fp8 && recv_dtype != args.dtype) {
    return ffi::Error::InvalidArgument(where + "recv_x must have x's dtype");
  }
  return Launch(where, call.comm, args, jax_ep::LLShape{T, H, K, E, M}, jax_ep::kLLFused, stream);
}

ffi::Error LLDispatchSend(cudaStream_t stream, int32_t device,
                          ffi::Buffer<ffi::S32, 0> axis_index, ffi::AnyBuffer x,
                          ffi::Buffer<ffi::S32, 2> topk_idx,
                          ffi::Result<ffi::Buffer<ffi::S32, 1>> token, bool use_fp8,
                          int64_t max_tokens, int64_t num_experts) {
  const std::string where = "jax_ep_ll_dispatch_send: ";
  LLCall call;
  JAX_EP_RETURN_IF_ERROR(BeginLLCall(where, device, max_tokens, num_experts, &call));
  const int64_t M = call.M, E = call.E;
  int64_t T = 0, K = 0, H = 0;
  JAX_EP_RETURN_IF_ERROR(CheckTopk(where, topk_idx.dimensions(), M, &T, &K));
  jax_ep::LLDispatchArgs args = BaseArgs(topk_idx, use_fp8, /*zero_fill=*/true);
  args.axis_index = axis_index.typed_data();
  JAX_EP_RETURN_IF_ERROR(DecodeX(where, x, T, &args, &H));
  JAX_EP_RETURN_IF_ERROR(CheckTokenOut(where, token->dimensions()));
  args.token_out = token->typed_data();
  return Launch(where, call.comm, args, jax_ep::LLShape{T, H, K, E, M},
                jax_ep::kLLSendOnly, stream);
}

ffi::Error LLDispatchRecv(cudaStream_t stream, int32_t device,
                          ffi::Buffer<ffi::S32, 0> axis_index, ffi::Buffer<ffi::S32, 1> token,
                          ffi::Buffer<ffi::S32, 2> topk_idx, ffi::Result<ffi::AnyBuffer> recv_x,
                          ffi::Result<ffi::Buffer<ffi::S32, 1>> recv_count,
                          ffi::Result<ffi::Buffer<ffi::S32, 2>> recv_src,
                          ffi::Result<ffi::Buffer<ffi::S32, 2>> slot, ffi::RemainingRets extra,
                          bool use_fp8, bool zero_fill, int64_t max_tokens, int64_t num_experts) {
  const std::string where = "jax_ep_ll_dispatch_recv: ";
  LLCall call;
  JAX_EP_RETURN_IF_ERROR(BeginLLCall(where, device, max_tokens, num_experts, &call));
  const int64_t R = call.R, M = call.M, E = call.E, L = call.L;
  int64_t T = 0, K = 0, H = 0;
  JAX_EP_RETURN_IF_ERROR(CheckTopk(where, topk_idx.dimensions(), M, &T, &K));
  jax_ep::LLDispatchArgs args = BaseArgs(topk_idx, use_fp8, zero_fill);
  args.axis_index = axis_index.typed_data();
  const DispatchResults results{recv_x, recv_count, recv_src, slot, extra};
  JAX_EP_RETURN_IF_ERROR(
      DecodeResults(where, results, use_fp8, R, L, M, T, K, &args, &H, &args.dtype));
  JAX_EP_RETURN_IF_ERROR(CheckTokenIn(where, token.dimensions()));
  args.token_in = token.typed_data();
  return Launch(where, call.comm, args, jax_ep::LLShape{T, H, K, E, M},
                jax_ep::kLLRecvOnly, stream);
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
                                              .Arg<ffi::BufferR0<ffi::S32>>()      // axis_index
                                              .Arg<ffi::AnyBuffer>()               // x
                                              .Arg<ffi::BufferR2<ffi::S32>>())),  // topk_idx
    JAX_EP_GRAPH_SAFE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLDispatchSend, LLDispatchSend,
    WithGeometryAttrs(BindStreamAndDevice()
                          .Arg<ffi::BufferR0<ffi::S32>>()  // axis_index
                          .Arg<ffi::AnyBuffer>()           // x
                          .Arg<ffi::BufferR2<ffi::S32>>()  // topk_idx
                          .Ret<ffi::BufferR1<ffi::S32>>()  // token
                          .Attr<bool>("use_fp8")),
    JAX_EP_GRAPH_SAFE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLDispatchRecv, LLDispatchRecv,
    WithGeometryAttrs(WithDispatchResults(BindStreamAndDevice()
                                              .Arg<ffi::BufferR0<ffi::S32>>()      // axis_index
                                              .Arg<ffi::BufferR1<ffi::S32>>()      // token
                                              .Arg<ffi::BufferR2<ffi::S32>>())),  // topk_idx
    JAX_EP_GRAPH_SAFE);
