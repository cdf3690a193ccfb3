// Declarations of the XLA FFI handler symbols of the CUDA module (layout,
// route and intranode ops), so that ffi/bindings/cuda_module.cc can hand
// them to Python.
#pragma once

#include "xla/ffi/api/api.h"

// jax_ep_get_dispatch_layout (ffi/handlers/layout.cc)
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpGetDispatchLayout);
// jax_ep_route (ffi/handlers/route.cc)
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpRoute);
// jax_ep_intranode_dispatch, jax_ep_intranode_dispatch_cached,
// jax_ep_intranode_combine (ffi/handlers/intranode.cc)
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpIntranodeDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpIntranodeDispatchCached);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpIntranodeCombine);
