// The count of ffi/runtime/host_runs.h.
#include "ffi/runtime/host_runs.h"

#include <atomic>

namespace jax_ep {
namespace {
std::atomic<uint64_t> host_runs{0};
}  // namespace

void CountHandlerHostRun() { host_runs.fetch_add(1, std::memory_order_relaxed); }
uint64_t HandlerHostRuns() { return host_runs.load(std::memory_order_relaxed); }

}  // namespace jax_ep
