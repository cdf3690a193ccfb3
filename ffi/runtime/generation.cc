// Generations of the modes' contexts (ffi/runtime/generation.h).
#include "ffi/runtime/generation.h"

#include <map>
#include <mutex>
#include <stdexcept>
#include <utility>

#include <cuda_runtime.h>

namespace jax_ep {
namespace {

constexpr int kModes = 3;

struct Generations {
  std::mutex mu;
  uint32_t next = 0;
  std::map<int, uint32_t*> words;  // device -> device array [kModes]; never freed
  uint32_t* stale_host = nullptr;  // host-mapped flag; never freed
  uint32_t* stale_device = nullptr;
};

Generations& Gen() {
  static Generations* g = new Generations();  // never destroyed: graphs may outlive it
  return *g;
}

void Check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("jax_ep: ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

// The device words of `device` (allocated on first use, zeroed), with the
// device current.
uint32_t* WordsLocked(Generations& g, int device) {
  auto it = g.words.find(device);
  if (it != g.words.end()) return it->second;
  uint32_t* words = nullptr;
  Check(cudaMalloc(reinterpret_cast<void**>(&words), kModes * sizeof(uint32_t)),
        "cudaMalloc of the generation words");
  Check(cudaMemset(words, 0, kModes * sizeof(uint32_t)), "zeroing the generation words");
  g.words.emplace(device, words);
  return words;
}

// A copy from pageable memory may return before it lands: synchronise, so
// the first kernel of the new generation cannot read the old value.
void SetWord(uint32_t* word, uint32_t value) {
  Check(cudaMemcpy(word, &value, sizeof(value), cudaMemcpyHostToDevice),
        "writing a generation word");
  Check(cudaDeviceSynchronize(), "waiting for a generation word");
}

}  // namespace

LiveCheck BeginGeneration(int device, GuardedMode mode) {
  Generations& g = Gen();
  std::lock_guard<std::mutex> lock(g.mu);
  int previous = 0;
  Check(cudaGetDevice(&previous), "cudaGetDevice");
  Check(cudaSetDevice(device), "cudaSetDevice");
  LiveCheck out;
  try {
    if (g.stale_host == nullptr) {
      Check(cudaHostAlloc(reinterpret_cast<void**>(&g.stale_host), sizeof(uint32_t),
                          cudaHostAllocMapped | cudaHostAllocPortable),
            "cudaHostAlloc of the stale-graph flag");
      *g.stale_host = 0;
    }
    Check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&g.stale_device), g.stale_host, 0),
          "cudaHostGetDevicePointer of the stale-graph flag");
    uint32_t* word = WordsLocked(g, device) + static_cast<int>(mode);
    if (++g.next == 0) ++g.next;  // 0 means "shut down"
    SetWord(word, g.next);
    out.live = word;
    out.generation = g.next;
    out.stale = g.stale_device;
  } catch (...) {
    cudaSetDevice(previous);
    throw;
  }
  cudaSetDevice(previous);
  return out;
}

void EndGeneration(int device, GuardedMode mode) {
  Generations& g = Gen();
  std::lock_guard<std::mutex> lock(g.mu);
  auto it = g.words.find(device);
  if (it == g.words.end()) return;
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return;
  if (cudaSetDevice(device) == cudaSuccess) {
    const uint32_t zero = 0;
    cudaMemcpy(it->second + static_cast<int>(mode), &zero, sizeof(zero),
               cudaMemcpyHostToDevice);  // best effort at shutdown
    cudaDeviceSynchronize();
  }
  cudaSetDevice(previous);
}

std::optional<std::string> StaleGraphMessage() {
  Generations& g = Gen();
  std::lock_guard<std::mutex> lock(g.mu);
  if (g.stale_host == nullptr || *reinterpret_cast<volatile uint32_t*>(g.stale_host) == 0) {
    return std::nullopt;
  }
  return std::string(
      "jax_ep: a function compiled before jax_ep.shutdown() ran after it: XLA's CUDA graphs "
      "keep the addresses of the buffers shutdown freed, so its kernel stopped instead of "
      "using them. jax_ep.shutdown() clears JAX's caches, so jitted functions trace and "
      "compile again; compile an ahead-of-time .compile() result again after initialize.");
}

}  // namespace jax_ep
