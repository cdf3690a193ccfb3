// NVSHMEM bootstrap of this process, for every mode that runs over NVSHMEM
// (the low-latency mode; the internode mode later): the environment
// defaults, the unique id, init from inside this library, which PE this
// process is, and finalize.
//
// NVSHMEM has one PE per process, bound to one CUDA device. Init and
// finalize are collective: every PE calls them, in the same order, at
// initialize / shutdown from Python (never inside an FFI handler).
#pragma once

#include <cstddef>
#include <optional>
#include <string>

namespace jax_ep {

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

// This process's PE while NVSHMEM is initialized.
struct NvshmemPe {
  int device = -1;
  int rank = -1;
  int num_ranks = 0;
};
std::optional<NvshmemPe> NvshmemCurrentPe();

// Collective: nvshmem_finalize (NVSHMEM is reference counted: another user's
// init stays). The modes free their symmetric memory first (LLFree). Safe to
// call twice and without init.
void NvshmemFinalize();

}  // namespace jax_ep
