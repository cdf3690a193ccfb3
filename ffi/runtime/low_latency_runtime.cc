// Low-latency runtime over NVSHMEM (see low_latency_runtime.h and the
// protocol comment at the top of ffi/kernels/low_latency/device.cuh).
#include "ffi/runtime/low_latency_runtime.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
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

struct LLContext {
  int device = -1;
  int rank = -1;
  int num_ranks = 0;
  int num_sms = 0;
  int blocks_per_sm = 0;  // the least of the LL kernels' occupancy (LL*BlocksPerSm)
  int ranks_on_device = 1;
  LLAllocOptions options;
  uint8_t* region = nullptr;  // nvshmem_align
  LLLayout layout;
  std::vector<uint8_t*> peers;      // nvshmem_ptr(region, r) (nullptr: not mapped)
  int unmapped_peers = 0;
  uint8_t** peer_table = nullptr;   // device copy of `peers`
  uint8_t** put_table = nullptr;    // device array of nullptr: every peer by put (force_put)
  TimeoutRecord* record_host = nullptr;
  TimeoutRecord* record_device = nullptr;
  uint64_t* trace = nullptr;        // phase trace (options.phase_trace), device memory
  bool reported = false;            // registry mutex
  bool ready = false;               // set up completely (registry mutex); else only the region
  LiveCheck live;                   // this region's generation (ffi/runtime/generation.h)
};

namespace {

constexpr int kTeamSameGpu = 4;  // NVSHMEMI_TEAM_SAME_GPU (device_host/nvshmem_common.cuh)

void PollTimeouts();

struct Registry {
  std::mutex mu;  // everything below but the atomics and the watchdog
  std::shared_ptr<LLContext> ctx;
  TimeoutReports reports;

  std::atomic<double> timeout_s{kDefaultTimeoutSeconds};
  std::atomic<int> num_blocks{0};
  std::atomic<bool> force_put{false};
  std::atomic<int> ranks_on_device{0};  // 0: NVSHMEM's same-GPU team size

  Watchdog watchdog{PollTimeouts};
};

Registry& Reg() {
  static Registry* registry = new Registry();  // never destroyed (watchdog thread)
  return *registry;
}

const char* OpName(int32_t op) {
  switch (op) {
    case kOpLLDispatch:
      return "ll_dispatch";
    case kOpLLCombine:
      return "ll_combine";
    case kOpLLDispatchCached:
      return "ll_dispatch_cached";
    case kOpLLGather:
      return "ll_gather";
  }
  return "an unknown low-latency op";
}

const char* OpNameFromSignal(uint64_t seen) {
  switch (static_cast<int32_t>(seen & 15)) {
    case kOpLLDispatch & 15:
      return "ll_dispatch";
    case kOpLLCombine & 15:
      return "ll_combine";
    case kOpLLDispatchCached & 15:
      return "ll_dispatch_cached";
    case kOpLLGather & 15:
      return "ll_gather";
  }
  return "an unknown op";
}

// A low-latency op signature (LLComm::op_sig), e.g. "ll_dispatch (hidden
// 7168, 2-byte rows, FP8 cast, top-8 of 256 experts, max_tokens_per_rank 128)".
std::string DescribeSignature(const uint64_t* w) {
  char buf[192];
  std::snprintf(buf, sizeof(buf),
                "%s (hidden %llu, %d-byte elements%s, top-%d of %llu experts, "
                "max_tokens_per_rank %llu)",
                OpName(static_cast<int32_t>(w[0] & 0xff)),
                static_cast<unsigned long long>(w[1] & 0xffffffffu),
                static_cast<int>((w[0] >> 8) & 0xff), ((w[0] >> 16) & 1) ? ", FP8 cast" : "",
                static_cast<int>((w[0] >> 24) & 0xff), static_cast<unsigned long long>(w[0] >> 32),
                static_cast<unsigned long long>(w[1] >> 32));
  return buf;
}

std::string FormatRecord(const LLContext& ctx, const TimeoutRecord& rec) {
  char buf[768];
  const unsigned long long n = static_cast<unsigned long long>(rec.epoch);
  const double secs = static_cast<double>(rec.timeout_ns) * 1e-9;
  if (rec.what == kWaitLLRankOrder) {
    std::snprintf(buf, sizeof(buf),
                  "jax_ep: low-latency op #%llu: PE %d's call put it at EP axis index %llu, but "
                  "NVSHMEM made it PE %d at jax_ep.initialize. Call the jax_ep ops under the "
                  "mesh given to jax_ep.initialize (the same devices in the same order) [seen "
                  "by PE %d, CUDA device %d]",
                  n, rec.peer, static_cast<unsigned long long>(rec.seen), rec.peer, rec.rank,
                  ctx.device);
  } else if (rec.what == kWaitLLShapeMismatch) {
    std::snprintf(buf, sizeof(buf),
                  "jax_ep: PEs disagree on low-latency op #%llu: PE %d runs %s, PE %d runs %s. "
                  "Every rank must make the same jax_ep calls, with the same shapes, in the "
                  "same order [seen by PE %d, CUDA device %d]",
                  n, rec.rank, DescribeSignature(rec.mine).c_str(), rec.peer,
                  DescribeSignature(rec.theirs).c_str(), rec.rank, ctx.device);
  } else if (rec.what == kWaitLLMismatch) {
    std::snprintf(buf, sizeof(buf),
                  "jax_ep: PE %d got from PE %d a signal for %s while running %s as low-latency "
                  "op #%llu: every rank must call the same jax_ep low-latency ops in the same "
                  "order [CUDA device %d]",
                  rec.rank, rec.peer, OpNameFromSignal(rec.seen), OpName(rec.op), n, ctx.device);
  } else if (rec.what == kWaitLLRelease) {
    std::snprintf(buf, sizeof(buf),
                  "jax_ep: PE %d timed out after %.1f s in %s (low-latency op #%llu) waiting for "
                  "PE %d to release the buffer set of op #%llu (last release seen: op #%llu). "
                  "Did every rank call the same jax_ep low-latency ops in the same order? At "
                  "most two ops may be in flight: a send half must not run before the receive "
                  "half of the op two before it [CUDA device %d]",
                  rec.rank, secs, OpName(rec.op), n, rec.peer, n >= 2 ? n - 2 : 0ull,
                  static_cast<unsigned long long>(rec.seen), ctx.device);
  } else {
    std::snprintf(buf, sizeof(buf),
                  "jax_ep: PE %d timed out after %.1f s in %s (low-latency op #%llu) waiting for "
                  "the rows (done signal) of PE %d (last signal seen: op #%llu). Did every rank "
                  "call the same jax_ep low-latency ops in the same order? [CUDA device %d]",
                  rec.rank, secs, OpName(rec.op), n, rec.peer,
                  static_cast<unsigned long long>(rec.seen >> 4), ctx.device);
  }
  return buf;
}

// Caller holds reg.mu. No CUDA calls.
void PollLocked(Registry& reg) {
  if (!reg.ctx) return;
  LLContext& ctx = *reg.ctx;
  reg.reports.Poll(ctx.record_host, &ctx.reported,
                   [&](const TimeoutRecord& rec) { return FormatRecord(ctx, rec); });
}

// The watchdog's poll (also at process exit).
void PollTimeouts() {
  Registry& reg = Reg();
  std::lock_guard<std::mutex> guard(reg.mu);
  PollLocked(reg);
}

// Non-collective part of the teardown (tables, record); the region is freed
// by the caller (nvshmem_free is collective).
void FreeLocalParts(LLContext& ctx) {
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
  if (cudaSetDevice(ctx.device) == cudaSuccess) {
    if (ctx.peer_table != nullptr) cudaFree(ctx.peer_table);
    if (ctx.put_table != nullptr) cudaFree(ctx.put_table);
    if (ctx.trace != nullptr) cudaFree(ctx.trace);
  }
  if (ctx.record_host != nullptr) cudaFreeHost(ctx.record_host);
  ctx.peer_table = ctx.put_table = nullptr;
  ctx.trace = nullptr;
  ctx.record_host = ctx.record_device = nullptr;
  cudaGetLastError();
  if (previous >= 0) cudaSetDevice(previous);
}

constexpr size_t kTraceBytes =
    static_cast<size_t>(kLLTraceOps) * kLLTraceBlocks * kLLTraceEvents * sizeof(uint64_t);

// Diagnostics: with a phase_trace path, the kernels stamp their phases
// (low_latency.h) into a zeroed device buffer.
void AllocTrace(LLContext* ctx) {
  if (ctx->options.phase_trace.empty()) return;
  CudaCheck(cudaMalloc(reinterpret_cast<void**>(&ctx->trace), kTraceBytes), ctx->device,
            "cudaMalloc of the phase trace");
  CudaCheck(cudaMemset(ctx->trace, 0, kTraceBytes), ctx->device, "zeroing the phase trace");
}

// The trace as raw little-endian u64 [ops][blocks][events] in
// <path>.pe<rank>; failures are reported on stderr only (diagnostics).
void WriteTrace(const LLContext& ctx) {
  if (ctx.trace == nullptr) return;
  std::vector<uint64_t> host(kTraceBytes / sizeof(uint64_t));
  if (cudaMemcpy(host.data(), ctx.trace, kTraceBytes, cudaMemcpyDeviceToHost) != cudaSuccess) {
    cudaGetLastError();
    std::fprintf(stderr, "jax_ep: could not copy the low-latency phase trace\n");
    return;
  }
  const std::string file = ctx.options.phase_trace + ".pe" + std::to_string(ctx.rank);
  std::FILE* f = std::fopen(file.c_str(), "wb");
  if (f == nullptr || std::fwrite(host.data(), 1, kTraceBytes, f) != kTraceBytes) {
    std::fprintf(stderr, "jax_ep: could not write the low-latency phase trace %s\n", file.c_str());
  }
  if (f != nullptr) std::fclose(f);
}

// The larger of NVSHMEM's same-GPU team and what Python found (hostname +
// PCI bus id of every PE): a too-small value would oversubscribe the GPU.
int EffectiveRanksOnDevice(const LLContext& ctx, int option) {
  return std::max(option, std::max(1, ctx.ranks_on_device));
}

int EffectiveNumBlocks(const LLContext& ctx, int option, int ranks_on_device_option) {
  if (option > 0) return option;
  return std::max(1, std::max(1, ctx.num_sms) / EffectiveRanksOnDevice(ctx, ranks_on_device_option));
}

// Some rows go by NVSHMEM put: forced, or peers nvshmem_ptr cannot map.
bool AnyPut(const LLContext& ctx, bool force_put) { return force_put || ctx.unmapped_peers > 0; }

// Every PE on this GPU (processes sharing it) and none reached by put:
// GPU-scope flags and fences order all the kernels exchange, and cost less
// than system scope under load (see docs/optimisation-log.md).
// The system_scope option keeps system scope (what peers on other GPUs need).
bool EffectiveGpuScope(const LLContext& ctx, int ranks_on_device_option, bool any_put) {
  return !any_put && !ctx.options.system_scope &&
         EffectiveRanksOnDevice(ctx, ranks_on_device_option) >= ctx.num_ranks;
}

// The streamed fused combine: several PEs, all at GPU scope (across GPUs its
// per-row system-scope fence made it slower: combine_streamed.cu),
// unless the streamed_combine option is off.
bool EffectiveStreamCombine(const LLContext& ctx, bool gpu_scope) {
  return ctx.options.streamed_combine && ctx.num_ranks > 1 && gpu_scope;
}

}  // namespace

size_t LLRegionBytes(int num_ranks, int64_t max_tokens, int64_t hidden, int64_t num_experts,
                     int64_t top_k, int64_t itemsize, bool send_buffer) {
  return MakeLLLayout(num_ranks, max_tokens, hidden, num_experts, top_k, itemsize, send_buffer)
      .total_bytes;
}

namespace {

LLInfo InfoLocked(const Registry& reg, const std::optional<NvshmemPe>& pe) {
  LLInfo info;
  if (pe) {
    info.initialized = true;
    info.device = pe->device;
    info.rank = pe->rank;
    info.num_ranks = pe->num_ranks;
  }
  info.timeout_s = reg.timeout_s.load();
  info.force_put = reg.force_put.load();
  if (reg.ctx) {
    const LLContext& ctx = *reg.ctx;
    info.allocated = ctx.ready;
    info.num_sms = ctx.num_sms;
    info.max_coresident_blocks = ctx.blocks_per_sm * ctx.num_sms;
    info.ranks_on_device = EffectiveRanksOnDevice(ctx, reg.ranks_on_device.load());
    info.num_blocks = EffectiveNumBlocks(ctx, reg.num_blocks.load(), reg.ranks_on_device.load());
    info.unmapped_peers = ctx.unmapped_peers;
    info.gpu_scope =
        EffectiveGpuScope(ctx, reg.ranks_on_device.load(), AnyPut(ctx, info.force_put));
    info.pdl = ctx.options.dependent_launch;
    info.stream_combine = EffectiveStreamCombine(ctx, info.gpu_scope);
    info.system_scope = ctx.options.system_scope;
    info.phase_trace = ctx.options.phase_trace;
    info.ranks_per_node = ctx.options.ranks_per_node;
    info.layout = ctx.layout;
  }
  return info;
}

// The allocation maxima nvshmem_ll_alloc accepts for `nranks` PEs; throws.
void CheckAllocMaxima(const std::string& where, int nranks, int64_t max_tokens, int64_t hidden,
                      int64_t num_experts, int64_t top_k, int64_t itemsize) {
  if (max_tokens < 1 || max_tokens > kLLMaxTokens) {
    throw std::runtime_error(where + "max_tokens_per_rank must be in [1, " +
                             std::to_string(kLLMaxTokens) + "], got " + std::to_string(max_tokens));
  }
  if (hidden < 1 || hidden > kLLMaxHidden) {
    throw std::runtime_error(where + "hidden must be in [1, " + std::to_string(kLLMaxHidden) +
                             "], got " + std::to_string(hidden));
  }
  if (num_experts < nranks || num_experts % nranks != 0 || num_experts > kLLMaxExperts) {
    throw std::runtime_error(where + "num_experts must be a multiple of the " +
                             std::to_string(nranks) + " PEs and at most " +
                             std::to_string(kLLMaxExperts) + ", got " + std::to_string(num_experts));
  }
  if (top_k < 1 || top_k > kLLMaxTopK) {
    throw std::runtime_error(where + "top_k must be in [1, " + std::to_string(kLLMaxTopK) +
                             "], got " + std::to_string(top_k));
  }
  if (itemsize != 2 && itemsize != 4) {
    throw std::runtime_error(where + "itemsize must be 2 (bf16/f16) or 4 (f32), got " +
                             std::to_string(itemsize));
  }
}

// Collective: the same size on every PE. Throws naming the size on failure.
uint8_t* AllocRegion(const std::string& where, size_t bytes) {
  void* region = nvshmem_align(256, bytes);
  if (region == nullptr) {
    char size[64];
    std::snprintf(size, sizeof(size), "%.3f GiB", static_cast<double>(bytes) / (1 << 30));
    throw std::runtime_error(where + "nvshmem_align of the " + std::string(size) +
                             " low-latency region failed (raise NVSHMEM_SYMMETRIC_SIZE, or pass "
                             "heap_bytes to nvshmem_init)");
  }
  return static_cast<uint8_t*>(region);
}

// nvshmem_ptr of the region on every PE (nullptr: reached by puts, also every
// PE of another node when ranks_per_node groups them; my own is always the
// region) and the PEs sharing this GPU by NVSHMEM's team.
void MapPeers(LLContext* ctx) {
  const int per_node = ctx->options.ranks_per_node;
  ctx->peers.assign(ctx->num_ranks, nullptr);
  for (int r = 0; r < ctx->num_ranks; ++r) {
    const bool other_node = per_node > 0 && r / per_node != ctx->rank / per_node;
    ctx->peers[r] = other_node ? nullptr : static_cast<uint8_t*>(nvshmem_ptr(ctx->region, r));
    if (ctx->peers[r] == nullptr) ++ctx->unmapped_peers;
  }
  if (ctx->peers[ctx->rank] == nullptr) ctx->peers[ctx->rank] = ctx->region;
  const int same_gpu = nvshmem_team_n_pes(static_cast<nvshmem_team_t>(kTeamSameGpu));
  ctx->ranks_on_device = same_gpu >= 1 && same_gpu <= ctx->num_ranks ? same_gpu : 1;
}

// The device copies of the peer table and of the all-put table (force_put).
void AllocPeerTables(LLContext* ctx) {
  const int device = ctx->device;
  const size_t table_bytes = static_cast<size_t>(ctx->num_ranks) * sizeof(uint8_t*);
  CudaCheck(cudaMalloc(reinterpret_cast<void**>(&ctx->peer_table), table_bytes), device,
            "cudaMalloc of the peer table");
  CudaCheck(cudaMemcpy(ctx->peer_table, ctx->peers.data(), table_bytes, cudaMemcpyHostToDevice),
            device, "copying the peer table");
  CudaCheck(cudaMalloc(reinterpret_cast<void**>(&ctx->put_table), table_bytes), device,
            "cudaMalloc of the put table");
  CudaCheck(cudaMemset(ctx->put_table, 0, table_bytes), device, "zeroing the put table");
}

}  // namespace

LLInfo LLAlloc(int64_t max_tokens, int64_t hidden, int64_t num_experts, int64_t top_k,
               int64_t itemsize, bool send_buffer, const LLAllocOptions& options) {
  Registry& reg = Reg();
  const std::string where = "jax_ep: nvshmem_ll_alloc: ";
  const std::optional<NvshmemPe> pe = NvshmemCurrentPe();
  if (!pe) throw std::runtime_error(where + "call nvshmem_init first");
  {
    std::lock_guard<std::mutex> lock(reg.mu);
    if (reg.ctx) throw std::runtime_error(where + "already allocated (call nvshmem_finalize first)");
  }
  CheckAllocMaxima(where, pe->num_ranks, max_tokens, hidden, num_experts, top_k, itemsize);

  auto ctx = std::make_shared<LLContext>();
  ctx->device = pe->device;
  ctx->rank = pe->rank;
  ctx->num_ranks = pe->num_ranks;
  ctx->options = options;
  ctx->layout =
      MakeLLLayout(pe->num_ranks, max_tokens, hidden, num_experts, top_k, itemsize, send_buffer);
  const int device = ctx->device;
  DeviceGuard guard(device);
  CudaCheck(cudaDeviceGetAttribute(&ctx->num_sms, cudaDevAttrMultiProcessorCount, device), device,
            "cudaDeviceGetAttribute(multiProcessorCount)");
  ctx->blocks_per_sm =
      std::min({LLDispatchBlocksPerSm(ctx->layout), LLCombineBlocksPerSm(ctx->layout),
                LLStreamedCombineBlocksPerSm(ctx->layout), LLCachedDispatchBlocksPerSm(ctx->layout)});
  ctx->region = AllocRegion(where, ctx->layout.total_bytes);
  {
    // Registered at once (not ready): whatever fails below, LLFree frees the
    // region, and nvshmem_free is collective, so every PE must call it.
    std::lock_guard<std::mutex> lock(reg.mu);
    reg.ctx = ctx;
  }
  try {
    CudaCheck(cudaMemset(ctx->region, 0, ctx->layout.total_bytes), device, "zeroing the region");
    CudaCheck(cudaDeviceSynchronize(), device, "zeroing the region");
    MapPeers(ctx.get());
    AllocPeerTables(ctx.get());
    AllocTimeoutRecord(device, &ctx->record_host, &ctx->record_device);
    AllocTrace(ctx.get());
    ctx->live = BeginGeneration(device, GuardedMode::kLowLatency);
    CudaCheck(cudaDeviceSynchronize(), device, "setting up the low-latency context");
  } catch (...) {
    FreeLocalParts(*ctx);  // the region itself waits for the collective LLFree
    throw;
  }
  if (ctx->unmapped_peers > 0 && !send_buffer) {
    throw std::runtime_error(
        where + std::to_string(ctx->unmapped_peers) +
        " PEs are not reachable by loads / stores from this one (other nodes): the "
        "low-latency ops need NVSHMEM puts and therefore send_buffer=True on every PE");
  }
  // No NVSHMEM barrier here: a PE that failed above would leave the others in
  // it forever. The caller agrees on success with a bounded wait instead
  // (jax_ep/_agreement.py) before any kernel runs on the region.
  {
    std::lock_guard<std::mutex> lock(reg.mu);
    ctx->ready = true;
  }
  reg.watchdog.Start();
  return LLGetInfo();
}

void LLSetOptions(double timeout_s, int num_blocks, int force_put, int ranks_on_device) {
  CheckTimeoutAndBlocks("nvshmem_ll_set_options", timeout_s, num_blocks);
  Registry& reg = Reg();
  reg.timeout_s.store(timeout_s);
  reg.num_blocks.store(num_blocks);
  if (force_put >= 0) reg.force_put.store(force_put != 0);
  if (ranks_on_device >= 0) reg.ranks_on_device.store(std::min(ranks_on_device, kLLMaxRanks));
}

std::string CudaPciBusId(int device) {
  char id[64] = {0};
  CudaCheck(cudaDeviceGetPCIBusId(id, sizeof(id), device), device, "cudaDeviceGetPCIBusId");
  return std::string(id);
}

LLInfo LLGetInfo() {
  const std::optional<NvshmemPe> pe = NvshmemCurrentPe();
  Registry& reg = Reg();
  std::lock_guard<std::mutex> lock(reg.mu);
  return InfoLocked(reg, pe);
}

void LLFree() {
  Registry& reg = Reg();
  std::shared_ptr<LLContext> ctx;
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
  EndGeneration(ctx->device, GuardedMode::kLowLatency);  // graphs recorded so far stop
  WriteTrace(*ctx);
  nvshmem_free(ctx->region);  // collective
  FreeLocalParts(*ctx);
  {
    std::lock_guard<std::mutex> lock(reg.mu);
    reg.ctx.reset();
  }
  if (previous >= 0) cudaSetDevice(previous);
}

std::optional<std::string> LLLastError() {
  if (auto stale = StaleGraphMessage()) return stale;
  Registry& reg = Reg();
  std::lock_guard<std::mutex> lock(reg.mu);
  PollLocked(reg);
  if (reg.reports.first().empty()) return std::nullopt;
  return reg.reports.first();
}

bool AcquireLowLatency(int device, LLComm* comm, std::shared_ptr<const LLContext>* hold,
                       std::string* error) {
  Registry& reg = Reg();
  std::lock_guard<std::mutex> lock(reg.mu);
  PollLocked(reg);
  if (reg.reports.any()) {
    *error = reg.reports.first();
    return false;
  }
  if (!reg.ctx || !reg.ctx->ready) {
    *error = "jax_ep: the NVSHMEM low-latency buffers are not set up in this process: call "
             "jax_ep's low-latency initialization (nvshmem_init + nvshmem_ll_alloc) first";
    return false;
  }
  const LLContext& ctx = *reg.ctx;
  if (ctx.device != device) {
    *error = "jax_ep: this low-latency op runs on CUDA device " + std::to_string(device) +
             " but NVSHMEM was initialized for device " + std::to_string(ctx.device) +
             " (NVSHMEM has one PE, i.e. one GPU, per process)";
    return false;
  }
  const bool force_put = reg.force_put.load();
  const bool any_put = AnyPut(ctx, force_put);
  if (any_put && ctx.layout.send_bytes == 0) {
    *error = std::string("jax_ep: ") +
             (force_put ? "force_put (jax_ep.Options(force_put=True))" : "peers on other nodes") +
             " need NVSHMEM puts, but the low-latency buffers were allocated without the send "
             "buffer (send_buffer=True)";
    return false;
  }
  comm->base = ctx.region;
  comm->peer_base = force_put ? ctx.put_table : ctx.peer_table;
  comm->layout = ctx.layout;
  comm->rank = ctx.rank;
  comm->num_ranks = ctx.num_ranks;
  comm->num_blocks = EffectiveNumBlocks(ctx, reg.num_blocks.load(), reg.ranks_on_device.load());
  comm->any_put = any_put ? 1 : 0;
  comm->gpu_scope = EffectiveGpuScope(ctx, reg.ranks_on_device.load(), any_put) ? 1 : 0;
  comm->pdl = ctx.options.dependent_launch ? 1 : 0;
  comm->stream_combine = EffectiveStreamCombine(ctx, comm->gpu_scope != 0) ? 1 : 0;
  comm->timeout_record = ctx.record_device;
  comm->timeout_ns = TimeoutNs(reg.timeout_s.load());
  comm->trace = ctx.trace;
  comm->live = ctx.live;
  *hold = reg.ctx;
  return true;
}

}  // namespace jax_ep
