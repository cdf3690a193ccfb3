// Generations of the modes' contexts, for the kernels' LiveCheck
// (ffi/kernels/common/live_check.h): a set-up context takes a new
// generation, shutdown ends it, and a kernel recorded into a CUDA graph
// before that traps instead of touching freed buffers. The device words and
// the host-mapped flag are allocated once per process and never freed (a
// graph may outlive every context). Each Python extension module has its own.
#pragma once

#include <optional>
#include <string>

#include "ffi/kernels/common/live_check.h"

namespace jax_ep {

enum class GuardedMode { kIntranode = 0, kLowLatency = 1, kInternode = 2 };

// A new generation for `mode` on `device` (synchronous; at set-up only).
// Throws std::runtime_error naming the CUDA call that failed.
LiveCheck BeginGeneration(int device, GuardedMode mode);
// Marks `mode` on `device` shut down: kernels of any earlier generation trap.
void EndGeneration(int device, GuardedMode mode);
// The message for a stale graph that ran in this process, if one did.
std::optional<std::string> StaleGraphMessage();

}  // namespace jax_ep
