// Per-process NVSHMEM state for the low-latency ops: bootstrap (unique id,
// init from inside this library so that its kernels' device state is
// registered), the symmetric region (ffi/kernels/low_latency/low_latency.h: LLLayout),
// the peer-pointer tables, run-time options and the timeout watchdog.
//
// NVSHMEM has one PE per process, bound to one CUDA device: the low-latency
// ops run with one EP rank (= PE) per process. Everything that allocates or
// is collective (init, alloc, finalize) runs at initialize from Python, with
// every PE calling in the same order; the FFI handlers only call
// AcquireLowLatency (a mutex and a copy, no CUDA calls).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "ffi/kernels/low_latency/low_latency.h"

namespace jax_ep {

struct LLContext;  // low_latency_runtime.cc

// Sets NVSHMEM environment defaults, only for variables that are unset:
// NVSHMEM_DISABLE_NVLS=1 always (NVLink multicast is never used); with
// single_host also NVSHMEM_REMOTE_TRANSPORT=none, NVSHMEM_DISABLE_NCCL=1 and
// NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo. heap_bytes > 0 sets
// NVSHMEM_SYMMETRIC_SIZE. Must run before the unique id is made and before
// init (both call it).
void NvshmemSetEnvDefaults(bool single_host, size_t heap_bytes);

// nvshmemx_get_uniqueid: 128 bytes, made on one PE (EP rank 0) and handed to
// all (jax.distributed key-value store). Rank 0 must stay alive until every
// PE finished NvshmemInit (its socket is the bootstrap rendezvous).
std::string NvshmemGetUniqueId(bool single_host);

// nvshmemx_set_attr_uniqueid_args + nvshmemx_init_attr(UNIQUEID) on `device`.
// Collective over all nranks PEs. If another user (nvshmem4py) initialized
// NVSHMEM in this process already, the call only takes a reference and
// registers this library's device state. Throws std::runtime_error.
void NvshmemInit(const std::string& unique_id, int rank, int nranks, int device, bool single_host,
                 size_t heap_bytes);
bool NvshmemInitialized();

// Bytes of the symmetric region MakeLLLayout gives for these maxima (no
// NVSHMEM call; for sizing NVSHMEM_SYMMETRIC_SIZE before init).
size_t LLRegionBytes(int num_ranks, int64_t max_tokens, int64_t hidden, int64_t num_experts,
                     int64_t top_k, int64_t itemsize, bool send_buffer);

struct LLInfo {
  bool initialized = false;  // NVSHMEM is up (NvshmemInit ran)
  bool allocated = false;    // the region exists
  int device = -1, rank = -1, num_ranks = 0;
  int num_sms = 0, ranks_on_device = 0, num_blocks = 0;
  int unmapped_peers = 0;    // PEs nvshmem_ptr cannot map (reached by puts)
  bool force_put = false;
  bool gpu_scope = false;    // the kernels' flags and fences at GPU, not system, scope
  bool pdl = false;          // kernels launched with programmatic dependent launch
  bool stream_combine = false;  // the fused combine runs streamed (several PEs, GPU scope)
  double timeout_s = 0;
  LLLayout layout;
};

// Collective: every PE, same arguments, same order. Allocates and zeroes the
// symmetric region, maps the peers, allocates the host-mapped timeout record,
// barrier. send_buffer: allocate the staging rows NVSHMEM puts need; required
// when some peer is not mapped (other nodes) or to use force_put. Throws.
LLInfo LLAlloc(int64_t max_tokens, int64_t hidden, int64_t num_experts, int64_t top_k,
               int64_t itemsize, bool send_buffer);

// timeout_s > 0; num_blocks >= 0 (0 = automatic: SMs / PEs sharing the GPU);
// force_put: 0 / 1, or -1 to keep; ranks_on_device: PEs sharing this GPU
// (0 = NVSHMEM's same-GPU team size, -1 = keep). Read at every op launch.
void LLSetOptions(double timeout_s, int num_blocks, int force_put, int ranks_on_device = -1);
// cudaDeviceGetPCIBusId of `device` (to tell which PEs share a GPU).
std::string CudaPciBusId(int device);
LLInfo LLGetInfo();

// Collective: frees the region (nvshmem_free) and calls nvshmem_finalize
// (NVSHMEM is reference counted: another user's init stays). Stops the
// watchdog. Safe to call twice and without init.
void NvshmemFinalize();

// The first low-latency timeout / mismatch message of this process, if any.
std::optional<std::string> LLLastError();

// ---- Handler side (no CUDA calls, thread-safe).
bool AcquireLowLatency(int device, LLComm* comm, std::shared_ptr<const LLContext>* hold,
                       std::string* error);

}  // namespace jax_ep
