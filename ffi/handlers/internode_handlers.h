// Declarations of the XLA FFI handler symbols of the internode ops
// (ffi/handlers/internode.cc), for the nanobind module
// ffi/bindings/nvshmem_module.cc (the internode kernels run over NVSHMEM).
#pragma once

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpInternodeDispatch);        // jax_ep_internode_dispatch
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpInternodeDispatchCached);  // jax_ep_internode_dispatch_cached
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpInternodeCombine);         // jax_ep_internode_combine
