// Element types of the reductions and casts in the intranode kernels
// (intranode.cu) and the low-latency kernels (low_latency/*.cu): the raw
// storage type and exact fp32 conversions, one struct per ElemType
// (elem_type.h). Header-only (see device_sync.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace jax_ep {

struct Bf16Elem {
  using Raw = unsigned short;
  __device__ __forceinline__ static float ToFloat(Raw r) {
    return __uint_as_float(static_cast<unsigned int>(r) << 16);
  }
  __device__ __forceinline__ static Raw FromFloat(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

struct F16Elem {
  using Raw = unsigned short;
  __device__ __forceinline__ static float ToFloat(Raw r) { return __half2float(__ushort_as_half(r)); }
  __device__ __forceinline__ static Raw FromFloat(float f) {
    return __half_as_ushort(__float2half_rn(f));
  }
};

struct F32Elem {
  using Raw = unsigned int;
  __device__ __forceinline__ static float ToFloat(Raw r) { return __uint_as_float(r); }
  __device__ __forceinline__ static Raw FromFloat(float f) { return __float_as_uint(f); }
};

// float8_e4m3fn: exact widening; narrowing rounds to nearest even and, like
// ml_dtypes / numpy, turns out-of-range values into NaN (no saturation).
struct F8E4M3Elem {
  using Raw = unsigned char;
  __device__ __forceinline__ static float ToFloat(Raw r) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(r, __NV_E4M3)));
  }
  __device__ __forceinline__ static Raw FromFloat(float f) {
    return __nv_cvt_float_to_fp8(f, __NV_NOSAT, __NV_E4M3);
  }
};

}  // namespace jax_ep
