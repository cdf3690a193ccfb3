// XLA FFI handler for the dispatch routing (target jax_ep_route): checks
// buffer shapes and attributes, then launches the kernel declared in
// ffi/kernels/layout/route.h on XLA's stream. No math here.
//
//   operand  topk_idx  s32[T, K]
//   attrs    num_experts (i64), num_ranks (i64)
//   results  slot      s32[T, R]
//            sent      s32[R]
//            scratch   s32[route_scratch_ints(T, R)]  per-chunk counts, discarded by the
//                      caller (a result, not ScratchAllocator memory: an allocation
//                      made while XLA records a CUDA graph would not be the one the
//                      replays use)
#include <cstdint>
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

ffi::Error Route(cudaStream_t stream, ffi::Buffer<ffi::S32, 2> topk_idx, int64_t num_experts,
                 int64_t num_ranks, ffi::ResultBuffer<ffi::S32, 2> slot,
                 ffi::ResultBuffer<ffi::S32, 1> sent, ffi::ResultBuffer<ffi::S32, 1> scratch) {
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
  if (scratch->element_count() != static_cast<size_t>(scratch_ints)) {
    return ffi::Error::InvalidArgument(where + "scratch must be s32[" +
                                       std::to_string(scratch_ints) + "], got " +
                                       Dims(scratch->dimensions()));
  }
  const cudaError_t err =
      jax_ep::LaunchRoute(params, scratch->typed_data(), stream);
  if (err != cudaSuccess) return CudaError(where, err);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpRoute, Route,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // topk_idx
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("num_ranks")
                                  .Ret<ffi::BufferR2<ffi::S32>>()  // slot
                                  .Ret<ffi::BufferR1<ffi::S32>>()  // sent
                                  .Ret<ffi::BufferR1<ffi::S32>>(),  // scratch
                              JAX_EP_GRAPH_SAFE);
