// The end of a sparse prefill work item, shared by both CTAs (kernel.cuh, kernel_wide.cuh):
// lse and max_logits of each head and the scale of its output row (finish_row), then the
// scaled, rounded output rows (store_out_rows).
#pragma once

#include <cstdint>
#include <limits>

#include <cuda_runtime.h>

#include "../../common/element.cuh"
#include "kernel.h"

namespace flash_mla::portable::sparse_prefill {

// Head `head` of query `query`, whose running max is row_max (raw score units) and whose
// row sum (of 2^(s c - m c)) is sum: writes lse = (m c + log2 sum) ln 2 and max_logits =
// m x softmax_scale, and returns 1 / sum, times 1 / (1 + exp(sink - lse)) with a sink
// (sink +inf gives 0, -inf gives 1). A row that saw no valid key (sum 0) gets lse +inf,
// max_logits -inf and scale 0.
__device__ __forceinline__ float finish_row(const SparsePrefillParams& params, int query, int head,
                                            float row_max, float sum) {
  const int64_t at = static_cast<int64_t>(query) * params.h_q + head;
  if (!(sum > 0.f)) {
    params.lse[at] = std::numeric_limits<float>::infinity();
    params.max_logits[at] = -std::numeric_limits<float>::infinity();
    return 0.f;
  }
  const float lse = (row_max * params.softmax_scale_log2 + __log2f(sum)) * 0.69314718055994530942f;
  params.lse[at] = lse;
  params.max_logits[at] = row_max * params.softmax_scale;
  float out_scale = 1.f / sum;
  if (params.attn_sink != nullptr) out_scale *= 1.f / (1.f + expf(params.attn_sink[head] - lse));
  return out_scale;
}

// Writes this lane's rows of a CTA's O accumulators (kS m16 slabs x kN n-tiles, columns
// [col0, col0 + 8 kN) of every row) to out: row 16 s + g + 8 r of the block is head
// head0 + row, scaled by out_scale_smem[row] and rounded to bf16 once; rows at or past
// valid_rows are not written (g = lane / 4, t = lane % 4).
template <int kS, int kN>
__device__ __forceinline__ void store_out_rows(const SparsePrefillParams& params,
                                               const float (&o_acc)[kS][kN][4], int query,
                                               int head0, int valid_rows,
                                               const float* out_scale_smem, int col0, int lane) {
  using Storage = BF16::Storage;
  const int g = lane / 4;
  const int t = lane % 4;
#pragma unroll
  for (int s = 0; s < kS; ++s) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 16 * s + g + 8 * r;
      if (row >= valid_rows) continue;
      const float scale = out_scale_smem[row];
      Storage* dst = static_cast<Storage*>(params.out) +
                     static_cast<int64_t>(query) * params.out_row_stride +
                     static_cast<int64_t>(head0 + row) * params.out_head_stride + col0 + 2 * t;
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        *reinterpret_cast<uint32_t*>(dst + n * 8) =
            pack_float2<BF16>(o_acc[s][n][2 * r] * scale, o_acc[s][n][2 * r + 1] * scale);
      }
    }
  }
}

}  // namespace flash_mla::portable::sparse_prefill
