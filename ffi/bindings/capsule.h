// Hands XLA FFI handlers to Python: the registrations() dict of the CUDA
// modules (ffi/bindings/cuda_module.cc, nvshmem_module.cc), FFI target name
// -> PyCapsule of the handler, for jax.ffi.register_ffi_target(...,
// platform="CUDA") in jax_ep/cuda/extension.py.
#pragma once

#include <initializer_list>

#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"

namespace jax_ep {

struct FfiTarget {
  const char* name;          // e.g. "jax_ep_intranode_dispatch"
  XLA_FFI_Handler* handler;  // from XLA_FFI_DEFINE_HANDLER_SYMBOL
};

inline nanobind::dict FfiRegistrations(std::initializer_list<FfiTarget> targets) {
  nanobind::dict d;
  for (const FfiTarget& t : targets) {
    d[t.name] = nanobind::capsule(reinterpret_cast<void*>(t.handler));
  }
  return d;
}

}  // namespace jax_ep
