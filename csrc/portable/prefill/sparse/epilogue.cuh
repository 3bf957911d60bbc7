// The per-row end of a sparse prefill work item, shared by both CTAs (kernel.cuh,
// kernel_wide.cuh): lse and max_logits of one head, and the scale its output row is
// multiplied by before the one rounding to bf16.
#pragma once

#include <cstdint>
#include <limits>

#include <cuda_runtime.h>

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

}  // namespace flash_mla::portable::sparse_prefill
