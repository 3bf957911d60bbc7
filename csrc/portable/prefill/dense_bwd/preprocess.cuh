// Backward step 1: delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in fp32, and the
// fp32 dQ accumulator of row (t, h) set to zero, for every row t < total_q (rows
// outside every sequence included: they get dq = 0).
//
// kThreadsPerRow = d_v / 8 threads share one (t, h) row: each loads 16 bytes of
// dO and of O, and the partial dot products meet through xor shuffles inside
// that group (groups are aligned lane ranges of 8 or 16 lanes).
#pragma once

#include <cstdint>

#include "../../../params.h"
#include "../../common/element.cuh"
#include "config.h"

namespace flash_mla::portable::dense_bwd {

template <typename Elem, int kDQK, int kDV>
__global__ void __launch_bounds__(kPreprocessThreads)
    dense_bwd_preprocess_kernel(const DensePrefillBwdParams p) {
  constexpr int kThreadsPerRow = kDV / 8;
  constexpr int kRowsPerBlock = kPreprocessThreads / kThreadsPerRow;
  static_assert(kDQK % (4 * kThreadsPerRow) == 0, "dq_accum row splits into float4 per thread");
  using Storage = typename Elem::Storage;

  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock +
                      threadIdx.x / kThreadsPerRow;  // = t * h_q + h
  const int sub = threadIdx.x % kThreadsPerRow;
  const int64_t num_rows = static_cast<int64_t>(p.total_q) * p.h_q;
  // No early return: every lane of a shuffle group must reach the shuffles.
  const bool active = row < num_rows;
  const int64_t t = active ? row / p.h_q : 0;
  const int h = active ? static_cast<int>(row % p.h_q) : 0;

  float dot = 0.f;
  if (active) {
    const Storage* o = static_cast<const Storage*>(p.out) + t * p.out_row_stride +
                       h * p.out_head_stride + sub * 8;
    const Storage* d_o = static_cast<const Storage*>(p.dout) + t * p.dout_row_stride +
                         h * p.dout_head_stride + sub * 8;
    const uint4 ov = *reinterpret_cast<const uint4*>(o);
    const uint4 dv = *reinterpret_cast<const uint4*>(d_o);
    const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w};
    const uint32_t dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 a = unpack_float2<Elem>(ow[i]);
      const float2 b = unpack_float2<Elem>(dw[i]);
      dot = fmaf(a.x, b.x, dot);
      dot = fmaf(a.y, b.y, dot);
    }
  }
#pragma unroll
  for (int offset = kThreadsPerRow / 2; offset > 0; offset /= 2) {
    dot += __shfl_xor_sync(0xffffffffu, dot, offset);
  }
  if (!active) return;

  float* ws = static_cast<float*>(p.workspace);
  if (sub == 0) ws[h * delta_row_stride(p.total_q) + t] = dot;

  float* dq_accum = reinterpret_cast<float*>(static_cast<char*>(p.workspace) +
                                             dq_accum_offset(p.total_q, p.h_q)) +
                    row * kDQK;
  constexpr int kFloat4PerThread = kDQK / (4 * kThreadsPerRow);
#pragma unroll
  for (int i = 0; i < kFloat4PerThread; ++i) {
    reinterpret_cast<float4*>(dq_accum)[i * kThreadsPerRow + sub] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

}  // namespace flash_mla::portable::dense_bwd
