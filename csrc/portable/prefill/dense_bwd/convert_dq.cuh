// Backward step 4: dq[t, h, :] = softmax_scale * dq_accum[t, h, :], rounded to
// nearest in the input dtype. One thread per 8 elements: two float4 loads, one
// 16-byte store.
#pragma once

#include <cstdint>

#include "../../../params.h"
#include "../../common/element.cuh"
#include "config.h"

namespace flash_mla::portable::dense_bwd {

template <typename Elem, int kDQK>
__global__ void __launch_bounds__(kConvertThreads)
    dense_bwd_convert_dq_kernel(const DensePrefillBwdParams p) {
  using Storage = typename Elem::Storage;
  constexpr int kChunksPerRow = kDQK / 8;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kConvertThreads + threadIdx.x;
  const int64_t num_chunks = static_cast<int64_t>(p.total_q) * p.h_q * kChunksPerRow;
  if (chunk >= num_chunks) return;
  const int64_t row = chunk / kChunksPerRow;  // = t * h_q + h
  const int c = static_cast<int>(chunk % kChunksPerRow);
  const int64_t t = row / p.h_q;
  const int h = static_cast<int>(row % p.h_q);

  const float* src = reinterpret_cast<const float*>(static_cast<const char*>(p.workspace) +
                                                    dq_accum_offset(p.total_q, p.h_q)) +
                     chunk * 8;
  const float4 a = reinterpret_cast<const float4*>(src)[0];
  const float4 b = reinterpret_cast<const float4*>(src)[1];
  const float s = p.softmax_scale;
  uint4 packed;
  packed.x = pack_float2<Elem>(a.x * s, a.y * s);
  packed.y = pack_float2<Elem>(a.z * s, a.w * s);
  packed.z = pack_float2<Elem>(b.x * s, b.y * s);
  packed.w = pack_float2<Elem>(b.z * s, b.w * s);
  Storage* dst = static_cast<Storage*>(p.dq) + t * p.dq_row_stride + h * p.dq_head_stride + c * 8;
  *reinterpret_cast<uint4*>(dst) = packed;
}

}  // namespace flash_mla::portable::dense_bwd
