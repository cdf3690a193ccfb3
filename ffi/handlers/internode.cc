// XLA FFI handlers for the internode ops (kernels: ffi/kernels/internode/internode.h;
// runtime: ffi/runtime/internode_runtime.h), one per target: find this
// process's internode context, check shapes, fill plain structs and launch on
// XLA's stream. R = EP size, N nodes of G ranks, T tokens.
// jax_ep_internode_dispatch
//   operands  axis_index s32[], slot s32[T, R], node_slot s32[T, N], sent s32[R],
//             node_sent s32[N], payload_0..P-1 [T, ...] (raw bytes)
//   attrs     capacity (i64)
//   results   rank_counts s32[R, R], relay_pos s32[N, T, G], relay_rows s32[N],
//             recv_0..P-1 [capacity, ...]
// jax_ep_internode_dispatch_cached
//   operands  axis_index, slot s32[T, R] (post-drop), node_slot s32[T, N],
//             rank_counts s32[R, R], relay_rows s32[N], payload_0..P-1
//   attrs     capacity (i64)
//   results   recv_0..P-1
// jax_ep_internode_combine
//   operands  axis_index, y [capacity, H] (bf16 | f16 | f32), node_slot s32[T, N],
//             rank_counts s32[R, R], relay_pos s32[N, T, G], relay_rows s32[N]
//   results   out [T, H], dtype of y
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "ffi/handlers/ffi_helpers.h"
#include "ffi/handlers/internode_handlers.h"
#include "ffi/handlers/payloads.h"
#include "ffi/kernels/internode/internode.h"
#include "ffi/runtime/internode_runtime.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jax_ep::ffi_util;  // Dims, Str, SameDims, CheckMatrix, CollectPayloads, ...

struct Context {
  jax_ep::InternodeComm comm{};
  std::shared_ptr<const jax_ep::InternodeContext> hold;
  int64_t R = 0, N = 0, G = 0;
};

ffi::Error Begin(const std::string& where, int32_t device, Context* ctx) {
  JAX_EP_RETURN_IF_ERROR(
      AcquireComm(jax_ep::AcquireInternode, where, device, &ctx->comm, &ctx->hold));
  ctx->R = ctx->comm.layout.num_ranks;
  ctx->N = ctx->comm.layout.num_nodes;
  ctx->G = ctx->comm.layout.ranks_per_node;
  return ffi::Error::Success();
}

ffi::Error Expect(const std::string& where, const char* name, ffi::Span<const int64_t> dims,
                  std::initializer_list<int64_t> want) {
  return ExpectShape(where, name, dims, want);
}

// slot [T, R] and node_slot [T, N]; sets *T.
ffi::Error DecodeRouting(const std::string& where, const Context& ctx,
                         ffi::Span<const int64_t> slot, ffi::Span<const int64_t> node_slot,
                         int64_t* T) {
  *T = slot[0];
  JAX_EP_RETURN_IF_ERROR(Expect(where, "slot", slot, {*T, ctx.R}));
  JAX_EP_RETURN_IF_ERROR(Expect(where, "node_slot", node_slot, {*T, ctx.N}));
  if (*T > ctx.comm.layout.max_tokens) {
    return TooLarge(where, "T=" + Str(*T) + " tokens but the internode region holds " +
                               Str(ctx.comm.layout.max_tokens) +
                               " per rank; initialize jax_ep with a larger max_tokens_per_rank");
  }
  return ffi::Error::Success();
}

ffi::Error DecodePayloads(const std::string& where, const Context& ctx, int64_t T,
                          const ffi::RemainingArgs& payloads, const ffi::RemainingRets& recvs,
                          int64_t capacity, jax_ep::InternodeDispatchArgs* args) {
  if (capacity < 0 || capacity > INT32_MAX) {
    return ffi::Error::InvalidArgument(where + "capacity must be in [0, 2^31), got " +
                                       Str(capacity));
  }
  std::vector<Payload> found;
  JAX_EP_RETURN_IF_ERROR(CollectPayloads(where, payloads, recvs, T, capacity,
                                         jax_ep::kInternodeMaxParts, &found));
  std::vector<int64_t> row_bytes;
  args->num_parts = static_cast<int32_t>(found.size());
  for (size_t i = 0; i < found.size(); ++i) {
    args->parts[i] = jax_ep::InternodePart{found[i].src, found[i].dst, found[i].row_bytes};
    row_bytes.push_back(found[i].row_bytes);
  }
  const int64_t msg = jax_ep::InternodeMessageBytes(static_cast<int>(ctx.G), row_bytes.data(),
                                                    static_cast<int>(row_bytes.size()));
  if (msg > ctx.comm.layout.stride) {
    return TooLarge(where, "a message of this dispatch takes " + Str(msg) +
                               " bytes but the internode region's rows hold " +
                               Str(ctx.comm.layout.stride) +
                               "; initialize jax_ep with a larger hidden / top_k");
  }
  args->num_tokens = T;
  args->capacity = capacity;
  return ffi::Error::Success();
}

ffi::Error InternodeDispatch(cudaStream_t stream, int32_t device,
                             ffi::Buffer<ffi::S32, 0> axis_index, ffi::Buffer<ffi::S32, 2> slot,
                             ffi::Buffer<ffi::S32, 2> node_slot, ffi::Buffer<ffi::S32, 1> sent,
                             ffi::Buffer<ffi::S32, 1> node_sent, ffi::RemainingArgs payloads,
                             ffi::ResultBuffer<ffi::S32, 2> rank_counts,
                             ffi::ResultBuffer<ffi::S32, 3> relay_pos,
                             ffi::ResultBuffer<ffi::S32, 1> relay_rows, ffi::RemainingRets recvs,
                             int64_t capacity) {
  const std::string where = "jax_ep_internode_dispatch: ";
  Context ctx;
  JAX_EP_RETURN_IF_ERROR(Begin(where, device, &ctx));
  int64_t T = 0;
  JAX_EP_RETURN_IF_ERROR(DecodeRouting(where, ctx, slot.dimensions(), node_slot.dimensions(), &T));
  JAX_EP_RETURN_IF_ERROR(Expect(where, "sent", sent.dimensions(), {ctx.R}));
  JAX_EP_RETURN_IF_ERROR(Expect(where, "node_sent", node_sent.dimensions(), {ctx.N}));
  JAX_EP_RETURN_IF_ERROR(CheckMatrix(where, "rank_counts", rank_counts->dimensions(), ctx.R, ctx.R));
  JAX_EP_RETURN_IF_ERROR(Expect(where, "relay_pos", relay_pos->dimensions(), {ctx.N, T, ctx.G}));
  JAX_EP_RETURN_IF_ERROR(Expect(where, "relay_rows", relay_rows->dimensions(), {ctx.N}));
  jax_ep::InternodeDispatchArgs args{};
  args.axis_index = axis_index.typed_data();
  args.slot = slot.typed_data();
  args.node_slot = node_slot.typed_data();
  args.sent = sent.typed_data();
  args.node_sent = node_sent.typed_data();
  args.rank_counts = rank_counts->typed_data();
  args.relay_pos = relay_pos->typed_data();
  args.relay_rows_out = relay_rows->typed_data();
  JAX_EP_RETURN_IF_ERROR(DecodePayloads(where, ctx, T, payloads, recvs, capacity, &args));
  return LaunchStatus(where, jax_ep::LaunchInternodeDispatch(ctx.comm, args, stream));
}

ffi::Error InternodeDispatchCached(cudaStream_t stream, int32_t device,
                                   ffi::Buffer<ffi::S32, 0> axis_index,
                                   ffi::Buffer<ffi::S32, 2> slot,
                                   ffi::Buffer<ffi::S32, 2> node_slot,
                                   ffi::Buffer<ffi::S32, 2> rank_counts,
                                   ffi::Buffer<ffi::S32, 1> relay_rows,
                                   ffi::RemainingArgs payloads, ffi::RemainingRets recvs,
                                   int64_t capacity) {
  const std::string where = "jax_ep_internode_dispatch_cached: ";
  Context ctx;
  JAX_EP_RETURN_IF_ERROR(Begin(where, device, &ctx));
  int64_t T = 0;
  JAX_EP_RETURN_IF_ERROR(DecodeRouting(where, ctx, slot.dimensions(), node_slot.dimensions(), &T));
  JAX_EP_RETURN_IF_ERROR(CheckMatrix(where, "rank_counts", rank_counts.dimensions(), ctx.R, ctx.R));
  JAX_EP_RETURN_IF_ERROR(Expect(where, "relay_rows", relay_rows.dimensions(), {ctx.N}));
  jax_ep::InternodeDispatchArgs args{};
  args.axis_index = axis_index.typed_data();
  args.slot = slot.typed_data();
  args.node_slot = node_slot.typed_data();
  args.rank_counts = const_cast<int32_t*>(rank_counts.typed_data());  // read only when cached
  args.relay_rows = relay_rows.typed_data();
  JAX_EP_RETURN_IF_ERROR(DecodePayloads(where, ctx, T, payloads, recvs, capacity, &args));
  return LaunchStatus(where, jax_ep::LaunchInternodeDispatch(ctx.comm, args, stream));
}

ffi::Error InternodeCombine(cudaStream_t stream, int32_t device,
                            ffi::Buffer<ffi::S32, 0> axis_index, ffi::AnyBuffer y,
                            ffi::Buffer<ffi::S32, 2> node_slot,
                            ffi::Buffer<ffi::S32, 2> rank_counts,
                            ffi::Buffer<ffi::S32, 3> relay_pos,
                            ffi::Buffer<ffi::S32, 1> relay_rows,
                            ffi::Result<ffi::AnyBuffer> out) {
  const std::string where = "jax_ep_internode_combine: ";
  Context ctx;
  JAX_EP_RETURN_IF_ERROR(Begin(where, device, &ctx));
  jax_ep::InternodeCombineArgs args{};
  if (!ToElemType(y.element_type(), &args.dtype) || args.dtype == jax_ep::ElemType::kF8E4M3FN) {
    return ffi::Error::InvalidArgument(where + "y must be bfloat16, float16 or float32");
  }
  const auto y_dims = y.dimensions();
  if (y_dims.size() != 2) {
    return ffi::Error::InvalidArgument(where + "y must be [capacity, H], got " + Dims(y_dims));
  }
  const int64_t H = y_dims[1];
  const int64_t T = node_slot.dimensions()[0];
  JAX_EP_RETURN_IF_ERROR(Expect(where, "node_slot", node_slot.dimensions(), {T, ctx.N}));
  JAX_EP_RETURN_IF_ERROR(CheckMatrix(where, "rank_counts", rank_counts.dimensions(), ctx.R, ctx.R));
  JAX_EP_RETURN_IF_ERROR(Expect(where, "relay_pos", relay_pos.dimensions(), {ctx.N, T, ctx.G}));
  JAX_EP_RETURN_IF_ERROR(Expect(where, "relay_rows", relay_rows.dimensions(), {ctx.N}));
  if (out->element_type() != y.element_type() || !SameDims(out->dimensions(), {T, H})) {
    return ffi::Error::InvalidArgument(where + "the result must be [T=" + Str(T) + ", H=" +
                                       Str(H) + "] with y's dtype, got " + Dims(out->dimensions()));
  }
  if (T > ctx.comm.layout.max_tokens ||
      (H * jax_ep::ElemTypeBytes(args.dtype) + 15) / 16 * 16 > ctx.comm.layout.stride) {
    return TooLarge(where, "[T=" + Str(T) + ", H=" + Str(H) + "] rows do not fit the internode "
                           "region (" + Str(ctx.comm.layout.max_tokens) + " tokens of " +
                           Str(ctx.comm.layout.stride) + " bytes); initialize jax_ep with larger "
                           "max_tokens_per_rank / hidden");
  }
  args.axis_index = axis_index.typed_data();
  args.y = y.untyped_data();
  args.node_slot = node_slot.typed_data();
  args.rank_counts = rank_counts.typed_data();
  args.relay_pos = relay_pos.typed_data();
  args.relay_rows = relay_rows.typed_data();
  args.out = out->untyped_data();
  args.num_tokens = T;
  args.capacity = y_dims[0];
  args.hidden = H;
  return LaunchStatus(where, jax_ep::LaunchInternodeCombine(ctx.comm, args, stream));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpInternodeDispatch, InternodeDispatch,
                              BindStreamAndDevice()
                                  .Arg<ffi::BufferR0<ffi::S32>>()  // axis_index
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // slot
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // node_slot
                                  .Arg<ffi::BufferR1<ffi::S32>>()  // sent
                                  .Arg<ffi::BufferR1<ffi::S32>>()  // node_sent
                                  .RemainingArgs()                  // payloads
                                  .Ret<ffi::BufferR2<ffi::S32>>()  // rank_counts
                                  .Ret<ffi::BufferR3<ffi::S32>>()  // relay_pos
                                  .Ret<ffi::BufferR1<ffi::S32>>()  // relay_rows
                                  .RemainingRets()                  // receive buffers
                                  .Attr<int64_t>("capacity"),
                              JAX_EP_GRAPH_SAFE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpInternodeDispatchCached, InternodeDispatchCached,
                              BindStreamAndDevice()
                                  .Arg<ffi::BufferR0<ffi::S32>>()  // axis_index
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // slot (post-drop)
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // node_slot
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // rank_counts
                                  .Arg<ffi::BufferR1<ffi::S32>>()  // relay_rows
                                  .RemainingArgs()                  // payloads
                                  .RemainingRets()                  // receive buffers
                                  .Attr<int64_t>("capacity"),
                              JAX_EP_GRAPH_SAFE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpInternodeCombine, InternodeCombine,
                              BindStreamAndDevice()
                                  .Arg<ffi::BufferR0<ffi::S32>>()  // axis_index
                                  .Arg<ffi::AnyBuffer>()            // y
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // node_slot
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // rank_counts
                                  .Arg<ffi::BufferR3<ffi::S32>>()  // relay_pos
                                  .Arg<ffi::BufferR1<ffi::S32>>()  // relay_rows
                                  .Ret<ffi::AnyBuffer>(),  // out
                              JAX_EP_GRAPH_SAFE);
