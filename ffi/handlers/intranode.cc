// XLA FFI handlers for the intranode ops (kernels: ffi/kernels/intranode/intranode.h;
// runtime: ffi/runtime/intranode_runtime.h), one per target: find this
// device's rank context, check shapes, fill plain structs and launch on XLA's
// stream. No math, no host synchronisation, no CUDA API calls besides the
// launches.
//
// Every target's first operand is axis_index s32[], the call's position on
// the EP axis (lax.axis_index): the kernels stop with a message when it is not
// the rank jax_ep.initialize gave this device (a mesh of another order).
// jax_ep_intranode_dispatch
//   operands  slot         s32[T, R]   position of token t among my tokens to rank r, or -1
//             sent         s32[R]      my tokens per destination rank
//             payload_0..N-1  [T, ...] any dtype, moved as raw bytes
//   attrs     capacity (i64)
//   results   rank_counts  s32[R, R]   C[s][r] = tokens s sends to r (same on every rank)
//             recv_0..N-1  [capacity, ...] same dtypes; rows >= num_recv are zero
// jax_ep_intranode_dispatch_cached
//   operands  slot s32[T, R] (post-drop), rank_counts s32[R, R], payload_0..N-1
//   attrs     capacity (i64)
//   results   recv_0..N-1
// jax_ep_intranode_combine
//   operands  y [capacity, H] (bf16 | f16 | f32 | f8e4m3fn)
//             token_slot s32[T, R] (post-drop), rank_counts s32[R, R]
//   results   out [T, H], dtype of y
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "ffi/handlers/cuda_handlers.h"
#include "ffi/handlers/ffi_helpers.h"
#include "ffi/handlers/payloads.h"
#include "ffi/kernels/intranode/intranode.h"
#include "ffi/runtime/intranode_runtime.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jax_ep::ffi_util;  // Dims, Str, ToElemType, AcquireComm, LaunchStatus, ...

// Fills args.parts from the payloads and the receive results (payloads.h).
ffi::Error CollectParts(const std::string& where, const ffi::RemainingArgs& payloads,
                        const ffi::RemainingRets& recvs, int64_t num_tokens, int64_t capacity,
                        jax_ep::IntranodeDispatchArgs* args, std::vector<int64_t>* row_bytes) {
  std::vector<Payload> found;
  JAX_EP_RETURN_IF_ERROR(CollectPayloads(where, payloads, recvs, num_tokens, capacity,
                                         jax_ep::kIntranodeMaxParts, &found));
  args->num_parts = static_cast<int32_t>(found.size());
  for (size_t i = 0; i < found.size(); ++i) {
    args->parts[i] = jax_ep::IntranodePart{found[i].src, found[i].dst, found[i].row_bytes};
    row_bytes->push_back(found[i].row_bytes);
  }
  return ffi::Error::Success();
}

// A [T, R] table of slots with R = the EP size; sets *T.
ffi::Error CheckSlotTable(const std::string& where, const char* name,
                          ffi::Span<const int64_t> dims, int64_t R, int64_t* T) {
  *T = dims[0];
  if (dims[1] != R) {
    return ffi::Error::InvalidArgument(where + name + " must have shape [T, R] with R = " +
                                       Str(R) + " (the EP size this device was initialized " +
                                       "with), got " + Dims(dims));
  }
  return ffi::Error::Success();
}

// What both dispatch targets check after their slot table: the count matrix,
// the capacity, the payloads and their receive results (args->parts), and
// that the comm buffer's data area holds them.
ffi::Error DecodePayloads(const std::string& where, const jax_ep::IntranodeComm& comm, int64_t T,
                          ffi::Span<const int64_t> counts_dims, const ffi::RemainingArgs& payloads,
                          const ffi::RemainingRets& recvs, int64_t capacity,
                          jax_ep::IntranodeDispatchArgs* args) {
  const int64_t R = comm.num_ranks;
  JAX_EP_RETURN_IF_ERROR(CheckMatrix(where, "rank_counts", counts_dims, R, R));
  if (capacity < 0 || capacity > INT32_MAX) {
    return ffi::Error::InvalidArgument(where + "capacity must be in [0, 2^31), got " +
                                       Str(capacity));
  }
  args->num_tokens = T;
  args->capacity = capacity;
  std::vector<int64_t> row_bytes;
  JAX_EP_RETURN_IF_ERROR(CollectParts(where, payloads, recvs, T, capacity, args, &row_bytes));
  const size_t need = jax_ep::IntranodeDispatchDataBytes(capacity, row_bytes.data(),
                                                        static_cast<int>(row_bytes.size()));
  if (need > comm.data_bytes) {
    return TooLarge(where, "the comm buffer's data area has " + std::to_string(comm.data_bytes) +
                               " bytes but this dispatch needs " + std::to_string(need) +
                               " (capacity x row bytes of every payload); initialize jax_ep with "
                               "a larger buffer");
  }
  return ffi::Error::Success();
}

ffi::Error IntranodeDispatch(cudaStream_t stream, int32_t device,
                             ffi::Buffer<ffi::S32, 0> axis_index, ffi::Buffer<ffi::S32, 2> slot,
                             ffi::Buffer<ffi::S32, 1> sent, ffi::RemainingArgs payloads,
                             ffi::ResultBuffer<ffi::S32, 2> rank_counts, ffi::RemainingRets recvs,
                             int64_t capacity) {
  const std::string where = "jax_ep_intranode_dispatch: ";
  jax_ep::IntranodeComm comm{};
  std::shared_ptr<const jax_ep::CommContext> hold;
  JAX_EP_RETURN_IF_ERROR(AcquireComm(jax_ep::AcquireIntranodeComm, where, device, &comm, &hold));
  const int64_t R = comm.num_ranks;
  int64_t T = 0;
  JAX_EP_RETURN_IF_ERROR(CheckSlotTable(where, "slot", slot.dimensions(), R, &T));
  if (!SameDims(sent.dimensions(), {R})) {
    return ffi::Error::InvalidArgument(where + "sent must have shape [R=" + Str(R) + "], got " +
                                       Dims(sent.dimensions()));
  }
  jax_ep::IntranodeDispatchArgs args{};
  args.axis_index = axis_index.typed_data();
  args.slot = slot.typed_data();
  args.sent = sent.typed_data();
  args.rank_counts = rank_counts->typed_data();
  JAX_EP_RETURN_IF_ERROR(DecodePayloads(where, comm, T, rank_counts->dimensions(), payloads, recvs,
                                        capacity, &args));
  return LaunchStatus(where, jax_ep::LaunchIntranodeDispatch(comm, args, stream));
}

ffi::Error IntranodeDispatchCached(cudaStream_t stream, int32_t device,
                                   ffi::Buffer<ffi::S32, 0> axis_index,
                                   ffi::Buffer<ffi::S32, 2> slot,
                                   ffi::Buffer<ffi::S32, 2> rank_counts,
                                   ffi::RemainingArgs payloads, ffi::RemainingRets recvs,
                                   int64_t capacity) {
  const std::string where = "jax_ep_intranode_dispatch_cached: ";
  jax_ep::IntranodeComm comm{};
  std::shared_ptr<const jax_ep::CommContext> hold;
  JAX_EP_RETURN_IF_ERROR(AcquireComm(jax_ep::AcquireIntranodeComm, where, device, &comm, &hold));
  int64_t T = 0;
  JAX_EP_RETURN_IF_ERROR(CheckSlotTable(where, "slot", slot.dimensions(), comm.num_ranks, &T));
  jax_ep::IntranodeDispatchArgs args{};
  args.axis_index = axis_index.typed_data();
  args.slot = slot.typed_data();
  args.sent = nullptr;  // cached: the kernels only read rank_counts
  args.rank_counts = const_cast<int32_t*>(rank_counts.typed_data());
  JAX_EP_RETURN_IF_ERROR(DecodePayloads(where, comm, T, rank_counts.dimensions(), payloads, recvs,
                                        capacity, &args));
  return LaunchStatus(where, jax_ep::LaunchIntranodeDispatch(comm, args, stream));
}

// y [capacity, H] of a combine: its element type and H.
ffi::Error DecodeCombineRows(const std::string& where, const ffi::AnyBuffer& y,
                             jax_ep::ElemType* dtype, int64_t* hidden) {
  if (!ToElemType(y.element_type(), dtype)) {
    return ffi::Error::InvalidArgument(where +
                                       "y must be bfloat16, float16, float32 or float8_e4m3fn");
  }
  const auto y_dims = y.dimensions();
  if (y_dims.size() != 2) {
    return ffi::Error::InvalidArgument(where + "y must be [capacity, H], got " + Dims(y_dims));
  }
  *hidden = y_dims[1];
  if (*hidden > jax_ep::kIntranodeMaxHidden) {
    return ffi::Error::InvalidArgument(where + "H must be <= " + Str(jax_ep::kIntranodeMaxHidden) +
                                       ", got " + Str(*hidden));
  }
  return ffi::Error::Success();
}

ffi::Error IntranodeCombine(cudaStream_t stream, int32_t device,
                            ffi::Buffer<ffi::S32, 0> axis_index, ffi::AnyBuffer y,
                            ffi::Buffer<ffi::S32, 2> token_slot,
                            ffi::Buffer<ffi::S32, 2> rank_counts, ffi::Result<ffi::AnyBuffer> out) {
  const std::string where = "jax_ep_intranode_combine: ";
  jax_ep::IntranodeComm comm{};
  std::shared_ptr<const jax_ep::CommContext> hold;
  JAX_EP_RETURN_IF_ERROR(AcquireComm(jax_ep::AcquireIntranodeComm, where, device, &comm, &hold));
  const int64_t R = comm.num_ranks;
  jax_ep::IntranodeCombineArgs args{};
  JAX_EP_RETURN_IF_ERROR(DecodeCombineRows(where, y, &args.dtype, &args.hidden));
  const int64_t H = args.hidden;
  int64_t T = 0;
  JAX_EP_RETURN_IF_ERROR(CheckSlotTable(where, "token_slot", token_slot.dimensions(), R, &T));
  JAX_EP_RETURN_IF_ERROR(CheckMatrix(where, "rank_counts", rank_counts.dimensions(), R, R));
  if (out->element_type() != y.element_type() || !SameDims(out->dimensions(), {T, H})) {
    return ffi::Error::InvalidArgument(where + "the result must be [T=" + Str(T) + ", H=" +
                                       Str(H) + "] with y's dtype, got " + Dims(out->dimensions()));
  }
  const size_t need =
      jax_ep::IntranodeCombineDataBytes(R, T, H * jax_ep::ElemTypeBytes(args.dtype));
  if (need > comm.data_bytes) {
    return TooLarge(where, "the comm buffer's data area has " + std::to_string(comm.data_bytes) +
                               " bytes but this combine needs " + std::to_string(need) +
                               " (R x T x H x itemsize); initialize jax_ep with a larger buffer");
  }
  args.axis_index = axis_index.typed_data();
  args.y = y.untyped_data();
  args.token_slot = token_slot.typed_data();
  args.rank_counts = rank_counts.typed_data();
  args.out = out->untyped_data();
  args.num_tokens = T;
  args.capacity = y.dimensions()[0];
  return LaunchStatus(where, jax_ep::LaunchIntranodeCombine(comm, args, stream));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpIntranodeDispatch, IntranodeDispatch,
                              BindStreamAndDevice()
                                  .Arg<ffi::BufferR0<ffi::S32>>()  // axis_index
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // slot
                                  .Arg<ffi::BufferR1<ffi::S32>>()  // sent
                                  .RemainingArgs()                  // payloads
                                  .Ret<ffi::BufferR2<ffi::S32>>()  // rank_counts
                                  .RemainingRets()                  // receive buffers
                                  .Attr<int64_t>("capacity"),
                              JAX_EP_GRAPH_SAFE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpIntranodeDispatchCached, IntranodeDispatchCached,
                              BindStreamAndDevice()
                                  .Arg<ffi::BufferR0<ffi::S32>>()  // axis_index
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // slot (post-drop)
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // rank_counts
                                  .RemainingArgs()                  // payloads
                                  .RemainingRets()                  // receive buffers
                                  .Attr<int64_t>("capacity"),
                              JAX_EP_GRAPH_SAFE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpIntranodeCombine, IntranodeCombine,
                              BindStreamAndDevice()
                                  .Arg<ffi::BufferR0<ffi::S32>>()  // axis_index
                                  .Arg<ffi::AnyBuffer>()            // y
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // token_slot (post-drop)
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // rank_counts
                                  .Ret<ffi::AnyBuffer>(),  // out
                              JAX_EP_GRAPH_SAFE);
