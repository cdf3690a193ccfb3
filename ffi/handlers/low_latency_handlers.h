// Declarations of the XLA FFI handler symbols of the low-latency (NVSHMEM)
// ops (ffi/handlers/low_latency_{dispatch,combine,cached}.cc), for the
// nanobind module ffi/bindings/nvshmem_module.cc (its own module: it links
// NVSHMEM).
#pragma once

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLLDispatch);        // jax_ep_ll_dispatch
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLLDispatchSend);    // jax_ep_ll_dispatch_send
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLLDispatchRecv);    // jax_ep_ll_dispatch_recv
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLLCombine);         // jax_ep_ll_combine
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLLCombineSend);     // jax_ep_ll_combine_send
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLLCombineRecv);     // jax_ep_ll_combine_recv
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLLGather);          // jax_ep_ll_gather
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLLDispatchCached);  // jax_ep_ll_dispatch_cached
