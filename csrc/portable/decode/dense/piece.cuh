// What every dense-decode CTA shape (kernel.cuh, kernel_wide.cuh, kernel_64rows.cuh) shares
// outside its tile loop: where its block of rows and its part of the schedule are (Work),
// which keys of one request it reads (Piece), and where a row's results go (lse, out, or
// the fp32 split partial). One copy, so the shapes cannot disagree on the split-KV protocol
// (docs/dense_decode.md, "Split-KV and combine protocol").
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../../../params.h"
#include "../../common/cp_async.cuh"
#include "../../common/element.cuh"
#include "../../common/swizzle.cuh"
#include "../schedule/config.h"
#include "config.h"

namespace flash_mla::portable::dense_decode {

// The CTA's (row block, kv head, part) from blockIdx.x, its part's schedule entry and its
// rows: row r of the block is row m0 + r of the kv head's rows (query (m0 + r) / group,
// head kv_head * group + (m0 + r) % group); rows past valid_rows are padding.
struct Work {
  int kv_head;
  int begin_req, begin_block, end_req, end_block, first_split;
  int last_req;  // end_req clamped to the batch
  int group, m0, valid_rows;
};

// False for an empty part (no request): the CTA has nothing to do.
template <int kBlockM>
__device__ __forceinline__ bool work_of(const DenseDecodeParams& params, Work& w) {
  namespace sched = ::flash_mla::portable::decode_schedule;
  const int m_block = static_cast<int>(blockIdx.x % params.num_m_blocks);
  const int rest = static_cast<int>(blockIdx.x / params.num_m_blocks);
  w.kv_head = rest % params.h_k;
  const int part = rest / params.h_k;
  const int32_t* meta = params.metadata + static_cast<int64_t>(part) * sched::kMetaInts;
  w.begin_req = meta[sched::kBeginReq];
  w.begin_block = meta[sched::kBeginBlock];
  w.end_req = meta[sched::kEndReq];
  w.end_block = meta[sched::kEndBlock];
  w.first_split = meta[sched::kFirstSplit];
  if (w.begin_req < 0 || w.begin_req >= params.batch) return false;
  w.last_req = min(w.end_req, params.batch - 1);
  w.group = params.h_q / params.h_k;
  w.m0 = m_block * kBlockM;
  w.valid_rows = min(kBlockM, params.s_q * w.group - w.m0);
  return true;
}

// The keys of request `req` that the CTA reads: [tok_begin, tok_end), in num_tiles tiles of
// kBlockN; tok_end_piece is the piece's end before the causal cut. direct: the request has
// one split, so the CTA writes out and lse itself; else it writes split `split`.
struct Piece {
  int s_k;
  bool direct;
  int split;
  int tok_begin, tok_end, tok_end_piece, num_tiles;
};

// False where the CTA has no piece of `req` (the schedule gave none, or a stale schedule
// names a split past the buffers). A piece the schedule counted but the current lengths
// left empty still runs with no tiles and writes its (empty) result, so the combine never
// reads an unwritten split.
template <bool kIsCausal, int kBlockN>
__device__ __forceinline__ bool piece_of(const DenseDecodeParams& params, const Work& w,
                                         int req, Piece& piece) {
  const int s_k = max(params.seqlens[req], 0);
  const int n_blocks = static_cast<int>((static_cast<int64_t>(s_k) + kPageSize - 1) / kPageSize);
  const int lo = req == w.begin_req ? w.begin_block : 0;
  const int hi = min(req == w.end_req ? w.end_block : n_blocks, n_blocks);
  const int sched_hi = req == w.end_req ? w.end_block : n_blocks;
  if (lo >= sched_hi) return false;
  const int total_splits = params.num_splits_total;
  const int off_begin = min(max(params.split_offsets[req], 0), total_splits);
  const int off_end = min(max(params.split_offsets[req + 1], off_begin), total_splits);
  piece.direct = off_end - off_begin == 1;
  piece.split = req == w.begin_req ? w.first_split : off_begin;
  if (!piece.direct && (piece.split < 0 || piece.split >= total_splits)) return false;

  piece.s_k = s_k;
  piece.tok_begin = lo * kPageSize;
  int tok_end = static_cast<int>(min(static_cast<int64_t>(max(hi, lo)) * kPageSize,
                                     static_cast<int64_t>(s_k)));
  piece.tok_end_piece = tok_end;
  if (kIsCausal) {
    // No row of this block sees keys at or past s_k - s_q + (its last query) + 1.
    const int last_query = (w.m0 + w.valid_rows - 1) / w.group;
    tok_end = min(tok_end, s_k - params.s_q + last_query + 1);
  }
  piece.tok_end = tok_end;
  piece.num_tiles =
      tok_end > piece.tok_begin ? (tok_end - piece.tok_begin + kBlockN - 1) / kBlockN : 0;
  return true;
}

// cp.async of the block's Q rows of request `req` into `dst` (swizzled rows of 576, rows
// past valid_rows zero-filled without a read), kUnroll chunks per loop step. q_base is
// params.q, computed once per CTA by the caller.
template <typename Storage, int kBlockM, int kThreads, int kUnroll>
__device__ __forceinline__ void copy_q_block(uint32_t dst, const Storage* q_base,
                                             const DenseDecodeParams& params, const Work& w,
                                             int req, int tid) {
  constexpr int kChunksPerRow = kHeadDimQK / 8;
  static_assert(kBlockM * kChunksPerRow % kThreads == 0, "whole Q chunks per thread");
  const Storage* q_req = q_base + static_cast<int64_t>(req) * params.q_batch_stride;
#pragma unroll(kUnroll)
  for (int j = 0; j < kBlockM * kChunksPerRow / kThreads; ++j) {
    const int idx = tid + j * kThreads;
    const int row = idx / kChunksPerRow;
    const int col = (idx % kChunksPerRow) * 8;
    const bool valid = row < w.valid_rows;
    const Storage* src = q_base;
    if (valid) {
      const int r = w.m0 + row;
      const int head = w.kv_head * w.group + r % w.group;
      src = q_req + static_cast<int64_t>(r / w.group) * params.q_row_stride +
            static_cast<int64_t>(head) * params.q_head_stride + col;
    }
    cp_async_16_zfill(dst + swizzled_offset<kHeadDimQK>(row, col), src, valid);
  }
}

// Keys [0, bound) that query `query` sees in a piece ending at tok_end (causal: also
// keys <= s_k - s_q + query, bottom-right aligned).
template <bool kIsCausal>
__device__ __forceinline__ int visible_bound(int tok_end, int s_k, int s_q, int query) {
  return kIsCausal ? min(tok_end, s_k - s_q + query + 1) : tok_end;
}

// Where row `row` of the block belongs: query (m0 + row) / group, head kv_head * group +
// (m0 + row) % group.
struct RowPos {
  int query, head;
};
__device__ __forceinline__ RowPos row_pos(const Work& w, int row) {
  const int rr = w.m0 + row;
  return RowPos{rr / w.group, w.kv_head * w.group + rr % w.group};
}

// A row's lse from its running max (in score units), its sum and the log2 scale: natural
// log to lse (direct), log2 to the split's lse_accum; a row that saw no key gives +inf
// (direct) or -inf (partial).
__device__ __forceinline__ void store_lse(const DenseDecodeParams& params, int req,
                                          const Piece& piece, RowPos pos, float row_max,
                                          float sum, float scale_log2) {
  const int64_t hs = static_cast<int64_t>(pos.head) * params.s_q + pos.query;
  const float lse2 = row_max * scale_log2 + __log2f(sum);
  if (piece.direct) {
    params.lse[static_cast<int64_t>(req) * params.h_q * params.s_q + hs] =
        sum > 0.f ? lse2 * 0.69314718055994530942f : __int_as_float(0x7f800000);
  } else {
    params.lse_accum[static_cast<int64_t>(piece.split) * params.h_q * params.s_q + hs] =
        sum > 0.f ? lse2 : __int_as_float(0xff800000);
  }
}

// Column `col` of a row's output (direct pieces), in q's storage type.
template <typename Storage>
__device__ __forceinline__ Storage* out_row(const DenseDecodeParams& params, int req,
                                            RowPos pos, int col) {
  return static_cast<Storage*>(params.out) + static_cast<int64_t>(req) * params.out_batch_stride +
         static_cast<int64_t>(pos.query) * params.out_row_stride +
         static_cast<int64_t>(pos.head) * params.out_head_stride + col;
}

// Column `col` of a row's fp32 split partial (o_accum [split, h_q, s_q, 512]).
__device__ __forceinline__ float* partial_row(const DenseDecodeParams& params,
                                              const Piece& piece, RowPos pos, int col) {
  return params.o_accum +
         ((static_cast<int64_t>(piece.split) * params.h_q + pos.head) * params.s_q + pos.query) *
             kHeadDimV +
         col;
}

// One row of a warp's output columns, from its accumulator fragments o[n][2 r], o[n][2 r + 1]
// (n-tile n at column col + 8 n, col including this lane's pair) scaled by inv: rounded
// into out for a direct piece, or as the fp32 split partial.
template <typename Elem, int kNTiles>
__device__ __forceinline__ void store_row(const DenseDecodeParams& params, int req,
                                          const Piece& piece, RowPos pos, int col,
                                          const float (&o)[kNTiles][4], int r, float inv) {
  if (piece.direct) {
    typename Elem::Storage* dst = out_row<typename Elem::Storage>(params, req, pos, col);
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
      *reinterpret_cast<uint32_t*>(dst + n * 8) =
          pack_float2<Elem>(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    }
  } else {
    float* dst = partial_row(params, piece, pos, col);
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
      *reinterpret_cast<float2*>(dst + n * 8) =
          make_float2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    }
  }
}

}  // namespace flash_mla::portable::dense_decode
