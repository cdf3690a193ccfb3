// nanobind module jax_ep._jax_ep_nvshmem: the FFI handlers of the modes that
// run over NVSHMEM (low-latency, internode) as PyCapsules plus the host calls
// that set NVSHMEM and their regions up. A module of its own because it links
// libnvshmem_host.so.3 (from the nvidia-nvshmem-cu13 wheel): when that library
// is missing only these modes are lost.
//
// Collective calls (nvshmem_init, nvshmem_ll_alloc, internode_alloc, the
// frees, nvshmem_finalize) must be
// made by every PE, in the same order, outside jit; they release the GIL.
// Every switch reaches C++ as an argument here (no environment variables
// are read).
#include <string>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <nvshmem_host.h>

#include "ffi/bindings/capsule.h"
#include "ffi/handlers/internode_handlers.h"
#include "ffi/handlers/low_latency_handlers.h"
#include "ffi/kernels/low_latency/low_latency.h"
#include "ffi/runtime/internode_runtime.h"
#include "ffi/runtime/low_latency_runtime.h"
#include "ffi/runtime/nvshmem_bootstrap.h"

namespace nb = nanobind;

namespace {

// FFI target name -> handler capsule. Add one line per new handler.
constexpr jax_ep::FfiTarget kTargets[] = {
    {"jax_ep_ll_dispatch", JaxEpLLDispatch},
    {"jax_ep_ll_dispatch_send", JaxEpLLDispatchSend},
    {"jax_ep_ll_dispatch_recv", JaxEpLLDispatchRecv},
    {"jax_ep_ll_combine", JaxEpLLCombine},
    {"jax_ep_ll_combine_send", JaxEpLLCombineSend},
    {"jax_ep_ll_combine_recv", JaxEpLLCombineRecv},
    {"jax_ep_ll_gather", JaxEpLLGather},
    {"jax_ep_ll_dispatch_cached", JaxEpLLDispatchCached},
    {"jax_ep_internode_dispatch", JaxEpInternodeDispatch},
    {"jax_ep_internode_dispatch_cached", JaxEpInternodeDispatchCached},
    {"jax_ep_internode_combine", JaxEpInternodeCombine},
};

nb::dict LayoutDict(const jax_ep::LLLayout& lay) {
  nb::dict d;
  d["num_ranks"] = lay.num_ranks;
  d["max_tokens_per_rank"] = lay.max_tokens;
  d["hidden"] = lay.hidden;
  d["num_experts"] = lay.num_experts;
  d["top_k"] = lay.top_k;
  d["itemsize"] = lay.itemsize;
  d["counts_offset"] = lay.counts_offset;
  d["scratch_offset"] = lay.scratch_offset;
  d["jpos_offset"] = lay.jpos_offset;
  d["arrive_offset"] = lay.arrive_offset;
  d["set_offset"] = lay.set_offset;
  d["set_bytes"] = lay.set_bytes;
  d["send_offset"] = lay.send_offset;
  d["send_bytes"] = lay.send_bytes;
  d["total_bytes"] = lay.total_bytes;
  return d;
}

nb::dict InfoDict(const jax_ep::LLInfo& info) {
  nb::dict d;
  d["initialized"] = info.initialized;
  d["allocated"] = info.allocated;
  d["device"] = info.device;
  d["rank"] = info.rank;
  d["num_ranks"] = info.num_ranks;
  d["num_sms"] = info.num_sms;
  d["max_coresident_blocks"] = info.max_coresident_blocks;
  d["ranks_on_device"] = info.ranks_on_device;
  d["num_blocks"] = info.num_blocks;
  d["unmapped_peers"] = info.unmapped_peers;
  d["force_put"] = info.force_put;
  d["gpu_scope"] = info.gpu_scope;
  d["pdl"] = info.pdl;
  d["stream_combine"] = info.stream_combine;
  d["system_scope"] = info.system_scope;
  d["phase_trace"] = info.phase_trace;
  d["ranks_per_node"] = info.ranks_per_node;
  d["timeout_s"] = info.timeout_s;
  d["layout"] = info.allocated ? nb::object(LayoutDict(info.layout)) : nb::none();
  return d;
}

nb::dict InternodeInfoDict(const jax_ep::InternodeInfo& info) {
  nb::dict d;
  d["allocated"] = info.allocated;
  d["device"] = info.device;
  d["rank"] = info.rank;
  d["num_ranks"] = info.num_ranks;
  d["ranks_per_node"] = info.ranks_per_node;
  d["num_nodes"] = info.num_nodes;
  d["num_sms"] = info.num_sms;
  d["ranks_on_device"] = info.ranks_on_device;
  d["num_blocks"] = info.num_blocks;
  d["max_coresident_blocks"] = info.max_coresident_blocks;
  d["timeout_s"] = info.timeout_s;
  d["stride"] = info.layout.stride;
  d["max_tokens_per_rank"] = info.layout.max_tokens;
  d["region_bytes"] = info.layout.total_bytes;
  return d;
}

}  // namespace

NB_MODULE(_jax_ep_nvshmem, m) {
  m.doc() = "jax_ep low-latency ops over NVSHMEM: FFI handlers (PyCapsules) and NVSHMEM setup.";
  jax_ep::DefineTargetBindings(m, kTargets);
  m.def(
      "nvshmem_version",
      [] {
        return nb::make_tuple(NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                              NVSHMEM_VENDOR_PATCH_VERSION);
      },
      "NVSHMEM version the module was built against (major, minor, patch); the run-time "
      "libnvshmem_host.so.3 must not be older in its minor version.");
  m.def(
      "nvshmem_get_unique_id",
      [](bool single_host) {
        std::string id;
        {
          nb::gil_scoped_release release;
          id = jax_ep::NvshmemGetUniqueId(single_host);
        }
        return nb::bytes(id.data(), id.size());
      },
      nb::arg("single_host") = false,
      "nvshmemx_get_uniqueid (128 bytes). Call on EP rank 0 only, after the environment "
      "defaults (applied here too); rank 0 must live until every PE ran nvshmem_init.");
  m.def(
      "nvshmem_init",
      [](nb::bytes uid, int rank, int nranks, int device_ordinal, bool single_host,
         size_t heap_bytes) {
        std::string id(uid.c_str(), uid.size());
        nb::gil_scoped_release release;
        jax_ep::NvshmemInit(id, rank, nranks, device_ordinal, single_host, heap_bytes);
      },
      nb::arg("uid"), nb::arg("rank"), nb::arg("nranks"), nb::arg("device_ordinal"),
      nb::arg("single_host") = false, nb::arg("heap_bytes") = 0,
      "Collective: nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID) as PE `rank` of `nranks` on "
      "CUDA device `device_ordinal`, from inside this module (registers its device state; works "
      "after nvshmem4py's init too). heap_bytes > 0 sets NVSHMEM_SYMMETRIC_SIZE if unset.");
  m.def("nvshmem_initialized", &jax_ep::NvshmemInitialized,
        "Whether nvshmem_init ran (and nvshmem_finalize did not) in this process.");
  m.def("nvshmem_ll_region_bytes", &jax_ep::LLRegionBytes, nb::arg("num_ranks"),
        nb::arg("max_tokens_per_rank"), nb::arg("hidden"), nb::arg("num_experts"),
        nb::arg("top_k"), nb::arg("itemsize") = 2, nb::arg("send_buffer") = false,
        "Bytes of symmetric heap nvshmem_ll_alloc takes for these maxima (no NVSHMEM call).");
  m.def(
      "nvshmem_ll_layout",
      [](int num_ranks, int64_t max_tokens, int64_t hidden, int64_t num_experts, int64_t top_k,
         int64_t itemsize, bool send_buffer) {
        return LayoutDict(jax_ep::MakeLLLayout(num_ranks, max_tokens, hidden, num_experts, top_k,
                                               itemsize, send_buffer));
      },
      nb::arg("num_ranks"), nb::arg("max_tokens_per_rank"), nb::arg("hidden"),
      nb::arg("num_experts"), nb::arg("top_k"), nb::arg("itemsize") = 2,
      nb::arg("send_buffer") = false, "The region layout (offsets and sizes in bytes) as a dict.");
  m.def(
      "nvshmem_ll_alloc",
      [](int64_t max_tokens, int64_t hidden, int64_t num_experts, int64_t top_k, int64_t itemsize,
         bool send_buffer, bool system_scope, bool dependent_launch, bool streamed_combine,
         const std::string& phase_trace, int ranks_per_node) {
        const jax_ep::LLAllocOptions options{ranks_per_node, system_scope, dependent_launch,
                                             streamed_combine, phase_trace};
        jax_ep::LLInfo info;
        {
          nb::gil_scoped_release release;
          info = jax_ep::LLAlloc(max_tokens, hidden, num_experts, top_k, itemsize, send_buffer,
                                 options);
        }
        return InfoDict(info);
      },
      nb::arg("max_tokens_per_rank"), nb::arg("hidden"), nb::arg("num_experts"),
      nb::arg("top_k"), nb::arg("itemsize") = 2, nb::arg("send_buffer") = false,
      nb::arg("system_scope") = false, nb::arg("dependent_launch") = true,
      nb::arg("streamed_combine") = true, nb::arg("phase_trace") = "",
      nb::arg("ranks_per_node") = 0,
      "Collective: allocate and zero the symmetric low-latency region (double-buffered) for "
      "these maxima; itemsize = bytes per element of x / y (2: bf16/f16, 4: f32); send_buffer: "
      "staging rows for NVSHMEM puts (needed across nodes and for force_put). Fixed until "
      "nvshmem_finalize: system_scope (system-scope flags and fences even when every PE is on "
      "this GPU), dependent_launch (programmatic dependent launch of the kernels), "
      "streamed_combine (False: always the plain fused combine), phase_trace (path prefix of "
      "the phase trace, written to <phase_trace>.pe<rank> at nvshmem_finalize; '' = off), "
      "ranks_per_node (> 0: PEs of other nodes of that many consecutive ranks by puts, needs "
      "send_buffer; 0: every peer NVSHMEM maps by stores). Returns nvshmem_ll_info().");
  m.def("nvshmem_ll_set_options", &jax_ep::LLSetOptions, nb::arg("timeout_s"),
        nb::arg("num_blocks") = 0, nb::arg("force_put") = -1, nb::arg("ranks_on_device") = -1,
        "Spin-wait timeout (s), thread blocks per kernel (0 = SMs / PEs sharing the GPU), "
        "force_put (1: move every row with NVSHMEM puts even to mapped peers, 0: off, -1: keep; "
        "initially off) and ranks_on_device (PEs sharing this GPU, "
        "for the automatic grid size; 0: NVSHMEM's same-GPU team, -1: keep). Read at every op "
        "launch.");
  m.def(
      "cuda_pci_bus_id",
      [](int device_ordinal) {
        nb::gil_scoped_release release;
        return jax_ep::CudaPciBusId(device_ordinal);
      },
      nb::arg("device_ordinal"), "cudaDeviceGetPCIBusId of the device, e.g. '0000:1B:00.0'.");
  m.def("nvshmem_ll_info", [] { return InfoDict(jax_ep::LLGetInfo()); },
        "Dict: initialized, allocated, device, rank, num_ranks, num_sms, ranks_on_device, "
        "num_blocks, unmapped_peers, force_put, gpu_scope, pdl, stream_combine (effective values), "
        "system_scope, phase_trace (as given to nvshmem_ll_alloc), timeout_s, layout.");
  m.def(
      "nvshmem_ll_free",
      [] {
        nb::gil_scoped_release release;
        jax_ep::LLFree();
      },
      "Collective: free the low-latency region (nvshmem_free); NVSHMEM stays initialized. "
      "Safe to call twice / without allocation.");
  m.def(
      "nvshmem_finalize",
      [] {
        nb::gil_scoped_release release;
        jax_ep::LLFree();
        jax_ep::InternodeFree();
        jax_ep::NvshmemFinalize();
      },
      "Collective: free the regions and nvshmem_finalize. Safe to call twice / without init.");
  m.def("ll_last_error", &jax_ep::LLLastError,
        "The first low-latency timeout / mismatch message of this process (str), or None.");
  m.def(
      "internode_message_bytes",
      [](int ranks_per_node, const std::vector<int64_t>& row_bytes) {
        return jax_ep::InternodeMessageBytes(ranks_per_node, row_bytes.data(),
                                             static_cast<int>(row_bytes.size()));
      },
      nb::arg("ranks_per_node"), nb::arg("row_bytes"),
      "Bytes of an internode dispatch message carrying payload rows of these sizes.");
  m.def("internode_region_bytes", &jax_ep::InternodeRegionBytes, nb::arg("num_ranks"),
        nb::arg("ranks_per_node"), nb::arg("max_tokens_per_rank"), nb::arg("message_bytes"),
        nb::arg("combine_row_bytes"),
        "Bytes of symmetric heap internode_alloc takes for these maxima (no NVSHMEM call).");
  m.def(
      "internode_alloc",
      [](int ranks_per_node, int64_t max_tokens, int64_t message_bytes, int64_t combine_row_bytes,
         int ranks_on_device) {
        jax_ep::InternodeInfo info;
        {
          nb::gil_scoped_release release;
          info = jax_ep::InternodeAlloc(ranks_per_node, max_tokens, message_bytes,
                                        combine_row_bytes, ranks_on_device);
        }
        return InternodeInfoDict(info);
      },
      nb::arg("ranks_per_node"), nb::arg("max_tokens_per_rank"), nb::arg("message_bytes"),
      nb::arg("combine_row_bytes"), nb::arg("ranks_on_device") = 1,
      "Collective, after nvshmem_init: allocate and zero the internode region for messages of "
      "up to message_bytes and combine rows of up to combine_row_bytes, map the regions of this "
      "node's ranks (raises when one is not reachable). Returns internode_info().");
  m.def("internode_set_options", &jax_ep::InternodeSetOptions, nb::arg("timeout_s"),
        nb::arg("num_blocks") = 0,
        "Spin-wait timeout (s) and blocks per kernel (0 = SMs / PEs sharing the GPU).");
  m.def("internode_info", [] { return InternodeInfoDict(jax_ep::InternodeGetInfo()); },
        "Dict: allocated, device, rank, num_ranks, ranks_per_node, num_nodes, num_sms, "
        "ranks_on_device, num_blocks, max_coresident_blocks, timeout_s, stride, "
        "max_tokens_per_rank, region_bytes.");
  m.def(
      "internode_free",
      [] {
        nb::gil_scoped_release release;
        jax_ep::InternodeFree();
      },
      "Collective: free the internode region; NVSHMEM stays initialized. Safe to call twice.");
  m.def("internode_last_error", &jax_ep::InternodeLastError,
        "The first internode timeout / mismatch message of this process (str), or None.");
  m.def("internode_max_ranks", [] { return jax_ep::kInternodeMaxRanks; }, "Largest EP group.");
  m.def("ll_max_ranks", [] { return jax_ep::kLLMaxRanks; }, "Largest EP group (PEs).");
}
