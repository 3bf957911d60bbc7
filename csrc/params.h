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
  // Dense decode writes a batch that has exactly one split itself (no partial): true
  // makes the combine leave such a batch's out/lse untouched. False for the combine op.
  bool skip_single_split;

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

// ---------------------------------------------------------------------------
// Dense MLA decode (csrc/portable/decode/dense, schedule in csrc/portable/decode/schedule;
// docs/dense_decode.md). A CTA serves one row block (32 of the s_q * (h_q / h_k) rows of
// one kv head) of one schedule part; a part is a run of 64-token KV blocks that may span
// requests. Token t of request i is k_cache[block_table[i][t / 64]][t % 64]; only
// t < cache_seqlens[i] is read. Causal: query s sees keys [0, s_k - s_q + s].
// ---------------------------------------------------------------------------
struct DenseDecodeScheduleParams {
  int batch;              // b
  int num_parts;          // rows of metadata
  bool batch_invariant;   // pieces depend only on each request's own length
  const int32_t* seqlens; // [b] int32 (cache_seqlens)
  int32_t* metadata;      // [num_parts, 8] int32: begin_req, begin_block, end_req, end_block
                          // (exclusive), first_split, 3 unused; begin_req == b: empty part
  int32_t* split_offsets; // [b + 1] int32: request i owns splits [off[i], off[i + 1])
  cudaStream_t stream;
};

struct DenseDecodeParams {
  int batch, s_q, h_q, h_k;  // h_q % h_k == 0
  int num_m_blocks;          // row blocks per kv head: ceil(s_q * h_q / h_k / block rows)
  int num_parts;             // schedule parts (metadata rows)
  int num_splits_total;      // rows of o_accum / lse_accum
  int num_cache_blocks;      // k_cache.shape[0]; a page id outside [0, this) is never read
  int max_blocks_per_seq;    // block_table.shape[1]
  bool is_causal;
  DType dtype;               // of q, k_cache, out
  float softmax_scale_log2;  // softmax_scale * log2(e)

  const void* q;        int64_t q_batch_stride, q_row_stride, q_head_stride;  // [b, s_q, h_q, 576]
  const void* k_cache;  int64_t k_block_stride, k_token_stride, k_head_stride;
                        // [num_cache_blocks, 64, h_k, 576], last dim contiguous; V = dims [0, 512)
  const int32_t* block_table;  int64_t block_table_stride;  // [b, max_blocks_per_seq] int32
  const int32_t* seqlens;        // [b] int32 (cache_seqlens)
  const int32_t* metadata;       // [num_parts, 8] int32 from the schedule
  const int32_t* split_offsets;  // [b + 1] int32 from the schedule

  void* out;  int64_t out_batch_stride, out_row_stride, out_head_stride;  // [b, s_q, h_q, 512]
  float* lse;        // [b, h_q, s_q] fp32 contiguous, natural log; +inf = row saw no key
  float* o_accum;    // [num_splits_total, h_q, s_q, 512] fp32 contiguous, normalised partials
  float* lse_accum;  // [num_splits_total, h_q, s_q] fp32 contiguous, log2; -inf = empty piece

  cudaStream_t stream;
};

// Pinned sizes. These structs are built by host code and read by device code
// compiled through a different front end (MSVC lays out some classes
// differently): a static_assert seen by both the host and the device pass
// catches a layout drift at compile time. Update the number when a field is
// added, on purpose.
static_assert(sizeof(CombineParams) == 112, "CombineParams layout changed");
static_assert(sizeof(DensePrefillFwdParams) == 200, "DensePrefillFwdParams layout changed");
static_assert(sizeof(DensePrefillBwdParams) == 320, "DensePrefillBwdParams layout changed");
static_assert(sizeof(DenseDecodeScheduleParams) == 48, "DenseDecodeScheduleParams layout changed");
static_assert(sizeof(DenseDecodeParams) == 216, "DenseDecodeParams layout changed");

}  // namespace flash_mla
