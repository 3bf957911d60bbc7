// Byte formats of the sparse decode's paged caches as compile-time policies. A policy says
// how many bytes a token has, whether its bytes sit in one run (token-contiguous) or split
// across the page (V4), the cp.async granularity its rows allow, and how one group of 8
// dims dequantises from the token's raw bytes (staged in shared memory, laid out as
// raw_row() below) to bf16. A new format is one more policy here, its row in config.h's
// format_info() and its case in kernel.cuh's format switch.
//
// kDataBytes: the bytes of a token's one contiguous run (all of them for token-contiguous
// formats); kScaleBytes: its separate scale row (page-structured formats only).
// Raw row in shared memory (what the kernel's cp.async ring holds per token):
//   token-contiguous formats: the token's bytes_per_token bytes as stored;
//   V4: the token's 576 data bytes, then its 8 scale bytes (from the page's scale area).
// Values: e4m3 and ue8m0 / e4m3 / fp32 scales are widened to fp32, multiplied and rounded
// to bf16 once (with power-of-two scales, as the writers use, the product is exact).
// A NaN code or NaN scale gives NaN (never a plausible value).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "../../common/element.cuh"
#include "config.h"

namespace flash_mla::portable::sparse_decode::formats {

// ue8m0 byte e -> 2^(e - 127); 0 is 2^-127 (a subnormal float), 255 is NaN.
__device__ __forceinline__ float ue8m0_to_float(uint32_t e) {
  if (e == 255u) return __int_as_float(0x7fc00000);
  if (e == 0u) return __int_as_float(0x00400000);
  return __int_as_float(static_cast<int>(e << 23));
}

// One e4m3 byte -> fp32 (exact; through fp16, which holds every e4m3 value).
__device__ __forceinline__ float e4m3_to_float(uint32_t byte) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(byte), __NV_E4M3);
  return __half2float(__half(h));
}

// 8 e4m3 bytes (lo: bytes 0..3, hi: 4..7) times `scale` -> 8 bf16 packed in 4 words.
__device__ __forceinline__ uint4 e4m3x8_scaled(uint2 codes, float scale) {
  uint32_t out[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const uint32_t word = w < 2 ? codes.x : codes.y;
    const __nv_fp8x2_storage_t pair =
        static_cast<__nv_fp8x2_storage_t>((word >> (16 * (w & 1))) & 0xffffu);
    const __half2_raw h2 = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
    const float2 f = __half22float2(__half2(h2));
    out[w] = pack_float2<BF16>(f.x * scale, f.y * scale);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// 8 e2m1 nibbles (element 2i in the low nibble of byte i) times `scale` -> 8 bf16, by bit
// placement instead of a conversion per value. An e2m1 code s|e1 e0|m put at bf16 bit 15
// (sign) and bits 8..6 (e1 e0 m: the low two exponent bits and the top mantissa bit) is a
// bf16 equal to 2^-126 times the code's value, for e = 0 (a bf16 subnormal: m x 2^-127,
// value m x 0.5) as for e >= 1 (2^(e-127) (1 + m/2), value 2^(e-1) (1 + m/2)). Two packed
// bf16 products then finish it: x 2^126 (a power of two: exact) and x the scale (an e4m3
// value, so the product has at most 2 + 4 significant bits: exact in bf16's 8), so the result
// is the fp32 product rounded once, as the other formats'. A NaN scale gives NaN.
__device__ __forceinline__ uint4 e2m1x8_scaled(uint32_t codes, __nv_bfloat16 scale) {
  const uint32_t even = codes & 0x0F0F0F0Fu;         // elements 0, 2, 4, 6: byte j = element 2j
  const uint32_t odd = (codes >> 4) & 0x0F0F0F0Fu;   // elements 1, 3, 5, 7
  const __nv_bfloat162 unbias = __floats2bfloat162_rn(0x1p126f, 0x1p126f);
  const __nv_bfloat162 scale2 = __halves2bfloat162(scale, scale);
  uint32_t out[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    // Byte 0: element 2w, byte 2: element 2w + 1 (bytes 1 and 3 are copies, masked off).
    const uint32_t pair = __byte_perm(even, odd, (w | (w << 4) | ((4 + w) << 8) | ((4 + w) << 12)));
    const uint32_t bits = ((pair << 6) & 0x01C001C0u) | ((pair << 12) & 0x80008000u);
    __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(&bits);
    v = __hmul2(__hmul2(v, unbias), scale2);
    out[w] = *reinterpret_cast<const uint32_t*>(&v);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// What every token-contiguous format shares: its bytes are one run per token.
template <int kId_, int kDimQK_, int kBytesPerToken_>
struct TokenContiguous {
  static constexpr int kId = kId_;
  static constexpr int kDimQK = kDimQK_;
  static constexpr int kBytesPerToken = kBytesPerToken_;
  static constexpr bool kPageStructured = false;
  static constexpr int kDataBytes = kBytesPerToken_;  // one run per token, no scale row
  static constexpr int kScaleBytes = 0;
};

// Dims [dim0, dim0 + 8) of V3.2's quantised part: e4m3 codes at byte dim, an fp32 scale per
// 128 dims at bytes [512, 528).
__device__ __forceinline__ uint4 v32_latent8(const unsigned char* raw, int dim0) {
  const float scale = *reinterpret_cast<const float*>(raw + 512 + 4 * (dim0 / 128));
  return e4m3x8_scaled(*reinterpret_cast<const uint2*>(raw + dim0), scale);
}

// V3.2: [512 e4m3 | 4 fp32 scales, one per 128 dims | 64 bf16 RoPE dims 512..575].
struct V32 : TokenContiguous<0, 576, 656> {
  __device__ static uint4 dequant8(const unsigned char* raw, int dim0) {
    if (dim0 >= 512) return *reinterpret_cast<const uint4*>(raw + 528 + 2 * (dim0 - 512));
    return v32_latent8(raw, dim0);
  }
};

// V3.2 without RoPE: the first 528 bytes of V3.2; d_qk 512, every dim quantised.
struct V32NoRope : TokenContiguous<1, 512, 528> {
  __device__ static uint4 dequant8(const unsigned char* raw, int dim0) {
    return v32_latent8(raw, dim0);
  }
};

// V4 (MODEL1): per page, page_size rows of [448 e4m3 | 64 bf16 RoPE] (576 B), then
// page_size rows of 8 B (7 ue8m0 scales, one per 64 dims, + 1 pad byte). Raw row in
// shared memory: [576 data | 8 scale bytes].
struct V4 {
  static constexpr int kId = 2;
  static constexpr int kDimQK = 512;
  static constexpr int kBytesPerToken = 584;
  static constexpr bool kPageStructured = true;
  static constexpr int kDataBytes = 576;
  static constexpr int kScaleBytes = 8;
  __device__ static uint4 dequant8(const unsigned char* raw, int dim0) {
    if (dim0 >= 448) return *reinterpret_cast<const uint4*>(raw + 448 + 2 * (dim0 - 448));
    const float scale = ue8m0_to_float(raw[kDataBytes + dim0 / 64]);
    return e4m3x8_scaled(*reinterpret_cast<const uint2*>(raw + dim0), scale);
  }
};

// V4.1: [512 e4m3 (RoPE dims quantised too) | 16 ue8m0 scales, one per 32 dims].
struct V41 : TokenContiguous<3, 512, 528> {
  __device__ static uint4 dequant8(const unsigned char* raw, int dim0) {
    const float scale = ue8m0_to_float(raw[512 + dim0 / 32]);
    return e4m3x8_scaled(*reinterpret_cast<const uint2*>(raw + dim0), scale);
  }
};

// V4.1 FP4: [256 B of e2m1, element i in byte i / 2, even element in the low nibble |
// 32 e4m3 scales, one per 16 dims].
struct V41Fp4 : TokenContiguous<4, 512, 288> {
  __device__ static uint4 dequant8(const unsigned char* raw, int dim0) {
    // The e4m3 scale is exact in bf16 (4 significant bits, exponents 2^-9 .. 2^8).
    const __nv_bfloat16 scale = __float2bfloat16_rn(e4m3_to_float(raw[256 + dim0 / 16]));
    return e2m1x8_scaled(*reinterpret_cast<const uint32_t*>(raw + dim0 / 2), scale);
  }
};

// The policies agree with the table the host reads.
template <typename F>
constexpr bool matches_table() {
  return format_info(F::kId).bytes_per_token == F::kBytesPerToken &&
         format_info(F::kId).d_qk == F::kDimQK &&
         (format_info(F::kId).copy_bytes == 8) == F::kPageStructured;
}
static_assert(matches_table<V32>() && matches_table<V32NoRope>() && matches_table<V4>() &&
                  matches_table<V41>() && matches_table<V41Fp4>(),
              "formats.cuh and config.h's format_info agree");

}  // namespace flash_mla::portable::sparse_decode::formats
