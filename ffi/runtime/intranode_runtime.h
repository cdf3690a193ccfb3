// Per-process runtime state of the intranode communicator: one context per
// local CUDA device (its comm buffer, the peer-pointer table, its rank), the
// device-ordinal -> context table the FFI handlers look up, run-time options,
// and the timeout watchdog.
//
// Every function that allocates or maps memory runs at initialize (from
// Python, through ffi/bindings/cuda_module.cc), never inside a handler: a
// cudaMalloc or IPC open racing a spinning peer kernel can deadlock the
// driver. The handlers only call AcquireIntranodeComm, which takes a mutex
// for a map lookup and touches no CUDA API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ffi/kernels/intranode/intranode.h"

namespace jax_ep {

// How comm_connect reaches the buffer of one peer rank.
struct PeerSpec {
  enum class Kind { kSelf, kLocal, kIpc };
  Kind kind = Kind::kSelf;
  uintptr_t pointer = 0;  // kLocal: comm_local_pointer() of another device of this process
  std::string ipc_handle;  // kIpc: the 64 bytes of comm_ipc_handle() from another process
};

struct CommContext;  // defined in intranode_runtime.cc

// ---- Initialize-time calls (Python). All throw std::runtime_error with a
// message naming the device and the CUDA error on failure; the current CUDA
// device of the calling thread is restored on return.

// Allocates and zeroes a comm buffer of kIntranodeSignalBytes + data_bytes on
// `device`, plus its host-mapped timeout record; starts the watchdog thread.
void CommCreate(int device, size_t data_bytes);
// cudaIpcGetMemHandle of the comm buffer (64 bytes).
std::string CommIpcHandle(int device);
// The comm buffer's device pointer (for peers in this process).
uintptr_t CommLocalPointer(int device);
// Maps the peers (peers[rank] must be kSelf), copies the peer-pointer table
// to the device and registers the context for the FFI handlers.
void CommConnect(int device, int rank, int num_ranks, int group, const std::vector<PeerSpec>& peers);
// timeout_s > 0; num_blocks >= 0 (0 = automatic: 2 * SMs / ranks sharing the GPU).
void CommSetOptions(double timeout_s, int num_blocks);
double CommTimeoutSeconds();

struct CommInfo {
  int device, rank, num_ranks, group, num_sms, ranks_on_device, num_blocks;
  int max_coresident_blocks;  // receive-kernel blocks the GPU holds at once (occupancy x SMs)
  bool connected;
  size_t data_bytes, signal_bytes;
};
CommInfo CommGetInfo(int device);
// The first half of a collective shutdown: marks every context disconnected
// (handlers refuse it), waits for each device and closes its mappings of the
// peers' buffers. Free (CommDestroyAll) only once every peer has done this:
// freeing a buffer another process still has mapped is undefined.
void CommClosePeers();
// Stops the watchdog, waits for each device, closes IPC mappings, frees
// everything. Safe to call twice. Timeout messages survive it.
void CommDestroyAll();
// The first timeout message of this process, if any.
std::optional<std::string> LastError();

// ---- Handler-side (no CUDA calls, thread-safe).

// Fills `comm` for the context of `device` with the current options. On
// failure (no context, not connected, an earlier timeout) returns false and
// sets *error. `hold` keeps the context alive while the launch runs.
bool AcquireIntranodeComm(int device, IntranodeComm* comm, std::shared_ptr<const CommContext>* hold,
                          std::string* error);

}  // namespace jax_ep
