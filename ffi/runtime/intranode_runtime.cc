// Runtime state of the intranode communicator (see intranode_runtime.h and the
// protocol comment at the top of ffi/kernels/intranode/intranode.cu).
#include "ffi/runtime/intranode_runtime.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>

#include <cuda_runtime.h>

#include "ffi/runtime/cuda_check.h"
#include "ffi/runtime/generation.h"
#include "ffi/runtime/options.h"
#include "ffi/runtime/watchdog.h"

namespace jax_ep {

struct CommContext {
  int device = -1;
  uint8_t* buffer = nullptr;  // signal area + data area
  size_t data_bytes = 0;
  int num_sms = 0;
  int recv_blocks_per_sm = 0;  // IntranodeRecvBlocksPerSm on this device
  TimeoutRecord* record_host = nullptr;    // cudaHostAlloc(mapped)
  TimeoutRecord* record_device = nullptr;  // its device-visible address
  bool reported = false;                   // timeout already printed (registry mutex)

  bool connected = false;
  int rank = -1;
  int num_ranks = 0;
  int group = 0;
  int ranks_on_device = 1;  // ranks (self included) whose buffers live on this GPU
  std::vector<uint8_t*> peers;      // comm buffer base of every rank
  std::vector<bool> peer_is_ipc;    // opened with cudaIpcOpenMemHandle: close at teardown
  uint8_t** peers_device = nullptr;  // device copy of `peers`
  LiveCheck live;                    // this connection's generation (ffi/runtime/generation.h)
};

namespace {

constexpr int kMinAutoBlocks = 8;

void PollTimeouts();

struct Registry {
  std::mutex mu;  // contexts, reports, CommContext::reported
  std::map<int, std::shared_ptr<CommContext>> contexts;
  TimeoutReports reports;

  std::atomic<double> timeout_s{kDefaultTimeoutSeconds};
  std::atomic<int> num_blocks{0};

  Watchdog watchdog{PollTimeouts};
};

// Never destroyed: the watchdog thread may outlive static destruction.
Registry& Reg() {
  static Registry* registry = new Registry();
  return *registry;
}

const char* OpName(int32_t op) {
  switch (op) {
    case kOpDispatch:
      return "dispatch";
    case kOpCachedDispatch:
      return "cached dispatch";
    case kOpCombine:
      return "combine";
  }
  return "an unknown op";
}

const char* WaitName(int32_t what) {
  switch (what) {
    case kWaitBarrier:
      return "the barrier";
    case kWaitCounts:
      return "the token counts";
    case kWaitData:
      return "the data";
  }
  return "an unknown signal";
}

// An op signature (intranode.h: kSignatureWords), e.g. "dispatch (capacity
// 4096, 512 tokens, 4 payloads, 14448 bytes a row)".
std::string DescribeSignature(const uint64_t* w) {
  const int32_t op = static_cast<int32_t>(w[0] & 0xff);
  const int parts = static_cast<int>((w[0] >> 8) & 0xff);
  const int dtype = static_cast<int>((w[0] >> 16) & 0xff);
  char buf[192];
  if (op == kOpCombine) {
    static const char* const kNames[] = {"bfloat16", "float16", "float32", "float8_e4m3fn"};
    std::snprintf(buf, sizeof(buf), "combine (capacity %llu, %llu tokens, %s rows of %llu bytes)",
                  static_cast<unsigned long long>(w[1]), static_cast<unsigned long long>(w[2]),
                  dtype >= 0 && dtype < 4 ? kNames[dtype] : "?",
                  static_cast<unsigned long long>(w[3]));
  } else {
    std::snprintf(buf, sizeof(buf),
                  "%s (capacity %llu, %llu tokens, %d payloads, %llu bytes a row)", OpName(op), static_cast<unsigned long long>(w[1]),
                  static_cast<unsigned long long>(w[2]), parts,
                  static_cast<unsigned long long>(w[3]));
  }
  return buf;
}

std::string FormatDisagreement(const CommContext& ctx, const TimeoutRecord& rec) {
  char buf[768];
  const unsigned long long n = static_cast<unsigned long long>(rec.epoch);
  if (rec.what == kWaitRankOrder) {
    std::snprintf(buf, sizeof(buf),
                  "jax_ep: op #%llu of EP group %d: rank %d's call put it at EP axis index %llu, "
                  "but jax_ep.initialize made that device rank %d. Call the jax_ep ops under the "
                  "mesh given to jax_ep.initialize (the same devices in the same order) "
                  "[seen by rank %d, CUDA device %d]",
                  n, ctx.group, rec.peer, static_cast<unsigned long long>(rec.seen), rec.peer,
                  rec.rank, ctx.device);
  } else {
    std::snprintf(buf, sizeof(buf),
                  "jax_ep: ranks disagree on op #%llu of EP group %d: rank %d runs %s, rank %d "
                  "runs %s. Every rank must make the same jax_ep calls, with the same shapes, in "
                  "the same order [seen by rank %d, CUDA device %d]",
                  n, ctx.group, rec.rank, DescribeSignature(rec.mine).c_str(), rec.peer,
                  DescribeSignature(rec.theirs).c_str(), rec.rank, ctx.device);
  }
  return buf;
}

std::string FormatTimeout(const CommContext& ctx, const TimeoutRecord& rec) {
  if (rec.what == kWaitSignature || rec.what == kWaitRankOrder) return FormatDisagreement(ctx, rec);
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                "jax_ep: rank %d of EP group %d timed out after %.1f s in %s waiting for %s from "
                "rank %d (did every rank call the same jax_ep ops in the same order?) "
                "[CUDA device %d, op #%llu on this rank]",
                rec.rank, ctx.group, static_cast<double>(rec.timeout_ns) * 1e-9, OpName(rec.op),
                WaitName(rec.what), rec.peer, ctx.device,
                static_cast<unsigned long long>(rec.epoch));
  return buf;
}

// Reads every context's host-mapped timeout record; prints and keeps the
// first message. Caller holds reg.mu. No CUDA calls.
void PollTimeoutsLocked(Registry& reg) {
  for (auto& entry : reg.contexts) {
    CommContext& ctx = *entry.second;
    reg.reports.Poll(ctx.record_host, &ctx.reported,
                     [&](const TimeoutRecord& rec) { return FormatTimeout(ctx, rec); });
  }
}

// The watchdog's poll (also at process exit).
void PollTimeouts() {
  Registry& reg = Reg();
  std::lock_guard<std::mutex> guard(reg.mu);
  PollTimeoutsLocked(reg);
}

// Releases everything a context holds; ignores errors (the device may be in
// an error state after a trapped kernel).
void FreeContext(CommContext& ctx) {
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
  if (cudaSetDevice(ctx.device) == cudaSuccess) {
    cudaDeviceSynchronize();  // no kernel of ours may still use the buffers
    if (ctx.live.live != nullptr) EndGeneration(ctx.device, GuardedMode::kIntranode);
    for (size_t r = 0; r < ctx.peers.size(); ++r) {
      if (ctx.peer_is_ipc[r] && ctx.peers[r] != nullptr) cudaIpcCloseMemHandle(ctx.peers[r]);
    }
    if (ctx.peers_device != nullptr) cudaFree(ctx.peers_device);
    if (ctx.buffer != nullptr) cudaFree(ctx.buffer);
  }
  if (ctx.record_host != nullptr) cudaFreeHost(ctx.record_host);
  ctx.peers.clear();
  ctx.peer_is_ipc.clear();
  ctx.peers_device = nullptr;
  ctx.buffer = nullptr;
  ctx.record_host = nullptr;
  ctx.record_device = nullptr;
  ctx.connected = false;
  cudaGetLastError();
  if (previous >= 0) cudaSetDevice(previous);
}

std::shared_ptr<CommContext> FindOrThrow(int device, const char* caller) {
  Registry& reg = Reg();
  std::lock_guard<std::mutex> guard(reg.mu);
  auto it = reg.contexts.find(device);
  if (it == reg.contexts.end()) {
    throw std::runtime_error(std::string("jax_ep: ") + caller + ": no comm buffer on CUDA device " +
                             std::to_string(device) + " (call comm_create first)");
  }
  return it->second;
}

int EffectiveNumBlocks(const CommContext& ctx, int option) {
  if (option > 0) return option;
  const int sharing = std::max(1, ctx.ranks_on_device);
  return std::max(kMinAutoBlocks, 2 * std::max(1, ctx.num_sms) / sharing);
}

}  // namespace

void CommCreate(int device, size_t data_bytes) {
  Registry& reg = Reg();
  if (device < 0) throw std::runtime_error("jax_ep: comm_create: device ordinal must be >= 0");
  {
    std::lock_guard<std::mutex> guard(reg.mu);
    if (reg.contexts.count(device) != 0) {
      throw std::runtime_error("jax_ep: comm_create: CUDA device " + std::to_string(device) +
                               " already has a comm buffer (call comm_destroy_all first)");
    }
  }
  auto ctx = std::make_shared<CommContext>();
  ctx->device = device;
  ctx->data_bytes = data_bytes;
  const size_t total = kIntranodeSignalBytes + data_bytes;
  try {
    DeviceGuard guard(device);
    CudaCheck(cudaDeviceGetAttribute(&ctx->num_sms, cudaDevAttrMultiProcessorCount, device),
              device, "cudaDeviceGetAttribute(multiProcessorCount)");
    ctx->recv_blocks_per_sm = IntranodeRecvBlocksPerSm();
    void* buffer = nullptr;
    cudaError_t err = cudaMalloc(&buffer, total);
    if (err != cudaSuccess) {
      char size[64];
      std::snprintf(size, sizeof(size), "%.3f GiB", static_cast<double>(total) / (1 << 30));
      CudaFail(device, std::string("cudaMalloc of the ") + size + " comm buffer", err);
    }
    ctx->buffer = static_cast<uint8_t*>(buffer);
    cudaStream_t stream = nullptr;
    CudaCheck(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), device,
              "cudaStreamCreate");
    err = cudaMemsetAsync(ctx->buffer, 0, total, stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
    CudaCheck(err, device, "zeroing the comm buffer");

    AllocTimeoutRecord(device, &ctx->record_host, &ctx->record_device);
  } catch (...) {
    FreeContext(*ctx);
    throw;
  }
  {
    std::lock_guard<std::mutex> guard(reg.mu);
    if (reg.contexts.count(device) != 0) {  // lost a race with another thread
      FreeContext(*ctx);
      throw std::runtime_error("jax_ep: comm_create: CUDA device " + std::to_string(device) +
                               " already has a comm buffer (call comm_destroy_all first)");
    }
    reg.contexts[device] = ctx;
  }
  reg.watchdog.Start();  // after the CUDA runtime registered its own exit handler
}

std::string CommIpcHandle(int device) {
  auto ctx = FindOrThrow(device, "comm_ipc_handle");
  DeviceGuard guard(device);
  cudaIpcMemHandle_t handle;
  CudaCheck(cudaIpcGetMemHandle(&handle, ctx->buffer), device, "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

uintptr_t CommLocalPointer(int device) {
  return reinterpret_cast<uintptr_t>(FindOrThrow(device, "comm_local_pointer")->buffer);
}

namespace {

// The rank geometry and the peer list of comm_connect; throws.
void CheckConnectArgs(const std::string& where, const CommContext& ctx, int rank, int num_ranks,
                      const std::vector<PeerSpec>& peers) {
  if (ctx.connected) throw std::runtime_error(where + "already connected");
  if (num_ranks < 1 || num_ranks > kIntranodeMaxRanks) {
    throw std::runtime_error(where + "num_ranks must be in [1, " +
                             std::to_string(kIntranodeMaxRanks) + "], got " +
                             std::to_string(num_ranks));
  }
  if (rank < 0 || rank >= num_ranks) {
    throw std::runtime_error(where + "rank " + std::to_string(rank) + " is outside [0, " +
                             std::to_string(num_ranks) + ")");
  }
  if (static_cast<int>(peers.size()) != num_ranks) {
    throw std::runtime_error(where + "expected " + std::to_string(num_ranks) +
                             " peer entries, got " + std::to_string(peers.size()));
  }
  for (int r = 0; r < num_ranks; ++r) {
    if ((peers[r].kind == PeerSpec::Kind::kSelf) != (r == rank)) {
      throw std::runtime_error(where + "peers[" + std::to_string(r) + "] must be " +
                               (r == rank ? "'self' (it is this rank)" : "'local' or 'ipc'"));
    }
  }
}

// The CUDA device that owns peer r's buffer at ptr (device memory only).
int DeviceOfPeer(const std::string& where, int device, const void* ptr, int r) {
  cudaPointerAttributes attr{};
  CudaCheck(cudaPointerGetAttributes(&attr, ptr), device,
            "cudaPointerGetAttributes of peer " + std::to_string(r) + "'s buffer");
  if (attr.type != cudaMemoryTypeDevice) {
    throw std::runtime_error(where + "peer " + std::to_string(r) +
                             "'s pointer is not device memory");
  }
  return attr.device;
}

// Lets `device` access `peer_device` (already enabled is fine).
void EnablePeerAccess(const std::string& where, int device, int peer_device) {
  int can_access = 0;
  CudaCheck(cudaDeviceCanAccessPeer(&can_access, device, peer_device), device,
            "cudaDeviceCanAccessPeer");
  if (!can_access) {
    throw std::runtime_error(where + "CUDA device " + std::to_string(device) +
                             " cannot access peer device " + std::to_string(peer_device) +
                             " (no NVLink / PCIe peer-to-peer path)");
  }
  const cudaError_t err = cudaDeviceEnablePeerAccess(peer_device, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();
  } else {
    CudaCheck(err, device, "cudaDeviceEnablePeerAccess(" + std::to_string(peer_device) + ")");
  }
}

// Peer r's comm buffer from another process: cudaIpcOpenMemHandle.
uint8_t* OpenIpcPeer(const std::string& where, int device, const PeerSpec& spec, int r) {
  cudaIpcMemHandle_t handle;
  if (spec.ipc_handle.size() != sizeof(handle)) {
    throw std::runtime_error(where + "peer " + std::to_string(r) + "'s IPC handle has " +
                             std::to_string(spec.ipc_handle.size()) + " bytes, expected " +
                             std::to_string(sizeof(handle)));
  }
  std::memcpy(&handle, spec.ipc_handle.data(), sizeof(handle));
  void* ptr = nullptr;
  CudaCheck(cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess), device,
            "cudaIpcOpenMemHandle of rank " + std::to_string(r) + "'s comm buffer");
  return static_cast<uint8_t*>(ptr);
}

// The comm buffer of every rank as this device reaches it.
struct MappedPeers {
  std::vector<uint8_t*> bases;
  std::vector<bool> is_ipc;  // opened with cudaIpcOpenMemHandle: close at teardown
  int on_device = 0;         // ranks (self included) whose buffers live on this GPU
};

// Fills *mapped entry by entry, so that on a throw the caller closes what was
// opened.
void MapPeers(const std::string& where, const CommContext& ctx,
              const std::vector<PeerSpec>& peers, MappedPeers* mapped) {
  const int device = ctx.device;
  for (size_t r = 0; r < peers.size(); ++r) {
    const PeerSpec& spec = peers[r];
    const int rank = static_cast<int>(r);
    if (spec.kind == PeerSpec::Kind::kSelf) {
      mapped->bases[r] = ctx.buffer;
      ++mapped->on_device;
    } else if (spec.kind == PeerSpec::Kind::kLocal) {
      auto* ptr = reinterpret_cast<uint8_t*>(spec.pointer);
      if (ptr == nullptr) throw std::runtime_error(where + "peer " + std::to_string(r) + " is null");
      const int peer_device = DeviceOfPeer(where, device, ptr, rank);
      if (peer_device == device) {
        ++mapped->on_device;
      } else {
        EnablePeerAccess(where, device, peer_device);
      }
      mapped->bases[r] = ptr;
    } else {
      mapped->bases[r] = OpenIpcPeer(where, device, spec, rank);
      mapped->is_ipc[r] = true;
      if (DeviceOfPeer(where, device, mapped->bases[r], rank) == device) ++mapped->on_device;
    }
  }
}

// The device copy of the peer-pointer table.
uint8_t** CopyPeerTable(int device, const std::vector<uint8_t*>& bases) {
  uint8_t** table = nullptr;
  const size_t bytes = bases.size() * sizeof(uint8_t*);
  CudaCheck(cudaMalloc(reinterpret_cast<void**>(&table), bytes), device,
            "cudaMalloc of the peer table");
  const cudaError_t err = cudaMemcpy(table, bases.data(), bytes, cudaMemcpyHostToDevice);
  if (err != cudaSuccess) {
    cudaFree(table);
    CudaFail(device, "copying the peer table", err);
  }
  return table;
}

}  // namespace

void CommConnect(int device, int rank, int num_ranks, int group,
                 const std::vector<PeerSpec>& peers) {
  auto ctx = FindOrThrow(device, "comm_connect");
  const std::string where = "jax_ep: comm_connect(device " + std::to_string(device) + "): ";
  CheckConnectArgs(where, *ctx, rank, num_ranks, peers);

  DeviceGuard guard(device);
  MappedPeers mapped{std::vector<uint8_t*>(num_ranks, nullptr),
                     std::vector<bool>(num_ranks, false)};
  uint8_t** table = nullptr;
  LiveCheck live;
  try {
    MapPeers(where, *ctx, peers, &mapped);
    table = CopyPeerTable(device, mapped.bases);
    live = BeginGeneration(device, GuardedMode::kIntranode);
  } catch (...) {
    for (int r = 0; r < num_ranks; ++r) {
      if (mapped.is_ipc[r] && mapped.bases[r] != nullptr) cudaIpcCloseMemHandle(mapped.bases[r]);
    }
    cudaGetLastError();
    throw;
  }

  Registry& reg = Reg();
  std::lock_guard<std::mutex> lock(reg.mu);
  ctx->peers = std::move(mapped.bases);
  ctx->peer_is_ipc = std::move(mapped.is_ipc);
  ctx->peers_device = table;
  ctx->rank = rank;
  ctx->num_ranks = num_ranks;
  ctx->group = group;
  ctx->ranks_on_device = std::max(1, mapped.on_device);
  ctx->live = live;
  ctx->connected = true;
}

void CommSetOptions(double timeout_s, int num_blocks) {
  CheckTimeoutAndBlocks("comm_set_options", timeout_s, num_blocks);
  Registry& reg = Reg();
  reg.timeout_s.store(timeout_s);
  reg.num_blocks.store(num_blocks);
}

double CommTimeoutSeconds() { return Reg().timeout_s.load(); }

CommInfo CommGetInfo(int device) {
  auto ctx = FindOrThrow(device, "comm_info");
  Registry& reg = Reg();
  std::lock_guard<std::mutex> guard(reg.mu);
  CommInfo info{};
  info.device = ctx->device;
  info.rank = ctx->rank;
  info.num_ranks = ctx->num_ranks;
  info.group = ctx->group;
  info.num_sms = ctx->num_sms;
  info.ranks_on_device = ctx->ranks_on_device;
  info.num_blocks = EffectiveNumBlocks(*ctx, reg.num_blocks.load());
  info.max_coresident_blocks = ctx->recv_blocks_per_sm * ctx->num_sms;
  info.connected = ctx->connected;
  info.data_bytes = ctx->data_bytes;
  info.signal_bytes = kIntranodeSignalBytes;
  return info;
}

void CommClosePeers() {
  Registry& reg = Reg();
  std::vector<std::shared_ptr<CommContext>> contexts;
  {
    std::lock_guard<std::mutex> guard(reg.mu);
    for (auto& entry : reg.contexts) {
      entry.second->connected = false;  // handlers refuse it from now on
      contexts.push_back(entry.second);
    }
  }
  for (auto& ctx : contexts) {
    int previous = -1;
    if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
    if (cudaSetDevice(ctx->device) == cudaSuccess) {
      cudaDeviceSynchronize();  // every kernel that may read or write a peer is done
      EndGeneration(ctx->device, GuardedMode::kIntranode);  // graphs recorded so far stop
      for (size_t r = 0; r < ctx->peers.size(); ++r) {
        if (ctx->peer_is_ipc[r] && ctx->peers[r] != nullptr) {
          cudaIpcCloseMemHandle(ctx->peers[r]);
          ctx->peers[r] = nullptr;
        }
      }
    }
    cudaGetLastError();
    if (previous >= 0) cudaSetDevice(previous);
  }
}

void CommDestroyAll() {
  Registry& reg = Reg();
  reg.watchdog.Stop();
  std::map<int, std::shared_ptr<CommContext>> taken;
  {
    std::lock_guard<std::mutex> guard(reg.mu);
    PollTimeoutsLocked(reg);  // keep a last-moment timeout message
    taken.swap(reg.contexts);
  }
  for (auto& entry : taken) FreeContext(*entry.second);
}

std::optional<std::string> LastError() {
  if (auto stale = StaleGraphMessage()) return stale;
  Registry& reg = Reg();
  std::lock_guard<std::mutex> guard(reg.mu);
  PollTimeoutsLocked(reg);
  if (reg.reports.first().empty()) return std::nullopt;
  return reg.reports.first();
}

bool AcquireIntranodeComm(int device, IntranodeComm* comm, std::shared_ptr<const CommContext>* hold,
                          std::string* error) {
  Registry& reg = Reg();
  std::lock_guard<std::mutex> guard(reg.mu);
  PollTimeoutsLocked(reg);
  if (reg.reports.any()) {
    *error = reg.reports.first();
    return false;
  }
  auto it = reg.contexts.find(device);
  if (it == reg.contexts.end() || !it->second->connected) {
    *error = "jax_ep: no intranode communicator on CUDA device " + std::to_string(device) +
             " in this process: call jax_ep.initialize(mesh, axis_name, backend='cuda') before "
             "running jax_ep CUDA ops on this device";
    return false;
  }
  const CommContext& ctx = *it->second;
  comm->peer_bases = ctx.peers_device;
  comm->local_base = ctx.buffer;
  comm->data_bytes = ctx.data_bytes;
  comm->rank = ctx.rank;
  comm->num_ranks = ctx.num_ranks;
  comm->timeout_record = ctx.record_device;
  comm->timeout_ns = TimeoutNs(reg.timeout_s.load());
  comm->num_blocks = EffectiveNumBlocks(ctx, reg.num_blocks.load());
  comm->live = ctx.live;
  *hold = it->second;
  return true;
}

}  // namespace jax_ep
