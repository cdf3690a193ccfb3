// XLA FFI handler for the dispatch layout (target jax_ep_get_dispatch_layout):
// checks buffer shapes and attributes, then launches the kernel declared in
// ffi/kernels/layout/layout.h on XLA's stream. No math here.
//
//   operand  topk_idx               s32[T, K]
//   attrs    num_experts (i64), num_ranks (i64)
//   results  num_tokens_per_rank    s32[R]
//            num_tokens_per_expert  s32[E]
//            is_token_in_rank       pred[T, R]
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

#include "ffi/handlers/cuda_handlers.h"
#include "ffi/handlers/ffi_helpers.h"
#include "ffi/kernels/layout/layout.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jax_ep::ffi_util::CudaError;
using jax_ep::ffi_util::Dims;

ffi::Error GetDispatchLayout(cudaStream_t stream, ffi::Buffer<ffi::S32, 2> topk_idx,
                             int64_t num_experts, int64_t num_ranks,
                             ffi::ResultBuffer<ffi::S32, 1> num_tokens_per_rank,
                             ffi::ResultBuffer<ffi::S32, 1> num_tokens_per_expert,
                             ffi::ResultBuffer<ffi::PRED, 2> is_token_in_rank) {
  const std::string where = "jax_ep_get_dispatch_layout: ";
  if (num_experts < 1 || num_experts > jax_ep::kLayoutMaxExperts) {
    return ffi::Error::InvalidArgument(
        where + "num_experts must be in [1, " + std::to_string(jax_ep::kLayoutMaxExperts) +
        "], got " + std::to_string(num_experts));
  }
  if (num_ranks < 1 || num_experts % num_ranks != 0) {
    return ffi::Error::InvalidArgument(
        where + "num_ranks must be >= 1 and divide num_experts=" + std::to_string(num_experts) +
        ", got " + std::to_string(num_ranks));
  }
  const auto idx_dims = topk_idx.dimensions();
  const int64_t num_tokens = idx_dims[0];
  const int64_t num_topk = idx_dims[1];
  if (num_topk > jax_ep::kLayoutMaxTopk) {
    return ffi::Error::InvalidArgument(where + "top-k must be <= " +
                                       std::to_string(jax_ep::kLayoutMaxTopk) + ", got " +
                                       std::to_string(num_topk));
  }
  const auto rank_dims = num_tokens_per_rank->dimensions();
  const auto expert_dims = num_tokens_per_expert->dimensions();
  const auto mask_dims = is_token_in_rank->dimensions();
  if (rank_dims[0] != num_ranks || expert_dims[0] != num_experts ||
      mask_dims[0] != num_tokens || mask_dims[1] != num_ranks) {
    return ffi::Error::InvalidArgument(
        where + "result shapes " + Dims(rank_dims) + ", " + Dims(expert_dims) + ", " +
        Dims(mask_dims) + " do not match topk_idx " + Dims(idx_dims) + " with num_experts=" +
        std::to_string(num_experts) + ", num_ranks=" + std::to_string(num_ranks));
  }

  jax_ep::LayoutParams params;
  params.topk_idx = topk_idx.typed_data();
  params.num_tokens_per_rank = num_tokens_per_rank->typed_data();
  params.num_tokens_per_expert = num_tokens_per_expert->typed_data();
  params.is_token_in_rank = is_token_in_rank->typed_data();
  params.num_tokens = num_tokens;
  params.num_topk = num_topk;
  params.num_experts = num_experts;
  params.num_ranks = num_ranks;

  cudaError_t err = jax_ep::LaunchDispatchLayout(params, stream);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess) return CudaError(where, err);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpGetDispatchLayout, GetDispatchLayout,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // topk_idx
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("num_ranks")
                                  .Ret<ffi::BufferR1<ffi::S32>>()     // num_tokens_per_rank
                                  .Ret<ffi::BufferR1<ffi::S32>>()     // num_tokens_per_expert
                                  .Ret<ffi::BufferR2<ffi::PRED>>(),  // is_token_in_rank
                              JAX_EP_GRAPH_SAFE);
