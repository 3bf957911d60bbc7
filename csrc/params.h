// Plain parameter structs shared by the tvm-ffi entry points (csrc/api/) and the
// kernels. No CuTe, no torch, no tvm-ffi here: the API layer fills these after
// validation and passes them by const reference to run_xxx(), which launches.
//
// Conventions:
//   - every pointer field says its shape, dtype and layout in a comment;
//   - strides are in elements, int64_t (long is 32 bits on Windows);
//   - "natural log" / "log2" says which base an LSE is in;
//   - "may be null" marks optional tensors.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"

namespace flash_mla {

// ---------------------------------------------------------------------------
// Split-KV combine (csrc/portable/decode/combine): merges per-split partial outputs of the
// decode kernels into the final output. Batch i owns splits
// [split_offsets[i], split_offsets[i+1]); the kernel clamps those offsets to
// [0, num_splits_total] so a bad offsets tensor can never read out of bounds.
// ---------------------------------------------------------------------------
struct CombineParams {
  int batch;             // b
  int s_q;               // queries per batch
  int h_q;               // query heads
  int d_v;               // value head dim
  int num_splits_total;  // rows of o_accum / lse_accum
  DType out_dtype;

  const float* o_accum;          // [num_splits_total, s_q, h_q, d_v] fp32, contiguous
  const float* lse_accum;        // [num_splits_total, s_q, h_q] fp32, log2, contiguous; -inf = empty split
  const int32_t* split_offsets;  // [batch + 1] int32, non-decreasing
  const float* attn_sink;        // [h_q] fp32, natural log; may be null

  void* out;                     // [batch, s_q, h_q, d_v] out_dtype
  int64_t out_batch_stride, out_row_stride, out_head_stride;  // last dim contiguous
  float* lse;                    // [batch, s_q, h_q] fp32, natural log, contiguous; +inf = empty row

  cudaStream_t stream;
};

// ---------------------------------------------------------------------------
// Dense MHA prefill (training), forward. Sequence i of the batch covers rows
// [cu_seqlens_q[i], cu_seqlens_q[i+1]) of q/out/lse and [cu_seqlens_k[i],
// cu_seqlens_k[i+1]) of k/v. Causal is bottom-right aligned per sequence: query
// row r (0-based in its sequence of length s_q) sees keys [0, s_k - s_q + r].
// Query head h reads key/value head h / (h_q / h_k) (GQA/MQA).
// ---------------------------------------------------------------------------
struct DensePrefillFwdParams {
  int batch;             // number of sequences = cu_seqlens_q.size(0) - 1
  int total_q, total_k;  // rows of q and of k/v
  int h_q, h_k;          // h_q % h_k == 0
  int d_qk, d_v;         // (64,64), (128,128) or (192,128)
  int max_seqlen_q, max_seqlen_k;  // upper bounds used for the grid; sequences may be shorter
  bool is_causal;
  DType dtype;           // of q, k, v, out
  float softmax_scale;       // applied to q.k
  float softmax_scale_log2;  // softmax_scale * log2(e), for exp2-based softmax

  const void* q;  int64_t q_row_stride, q_head_stride;  // [total_q, h_q, d_qk], last dim contiguous
  const void* k;  int64_t k_row_stride, k_head_stride;  // [total_k, h_k, d_qk], last dim contiguous
  const void* v;  int64_t v_row_stride, v_head_stride;  // [total_k, h_k, d_v], last dim contiguous
  const int32_t* cu_seqlens_q;  // [batch + 1] int32
  const int32_t* cu_seqlens_k;  // [batch + 1] int32

  void* out;  int64_t out_row_stride, out_head_stride;  // [total_q, h_q, d_v], last dim contiguous
  float* lse;  int64_t lse_head_stride;  // element (row t, head h) at lse[h * lse_head_stride + t];
                                         // natural log; +inf for a row that sees no key

  int num_sms;
  cudaStream_t stream;
};

// ---------------------------------------------------------------------------
// Dense MHA prefill, backward. Same sequence/causal/GQA conventions as the
// forward. dK/dV are written once per element (bit-deterministic); dQ may be
// accumulated in fp32 in `workspace` (the kernel documents whether it uses
// atomics) and converted at the end.
// ---------------------------------------------------------------------------
struct DensePrefillBwdParams {
  int batch;
  int total_q, total_k;
  int h_q, h_k;
  int d_qk, d_v;
  int max_seqlen_q, max_seqlen_k;
  bool is_causal;
  DType dtype;
  float softmax_scale;
  float softmax_scale_log2;

  const void* q;     int64_t q_row_stride, q_head_stride;       // [total_q, h_q, d_qk]
  const void* k;     int64_t k_row_stride, k_head_stride;       // [total_k, h_k, d_qk]
  const void* v;     int64_t v_row_stride, v_head_stride;       // [total_k, h_k, d_v]
  const void* out;   int64_t out_row_stride, out_head_stride;   // [total_q, h_q, d_v]
  const void* dout;  int64_t dout_row_stride, dout_head_stride; // [total_q, h_q, d_v]
  const float* lse;  int64_t lse_head_stride;                   // as in the forward, natural log
  const int32_t* cu_seqlens_q;  // [batch + 1]
  const int32_t* cu_seqlens_k;  // [batch + 1]

  void* dq;  int64_t dq_row_stride, dq_head_stride;  // [total_q, h_q, d_qk]
  void* dk;  int64_t dk_row_stride, dk_head_stride;  // [total_k, h_k, d_qk]
  void* dv;  int64_t dv_row_stride, dv_head_stride;  // [total_k, h_k, d_v]

  void* workspace;           // device scratch, at least workspace_bytes (see the kernel's
  int64_t workspace_bytes;   // dense_prefill_bwd_workspace_bytes()); 256-byte aligned
  // Deterministic dQ (8-warp CTA only): per (query block, query head) counters in the
  // workspace that let key blocks add their dQ in key-block order; nullptr = off.
  int* dq_turns;

  int num_sms;
  cudaStream_t stream;
};

// Pinned sizes. These structs are built by host code and read by device code
// compiled through a different front end (MSVC lays out some classes
// differently): a static_assert seen by both the host and the device pass
// catches a layout drift at compile time. Update the number when a field is
// added, on purpose.
static_assert(sizeof(CombineParams) == 104, "CombineParams layout changed");
static_assert(sizeof(DensePrefillFwdParams) == 200, "DensePrefillFwdParams layout changed");
static_assert(sizeof(DensePrefillBwdParams) == 320, "DensePrefillBwdParams layout changed");

}  // namespace flash_mla
