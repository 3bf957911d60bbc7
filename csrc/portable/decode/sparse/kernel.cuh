// Portable sparse MLA decode over paged byte caches: mma.sync m16n8k16 + ldmatrix +
// cp.async only, so the same source runs on sm_80 .. sm_90 and sm_120/121. Design and
// arithmetic: docs/sparse_decode.md; byte formats: formats.cuh.
//
// Work split. blockIdx.x = part * num_m_blocks + m_block, m_block = query * num_head_blocks
// + hb: the CTA's rows are the heads [R hb, R hb + R) of query `query`, R = 16 kSlabs
// (heads past h_q are zero rows, never written); for every piece of its schedule part (a run of
// 64-position blocks of one request's key list) it attends to the tokens the list names.
// Request i's key list: the main pool's counted positions [0, main_limit_i), padded with
// invalid positions to main_span_i (a multiple of 16, so no tile mixes pools), then the
// extra pool's counted positions. The per-tile math is mla_row_block.cuh's (warp w: S over
// dims [w d/4, (w+1) d/4), warp 0: online softmax in base 2, warp w: output columns
// [128w, 128w + 128)).
//
// Global memory. Per tile, thread t serves token t / 8 (eight threads a token): it reads
// that index position from the index ring (copied there four tiles ahead); a value outside
// [0, num_tokens) or a position past the pool's limit is invalid. It copies chunks t % 8,
// t % 8 + 8, ... of the token;
// an invalid token's raw row is zero-filled by cp.async without a read (it dequantises to
// zeros) and its scores are set to -inf from the tile's valid flags (the token's first
// thread writes its flag when it issues the tile). A token is copied in 16-byte chunks, or
// 8-byte ones for V4, whose page rows are only 8-byte aligned (the API checks the
// alignment of cache base and block stride).
// A piece of a request with one split writes out (bf16, rounded to nearest, with the sink
// factor) and lse (natural log) directly; otherwise it writes its normalised fp32 partial
// to o_accum[split] and its log2 lse to lse_accum[split] (the combine merges them and
// applies the sink). No atomics, fixed reduction order: bit-identical reruns.
//
// Shared memory (config.h, Layout<d, slabs>; 16-bit rows XOR-swizzled in 16-byte chunks):
//   Q block [16 slabs][d] | dequantised tile [16][d] bf16 | raw ring, tile i in stage i % 3:
//   [16][raw row] bytes | S partials of warps 1..3 | P [32][16] bf16 | per-row rescale |
//   per-row output scale (epilogue) | warp 0's softmax state | valid flags [3][16] | the
//   current piece's record (Piece) | index ring [3][16] int32 (tile i's values in i % 3).
//
// Barrier / cp.async protocol per piece (T tiles):
//   __syncthreads (the previous piece's readers are done); thread 0 stores the Piece record,
//   warp 0 resets the softmax state; cp.async Q, raw tile 0 (its index values read from
//   global memory) and the index values of tiles 2 and 3 -> commit; raw tile 1 -> commit.
//   iteration i: wait_group 1 (raw tile i landed, this thread's part); B1 __syncthreads
//     (raw tile i, its flags, the Piece record and the index values of tile i+2 visible;
//     every warp finished iteration i-1, so the dequantised tile, raw stage (i+2) % 3 and
//     its flags, index stage (i+4) % 3, the S partials, P and the rescale factors are
//     free); issue raw tile i+2 (index values from the ring) and the index values of tile
//     i+4 -> commit (an empty group past the end keeps the count); warp w dequantises dims [w d/4, (w+1) d/4) of raw tile i into the bf16
//     tile, the dims its S partial reads; __syncwarp; S partial sums; warps 1..3 store
//     theirs; B2 __syncthreads (also: the whole bf16 tile is written); warp 0: add the
//     partials, mask, softmax step; B3 __syncthreads; every warp: rescale O (skipped by a
//     warp whose factors are all 1), O += P V.
//   epilogue: wait_group 0; __syncthreads (the Piece record and the last softmax state
//     visible); warp 0 writes lse (or lse_accum) and publishes each row's output scale;
//     __syncthreads; every warp writes its columns.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../../common/cp_async.cuh"
#include "../../common/element.cuh"
#include "../../common/math.cuh"
#include "../../common/mla_row_block.cuh"
#include "../../common/smem_opt_in.cuh"
#include "../../common/swizzle.cuh"
#include "../../common/tile_copy.cuh"
#include "../schedule/config.h"
#include "config.h"
#include "formats.cuh"
#include "kernel.h"

namespace flash_mla::portable::sparse_decode {

namespace rb = ::flash_mla::portable::mla_row_block;
namespace sched = ::flash_mla::portable::decode_schedule;

static_assert(rb::kThreads == kThreads && rb::kBlockM == kBlockM && rb::kBlockN == kBlockN &&
                  rb::kHeadDimV == kHeadDimV,
              "the row-block steps and this kernel must agree on the tile");

// Counted positions of request `req` in a pool: min(max(topk_length[req], 0), topk).
__device__ __forceinline__ int pool_limit(const CachePool& pool, int req) {
  int limit = pool.topk;
  if (pool.topk_length != nullptr) limit = min(max(pool.topk_length[req], 0), limit);
  return limit;
}

// Byte offsets (from pool.cache) of token `token` (valid) of a pool: its data and, for a
// page-structured format, its scale row.
template <typename F>
__device__ __forceinline__ void token_offsets(const CachePool& pool, int token, int64_t& data,
                                              int64_t& scales) {
  const int block = fast_div(pool.page_div, token);  // token in [0, 2^31) (checked)
  const int offset = token - block * pool.page_size;
  const int64_t base = static_cast<int64_t>(block) * pool.block_stride;
  if constexpr (F::kPageStructured) {
    data = base + static_cast<int64_t>(offset) * F::kDataBytes;
    scales = base + static_cast<int64_t>(pool.page_size) * F::kDataBytes +
             static_cast<int64_t>(offset) * F::kScaleBytes;
  } else {
    data = base + static_cast<int64_t>(offset) * F::kBytesPerToken;
    scales = 0;
  }
}

// Threads per token in the gather: thread t copies chunks t % 8, t % 8 + 8, ... of token
// t / 8 of the tile, so each thread computes one token's offsets and needs no shuffle.
constexpr int kThreadsPerToken = kThreads / kBlockN;  // 8

// cp.async of this thread's part of one raw tile: chunks `sub`, `sub` + kTpt, ... of the
// token in raw row `row`, whose byte offsets are data / scales (-1: invalid; zero-filled
// without a read). kRawRowBytes: the stride of raw rows in shared memory; kTpt: threads per
// token (8 here, 4 in the 64-row CTA).
template <typename F, int kRawRowBytes, int kTpt = kThreadsPerToken>
__device__ __forceinline__ void issue_raw_tile(const CachePool& pool, uint32_t raw_stage,
                                               int64_t data, int64_t scales, int row, int sub) {
  constexpr int kChunkBytes = F::kPageStructured ? 8 : 16;
  // V4: 72 data chunks + 1 scale chunk per token; the others: whole 16-byte chunks.
  constexpr int kDataChunks = F::kDataBytes / kChunkBytes;
  constexpr int kChunksPerToken = kDataChunks + (F::kPageStructured ? 1 : 0);
  constexpr int kIters = (kChunksPerToken + kTpt - 1) / kTpt;
  static_assert(F::kDataBytes % kChunkBytes == 0 && F::kScaleBytes <= kChunkBytes,
                "whole chunks per token");
  const bool valid = data >= 0;
  // This thread's first chunk; chunk sub + j kTpt is j kTpt kChunkBytes bytes further (an
  // immediate). An invalid token copies nothing (src-size 0: the address is never read, so
  // it may lie past an empty cache) from the same offsets of the cache's base.
  const unsigned char* first = pool.cache + (valid ? data : 0) + sub * kChunkBytes;
  const uint32_t dst_row = raw_stage + static_cast<uint32_t>(row * kRawRowBytes);
#pragma unroll
  for (int j = 0; j < kIters; ++j) {
    const int chunk = sub + j * kTpt;
    if (kChunksPerToken % kTpt != 0 && chunk >= kChunksPerToken) break;
    // The scale chunk of a page-structured format lands right after the data bytes.
    const bool is_scale = F::kPageStructured && chunk == kDataChunks;
    const unsigned char* src =
        is_scale && valid ? pool.cache + scales : first + j * kTpt * kChunkBytes;
    const uint32_t dst = dst_row + static_cast<uint32_t>(chunk * kChunkBytes);
    if constexpr (kChunkBytes == 8) {
      cp_async_8_zfill(dst, src, valid);
    } else {
      cp_async_16_zfill(dst, src, valid);
    }
  }
}

// Groups dim_of(0), ..., dim_of(kN - 1) (8 dims each) of one raw token row -> row `row` of
// the bf16 tile (swizzled), every load and conversion before any store: a store might alias a
// later load, so in one loop ptxas kept each load behind the previous store and no two
// overlapped. The three CTAs' dequantisations call this for their groups.
template <typename F, int kDimQK, int kN, typename DimOf>
__device__ __forceinline__ void dequant_chunks(const unsigned char* raw_row, unsigned char* tile,
                                               int row, DimOf dim_of) {
  uint4 v[kN];
#pragma unroll
  for (int j = 0; j < kN; ++j) v[j] = F::dequant8(raw_row, dim_of(j));
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    *reinterpret_cast<uint4*>(tile + swizzled_offset<kDimQK>(row, dim_of(j))) = v[j];
  }
}

// Raw tile (shared) -> dequantised bf16 tile (shared, swizzled), the part that warp `warp`
// reads for its S partial: dims [warp d / 4, (warp + 1) d / 4) of all 16 tokens (18 or 16
// chunks of 8 dims per token). Lane l takes token l / 2 and half of the warp's chunks of
// it (9 or 8 consecutive ones), so its row addresses are computed once. The warp's own S
// needs only a __syncwarp after it; P V reads other warps' dims after the CTA barrier that
// follows the S partials.
template <typename F, int kDimQK, int kRawRowBytes>
__device__ __forceinline__ void dequant_tile(const unsigned char* raw_stage, unsigned char* tile,
                                             int warp, int lane) {
  static_assert(F::kDimQK == kDimQK, "format and kernel agree on d_qk");
  constexpr int kWarpChunksPerRow = kDimQK / kNumWarps / 8;  // 18 or 16
  constexpr int kLaneChunks = kWarpChunksPerRow / 2;         // 9 or 8
  static_assert(kBlockN * 2 == 32, "two lanes per token");
  const int row = lane >> 1;
  const int first = warp * kWarpChunksPerRow + (lane & 1) * kLaneChunks;
  const unsigned char* raw_row = raw_stage + row * kRawRowBytes;
  constexpr int kGroup = kLaneChunks % 3 == 0 ? 3 : 4;
#pragma unroll 1
  for (int j0 = 0; j0 < kLaneChunks; j0 += kGroup) {
    dequant_chunks<F, kDimQK, kGroup>(raw_row, tile, row,
                                      [&](int j) { return (first + j0 + j) * 8; });
  }
}

// Calls f(F{}) with the policy of format id `format` among those of d_qk kDimQK (the API
// has checked that the format belongs to this d_qk; any other id does nothing).
template <int kDimQK, typename Fn>
__device__ __forceinline__ void with_format(int format, Fn&& f) {
  if constexpr (kDimQK == 576) {
    if (format == formats::V32::kId) f(formats::V32{});
  } else {
    switch (format) {
      case formats::V32NoRope::kId: f(formats::V32NoRope{}); break;
      case formats::V4::kId: f(formats::V4{}); break;
      case formats::V41::kId: f(formats::V41{}); break;
      case formats::V41Fp4::kId: f(formats::V41Fp4{}); break;
      default: break;
    }
  }
}

// What the tile loop needs of the current piece. Thread 0 stores it in shared memory at
// the piece's start and the loop reads it back after its barriers, so none of it stays in
// registers beside the O accumulators (the d_qk 576 build spilled with these live).
struct Piece {
  int req;
  int query, head0;                        // the CTA's query and first head
  int main_limit, main_span, extra_limit;  // the request's key list (see the file comment)
  int pos_begin;                           // first position of the piece
  int split;                               // its o_accum row; -1: write out directly
};
static_assert(sizeof(Piece) <= 32, "the Piece record has 32 bytes of shared memory (config.h)");

// The piece of request `req` that schedule part `meta` gives this CTA (row block
// blockIdx.x % num_m_blocks, kRows heads), and its number of 16-position tiles. False when
// there is nothing to write: no positions scheduled, or a stale split index. A piece the
// schedule counted but the current lengths left empty still counts (0 tiles), so the
// combine never reads an unwritten split.
__device__ __forceinline__ bool piece_of(const SparseDecodeParams& params, const int32_t* meta,
                                         int req, bool has_extra, int rows, Piece& here,
                                         int& num_tiles) {
  const int main_limit = pool_limit(params.main, req);
  const int main_span = (main_limit + kBlockN - 1) / kBlockN * kBlockN;
  const int extra_limit = has_extra ? pool_limit(params.extra, req) : 0;
  const int total = main_span + extra_limit;
  const int n_blocks = (total + kPositionsPerBlock - 1) / kPositionsPerBlock;
  const bool first = req == meta[sched::kBeginReq];
  const bool last = req == meta[sched::kEndReq];
  const int lo = first ? meta[sched::kBeginBlock] : 0;
  const int hi = min(last ? meta[sched::kEndBlock] : n_blocks, n_blocks);
  const int sched_hi = last ? meta[sched::kEndBlock] : n_blocks;
  if (lo >= sched_hi) return false;
  const int total_splits = params.num_splits_total;
  const int off_begin = min(max(params.split_offsets[req], 0), total_splits);
  const int off_end = min(max(params.split_offsets[req + 1], off_begin), total_splits);
  const bool direct = off_end - off_begin == 1;
  const int split = first ? meta[sched::kFirstSplit] : off_begin;
  if (!direct && (split < 0 || split >= total_splits)) return false;  // stale schedule

  const int pos_begin = lo * kPositionsPerBlock;
  const int m_block = static_cast<int>(blockIdx.x % params.num_m_blocks);
  here = Piece{req,        m_block / params.num_head_blocks,
               (m_block % params.num_head_blocks) * rows,
               main_limit, main_span, extra_limit, pos_begin, direct ? -1 : split};
  const int pos_end = min(max(hi, lo) * kPositionsPerBlock, total);
  num_tiles = pos_end > pos_begin ? (pos_end - pos_begin + kBlockN - 1) / kBlockN : 0;
  return true;
}

// The first tile position of `tile` of piece pc in its pool (pos) and that pool's counted
// limit: the main pool's positions come first, then the extra pool's (the file comment).
__device__ __forceinline__ const CachePool& tile_pool(const SparseDecodeParams& params,
                                                      const Piece& pc, int tile, int& pos,
                                                      int& limit) {
  const int pos0 = pc.pos_begin + tile * kBlockN;
  if (pos0 < pc.main_span) {
    pos = pos0;
    limit = pc.main_limit;
    return params.main;
  }
  pos = pos0 - pc.main_span;
  limit = pc.extra_limit;
  return params.extra;
}

// A tile's 16 index values into ring stage tile % kStages at index_ring (threads 0..15, one
// 4-byte copy each: index rows have any alignment), copied ahead of the tile's gather so
// the gather never waits for a dependent load. Positions past the pool's limit are
// zero-filled without a read and never used.
template <int kStages>
__device__ __forceinline__ void issue_index(const SparseDecodeParams& params, const Piece& pc,
                                            int tile, int num_tiles, int tid,
                                            uint32_t index_ring) {
  if (tile >= num_tiles || tid >= kBlockN) return;
  int pos0, limit;
  const CachePool& pool = tile_pool(params, pc, tile, pos0, limit);
  const int pos = pos0 + tid;
  const bool valid = pos < limit;
  const int32_t* src = pool.indices + static_cast<int64_t>(pc.req) * pool.indices_batch_stride +
                       static_cast<int64_t>(pc.query) * pool.indices_row_stride +
                       (valid ? pos : 0);
  cp_async_4_zfill(index_ring + static_cast<uint32_t>(((tile % kStages) * kBlockN + tid) * 4),
                   src, valid);
}

// Token token_row's index value in a tile, -1 past the tile's pool limit or the piece:
// from the index ring (`ring`: the tile's copy landed and is visible) or, in a piece's
// prologue, straight from global memory.
template <int kStages>
__device__ __forceinline__ int tile_index(const SparseDecodeParams& params, const Piece& pc,
                                          int tile, int num_tiles, int token_row,
                                          const int* index_ring, bool ring) {
  if (tile >= num_tiles) return -1;
  int pos0, limit;
  const CachePool& pool = tile_pool(params, pc, tile, pos0, limit);
  const int pos = pos0 + token_row;
  if (pos >= limit) return -1;
  if (ring) return index_ring[(tile % kStages) * kBlockN + token_row];
  return pool.indices[static_cast<int64_t>(pc.req) * pool.indices_batch_stride +
                      static_cast<int64_t>(pc.query) * pool.indices_row_stride + pos];
}

// Epilogue output rows, shared by the three CTAs. out_row / partial_row: where output row
// (query, head) of request req starts in out (a direct piece) and in o_accum[split] (a split
// piece's normalised fp32 partial). store_row / store_row_f32: row r (0: row g, 1: row g + 8)
// of a warp's O accumulators over kN n-tiles, times `scale`, to dst = the row's first column
// of the warp plus 2 (lane % 4), rounded to nearest in the input dtype or as fp32.
template <typename Storage>
__device__ __forceinline__ Storage* out_row(const SparseDecodeParams& params, int req, int query,
                                            int head) {
  return static_cast<Storage*>(params.out) + static_cast<int64_t>(req) * params.out_batch_stride +
         static_cast<int64_t>(query) * params.out_row_stride +
         static_cast<int64_t>(head) * params.out_head_stride;
}
__device__ __forceinline__ float* partial_row(const SparseDecodeParams& params, int split,
                                              int query, int head) {
  return params.o_accum +
         ((static_cast<int64_t>(split) * params.s_q + query) * params.h_q + head) * kHeadDimV;
}
template <typename Elem, int kN>
__device__ __forceinline__ void store_row(typename Elem::Storage* dst, const float (&acc)[kN][4],
                                          int r, float scale) {
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    *reinterpret_cast<uint32_t*>(dst + n * 8) =
        pack_float2<Elem>(acc[n][2 * r] * scale, acc[n][2 * r + 1] * scale);
  }
}
template <int kN>
__device__ __forceinline__ void store_row_f32(float* dst, const float (&acc)[kN][4], int r,
                                              float scale) {
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    *reinterpret_cast<float2*>(dst + n * 8) =
        make_float2(acc[n][2 * r] * scale, acc[n][2 * r + 1] * scale);
  }
}

template <int kDimQK, int kSlabs>
__global__ void __launch_bounds__(kThreads, min_ctas_per_sm(kSlabs))
    sparse_decode_kernel(const __grid_constant__ SparseDecodeParams params) {
  using L = Layout<kDimQK, kSlabs>;
  constexpr int kRows = 16 * kSlabs;
  using Elem = BF16;
  using Storage = typename Elem::Storage;
  constexpr int kRawRowBytes = L::kRawRowBytes;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = cvta_shared(smem);
  const uint32_t q_smem = smem_base;
  const uint32_t tile_smem = smem_base + L::kTileOffset;
  float4* s_partials = reinterpret_cast<float4*>(smem + L::kSPartialOffset);
  float* rescale_smem = reinterpret_cast<float*>(smem + L::kRescaleOffset);
  float* out_scale_smem = reinterpret_cast<float*>(smem + L::kOutScaleOffset);
  float* row_max_smem = reinterpret_cast<float*>(smem + L::kRowMaxOffset);
  float* row_sum_smem = reinterpret_cast<float*>(smem + L::kRowSumOffset);
  unsigned char* valid_smem = smem + L::kValidOffset;  // [stage][token]: 1 = valid
  Piece* piece_smem = reinterpret_cast<Piece*>(smem + L::kPieceOffset);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;

  const int part = static_cast<int>(blockIdx.x / params.num_m_blocks);

  const int32_t* meta = params.metadata + static_cast<int64_t>(part) * sched::kMetaInts;
  // The part's fields, the CTA's query and its heads are read or derived where they are
  // used, and the tile loop reads them from the Piece record: none stays in registers
  // beside the O accumulators (the sm_80/86/89 builds spilled with them live).
  const int begin_req = meta[sched::kBeginReq];
  if (begin_req < 0 || begin_req >= params.batch) return;  // empty part
  const int last_req = min(meta[sched::kEndReq], params.batch - 1);
  const bool has_extra = params.extra.cache != nullptr;
  const float scale_log2 = params.softmax_scale_log2;  // > 0 (validated)
  const Storage* q_base = static_cast<const Storage*>(params.q);
  // Per-lane ldmatrix coordinates (mla_row_block.cuh), computed once for the whole CTA.
  const rb::SCoords s_coords{lane & 15, (lane >> 4) * 8, (lane & 7) + ((lane >> 4) & 1) * 8,
                             ((lane >> 3) & 1) * 8};
  const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int v_col = (lane >> 4) * 8;

  for (int req = begin_req; req <= last_req; ++req) {
    Piece here;
    int num_tiles;
    if (!piece_of(params, meta, req, has_extra, kRows, here, num_tiles)) continue;

    __syncthreads();  // every warp is done with the previous piece's shared memory

    if (tid == 0) *piece_smem = here;
    if (warp == 0) {
      row_max_smem[lane] = rb::kNegInf;
#pragma unroll
      for (int k = 0; k < 4; ++k) row_sum_smem[lane * 4 + k] = 0.f;
    }

    // Q block: heads [head0, head0 + valid_rows) of this query; the other rows are zeros.
    load_tile_async<kRows, kDimQK, kThreads>(
        q_smem,
        q_base + static_cast<int64_t>(req) * params.q_batch_stride +
            static_cast<int64_t>(here.query) * params.q_row_stride,
        params.q_head_stride, here.head0, min(kRows, params.h_q - here.head0), tid);

    auto raw_stage = [&](int tile) -> uint32_t {
      return smem_base + L::kRawOffset + static_cast<uint32_t>(tile % kRawStages) * L::kRawStageBytes;
    };
    auto tile_pool = [&](const Piece& pc, int tile, int& pos, int& limit) -> const CachePool& {
      return sparse_decode::tile_pool(params, pc, tile, pos, limit);
    };
    // Index values kIndexLead tiles ahead of their gather, into the ring (issue_index);
    // this thread's token (row tid / 8 of a tile) reads its value back (tile_index).
    const int token_row = tid / kThreadsPerToken;
    auto issue_index = [&](const Piece& pc, int tile) {
      sparse_decode::issue_index<L::kIndexStages>(params, pc, tile, num_tiles, tid,
                                                  smem_base + L::kIndexOffset);
    };
    auto tile_index = [&](const Piece& pc, int tile, bool ring) -> int {
      return sparse_decode::tile_index<L::kIndexStages>(
          params, pc, tile, num_tiles, token_row,
          reinterpret_cast<const int*>(smem + L::kIndexOffset), ring);
    };
    // One raw tile of 16 index positions of one pool (uniform over the CTA); `value` is
    // this thread's load_index of the tile. The first thread of each token records whether
    // it is valid (one byte per token and stage; warp 0 turns them into the tile's mask).
    auto issue_tile = [&](const Piece& pc, int tile, int value) {
      if (tile >= num_tiles) return;
      int pos0, limit;
      const CachePool& pool = tile_pool(pc, tile, pos0, limit);
      const int token = value >= 0 && static_cast<int64_t>(value) < pool.num_tokens ? value : -1;
      if (tid % kThreadsPerToken == 0) {
        valid_smem[(tile % kRawStages) * kBlockN + token_row] = token >= 0 ? 1 : 0;
      }
      with_format<kDimQK>(pool.format, [&](auto fmt) {
        using F = decltype(fmt);
        int64_t data = -1, scales = -1;
        if (token >= 0) token_offsets<F>(pool, token, data, scales);
        issue_raw_tile<F, kRawRowBytes>(pool, raw_stage(tile), data, scales, token_row,
                                        tid % kThreadsPerToken);
      });
    };
    // The first group also carries the index values of tiles 2 and 3 (iteration i gathers
    // tile i + 2 and copies the values of tile i + 4).
    static_assert(L::kIndexLead == 4 && L::kIndexStages >= 3, "index ring as in config.h");
    issue_tile(here, 0, tile_index(here, 0, /*ring=*/false));
    issue_index(here, 2);
    issue_index(here, 3);
    cp_async_commit();
    issue_tile(here, 1, tile_index(here, 1, /*ring=*/false));
    cp_async_commit();

    float o_acc[kSlabs][rb::kNTilesO][4];
    rb::zero_o<kSlabs>(o_acc);

    for (int i = 0; i < num_tiles; ++i) {
      cp_async_wait<1>();
      __syncthreads();  // B1
      {
        const Piece pc = *piece_smem;
        issue_tile(pc, i + 2, tile_index(pc, i + 2, /*ring=*/true));
        issue_index(pc, i + L::kIndexLead);
        cp_async_commit();
        int pos0, limit;
        const CachePool& pool = tile_pool(pc, i, pos0, limit);
        const unsigned char* raw = smem + L::kRawOffset + (i % kRawStages) * L::kRawStageBytes;
        with_format<kDimQK>(pool.format, [&](auto fmt) {
          dequant_tile<decltype(fmt), kDimQK, kRawRowBytes>(raw, smem + L::kTileOffset, warp,
                                                            lane);
        });
      }
      __syncwarp();  // this warp's dims of the tile, which its S partial reads

      float s_acc[kSlabs][2][4];
      rb::s_partial<Elem, kDimQK, kSlabs>(s_acc, q_smem, tile_smem, warp, s_coords);
      if (warp > 0) rb::store_s_partial<kSlabs>(s_partials, s_acc, warp, lane);
      __syncthreads();  // B2

      if (warp == 0) {
        rb::add_s_partials<kSlabs>(s_acc, s_partials, lane);
        const uint32_t mask =
            __ballot_sync(0xffffffffu, lane < kBlockN &&
                                           valid_smem[(i % kRawStages) * kBlockN + (lane & 15)]);
        rb::mask_invalid_tokens<kSlabs>(s_acc, mask, t);
        rb::softmax_step<Elem, kSlabs>(s_acc, scale_log2, row_max_smem, row_sum_smem, rescale_smem,
                               smem + L::kPOffset, lane);
      }
      __syncthreads();  // B3

      rb::rescale_o_if_changed<kSlabs>(o_acc, rescale_smem, lane);
      uint32_t p_frag[kSlabs][4];
      rb::load_p<kSlabs>(p_frag, smem_base + L::kPOffset, lane);
      rb::pv<Elem, kDimQK, kSlabs>(o_acc, p_frag, tile_smem, warp, v_row, v_col);
    }
    cp_async_wait<0>();  // drain (the groups past the last tile are empty)
    __syncthreads();     // the piece record and the last tile's softmax state are visible

    // ---- epilogue ----
    const Piece pc = *piece_smem;
    const bool direct_out = pc.split < 0;
    const int query = pc.query, head0 = pc.head0;
    const int valid_rows = min(kRows, params.h_q - head0);
    if (warp == 0) {
#pragma unroll
      for (int s = 0; s < kSlabs; ++s) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = 16 * s + g + 8 * r;
          const float sum = quad_sum(row_sum_smem[row * 4 + t]);
          const float row_max = row_max_smem[row];
          if (t == 0) {
            float out_scale = sum > 0.f ? 1.f / sum : 0.f;
            if (row < valid_rows) {
              const int head = head0 + row;
              const int64_t qh = static_cast<int64_t>(query) * params.h_q + head;
              const float lse2 = row_max * scale_log2 + __log2f(sum);
              if (direct_out) {
                const float lse = lse2 * rb::kLn2;
                params.lse[static_cast<int64_t>(pc.req) * params.s_q * params.h_q + qh] =
                    sum > 0.f ? lse : __int_as_float(0x7f800000);
                // out *= exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink - lse)):
                // sink +inf gives 0, -inf gives 1.
                if (sum > 0.f && params.attn_sink != nullptr) {
                  out_scale *= 1.f / (1.f + expf(params.attn_sink[head] - lse));
                }
              } else {
                params.lse_accum[static_cast<int64_t>(pc.split) * params.s_q * params.h_q + qh] =
                    sum > 0.f ? lse2 : rb::kNegInf;
              }
            }
            out_scale_smem[row] = out_scale;
          }
        }
      }
    }
    __syncthreads();

#pragma unroll
    for (int s = 0; s < kSlabs; ++s) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = 16 * s + g + 8 * r;
        if (row >= valid_rows) continue;
        const float scale = out_scale_smem[row];
        const int head = head0 + row;
        const int col0 = warp * rb::kColsPerWarp + 2 * t;
        if (direct_out) {
          store_row<Elem>(out_row<Storage>(params, pc.req, query, head) + col0, o_acc[s], r, scale);
        } else {
          store_row_f32(partial_row(params, pc.split, query, head) + col0, o_acc[s], r, scale);
        }
      }
    }
  }
}

template <int kDimQK, int kSlabs>
void run_sparse_decode(const SparseDecodeParams& params) {
  constexpr auto kernel = sparse_decode_kernel<kDimQK, kSlabs>;
  constexpr int kSmemBytes = Layout<kDimQK, kSlabs>::kSmemBytes;
  // The carveout asks for the largest shared-memory split, so two CTAs share an H100 SM.
  opt_in_smem<kernel, kSmemBytes, /*kMaxCarveout=*/true>();
  const int64_t ctas = static_cast<int64_t>(params.num_parts) * params.num_m_blocks;
  kernel<<<static_cast<unsigned>(ctas), kThreads, kSmemBytes, params.stream>>>(params);
}

}  // namespace flash_mla::portable::sparse_decode
