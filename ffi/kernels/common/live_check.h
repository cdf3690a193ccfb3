// The check that a kernel's buffers are still the ones in force: XLA's CUDA
// graphs bake a kernel's arguments (buffer addresses included) into the
// graph, so a graph recorded before jax_ep.shutdown() would, replayed after
// it, write into freed memory. Each mode's context gets a generation number
// when it is set up; a process-lifetime device word per (device, mode) holds
// the generation in force (0 after shutdown). The first kernel of every op
// compares them and, when they differ, marks a process-lifetime host-mapped
// flag and traps (ffi/runtime/generation.h formats the message). Plain C++:
// included by host and device code.
#pragma once

#include <cstdint>

namespace jax_ep {

struct LiveCheck {
  const uint32_t* live = nullptr;  // device word: the generation in force for this mode
  uint32_t generation = 0;         // the generation the kernel's arguments belong to
  uint32_t* stale = nullptr;       // host-mapped flag, set before the trap
};

#ifdef __CUDACC__
// Every thread of the kernel calls it before touching a jax_ep buffer.
__device__ __forceinline__ void CheckLive(const LiveCheck& g) {
  if (g.live == nullptr) return;
  if (*reinterpret_cast<const volatile uint32_t*>(g.live) != g.generation) {
    // Every thread marks the flag before its trap: the first trap ends the
    // whole grid, so a flag left to one thread might never be written.
    if (g.stale != nullptr) {
      *reinterpret_cast<volatile uint32_t*>(g.stale) = 1u;
      __threadfence_system();
    }
    __trap();
  }
}
#endif

}  // namespace jax_ep
