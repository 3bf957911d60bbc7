// Launch entry of the portable sparse MLA decode (mma.sync + ldmatrix + cp.async: sm_80 ..
// sm_121) and its parameter struct. Declaration only, so the API layer includes no kernel
// code.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../../common/fast_div.h"
#include "config.h"

namespace flash_mla::portable::sparse_decode {

// One paged byte cache and the indices into it. Token id v (block * page_size + offset)
// is valid when 0 <= v < num_blocks * page_size; any other value is skipped and never
// read. Row (request i, query s) counts only positions [0, limit_i) of its index row,
// limit_i = min(max(topk_length[i], 0), topk) (topk without topk_length).
struct CachePool {
  const unsigned char* cache;  // [num_blocks, page_size, 1, bytes_per_token] bytes; a page's
  int64_t block_stride;        //   tokens back to back; block j starts at cache + j * block_stride
  int64_t num_tokens;          // num_blocks * page_size
  int page_size;
  int format;                  // KvFormat (config.h)
  int topk;                    // indices.shape[2]
  int pad_;                    // unused; keeps the 64-bit fields 8-byte aligned on every compiler
  FastDiv page_div;            // token / page_size as a multiply and a shift (make_fast_div)
  const int32_t* indices;      // [b, s_q, topk] int32, last dim contiguous
  int64_t indices_batch_stride, indices_row_stride;
  const int32_t* topk_length;  // [b] int32, contiguous; may be null
};

// flash_mla_with_kvcache with indices, on validated tensors. Request i's keys are its
// main list (positions [0, main_span_i): the main pool's counted indices, padded with
// invalid positions to a multiple of 16) followed by the extra pool's counted indices;
// the split-KV schedule (csrc/portable/decode/schedule) cuts that list, of length
// main_span_i + extra_limit_i, into pieces of 64-position blocks.
struct SparseDecodeParams {
  int batch, s_q, h_q;
  int num_head_blocks;       // ceil(h_q / block_rows(cta, h_q)) (config.h)
  int num_m_blocks;          // s_q * num_head_blocks: CTAs per schedule part
  int num_parts;             // schedule parts (metadata rows)
  int num_splits_total;      // rows of o_accum / lse_accum
  float softmax_scale_log2;  // softmax_scale * log2(e)

  const void* q;  int64_t q_batch_stride, q_row_stride, q_head_stride;  // [b, s_q, h_q, d_qk] bf16
  CachePool main;
  CachePool extra;             // extra.cache == nullptr: no extra pool
  const float* attn_sink;      // [h_q] fp32, natural log; may be null
  const int32_t* metadata;       // [num_parts, 8] int32 from the schedule
  const int32_t* split_offsets;  // [b + 1] int32 from the schedule

  void* out;  int64_t out_batch_stride, out_row_stride, out_head_stride;  // [b, s_q, h_q, 512] bf16
  float* lse;        // [b, s_q, h_q] fp32 contiguous, natural log, sink excluded; +inf = empty row
  float* o_accum;    // [num_splits_total, s_q, h_q, 512] fp32 contiguous, normalised partials
  float* lse_accum;  // [num_splits_total, s_q, h_q] fp32 contiguous, log2; -inf = empty piece

  cudaStream_t stream;
};

// The kernel takes the struct by value: its layout must be the same for the host compiler
// (MSVC or gcc) and the device pass.
static_assert(sizeof(CachePool) == 80, "CachePool layout changed");
static_assert(sizeof(SparseDecodeParams) == 312, "SparseDecodeParams layout changed");

// kDimQK 576 (V32) or 512 (the other formats); kSlabs = slabs_for(h_q) (config.h), which
// also sized num_head_blocks. Launches on params.stream and never synchronises; the caller
// reads cudaGetLastError().
template <int kDimQK, int kSlabs>
void run_sparse_decode(const SparseDecodeParams& params);

// The narrow CTA (kernel_narrow.cuh): 16 rows per CTA, num_head_blocks = ceil(h_q / 16).
template <int kDimQK>
void run_sparse_decode_narrow(const SparseDecodeParams& params);

// The 64-row CTA (kernel_64rows.cuh): 64 rows per CTA, num_head_blocks = ceil(h_q / 64); only
// where rows64::fits (config.h).
template <int kDimQK>
void run_sparse_decode_64rows(const SparseDecodeParams& params);

}  // namespace flash_mla::portable::sparse_decode
