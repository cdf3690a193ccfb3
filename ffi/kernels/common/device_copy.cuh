// Vector copies of the intranode kernels (intranode.cu) and the low-latency
// kernels (low_latency/*.cu): the vector type of an access width and the load
// flavour (both), and a strided copy with several loads in flight per thread
// (intranode's grid copies; low_latency/device.cuh keeps its own warp loop, see
// WarpCopyVec there). Header-only (see device_sync.cuh).
#pragma once

#include <cstdint>

namespace jax_ep {

// The unsigned vector type of kBytes bytes (32, 16, 8, 4, 2 or 1).
template <int kBytes>
struct VecOf;
// 32 bytes: two 16-byte vectors (loaded as two).
struct Vec32 {
  uint4 lo, hi;
};
template <>
struct VecOf<32> {
  using Type = Vec32;
};
template <>
struct VecOf<16> {
  using Type = uint4;
};
template <>
struct VecOf<8> {
  using Type = uint2;
};
template <>
struct VecOf<4> {
  using Type = unsigned int;
};
template <>
struct VecOf<2> {
  using Type = unsigned short;
};
template <>
struct VecOf<1> {
  using Type = unsigned char;
};

// kPeer: the data was written by another agent during this kernel (read
// through L2 only, __ldcg); else it is read-only for the whole kernel (__ldg).
template <bool kPeer, typename V>
__device__ __forceinline__ V LoadVec(const V* p) {
  if constexpr (sizeof(V) == 32) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    return V{LoadVec<kPeer>(q), LoadVec<kPeer>(q + 1)};
  } else if constexpr (kPeer) {
    return __ldcg(p);
  } else {
    return __ldg(p);
  }
}

// Copies the first n_valid vectors and zero-fills up to n_total. This thread
// takes the vectors first, first + stride, ... (grid-strided: first = global
// thread index, stride = threads of the grid; warp-strided: lane, 32), kUnroll
// of them at once: all loads are issued before the stores.
template <bool kPeer, int kUnroll, typename V>
__device__ __forceinline__ void StridedCopy(const V* __restrict__ src, V* __restrict__ dst,
                                            int64_t n_valid, int64_t n_total, int64_t first,
                                            int64_t stride) {
  for (int64_t base = first; base < n_total; base += stride * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      v[u] = i < n_valid ? LoadVec<kPeer>(src + i) : V{};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      if (i < n_total) dst[i] = v[u];
    }
  }
}

// Kernel parameters indexed with a run-time index would be copied to local
// memory: thread p copies entry p of the table (a constant index) into shared
// memory instead, for the first n entries. The caller syncs the block after.
template <typename T, int kMax>
__device__ __forceinline__ void CopyTableToShared(const T (&table)[kMax], int n, T* s_table) {
#pragma unroll
  for (int p = 0; p < kMax; ++p) {
    if (static_cast<int>(threadIdx.x) == p && p < n) s_table[p] = table[p];
  }
}

}  // namespace jax_ep
