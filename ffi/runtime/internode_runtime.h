// Per-process runtime of the internode ops over NVSHMEM: the symmetric region
// (ffi/kernels/internode/internode.h: InternodeLayout), the table of my node's
// regions mapped here, the run-time options and the timeout watchdog's
// messages. NVSHMEM itself is set up by nvshmem_bootstrap.h (one PE per
// process, PE = EP rank).
//
// Alloc and Free are collective (every PE, same order, from Python at
// initialize / shutdown); the FFI handlers only call AcquireInternode (a
// mutex and a copy, no CUDA calls).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "ffi/kernels/internode/internode.h"

namespace jax_ep {

struct InternodeContext;  // internode_runtime.cc

struct InternodeInfo {
  bool allocated = false;
  int device = -1, rank = -1, num_ranks = 0, ranks_per_node = 0, num_nodes = 0;
  int num_sms = 0, ranks_on_device = 0, num_blocks = 0;
  int max_coresident_blocks = 0;  // blocks of the internode kernels the GPU holds at once
  double timeout_s = 0;
  InternodeLayout layout;
};

// Bytes of symmetric heap InternodeAlloc takes (no NVSHMEM call).
size_t InternodeRegionBytes(int num_ranks, int ranks_per_node, int64_t max_tokens,
                            int64_t message_bytes, int64_t combine_row_bytes);

// Collective, after NvshmemInit: allocates and zeroes the region, maps the
// regions of my node's ranks (every one must be reachable by loads and
// stores: NVLink or this GPU), allocates the timeout record. ranks_on_device:
// PEs sharing this GPU (for the automatic grid size). Throws naming the
// problem; the region is freed by the (collective) InternodeFree even then.
InternodeInfo InternodeAlloc(int ranks_per_node, int64_t max_tokens, int64_t message_bytes,
                             int64_t combine_row_bytes, int ranks_on_device);
// timeout_s > 0; num_blocks >= 0 (0 = SMs / PEs sharing the GPU, at most
// kInternodeMaxBlocks). Read at every op launch.
void InternodeSetOptions(double timeout_s, int num_blocks);
InternodeInfo InternodeGetInfo();
// Collective: frees the region; safe to call twice and without a region.
void InternodeFree();
// The first internode timeout / mismatch message of this process, if any.
std::optional<std::string> InternodeLastError();

// ---- Handler side (no CUDA calls, thread-safe).
bool AcquireInternode(int device, InternodeComm* comm,
                      std::shared_ptr<const InternodeContext>* hold, std::string* error);

}  // namespace jax_ep
