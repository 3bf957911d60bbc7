// Element-type tags for the portable kernels and the conversions they need.
// A tag (not cuda_bf16's types directly) keeps templates cheap to instantiate and
// lets one switch pick the mma instruction and the rounding of P and of the output.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../../params.h"

namespace flash_mla::portable {

struct BF16 {
  using Storage = __nv_bfloat16;
  static constexpr DType kDType = DType::kBF16;
};
struct FP16 {
  using Storage = __half;
  static constexpr DType kDType = DType::kFP16;
};

// Two fp32 values rounded to nearest (even) and packed low = lo, high = hi, the
// 16-bit pair order that mma fragments and little-endian memory use.
template <typename Elem>
__device__ __forceinline__ uint32_t pack_float2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack_float2<BF16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack_float2<FP16>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Inverse of pack_float2 (exact).
template <typename Elem>
__device__ __forceinline__ float2 unpack_float2(uint32_t packed);

template <>
__device__ __forceinline__ float2 unpack_float2<BF16>(uint32_t packed) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&packed));
}

template <>
__device__ __forceinline__ float2 unpack_float2<FP16>(uint32_t packed) {
  return __half22float2(*reinterpret_cast<__half2*>(&packed));
}

}  // namespace flash_mla::portable
