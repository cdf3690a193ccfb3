// Internode runtime over NVSHMEM (see internode_runtime.h and the protocol
// comment at the top of ffi/kernels/internode/internode.cu).
#include "ffi/runtime/internode_runtime.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <mutex>
#include <stdexcept>
#include <vector>

#include <cuda_runtime.h>
#include <nvshmem_host.h>

#include "ffi/runtime/cuda_check.h"
#include "ffi/runtime/generation.h"
#include "ffi/runtime/nvshmem_bootstrap.h"
#include "ffi/runtime/options.h"
#include "ffi/runtime/watchdog.h"

namespace jax_ep {

struct InternodeContext {
  int device = -1;
  int rank = -1;
  int num_ranks = 0;
  int num_sms = 0;
  int blocks_per_sm = 0;
  int ranks_on_device = 1;
  uint8_t* region = nullptr;          // nvshmem_align
  InternodeLayout layout;
  uint8_t** node_peers = nullptr;     // device array [G]: nvshmem_ptr of my node's regions
  TimeoutRecord* record_host = nullptr;
  TimeoutRecord* record_device = nullptr;
  bool reported = false;
  bool ready = false;
  LiveCheck live;                     // this region's generation (ffi/runtime/generation.h)
};

namespace {

void PollTimeouts();

struct Registry {
  std::mutex mu;
  std::shared_ptr<InternodeContext> ctx;
  TimeoutReports reports;
  std::atomic<double> timeout_s{kDefaultTimeoutSeconds};
  std::atomic<int> num_blocks{0};
  Watchdog watchdog{PollTimeouts};
};

Registry& Reg() {
  static Registry* registry = new Registry();  // never destroyed (watchdog thread)
  return *registry;
}

const char* OpName(int32_t op) {
  switch (op) {
    case kOpInternodeDispatch:
      return "internode dispatch";
    case kOpInternodeDispatchCached:
      return "internode cached dispatch";
    case kOpInternodeCombine:
      return "internode combine";
  }
  return "an unknown internode op";
}

// e.g. "internode dispatch (capacity 4096, 512 tokens, 4 payloads, 14464-byte
// messages, 16 blocks, 4 ranks per node)".
std::string DescribeSignature(const uint64_t* w) {
  static const char* const kTypes[] = {"bfloat16", "float16", "float32", "float8_e4m3fn"};
  const int32_t op = static_cast<int32_t>(w[0] & 0xff);
  const int parts = static_cast<int>((w[0] >> 8) & 0xff);
  const int dtype = static_cast<int>((w[0] >> 16) & 0xff);
  const unsigned blocks = static_cast<unsigned>(w[0] >> 32);
  char what[96];
  if (op == kOpInternodeCombine) {
    std::snprintf(what, sizeof(what), "%s rows of %llu bytes",
                  dtype >= 0 && dtype < 4 ? kTypes[dtype] : "?",
                  static_cast<unsigned long long>(w[3]));
  } else {
    std::snprintf(what, sizeof(what), "%d payloads, %llu-byte messages", parts,
                  static_cast<unsigned long long>(w[3]));
  }
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "%s #%llu (capacity %llu, %llu tokens, %s, %u blocks, %llu ranks per node)",
                OpName(op), static_cast<unsigned long long>(w[5] >> 32),
                static_cast<unsigned long long>(w[1]), static_cast<unsigned long long>(w[2]),
                what, blocks, static_cast<unsigned long long>(w[5] & 0xffffffffull));
  return buf;
}

// "rank 5 (node 1, local 1)".
std::string Where(const InternodeContext& ctx, int rank) {
  const int G = std::max(ctx.layout.ranks_per_node, 1);
  char buf[64];
  std::snprintf(buf, sizeof(buf), "rank %d (node %d, local %d)", rank, rank / G, rank % G);
  return buf;
}

std::string WhatItWaitedFor(const InternodeContext& ctx, const TimeoutRecord& rec) {
  const int G = std::max(ctx.layout.ranks_per_node, 1);
  switch (rec.what) {
    case kWaitInternodeBarrier:
      return "the op's notify (counts and signature) from " + Where(ctx, rec.peer);
    case kWaitInternodeRelayRows:
      return "the rows " + Where(ctx, rec.peer) +
             " sends to this node through this rank (its relay)";
    case kWaitInternodeForwarded:
      return "the rows of source " + Where(ctx, rec.peer) + " forwarded by its relay " +
             Where(ctx, (rec.rank / G) * G + rec.peer % G);
    case kWaitInternodeCombineRows:
      return "the combine rows of " + Where(ctx, rec.peer) + " (this rank reduces them)";
    case kWaitInternodePartials:
      return "the node partial sums of relay " + Where(ctx, rec.peer);
  }
  return "an unknown signal from " + Where(ctx, rec.peer);
}

std::string FormatRecord(const InternodeContext& ctx, const TimeoutRecord& rec) {
  char buf[1024];
  const unsigned long long n = static_cast<unsigned long long>(rec.epoch);
  if (rec.what == kWaitInternodeRankOrder) {
    std::snprintf(buf, sizeof(buf),
                  "jax_ep: internode op #%llu: %s's call put it at EP axis index %llu, but "
                  "NVSHMEM made it PE %d at jax_ep.initialize. Call the jax_ep ops under the mesh "
                  "given to jax_ep.initialize (the same devices in the same order) [seen by %s, "
                  "CUDA device %d]",
                  n, Where(ctx, rec.peer).c_str(), static_cast<unsigned long long>(rec.seen),
                  rec.peer, Where(ctx, rec.rank).c_str(), ctx.device);
  } else if (rec.what == kWaitInternodeSignature) {
    std::snprintf(buf, sizeof(buf),
                  "jax_ep: ranks disagree on internode op #%llu: %s runs %s, %s runs %s. Every "
                  "rank must make the same jax_ep calls, with the same shapes, in the same order "
                  "[seen by %s, CUDA device %d]",
                  n, Where(ctx, rec.rank).c_str(), DescribeSignature(rec.mine).c_str(),
                  Where(ctx, rec.peer).c_str(), DescribeSignature(rec.theirs).c_str(),
                  Where(ctx, rec.rank).c_str(), ctx.device);
  } else {
    std::snprintf(buf, sizeof(buf),
                  "jax_ep: %s timed out after %.1f s in %s (op #%llu on this rank) waiting for "
                  "%s (did every rank call the same jax_ep ops in the same order?) [CUDA device "
                  "%d]",
                  Where(ctx, rec.rank).c_str(), static_cast<double>(rec.timeout_ns) * 1e-9,
                  OpName(rec.op), n, WhatItWaitedFor(ctx, rec).c_str(), ctx.device);
  }
  return buf;
}

void PollLocked(Registry& reg) {
  if (!reg.ctx) return;
  InternodeContext& ctx = *reg.ctx;
  reg.reports.Poll(ctx.record_host, &ctx.reported,
                   [&](const TimeoutRecord& rec) { return FormatRecord(ctx, rec); });
}

void PollTimeouts() {
  Registry& reg = Reg();
  std::lock_guard<std::mutex> guard(reg.mu);
  PollLocked(reg);
}

void FreeLocalParts(InternodeContext& ctx) {
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
  if (cudaSetDevice(ctx.device) == cudaSuccess && ctx.node_peers != nullptr) {
    cudaFree(ctx.node_peers);
  }
  if (ctx.record_host != nullptr) cudaFreeHost(ctx.record_host);
  ctx.node_peers = nullptr;
  ctx.record_host = ctx.record_device = nullptr;
  cudaGetLastError();
  if (previous >= 0) cudaSetDevice(previous);
}

int EffectiveNumBlocks(const InternodeContext& ctx, int option) {
  const int blocks = option > 0 ? option : std::max(1, ctx.num_sms) / std::max(1, ctx.ranks_on_device);
  return std::max(1, std::min(blocks, kInternodeMaxBlocks));
}

InternodeInfo InfoLocked(const Registry& reg) {
  InternodeInfo info;
  info.timeout_s = reg.timeout_s.load();
  if (!reg.ctx) return info;
  const InternodeContext& ctx = *reg.ctx;
  info.allocated = ctx.ready;
  info.device = ctx.device;
  info.rank = ctx.rank;
  info.num_ranks = ctx.num_ranks;
  info.ranks_per_node = ctx.layout.ranks_per_node;
  info.num_nodes = ctx.layout.num_nodes;
  info.num_sms = ctx.num_sms;
  info.ranks_on_device = ctx.ranks_on_device;
  info.num_blocks = EffectiveNumBlocks(ctx, reg.num_blocks.load());
  info.max_coresident_blocks = ctx.blocks_per_sm * ctx.num_sms;
  info.layout = ctx.layout;
  return info;
}

// nvshmem_ptr of every rank of my node; throws naming the first one this GPU
// cannot reach by loads and stores.
std::vector<uint8_t*> MapNode(const InternodeContext& ctx, const std::string& where) {
  const int G = ctx.layout.ranks_per_node;
  const int first = (ctx.rank / G) * G;
  std::vector<uint8_t*> peers(G, nullptr);
  for (int g = 0; g < G; ++g) {
    const int r = first + g;
    peers[g] = r == ctx.rank ? ctx.region : static_cast<uint8_t*>(nvshmem_ptr(ctx.region, r));
    if (peers[g] == nullptr) {
      throw std::runtime_error(
          where + "rank " + std::to_string(r) + " is in the node of rank " +
          std::to_string(ctx.rank) + " (ranks_per_node=" + std::to_string(G) +
          ") but NVSHMEM cannot map its memory here (no NVLink / peer access between these "
          "GPUs): pass a ranks_per_node whose groups are GPUs of one NVLink domain, or None "
          "to find them");
    }
  }
  return peers;
}

}  // namespace

size_t InternodeRegionBytes(int num_ranks, int ranks_per_node, int64_t max_tokens,
                            int64_t message_bytes, int64_t combine_row_bytes) {
  return MakeInternodeLayout(num_ranks, ranks_per_node, max_tokens, message_bytes,
                             combine_row_bytes)
      .total_bytes;
}

InternodeInfo InternodeAlloc(int ranks_per_node, int64_t max_tokens, int64_t message_bytes,
                             int64_t combine_row_bytes, int ranks_on_device) {
  Registry& reg = Reg();
  const std::string where = "jax_ep: internode_alloc: ";
  const std::optional<NvshmemPe> pe = NvshmemCurrentPe();
  if (!pe) throw std::runtime_error(where + "call nvshmem_init first");
  {
    std::lock_guard<std::mutex> lock(reg.mu);
    if (reg.ctx) throw std::runtime_error(where + "already allocated (call internode_free first)");
  }
  if (pe->num_ranks > kInternodeMaxRanks) {
    throw std::runtime_error(where + "at most " + std::to_string(kInternodeMaxRanks) +
                             " ranks, got " + std::to_string(pe->num_ranks));
  }
  if (ranks_per_node < 1 || pe->num_ranks % ranks_per_node != 0) {
    throw std::runtime_error(where + "ranks_per_node=" + std::to_string(ranks_per_node) +
                             " must divide the " + std::to_string(pe->num_ranks) + " ranks");
  }
  if (max_tokens < 1 || max_tokens > kInternodeMaxTokens) {
    throw std::runtime_error(where + "max_tokens_per_rank must be in [1, " +
                             std::to_string(kInternodeMaxTokens) + "], got " +
                             std::to_string(max_tokens));
  }
  auto ctx = std::make_shared<InternodeContext>();
  ctx->device = pe->device;
  ctx->rank = pe->rank;
  ctx->num_ranks = pe->num_ranks;
  ctx->ranks_on_device = std::max(1, ranks_on_device);
  ctx->layout = MakeInternodeLayout(pe->num_ranks, ranks_per_node, max_tokens, message_bytes,
                                    combine_row_bytes);
  const int device = ctx->device;
  DeviceGuard guard(device);
  CudaCheck(cudaDeviceGetAttribute(&ctx->num_sms, cudaDevAttrMultiProcessorCount, device), device,
            "cudaDeviceGetAttribute(multiProcessorCount)");
  ctx->blocks_per_sm = InternodeBlocksPerSm();
  void* region = nvshmem_align(256, ctx->layout.total_bytes);
  if (region == nullptr) {
    char size[64];
    std::snprintf(size, sizeof(size), "%.3f GiB",
                  static_cast<double>(ctx->layout.total_bytes) / (1 << 30));
    throw std::runtime_error(where + "nvshmem_align of the " + std::string(size) +
                             " internode region failed: the NVSHMEM symmetric heap is too small "
                             "(raise NVSHMEM_SYMMETRIC_SIZE, or pass a smaller "
                             "max_tokens_per_rank / hidden to jax_ep.initialize)");
  }
  ctx->region = static_cast<uint8_t*>(region);
  {
    std::lock_guard<std::mutex> lock(reg.mu);
    reg.ctx = ctx;  // from here on the collective InternodeFree frees the region
  }
  try {
    CudaCheck(cudaMemset(ctx->region, 0, ctx->layout.total_bytes), device, "zeroing the region");
    const std::vector<uint8_t*> peers = MapNode(*ctx, where);
    const size_t bytes = peers.size() * sizeof(uint8_t*);
    CudaCheck(cudaMalloc(reinterpret_cast<void**>(&ctx->node_peers), bytes), device,
              "cudaMalloc of the node table");
    CudaCheck(cudaMemcpy(ctx->node_peers, peers.data(), bytes, cudaMemcpyHostToDevice), device,
              "copying the node table");
    AllocTimeoutRecord(device, &ctx->record_host, &ctx->record_device);
    ctx->live = BeginGeneration(device, GuardedMode::kInternode);
    CudaCheck(cudaDeviceSynchronize(), device, "setting up the internode context");
  } catch (...) {
    FreeLocalParts(*ctx);
    throw;
  }
  {
    std::lock_guard<std::mutex> lock(reg.mu);
    ctx->ready = true;
  }
  reg.watchdog.Start();
  return InternodeGetInfo();
}

void InternodeSetOptions(double timeout_s, int num_blocks) {
  CheckTimeoutAndBlocks("internode_set_options", timeout_s, num_blocks);
  Registry& reg = Reg();
  reg.timeout_s.store(timeout_s);
  reg.num_blocks.store(num_blocks);
}

InternodeInfo InternodeGetInfo() {
  Registry& reg = Reg();
  std::lock_guard<std::mutex> lock(reg.mu);
  return InfoLocked(reg);
}

void InternodeFree() {
  Registry& reg = Reg();
  std::shared_ptr<InternodeContext> ctx;
  {
    std::lock_guard<std::mutex> lock(reg.mu);
    PollLocked(reg);
    ctx = reg.ctx;
  }
  reg.watchdog.Stop();
  if (!ctx) return;
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
  cudaSetDevice(ctx->device);
  cudaDeviceSynchronize();  // no kernel of ours may still use the region
  cudaGetLastError();
  EndGeneration(ctx->device, GuardedMode::kInternode);  // graphs recorded so far stop
  nvshmem_free(ctx->region);  // collective
  FreeLocalParts(*ctx);
  {
    std::lock_guard<std::mutex> lock(reg.mu);
    reg.ctx.reset();
  }
  if (previous >= 0) cudaSetDevice(previous);
}

std::optional<std::string> InternodeLastError() {
  if (auto stale = StaleGraphMessage()) return stale;
  Registry& reg = Reg();
  std::lock_guard<std::mutex> lock(reg.mu);
  PollLocked(reg);
  if (reg.reports.first().empty()) return std::nullopt;
  return reg.reports.first();
}

bool AcquireInternode(int device, InternodeComm* comm,
                      std::shared_ptr<const InternodeContext>* hold, std::string* error) {
  Registry& reg = Reg();
  std::lock_guard<std::mutex> lock(reg.mu);
  PollLocked(reg);
  if (reg.reports.any()) {
    *error = reg.reports.first();
    return false;
  }
  if (!reg.ctx || !reg.ctx->ready) {
    *error = "jax_ep: the internode buffers are not set up in this process: call "
             "jax_ep.initialize(mesh, axis_name=..., max_tokens_per_rank=..., hidden=..., "
             "ranks_per_node=...) first";
    return false;
  }
  const InternodeContext& ctx = *reg.ctx;
  if (ctx.device != device) {
    *error = "jax_ep: this internode op runs on CUDA device " + std::to_string(device) +
             " but NVSHMEM was initialized for device " + std::to_string(ctx.device) +
             " (one PE, i.e. one GPU, per process)";
    return false;
  }
  comm->base = ctx.region;
  comm->node_peers = ctx.node_peers;
  comm->layout = ctx.layout;
  comm->rank = ctx.rank;
  comm->num_blocks = EffectiveNumBlocks(ctx, reg.num_blocks.load());
  comm->timeout_record = ctx.record_device;
  comm->timeout_ns = TimeoutNs(reg.timeout_s.load());
  comm->live = ctx.live;
  *hold = reg.ctx;
  return true;
}

}  // namespace jax_ep
