// Hands XLA FFI handlers to Python: the registrations() dict of the CUDA
// modules (ffi/bindings/cuda_module.cc, nvshmem_module.cc), FFI target name
// -> PyCapsule of the handler, for jax.ffi.register_ffi_target(...,
// platform="CUDA") in jax_ep/cuda/extension.py; and handler_traits(), the
// traits each handler declares (what XLA reads to decide whether a custom call
// may join a CUDA graph), asked the way XLA asks: a call frame carrying the
// metadata extension, which a handler answers without running.
#pragma once

#include <cstdint>
#include <cstddef>

#include <nanobind/nanobind.h>

#include "ffi/runtime/host_runs.h"
#include "xla/ffi/api/c_api.h"

namespace jax_ep {

struct FfiTarget {
  const char* name;          // e.g. "jax_ep_intranode_dispatch"
  XLA_FFI_Handler* handler;  // from XLA_FFI_DEFINE_HANDLER_SYMBOL
};

template <size_t N>
nanobind::dict FfiRegistrations(const FfiTarget (&targets)[N]) {
  nanobind::dict d;
  for (const FfiTarget& t : targets) {
    d[t.name] = nanobind::capsule(reinterpret_cast<void*>(t.handler));
  }
  return d;
}

// The XLA_FFI_Handler_Traits bits `handler` declares, or -1 if it refused the
// metadata query.
inline int64_t HandlerTraits(XLA_FFI_Handler* handler) {
  XLA_FFI_Metadata metadata{};
  metadata.struct_size = XLA_FFI_Metadata_STRUCT_SIZE;
  XLA_FFI_Metadata_Extension extension{};
  extension.extension_base.struct_size = XLA_FFI_Metadata_Extension_STRUCT_SIZE;
  extension.extension_base.type = XLA_FFI_Extension_Metadata;
  extension.metadata = &metadata;
  XLA_FFI_CallFrame frame{};
  frame.struct_size = XLA_FFI_CallFrame_STRUCT_SIZE;
  frame.extension_start = &extension.extension_base;
  // No API table: the handler only touches it to report a malformed frame.
  if (handler(&frame) != nullptr) return -1;
  return static_cast<int64_t>(metadata.traits);
}

template <size_t N>
nanobind::dict FfiTraits(const FfiTarget (&targets)[N]) {
  nanobind::dict d;
  for (const FfiTarget& t : targets) d[t.name] = HandlerTraits(t.handler);
  return d;
}

// What every extension module says of its targets: registrations(),
// handler_traits() and handler_host_runs().
template <size_t N>
void DefineTargetBindings(nanobind::module_& m, const FfiTarget (&targets)[N]) {
  m.def("registrations", [&targets] { return FfiRegistrations(targets); },
        "Dict of FFI target name -> PyCapsule of its XLA FFI handler (platform CUDA).");
  m.def("handler_traits", [&targets] { return FfiTraits(targets); },
        "Dict of FFI target name -> XLA_FFI_Handler_Traits bits its handler declares "
        "(1 = command-buffer compatible), or -1 if it refused the query.");
  m.def("handler_host_runs", &HandlerHostRuns,
        "How many times this module's communication handlers ran their host code (XLA's "
        "CUDA graphs replay without it).");
}

}  // namespace jax_ep
