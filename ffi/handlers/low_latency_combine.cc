// XLA FFI handlers of the low-latency combine and gather (kernels:
// ffi/kernels/low_latency/low_latency.h; runtime:
// ffi/runtime/low_latency_runtime.h), one per target: find this device's PE
// context, check shapes, fill LLCombineArgs and launch on XLA's stream. No
// math, no host synchronisation. Notation: low_latency_checks.h; y dtypes
// bf16 | f16 | f32. Every target takes the attributes max_tokens_per_rank
// (i64) and num_experts (i64), and first the operand axis_index s32[]
// (lax.axis_index of the call: the kernels stop with a message when it is
// not the PE's rank).
//
// y is padded [L, RM, H] or ragged [N, H] (low_latency.h), as the dispatch
// returned its rows.
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
#include <cstdint>
#include <memory>
#include <string>

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

// The send side: y, padded [L, R*M, H] or ragged [N, H] (sets args->y,
// args->ragged_rows, args->dtype, *hidden), then recv_src [L, R*M] and
// recv_count [L].
ffi::Error DecodeSendRows(const std::string& where, const ffi::AnyBuffer& y,
                          const ffi::Buffer<ffi::S32, 2>& recv_src,
                          const ffi::Buffer<ffi::S32, 1>& recv_count, int64_t L, int64_t RM,
                          jax_ep::LLCombineArgs* args, int64_t* hidden) {
  if (!ToLLElemType(y.element_type(), &args->dtype)) {
    return ffi::Error::InvalidArgument(where + "y must be bfloat16, float16 or float32");
  }
  JAX_EP_RETURN_IF_ERROR(
      ExpertRows(where, "y", y.dimensions(), L, RM, /*want_rows=*/0, &args->ragged_rows, hidden));
  args->y = y.untyped_data();
  JAX_EP_RETURN_IF_ERROR(ExpectShape(where, "recv_src", recv_src.dimensions(), {L, RM}));
  JAX_EP_RETURN_IF_ERROR(ExpectShape(where, "recv_count", recv_count.dimensions(), {L}));
  args->recv_src = recv_src.typed_data();
  args->recv_count = recv_count.typed_data();
  return ffi::Error::Success();
}

// The receive side's result: out [T, H] (combine) or [T, K, H] (gather) of
// y's element type (when the target has y: have_y, *hidden = y's H); sets
// args->out, args->dtype and *hidden.
ffi::Error DecodeOut(const std::string& where, ffi::AnyBuffer& out, bool have_y, int64_t T,
                     int64_t K, jax_ep::LLCombineArgs* args, int64_t* hidden) {
  jax_ep::ElemType out_dtype;
  if (!ToLLElemType(out.element_type(), &out_dtype) || (have_y && out_dtype != args->dtype)) {
    return ffi::Error::InvalidArgument(where + "the result must have y's dtype (bfloat16, "
                                       "float16 or float32)");
  }
  args->dtype = out_dtype;
  const auto od = out.dimensions();
  const int64_t out_h = od.size() == 0 ? -1 : od[od.size() - 1];
  if (have_y && out_h != *hidden) {
    return ffi::Error::InvalidArgument(where + "the result's H (" + Str(out_h) +
                                       ") differs from y's (" + Str(*hidden) + ")");
  }
  const int64_t H = out_h;
  const bool ok = args->gather ? SameDims(od, {T, K, H}) : SameDims(od, {T, H});
  if (!ok || H < 1) {
    return ffi::Error::InvalidArgument(where + "the result must have shape " +
                                       (args->gather ? Shape({T, K, H}) : Shape({T, H})) +
                                       ", got " + Dims(od));
  }
  *hidden = H;
  args->out = out.untyped_data();
  return ffi::Error::Success();
}

// How every combine target ends: the call's shape checked against the
// region, then the launch.
ffi::Error Launch(const std::string& where, const jax_ep::LLComm& comm,
                  jax_ep::LLCombineArgs& args, jax_ep::LLShape shape, jax_ep::LLPhase phase,
                  cudaStream_t stream) {
  args.shape = shape;
  JAX_EP_RETURN_IF_ERROR(
      CheckFits(where, jax_ep::LLCheckCombine(comm, shape, jax_ep::LLElemBytes(args.dtype))));
  return LaunchStatus(where, jax_ep::LaunchLLCombine(comm, args, phase, stream));
}

ffi::Error LLCombine(cudaStream_t stream, int32_t device,
                     ffi::Buffer<ffi::S32, 0> axis_index, ffi::AnyBuffer y,
                     ffi::Buffer<ffi::S32, 2> topk_idx, ffi::Buffer<ffi::F32, 2> topk_weights,
                     ffi::Buffer<ffi::S32, 2> recv_src, ffi::Buffer<ffi::S32, 1> recv_count,
                     ffi::Buffer<ffi::S32, 2> slot, ffi::Result<ffi::AnyBuffer> out,
                     int64_t max_tokens, int64_t num_experts) {
  const std::string where = "jax_ep_ll_combine: ";
  LLCall call;
  JAX_EP_RETURN_IF_ERROR(BeginLLCall(where, device, max_tokens, num_experts, &call));
  const int64_t R = call.R, M = call.M, E = call.E, L = call.L;
  jax_ep::LLCombineArgs args;
  args.axis_index = axis_index.typed_data();
  int64_t T = 0, K = 0, H = 0;
  JAX_EP_RETURN_IF_ERROR(DecodeSendRows(where, y, recv_src, recv_count, L, R * M, &args, &H));
  JAX_EP_RETURN_IF_ERROR(CheckTopk(where, topk_idx.dimensions(), M, &T, &K));
  JAX_EP_RETURN_IF_ERROR(ExpectShape(where, "topk_weights", topk_weights.dimensions(), {T, K}));
  JAX_EP_RETURN_IF_ERROR(ExpectShape(where, "slot", slot.dimensions(), {T, K}));
  args.topk_idx = topk_idx.typed_data();
  args.topk_weights = topk_weights.typed_data();
  args.slot = slot.typed_data();
  JAX_EP_RETURN_IF_ERROR(DecodeOut(where, *out, /*have_y=*/true, T, K, &args, &H));
  return Launch(where, call.comm, args, jax_ep::LLShape{T, H, K, E, M}, jax_ep::kLLFused, stream);
}

ffi::Error LLCombineSend(cudaStream_t stream, int32_t device,
                         ffi::Buffer<ffi::S32, 0> axis_index, ffi::AnyBuffer y,
                         ffi::Buffer<ffi::S32, 2> recv_src, ffi::Buffer<ffi::S32, 1> recv_count,
                         ffi::Result<ffi::Buffer<ffi::S32, 1>> token, int64_t max_tokens,
                         int64_t num_experts) {
  const std::string where = "jax_ep_ll_combine_send: ";
  LLCall call;
  JAX_EP_RETURN_IF_ERROR(BeginLLCall(where, device, max_tokens, num_experts, &call));
  const int64_t R = call.R, M = call.M, E = call.E, L = call.L;
  jax_ep::LLCombineArgs args;
  args.axis_index = axis_index.typed_data();
  int64_t H = 0;
  JAX_EP_RETURN_IF_ERROR(DecodeSendRows(where, y, recv_src, recv_count, L, R * M, &args, &H));
  JAX_EP_RETURN_IF_ERROR(CheckTokenOut(where, token->dimensions()));
  args.token_out = token->typed_data();
  // The send half knows no tokens or top-k: check against the allocation's top-k.
  const int64_t K = call.comm.layout.top_k;
  return Launch(where, call.comm, args, jax_ep::LLShape{0, H, K, E, M},
                jax_ep::kLLSendOnly, stream);
}

ffi::Error LLCombineRecv(cudaStream_t stream, int32_t device,
                         ffi::Buffer<ffi::S32, 0> axis_index, ffi::Buffer<ffi::S32, 1> token,
                         ffi::Buffer<ffi::S32, 2> topk_idx, ffi::Buffer<ffi::F32, 2> topk_weights,
                         ffi::Result<ffi::AnyBuffer> out, int64_t max_tokens,
                         int64_t num_experts) {
  const std::string where = "jax_ep_ll_combine_recv: ";
  LLCall call;
  JAX_EP_RETURN_IF_ERROR(BeginLLCall(where, device, max_tokens, num_experts, &call));
  const int64_t M = call.M, E = call.E;
  jax_ep::LLCombineArgs args;
  args.axis_index = axis_index.typed_data();
  int64_t T = 0, K = 0, H = 0;
  JAX_EP_RETURN_IF_ERROR(CheckTopk(where, topk_idx.dimensions(), M, &T, &K));
  JAX_EP_RETURN_IF_ERROR(ExpectShape(where, "topk_weights", topk_weights.dimensions(), {T, K}));
  args.topk_idx = topk_idx.typed_data();
  args.topk_weights = topk_weights.typed_data();
  JAX_EP_RETURN_IF_ERROR(DecodeOut(where, *out, /*have_y=*/false, T, K, &args, &H));
  JAX_EP_RETURN_IF_ERROR(CheckTokenIn(where, token.dimensions()));
  args.token_in = token.typed_data();
  return Launch(where, call.comm, args, jax_ep::LLShape{T, H, K, E, M},
                jax_ep::kLLRecvOnly, stream);
}

ffi::Error LLGather(cudaStream_t stream, int32_t device,
                    ffi::Buffer<ffi::S32, 0> axis_index, ffi::AnyBuffer y,
                    ffi::Buffer<ffi::S32, 2> topk_idx, ffi::Buffer<ffi::S32, 2> recv_src,
                    ffi::Buffer<ffi::S32, 1> recv_count, ffi::Buffer<ffi::S32, 2> slot,
                    ffi::Result<ffi::AnyBuffer> out, int64_t max_tokens, int64_t num_experts) {
  const std::string where = "jax_ep_ll_gather: ";
  LLCall call;
  JAX_EP_RETURN_IF_ERROR(BeginLLCall(where, device, max_tokens, num_experts, &call));
  const int64_t R = call.R, M = call.M, E = call.E, L = call.L;
  jax_ep::LLCombineArgs args;
  args.axis_index = axis_index.typed_data();
  args.gather = true;
  int64_t T = 0, K = 0, H = 0;
  JAX_EP_RETURN_IF_ERROR(DecodeSendRows(where, y, recv_src, recv_count, L, R * M, &args, &H));
  JAX_EP_RETURN_IF_ERROR(CheckTopk(where, topk_idx.dimensions(), M, &T, &K));
  JAX_EP_RETURN_IF_ERROR(ExpectShape(where, "slot", slot.dimensions(), {T, K}));
  args.topk_idx = topk_idx.typed_data();
  args.slot = slot.typed_data();
  JAX_EP_RETURN_IF_ERROR(DecodeOut(where, *out, /*have_y=*/true, T, K, &args, &H));
  return Launch(where, call.comm, args, jax_ep::LLShape{T, H, K, E, M}, jax_ep::kLLFused, stream);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLCombine, LLCombine,
    WithGeometryAttrs(BindStreamAndDevice()
                          .Arg<ffi::BufferR0<ffi::S32>>()  // axis_index
                          .Arg<ffi::AnyBuffer>()           // y
                          .Arg<ffi::BufferR2<ffi::S32>>()  // topk_idx
                          .Arg<ffi::BufferR2<ffi::F32>>()  // topk_weights
                          .Arg<ffi::BufferR2<ffi::S32>>()  // recv_src
                          .Arg<ffi::BufferR1<ffi::S32>>()  // recv_count
                          .Arg<ffi::BufferR2<ffi::S32>>()  // slot
                          .Ret<ffi::AnyBuffer>()),  // out
    JAX_EP_GRAPH_SAFE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLCombineSend, LLCombineSend,
    WithGeometryAttrs(BindStreamAndDevice()
                          .Arg<ffi::BufferR0<ffi::S32>>()  // axis_index
                          .Arg<ffi::AnyBuffer>()             // y
                          .Arg<ffi::BufferR2<ffi::S32>>()    // recv_src
                          .Arg<ffi::BufferR1<ffi::S32>>()    // recv_count
                          .Ret<ffi::BufferR1<ffi::S32>>()),  // token
    JAX_EP_GRAPH_SAFE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLCombineRecv, LLCombineRecv,
    WithGeometryAttrs(BindStreamAndDevice()
                          .Arg<ffi::BufferR0<ffi::S32>>()  // axis_index
                          .Arg<ffi::BufferR1<ffi::S32>>()  // token
                          .Arg<ffi::BufferR2<ffi::S32>>()  // topk_idx
                          .Arg<ffi::BufferR2<ffi::F32>>()  // topk_weights
                          .Ret<ffi::AnyBuffer>()),  // out
    JAX_EP_GRAPH_SAFE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLGather, LLGather,
    WithGeometryAttrs(BindStreamAndDevice()
                          .Arg<ffi::BufferR0<ffi::S32>>()  // axis_index
                          .Arg<ffi::AnyBuffer>()           // y
                          .Arg<ffi::BufferR2<ffi::S32>>()  // topk_idx
                          .Arg<ffi::BufferR2<ffi::S32>>()  // recv_src
                          .Arg<ffi::BufferR1<ffi::S32>>()  // recv_count
                          .Arg<ffi::BufferR2<ffi::S32>>()  // slot
                          .Ret<ffi::AnyBuffer>()),  // out [T, K, H]
    JAX_EP_GRAPH_SAFE);
