// Per-process runtime of the low-latency ops over NVSHMEM: the symmetric
// region (ffi/kernels/low_latency/low_latency.h: LLLayout), the peer-pointer
// tables, the switches fixed at allocation, the run-time options, and the
// timeout watchdog's polling. NVSHMEM itself is set up by
// nvshmem_bootstrap.h; the low-latency ops run with one EP rank (= PE) per
// process.
//
// Everything that allocates or is collective (alloc, free) runs at
// initialize from Python, with every PE calling in the same order; the FFI
// handlers only call AcquireLowLatency (a mutex and a copy, no CUDA calls).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "ffi/kernels/low_latency/low_latency.h"

namespace jax_ep {

struct LLContext;  // low_latency_runtime.cc

// Bytes of the symmetric region MakeLLLayout gives for these maxima (no
// NVSHMEM call; for sizing NVSHMEM_SYMMETRIC_SIZE before init).
size_t LLRegionBytes(int num_ranks, int64_t max_tokens, int64_t hidden, int64_t num_experts,
                     int64_t top_k, int64_t itemsize, bool send_buffer);

// Switches fixed at allocation (nvshmem_ll_alloc's keyword arguments).
struct LLAllocOptions {
  // PEs in groups of this many consecutive ranks form nodes: peers of another
  // node are reached by NVSHMEM puts even where nvshmem_ptr maps them (virtual
  // nodes on one host). 0: no grouping (every mapped peer by stores).
  int ranks_per_node = 0;
  bool system_scope = false;     // system-scope flags and fences even with every PE on this GPU
  bool dependent_launch = true;  // launch the kernels with programmatic dependent launch
  bool streamed_combine = true;  // the fused combine streams where it can (else the plain kernel)
  std::string phase_trace;       // path prefix of the phase trace ("" = off)
};

struct LLInfo {
  bool initialized = false;  // NVSHMEM is up (NvshmemInit ran)
  bool allocated = false;    // the region exists
  int device = -1, rank = -1, num_ranks = 0;
  int num_sms = 0, ranks_on_device = 0, num_blocks = 0;
  int max_coresident_blocks = 0;  // blocks of the LL kernels the GPU holds at once (occupancy x SMs)
  int unmapped_peers = 0;    // PEs nvshmem_ptr cannot map (reached by puts)
  bool force_put = false;
  bool gpu_scope = false;    // the kernels' flags and fences at GPU, not system, scope
  bool pdl = false;          // kernels launched with programmatic dependent launch
  bool stream_combine = false;  // the fused combine runs streamed (several PEs, GPU scope)
  bool system_scope = false;    // LLAllocOptions::system_scope as given
  std::string phase_trace;      // LLAllocOptions::phase_trace as given
  int ranks_per_node = 0;       // LLAllocOptions::ranks_per_node as given
  double timeout_s = 0;
  LLLayout layout;
};

// Collective: every PE, same arguments, same order, after NvshmemInit.
// Allocates and zeroes the symmetric region, maps the peers, allocates the
// host-mapped timeout record, barrier. send_buffer: allocate the staging rows
// NVSHMEM puts need; required when some peer is not mapped (other nodes) or
// to use force_put. Throws.
LLInfo LLAlloc(int64_t max_tokens, int64_t hidden, int64_t num_experts, int64_t top_k,
               int64_t itemsize, bool send_buffer, const LLAllocOptions& options);

// timeout_s > 0; num_blocks >= 0 (0 = automatic: SMs / PEs sharing the GPU);
// force_put: 0 / 1, or -1 to keep (initially off); ranks_on_device: PEs
// sharing this GPU (0 = NVSHMEM's same-GPU team size, -1 = keep). Read at
// every op launch.
void LLSetOptions(double timeout_s, int num_blocks, int force_put, int ranks_on_device = -1);
// cudaDeviceGetPCIBusId of `device` (to tell which PEs share a GPU).
std::string CudaPciBusId(int device);
LLInfo LLGetInfo();

// Collective: writes the phase trace, frees the region (nvshmem_free), stops
// the watchdog. Runs before NvshmemFinalize; safe to call twice and without
// a region.
void LLFree();

// The first low-latency timeout / mismatch message of this process, if any.
std::optional<std::string> LLLastError();

// ---- Handler side (no CUDA calls, thread-safe).
bool AcquireLowLatency(int device, LLComm* comm, std::shared_ptr<const LLContext>* hold,
                       std::string* error);

}  // namespace jax_ep
