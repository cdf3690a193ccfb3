// XLA FFI handler for the dispatch routing (target jax_ep_route): checks
// buffer shapes and attributes, then launches the kernel declared in
// ffi/kernels/layout/route.h on XLA's stream. No math here.
//
//   operand  topk_idx  s32[T, K]
//   attrs    num_experts (i64), num_ranks (i64)
//   results  slot      s32[T, R]
//            sent      s32[R]
#include <cstdint>
#include <optional>
#include <string>

#include <cuda_runtime.h>

#include "ffi/handlers/cuda_handlers.h"
#include "ffi/handlers/ffi_helpers.h"
#include "ffi/kernels/layout/route.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jax_ep::ffi_util::CudaError;
using jax_ep::ffi_util::Dims;

ffi::Error Route(cudaStream_t stream, ffi::ScratchAllocator scratch,
                 ffi::Buffer<ffi::S32, 2> topk_idx, int64_t num_experts, int64_t num_ranks,
                 ffi::ResultBuffer<ffi::S32, 2> slot, ffi::ResultBuffer<ffi::S32, 1> sent) {
  const std::string where = "jax_ep_route: ";
  if (num_ranks < 1 || num_ranks > jax_ep::kRouteMaxRanks || num_experts < 1 ||
      num_experts % num_ranks != 0) {
    return ffi::Error::InvalidArgument(
        where + "num_ranks must be in [1, " + std::to_string(jax_ep::kRouteMaxRanks) +
        "] and divide num_experts; got num_ranks=" + std::to_string(num_ranks) +
        ", num_experts=" + std::to_string(num_experts));
  }
  const auto idx_dims = topk_idx.dimensions();
  const auto slot_dims = slot->dimensions();
  const auto sent_dims = sent->dimensions();
  if (slot_dims[0] != idx_dims[0] || slot_dims[1] != num_ranks || sent_dims[0] != num_ranks) {
    return ffi::Error::InvalidArgument(where + "result shapes " + Dims(slot_dims) + ", " +
                                       Dims(sent_dims) + " do not match topk_idx " +
                                       Dims(idx_dims) + " with num_ranks=" +
                                       std::to_string(num_ranks));
  }
  jax_ep::RouteParams params;
  params.topk_idx = topk_idx.typed_data();
  params.slot = slot->typed_data();
  params.sent = sent->typed_data();
  params.num_tokens = idx_dims[0];
  params.num_topk = idx_dims[1];
  params.num_experts = num_experts;
  params.num_ranks = num_ranks;
  const int64_t scratch_ints = jax_ep::RouteScratchInts(params.num_tokens, num_ranks);
  const std::optional<void*> counts = scratch.Allocate(scratch_ints * sizeof(int32_t), 16);
  if (!counts.has_value()) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      where + "could not allocate " + std::to_string(scratch_ints * 4) +
                          " bytes of scratch");
  }
  const cudaError_t err =
      jax_ep::LaunchRoute(params, static_cast<int32_t*>(counts.value()), stream);
  if (err != cudaSuccess) return CudaError(where, err);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpRoute, Route,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // topk_idx
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("num_ranks")
                                  .Ret<ffi::BufferR2<ffi::S32>>()   // slot
                                  .Ret<ffi::BufferR1<ffi::S32>>());  // sent
