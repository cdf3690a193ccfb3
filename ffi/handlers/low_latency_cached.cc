// XLA FFI handler of the low-latency cached dispatch (the backward of
// combine; kernels: ffi/kernels/low_latency/low_latency.h): find this
// device's PE context, check shapes, fill LLCachedDispatchArgs and launch on
// XLA's stream. No math, no host synchronisation. Notation:
// low_latency_checks.h.
//
// jax_ep_ll_dispatch_cached     attrs zero_fill (bool), max_tokens_per_rank (i64),
//                                     num_experts (i64)
//   operands  axis_index s32[] (lax.axis_index of the call), x [T, H] (bf16 | f16 | f32),
//             topk_idx s32[T, K], slot s32[T, K], recv_count s32[L], optional scale f32[T, K]
//   results   out [L, RM, H] (x dtype), or ragged [N, H] (low_latency.h)
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
using namespace jax_ep::ll_checks;  // BeginLLCall, CheckTopk, CheckFits, ...

// The optional scale f32[T, K] operand; nullptr (scale 1) without it.
ffi::Error DecodeScale(const std::string& where, const ffi::RemainingArgs& rest, int64_t T,
                       int64_t K, const float** scale) {
  if (rest.size() > 1) {
    return ffi::Error::InvalidArgument(where + "at most one extra operand (scale f32[T, K])");
  }
  *scale = nullptr;
  if (rest.size() == 0) return ffi::Error::Success();
  auto operand = rest.get<ffi::AnyBuffer>(0);
  if (!operand.has_value()) return ffi::Error::InvalidArgument(where + operand.error().message());
  const ffi::AnyBuffer s = operand.value();
  if (s.element_type() != ffi::DataType::F32 || !SameDims(s.dimensions(), {T, K})) {
    return ffi::Error::InvalidArgument(where + "scale must be f32" + Shape({T, K}) + ", got " +
                                       Dims(s.dimensions()));
  }
  *scale = static_cast<const float*>(s.untyped_data());
  return ffi::Error::Success();
}

ffi::Error LLDispatchCached(cudaStream_t stream, int32_t device,
                            ffi::Buffer<ffi::S32, 0> axis_index, ffi::AnyBuffer x,
                            ffi::Buffer<ffi::S32, 2> topk_idx, ffi::Buffer<ffi::S32, 2> slot,
                            ffi::Buffer<ffi::S32, 1> recv_count, ffi::RemainingArgs rest,
                            ffi::Result<ffi::AnyBuffer> out, bool zero_fill, int64_t max_tokens,
                            int64_t num_experts) {
  const std::string where = "jax_ep_ll_dispatch_cached: ";
  LLCall call;
  JAX_EP_RETURN_IF_ERROR(BeginLLCall(where, device, max_tokens, num_experts, &call));
  const int64_t R = call.R, M = call.M, E = call.E, L = call.L, RM = call.RM;
  int64_t T = 0, K = 0;
  JAX_EP_RETURN_IF_ERROR(CheckTopk(where, topk_idx.dimensions(), M, &T, &K));
  jax_ep::LLCachedDispatchArgs args;
  args.axis_index = axis_index.typed_data();
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
  JAX_EP_RETURN_IF_ERROR(DecodeScale(where, rest, T, K, &args.scale));
  int64_t out_h = 0;
  JAX_EP_RETURN_IF_ERROR(ExpertRows(where, "the result", out->dimensions(), L, RM,
                                    /*want_rows=*/0, &args.ragged_rows, &out_h));
  if (out->element_type() != x.element_type() || out_h != H) {
    return ffi::Error::InvalidArgument(where + "the result must have x's dtype and H (" +
                                       Str(H) + "), got " + Dims(out->dimensions()));
  }
  args.shape = jax_ep::LLShape{T, H, K, E, M};
  args.x = x.untyped_data();
  args.topk_idx = topk_idx.typed_data();
  args.slot = slot.typed_data();
  args.recv_count = recv_count.typed_data();
  args.zero_fill = zero_fill;
  args.out = out->untyped_data();
  JAX_EP_RETURN_IF_ERROR(CheckFits(
      where,
      jax_ep::LLCheckCachedDispatch(call.comm, args.shape, jax_ep::LLElemBytes(args.dtype))));
  return LaunchStatus(where, jax_ep::LaunchLLDispatchCached(call.comm, args, stream));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLDispatchCached, LLDispatchCached,
    WithGeometryAttrs(BindStreamAndDevice()
                          .Arg<ffi::BufferR0<ffi::S32>>()  // axis_index
                          .Arg<ffi::AnyBuffer>()           // x
                          .Arg<ffi::BufferR2<ffi::S32>>()  // topk_idx
                          .Arg<ffi::BufferR2<ffi::S32>>()  // slot
                          .Arg<ffi::BufferR1<ffi::S32>>()  // recv_count
                          .RemainingArgs()                 // scale f32[T, K] (optional)
                          .Ret<ffi::AnyBuffer>()           // out
                          .Attr<bool>("zero_fill")),
    JAX_EP_GRAPH_SAFE);
