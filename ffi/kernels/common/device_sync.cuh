// Device-side synchronisation shared by the intranode kernels (intranode.cu)
// and the low-latency kernels (low_latency/*.cu): acquire / release of 64-bit
// flags and fences at system scope (or GPU scope, when every reader and writer
// runs on this GPU), the %globaltimer clock, the timeout record + trap, the
// spin-wait with a timeout, and the election of the last block of a grid.
//
// Header-only (inline device functions): intranode.cu is compiled whole-
// program, the low-latency kernels with relocatable device code in their own
// library; each file gets its own copy.
#pragma once

#include <cstdint>

#include "ffi/kernels/common/timeout_record.h"

namespace jax_ep {

// ------------------------------------------------------------ memory model

__device__ __forceinline__ uint64_t LoadAcquireSys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void StoreReleaseSys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// The same at GPU scope when gpu_scope: enough when every thread that reads
// or writes the flag runs on this GPU (several PEs as processes sharing one
// GPU), and cheaper than system scope under load.
__device__ __forceinline__ uint64_t LoadAcquire(const uint64_t* p, bool gpu_scope) {
  if (!gpu_scope) return LoadAcquireSys(p);
  uint64_t v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void StoreRelease(uint64_t* p, uint64_t v, bool gpu_scope) {
  if (!gpu_scope) return StoreReleaseSys(p, v);
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void Fence(bool gpu_scope) {
  if (gpu_scope) {
    __threadfence();
  } else {
    __threadfence_system();
  }
}

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// ------------------------------------------------------------ timeouts

// Fills the host-mapped record (only the first timeout of the process gets
// it: state 0 -> 1 -> 2) and traps. A thread that loses the race waits (up to
// 10 ms) until the winner's record is complete: its trap would otherwise end
// the kernel halfway through the winner's writes to host memory, and the
// message would be lost (seen when hundreds of warps timed out together).
// Out of line: spin loops stay small.
inline __device__ __noinline__ void RecordTimeoutAndTrap(TimeoutRecord* rec, int32_t rank,
                                                         int32_t op, int32_t what, int32_t peer,
                                                         uint64_t timeout_ns, uint64_t epoch,
                                                         uint64_t seen,
                                                         const uint64_t* mine = nullptr,
                                                         const uint64_t* theirs = nullptr) {
  if (rec != nullptr) {
    if (atomicCAS_system(&rec->state, 0, 1) == 0) {
      volatile TimeoutRecord* v = rec;
      v->rank = rank;
      v->op = op;
      v->what = what;
      v->peer = peer;
      v->timeout_ns = timeout_ns;
      v->epoch = epoch;
      v->seen = seen;
      for (int i = 0; i < kSignatureWords; ++i) {
        v->mine[i] = mine != nullptr ? mine[i] : 0;
        v->theirs[i] = theirs != nullptr ? theirs[i] : 0;
      }
      __threadfence_system();
      atomicExch_system(&rec->state, 2);
      __threadfence_system();
    } else {
      const uint64_t start = GlobalTimerNs();
      while (*reinterpret_cast<volatile decltype(rec->state)*>(&rec->state) != 2 &&
             GlobalTimerNs() - start < 10000000ull) {
        __nanosleep(1000);
      }
    }
  }
  __trap();
}

// What a timed-out spin-wait writes into the record (besides the value seen).
struct TimeoutSite {
  TimeoutRecord* record;  // device-visible, host-mapped; nullptr: trap only
  int32_t rank;
  int32_t op;
  int32_t what;
  int32_t peer;
  uint64_t timeout_ns;
  uint64_t epoch;
};

// Spins until (acquire load of flag >> shift) >= target and returns the value
// loaded (system scope unless gpu_scope). After 64 polls every poll first
// sleeps sleep_ns (leaves issue slots to co-resident kernels); once
// timeout_ns passed since the first miss, records the site and the last value
// seen and traps.
__device__ __forceinline__ uint64_t SpinWaitAtLeast(const uint64_t* flag, uint64_t target,
                                                    int shift, unsigned int sleep_ns,
                                                    const TimeoutSite& site,
                                                    bool gpu_scope = false) {
  uint64_t seen = LoadAcquire(flag, gpu_scope);
  if ((seen >> shift) >= target) return seen;
  const uint64_t start = GlobalTimerNs();
  for (uint32_t spins = 0;; ++spins) {
    if (spins >= 64) __nanosleep(sleep_ns);
    seen = LoadAcquire(flag, gpu_scope);
    if ((seen >> shift) >= target) return seen;
    if (GlobalTimerNs() - start > site.timeout_ns) {
      RecordTimeoutAndTrap(site.record, site.rank, site.op, site.what, site.peer, site.timeout_ns,
                           site.epoch, seen);
    }
  }
}

// ------------------------------------------------------------ grid completion

// Every block of the grid calls this at the end of a phase; true in the last
// block to arrive. Thread 0 fences (system scope unless gpu_scope) after a
// barrier, counts the block in, and the last block fences again: the writes
// of every block are ordered before whatever the last block does next (the
// pattern of cooperative groups' grid sync: the barrier orders the block's
// writes before thread 0's fence). Whoever owns `counter` resets it for the
// next grid.
__device__ __forceinline__ bool ArriveLast(unsigned int* counter, bool gpu_scope = false) {
  __shared__ bool s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    Fence(gpu_scope);
    const unsigned int prev = atomicAdd(counter, 1u);
    s_last = prev == gridDim.x - 1;
    if (s_last) Fence(gpu_scope);
  }
  __syncthreads();
  return s_last;
}

}  // namespace jax_ep
