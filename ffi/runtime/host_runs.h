// How many times this module's communication handlers ran their host code.
// Under XLA's CUDA graphs a handler's host code runs when XLA records the
// graph, not on each replay: tests/gpu/test_graphs_gpu.py reads the count to
// prove that replays really skip it (a call XLA silently left out of the graph
// would count once per run). Each Python extension module has its own count.
#pragma once

#include <cstdint>

namespace jax_ep {

void CountHandlerHostRun();
uint64_t HandlerHostRuns();

}  // namespace jax_ep
