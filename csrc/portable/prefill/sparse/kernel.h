// Launch entry of the portable sparse MLA prefill (mma.sync + ldmatrix + cp.async: sm_80 ..
// sm_121) and its parameter struct. Declaration only, so the API layer includes no kernel
// code.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "config.h"

namespace flash_mla::portable::sparse_prefill {

// flash_mla_sparse_fwd on validated tensors. Query i attends to the kv rows
// indices[i][0, limit_i), limit_i = min(topk_length[i], topk) (topk without topk_length);
// an index < 0 or >= s_kv is skipped and never read. A query with no valid index gets
// out 0, max_logits -inf, lse +inf.
struct SparsePrefillParams {
  int s_q, h_q, s_kv, topk;
  int num_head_blocks;       // ceil(h_q / rows of the CTA): 32 (kernel.cuh) or 64 (wide)
  int num_ctas;              // grid size; CTA x serves work items x, x + num_ctas, ...
  float softmax_scale;       // applied to q.k (max_logits are in these units)
  float softmax_scale_log2;  // softmax_scale * log2(e)

  const void* q;  int64_t q_row_stride, q_head_stride;  // [s_q, h_q, d_qk] bf16, last dim contiguous
  const void* kv; int64_t kv_row_stride;                // [s_kv, (1,) d_qk] bf16, last dim contiguous
  const int32_t* indices; int64_t indices_row_stride;  // [s_q, (1,) topk] int32, last dim contiguous
  const int32_t* topk_length;  // [s_q] int32, contiguous; may be null
  const float* attn_sink;      // [h_q] fp32, contiguous, natural log; may be null

  void* out; int64_t out_row_stride, out_head_stride;  // [s_q, h_q, 512] bf16, last dim contiguous
  float* max_logits;  // [s_q, h_q] fp32 contiguous, natural units; -inf = empty row
  float* lse;         // [s_q, h_q] fp32 contiguous, natural log, sink excluded; +inf = empty row

  cudaStream_t stream;
};

// The kernel takes the struct by value: its layout must be the same for the host compiler
// (MSVC or gcc) and the device pass.
static_assert(sizeof(SparsePrefillParams) == 152, "SparsePrefillParams layout changed");

// kDimQK: one of config.h's kHeadDimsQK. Launches on params.stream and never synchronises;
// the caller reads cudaGetLastError().
template <int kDimQK>
void run_sparse_prefill(const SparsePrefillParams& params);

// The wide CTA (kernel_wide.cuh), params.num_head_blocks counted in 64-head blocks; only on a
// device whose blocks may opt in to wide::Layout<kDimQK>::kSmemBytes.
template <int kDimQK>
void run_sparse_prefill_wide(const SparsePrefillParams& params);

}  // namespace flash_mla::portable::sparse_prefill
