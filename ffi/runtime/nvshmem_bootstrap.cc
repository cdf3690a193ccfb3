// NVSHMEM bootstrap (see nvshmem_bootstrap.h).
//
// NVSHMEM's init code is `static inline` in its headers and calls
// nvshmemi_init_thread from libnvshmem_device.a, which registers the device
// state (nvshmemi_device_state_d) of the module it was device-linked into.
// This file is linked into the same module as the kernels (target
// jax_ep_ll_kernels), so initializing from here is what makes the kernels'
// NVSHMEM calls work; initializing only through nvshmem4py would leave this
// module's device state zeroed. nvshmem4py is not needed: the unique id
// comes from nvshmemx_get_uniqueid here too.
#include "ffi/runtime/nvshmem_bootstrap.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>

#include <cuda_runtime.h>
#include <nvshmem_host.h>

#include "ffi/kernels/low_latency/low_latency.h"  // kLLMaxRanks: the largest NVSHMEM world
#include "ffi/runtime/cuda_check.h"

namespace jax_ep {
namespace {

struct BootstrapState {
  std::mutex mu;
  bool initialized = false;
  NvshmemPe pe;
};

BootstrapState& State() {
  static BootstrapState* state = new BootstrapState();  // never destroyed
  return *state;
}

void CheckInitArgs(const std::string& where, const std::string& unique_id, int rank, int nranks,
                   int device) {
  if (unique_id.size() != sizeof(nvshmemx_uniqueid_t)) {
    throw std::runtime_error(where + "the unique id has " + std::to_string(unique_id.size()) +
                             " bytes, expected " + std::to_string(sizeof(nvshmemx_uniqueid_t)));
  }
  if (nranks < 1 || nranks > kLLMaxRanks || rank < 0 || rank >= nranks) {
    throw std::runtime_error(where + "rank " + std::to_string(rank) + " / nranks " +
                             std::to_string(nranks) + " out of range (1 <= nranks <= " +
                             std::to_string(kLLMaxRanks) + ")");
  }
  if (device < 0) throw std::runtime_error(where + "device ordinal must be >= 0");
}

}  // namespace

void NvshmemSetEnvDefaults(bool single_host, size_t heap_bytes) {
  setenv("NVSHMEM_DISABLE_NVLS", "1", 0);
  if (single_host) {
    setenv("NVSHMEM_REMOTE_TRANSPORT", "none", 0);
    setenv("NVSHMEM_DISABLE_NCCL", "1", 0);
    setenv("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo", 0);
  }
  if (heap_bytes > 0) setenv("NVSHMEM_SYMMETRIC_SIZE", std::to_string(heap_bytes).c_str(), 0);
}

std::string NvshmemGetUniqueId(bool single_host) {
  NvshmemSetEnvDefaults(single_host, 0);
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  const int status = nvshmemx_get_uniqueid(&id);
  if (status != 0) {
    throw std::runtime_error("jax_ep: nvshmemx_get_uniqueid failed with status " +
                             std::to_string(status));
  }
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

void NvshmemInit(const std::string& unique_id, int rank, int nranks, int device, bool single_host,
                 size_t heap_bytes) {
  BootstrapState& state = State();
  const std::string where = "jax_ep: nvshmem_init: ";
  CheckInitArgs(where, unique_id, rank, nranks, device);
  std::lock_guard<std::mutex> lock(state.mu);
  if (state.initialized) {
    const NvshmemPe& pe = state.pe;
    if (pe.rank == rank && pe.num_ranks == nranks && pe.device == device) return;
    throw std::runtime_error(where + "already initialized as PE " + std::to_string(pe.rank) +
                             " of " + std::to_string(pe.num_ranks) + " on CUDA device " +
                             std::to_string(pe.device) + "; call nvshmem_finalize first");
  }
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  NvshmemSetEnvDefaults(single_host, heap_bytes);
  // NVSHMEM binds to the current device; leave it current for this thread.
  CudaCheck(cudaSetDevice(device), device, "cudaSetDevice");
  CudaCheck(cudaFree(nullptr), device, "creating the CUDA context");
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int status = nvshmemx_set_attr_uniqueid_args(rank, nranks, &id, &attr);
  if (status != 0) {
    throw std::runtime_error(where + "nvshmemx_set_attr_uniqueid_args failed with status " +
                             std::to_string(status));
  }
  // Exits the process on failure (NVSHMEM's NONZERO_EXIT); its log says why.
  status = nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr);
  if (status != 0) {
    throw std::runtime_error(where + "nvshmemx_init_attr failed with status " +
                             std::to_string(status));
  }
  const int my_pe = nvshmem_my_pe();
  const int n_pes = nvshmem_n_pes();
  if (my_pe != rank || n_pes != nranks) {
    throw std::runtime_error(where + "NVSHMEM reports PE " + std::to_string(my_pe) + " of " +
                             std::to_string(n_pes) + " but rank " + std::to_string(rank) +
                             " of " + std::to_string(nranks) +
                             " was requested (was NVSHMEM already initialized differently?)");
  }
  state.initialized = true;
  state.pe = NvshmemPe{device, rank, nranks};
}

bool NvshmemInitialized() {
  BootstrapState& state = State();
  std::lock_guard<std::mutex> lock(state.mu);
  return state.initialized;
}

std::optional<NvshmemPe> NvshmemCurrentPe() {
  BootstrapState& state = State();
  std::lock_guard<std::mutex> lock(state.mu);
  if (!state.initialized) return std::nullopt;
  return state.pe;
}

void NvshmemFinalize() {
  const std::optional<NvshmemPe> pe = NvshmemCurrentPe();
  if (!pe) return;
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
  cudaSetDevice(pe->device);
  cudaDeviceSynchronize();  // no kernel may still use the symmetric heap
  cudaGetLastError();
  nvshmem_finalize();  // collective; reference counted with other users
  {
    BootstrapState& state = State();
    std::lock_guard<std::mutex> lock(state.mu);
    state.initialized = false;
    state.pe = NvshmemPe{};
  }
  if (previous >= 0) cudaSetDevice(previous);
}

}  // namespace jax_ep
