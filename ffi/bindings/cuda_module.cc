// nanobind module jax_ep._jax_ep_cuda: hands the CUDA XLA FFI handlers to
// Python as PyCapsules (registered lazily by jax_ep/cuda/extension.py) and reports
// what this module was compiled for.
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <nanobind/stl/optional.h>

#include "ffi/bindings/capsule.h"
#include "ffi/handlers/cuda_handlers.h"
#include "ffi/kernels/intranode/intranode.h"
#include "ffi/kernels/layout/route.h"
#include "ffi/runtime/intranode_runtime.h"

namespace nb = nanobind;

namespace {

// FFI target name -> handler capsule, for jax.ffi.register_ffi_target(...,
// platform="CUDA"). Add one line per new handler.
constexpr jax_ep::FfiTarget kTargets[] = {
    {"jax_ep_get_dispatch_layout", JaxEpGetDispatchLayout},
    {"jax_ep_route", JaxEpRoute},
    {"jax_ep_intranode_dispatch", JaxEpIntranodeDispatch},
    {"jax_ep_intranode_dispatch_cached", JaxEpIntranodeDispatchCached},
    {"jax_ep_intranode_combine", JaxEpIntranodeCombine},
};

// ---- Intranode runtime (ffi/runtime/intranode_runtime.h). Called at
// initialize only; CUDA work runs with the GIL released.

// peers[r] = ("self", 0) | ("local", pointer: int) | ("ipc", handle: bytes).
std::vector<jax_ep::PeerSpec> ParsePeers(const nb::list& peers) {
  std::vector<jax_ep::PeerSpec> out;
  out.reserve(nb::len(peers));
  for (size_t r = 0; r < nb::len(peers); ++r) {
    const std::string where = "jax_ep: comm_connect: peers[" + std::to_string(r) + "] ";
    nb::tuple entry;
    if (!nb::try_cast(peers[r], entry) || nb::len(entry) != 2) {
      throw nb::type_error((where + "must be a (kind, value) tuple").c_str());
    }
    std::string kind;
    if (!nb::try_cast(entry[0], kind)) throw nb::type_error((where + "kind must be a str").c_str());
    jax_ep::PeerSpec spec;
    if (kind == "self") {
      spec.kind = jax_ep::PeerSpec::Kind::kSelf;
    } else if (kind == "local") {
      spec.kind = jax_ep::PeerSpec::Kind::kLocal;
      uint64_t pointer = 0;
      if (!nb::try_cast(entry[1], pointer)) {
        throw nb::type_error((where + "('local', pointer) needs an int pointer").c_str());
      }
      spec.pointer = static_cast<uintptr_t>(pointer);
    } else if (kind == "ipc") {
      spec.kind = jax_ep::PeerSpec::Kind::kIpc;
      nb::bytes handle;
      if (!nb::try_cast(entry[1], handle)) {
        throw nb::type_error((where + "('ipc', handle) needs a bytes handle").c_str());
      }
      spec.ipc_handle.assign(handle.c_str(), handle.size());
    } else {
      throw nb::value_error(
          (where + "kind must be 'self', 'local' or 'ipc', got '" + kind + "'").c_str());
    }
    out.push_back(std::move(spec));
  }
  return out;
}

void CommConnect(int device, int rank, int num_ranks, int group, const nb::list& peers) {
  std::vector<jax_ep::PeerSpec> specs = ParsePeers(peers);
  nb::gil_scoped_release release;
  jax_ep::CommConnect(device, rank, num_ranks, group, specs);
}

nb::bytes CommIpcHandle(int device) {
  std::string handle;
  {
    nb::gil_scoped_release release;
    handle = jax_ep::CommIpcHandle(device);
  }
  return nb::bytes(handle.data(), handle.size());
}

nb::dict CommInfoDict(int device) {
  const jax_ep::CommInfo info = jax_ep::CommGetInfo(device);
  nb::dict d;
  d["device"] = info.device;
  d["rank"] = info.rank;
  d["num_ranks"] = info.num_ranks;
  d["group"] = info.group;
  d["connected"] = info.connected;
  d["data_bytes"] = info.data_bytes;
  d["signal_bytes"] = info.signal_bytes;
  d["num_sms"] = info.num_sms;
  d["ranks_on_device"] = info.ranks_on_device;
  d["num_blocks"] = info.num_blocks;
  d["max_coresident_blocks"] = info.max_coresident_blocks;
  d["timeout_s"] = jax_ep::CommTimeoutSeconds();
  return d;
}

size_t DispatchDataBytes(int64_t capacity, const std::vector<int64_t>& row_bytes) {
  return jax_ep::IntranodeDispatchDataBytes(capacity, row_bytes.data(),
                                            static_cast<int>(row_bytes.size()));
}

// CMAKE_CUDA_ARCHITECTURES at build time, e.g. "90a" or "90a;100a".
std::vector<std::string> CudaArchs() {
  std::vector<std::string> out;
  std::string archs = JAX_EP_CUDA_ARCHS;
  size_t start = 0;
  while (start <= archs.size()) {
    size_t end = archs.find(';', start);
    if (end == std::string::npos) end = archs.size();
    if (end > start) out.push_back(archs.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

}  // namespace

NB_MODULE(_jax_ep_cuda, m) {
  m.doc() = "jax_ep CUDA FFI handlers (PyCapsules) and build facts.";
  jax_ep::DefineTargetBindings(m, kTargets);
  m.def("route_scratch_ints", &jax_ep::RouteScratchInts, nb::arg("num_tokens"),
        nb::arg("num_ranks"), "Length of jax_ep_route's scratch result (int32).");
  m.def("cuda_archs", &CudaArchs, "CUDA architectures the kernels were compiled for.");

  // Intranode communicator runtime.
  m.def(
      "comm_create",
      [](int device, size_t data_bytes) {
        nb::gil_scoped_release release;
        jax_ep::CommCreate(device, data_bytes);
      },
      nb::arg("device_ordinal"), nb::arg("data_bytes"),
      "Allocate and zero this device's comm buffer (signal area + data_bytes) and its "
      "host-mapped timeout record; starts the timeout watchdog. RuntimeError on failure.");
  m.def("comm_ipc_handle", &CommIpcHandle, nb::arg("device_ordinal"),
        "cudaIpcGetMemHandle of the device's comm buffer (64 bytes), for peers in other "
        "processes.");
  m.def("comm_local_pointer", &jax_ep::CommLocalPointer, nb::arg("device_ordinal"),
        "Device pointer (int) of the device's comm buffer, for peers in this process.");
  m.def("comm_connect", &CommConnect, nb::arg("device_ordinal"), nb::arg("rank"),
        nb::arg("num_ranks"), nb::arg("group"), nb::arg("peers"),
        "Map the peers (peers[r] = ('self', 0) | ('local', pointer) | ('ipc', handle)) and "
        "register the device's rank context for the FFI handlers.");
  m.def("comm_set_options", &jax_ep::CommSetOptions, nb::arg("timeout_s"), nb::arg("num_blocks"),
        "Spin-wait timeout in seconds and thread blocks per data kernel (0 = automatic: "
        "2 x SMs / ranks sharing the GPU, at least 8). Read at every op launch.");
  m.def("comm_info", &CommInfoDict, nb::arg("device_ordinal"),
        "Dict describing the device's communicator (rank, num_ranks, group, connected, "
        "data_bytes, signal_bytes, num_sms, ranks_on_device, num_blocks, max_coresident_blocks, "
        "timeout_s).");
  m.def(
      "comm_close_peers",
      [] {
        nb::gil_scoped_release release;
        jax_ep::CommClosePeers();
      },
      "Disconnect every communicator, wait for its device and close its IPC mappings of "
      "the peers' buffers (the first half of a collective shutdown).");
  m.def(
      "comm_destroy_all",
      [] {
        nb::gil_scoped_release release;
        jax_ep::CommDestroyAll();
      },
      "Stop the watchdog, wait for every device, close IPC mappings and free all comm "
      "buffers. Safe to call twice.");
  m.def("last_error", &jax_ep::LastError,
        "The first timeout message of this process (str), or None.");
  m.def("intranode_max_ranks", [] { return jax_ep::kIntranodeMaxRanks; },
        "Largest EP group the intranode kernels support.");
  m.def("intranode_dispatch_bytes", &DispatchDataBytes, nb::arg("capacity"), nb::arg("row_bytes"),
        "Data-area bytes a dispatch needs: capacity * sum(row_bytes).");
  m.def("intranode_combine_bytes", &jax_ep::IntranodeCombineDataBytes, nb::arg("num_ranks"),
        nb::arg("num_tokens"), nb::arg("row_bytes"),
        "Data-area bytes a combine needs: num_ranks * num_tokens * row_bytes.");
}
