// The 64-row CTA of the portable sparse MLA decode: 8 warps, 64 heads of one query, 64-position
// tiles, for GPUs whose blocks may opt in to config.h's rows64::Layout (about 195 KB: H100/H200,
// B200), where it takes more than 32 heads (config.h choose_cta). The dense decode's 64-row CTA
// over gathered, dequantised tokens: its S, softmax and P V steps are common/wide_steps.cuh's
// (the roles of each warp are described there); the pieces, key lists, gather rules, formats and
// output contract are kernel.cuh's. With 128 heads it gathers and dequantises each token twice
// per query instead of four times, and each K / V fragment feeds 64 rows instead of 32. Design
// and numbers: docs/sparse_decode.md ("The 64-row CTA").
//
// Tokens. A tile is four of piece_of's 16-position tiles (one schedule block of 64 positions),
// so its positions change pool only at a 16-position boundary. Warp w gathers and dequantises
// tile rows [8 w, 8 w + 8), four lanes per token (lane l: token 8 w + l / 4, 16-byte chunks
// l % 4, l % 4 + 4, ...), so a warp's tokens share one pool and format. A position without a
// token (padding after the main pool's counted positions, past a pool's limit or the piece,
// an index outside the pool) has its raw row zero-filled without a read: it dequantises to
// zeros in every format and its scores are masked (the valid bytes, one per warp and stage).
// Each thread loads its token's index value a tile ahead and range-checks it when it issues
// the gather, so the load's latency hides under a tile of math.
//
// Shared memory (rows64::Layout): Q | one dequantised tile | one raw stage | P | half maxima |
// half sums | rescale | output scale | valid bytes [2][8] | the piece record. One raw stage is
// enough: tile i + 1's gather is issued once tile i is dequantised and lands during tile i's
// S, softmax and P V. A raw row is copied and dequantised by the same four lanes, so only
// their warp reads it; and warps 4 h .. 4 h + 3 dequantise exactly the tile rows [32 h, +32)
// that the S warps of token half h (the same four warps) read. So between the dequantisation
// and S a warp waits only for its own lanes and then for its half, not for the CTA.
//
// Barrier / cp.async protocol per piece (T tiles):
//   __syncthreads (the previous piece's readers are done); thread 0 stores the piece record;
//   Q and raw tile 0 -> commit.
//   iteration i: wait_group 0 (raw tile i, at i = 0 also Q, this thread's part); B1
//     __syncthreads (raw tile i and its valid bytes visible; every warp finished tile i - 1's
//     P V, so the dequantised tile, P, the rescale factors and the half maxima are free);
//     dequantise this warp's rows of raw tile i; __syncwarp (its raw rows read); issue its
//     part of raw tile i + 1 and its valid byte (stage (i + 1) % 2, last read in iteration
//     i - 1) -> commit; load the index values of tile i + 2; B2 half barrier (the half's
//     dequantised rows visible); S (its partial sums meet in P at two 64-thread barriers);
//     mask; half maxima; __syncthreads; softmax, P, rescale factors; B3 __syncthreads;
//     O *= rescale, O += P V.
//   epilogue: wait_group 0; half sums; __syncthreads; the h = 0 warps write lse (or
//     lse_accum) and each row's output scale (1 / sum, times the sink factor for a direct
//     piece); __syncthreads; every warp writes its columns (out, or the fp32 split partial).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../../common/cp_async.cuh"
#include "../../common/element.cuh"
#include "../../common/math.cuh"
#include "../../common/smem_opt_in.cuh"
#include "../../common/swizzle.cuh"
#include "../../common/tile_copy.cuh"
#include "../../common/wide_steps.cuh"
#include "../schedule/config.h"
#include "config.h"
#include "formats.cuh"
#include "kernel.cuh"
#include "kernel.h"

namespace flash_mla::portable::sparse_decode {

namespace rows64 {

namespace ws = ::flash_mla::portable::wide_steps;
namespace sched = ::flash_mla::portable::decode_schedule;
static_assert(kThreads == ws::kThreads && kBlockM == ws::kBlockM && kBlockN == ws::kBlockN &&
                  kSlabsO == ws::kSlabsO && kColsPerWarp == ws::kColsPerWarp,
              "the 64-row CTA and wide_steps.cuh must agree on the tile");
static_assert(kTokensPerWarp * kThreadsPerToken == 32 &&
                  sparse_decode::kBlockN % kTokensPerWarp == 0,
              "a warp's tokens lie in one 16-position tile");

constexpr float kLn2 = 0.69314718055994530942f;

// The pool of tile row `row` of 64-position tile `tile` of piece pc, with the row's position in
// that pool and the pool's counted limit (a position at or past it holds no token). Past the
// piece's last 16-position tile (num_sub of them), or in the extra pool's range of a call
// without one, the main pool with limit 0: its format zero-fills the row.
__device__ __forceinline__ const CachePool& row_pool(const SparseDecodeParams& params,
                                                     const Piece& pc, int tile, int row,
                                                     int num_sub, bool has_extra, int& pos,
                                                     int& limit) {
  const int sub_tile = tile * kSubTiles + row / sparse_decode::kBlockN;
  const int pos0 = pc.pos_begin + tile * kBlockN + row;
  if (sub_tile >= num_sub || (pos0 >= pc.main_span && !has_extra)) {
    pos = 0;
    limit = 0;
    return params.main;
  }
  const CachePool& pool = tile_pool(params, pc, sub_tile, pos, limit);
  pos += row % sparse_decode::kBlockN;
  return pool;
}

// Rendezvous of the four warps of token half h (128 threads): they dequantise the tile rows
// [32 h, +32) that their S reads. Barriers 1..4 are wide_steps' S block pairs.
__device__ __forceinline__ void half_barrier(int h) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(5 + h) : "memory");
}

template <int kDimQK>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_decode_64rows_kernel(const __grid_constant__ SparseDecodeParams params) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 900 || __CUDA_ARCH__ >= 1200)
  // Never launched here (cta_for checks rows64::fits): trap, and the code below is not emitted.
  __trap();
#else
  using L = Layout<kDimQK>;
  using Elem = BF16;
  using Storage = typename Elem::Storage;
  constexpr int kRawRowBytes = L::kRawRowBytes;
  constexpr int kChunksPerThread = kDimQK / 8 / kThreadsPerToken;  // 18 | 16

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = cvta_shared(smem);
  const uint32_t q_smem = smem_base;
  const uint32_t tile_smem = smem_base + L::kTileOffset;
  const uint32_t raw_smem = smem_base + L::kRawOffset;
  const uint32_t p_smem = smem_base + L::kPOffset;
  float* half_max_smem = reinterpret_cast<float*>(smem + L::kHalfMaxOffset);
  float* half_sum_smem = reinterpret_cast<float*>(smem + L::kHalfSumOffset);
  float* rescale_smem = reinterpret_cast<float*>(smem + L::kRescaleOffset);
  float* out_scale_smem = reinterpret_cast<float*>(smem + L::kOutScaleOffset);
  unsigned char* flag_smem = smem + L::kFlagOffset;
  Piece* piece_smem = reinterpret_cast<Piece*>(smem + L::kPieceOffset);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int slab = warp % 4;  // S rows [16 slab, +16)
  const int half = warp / 4;  // S tokens [32 half, +32) of the tile
  const int row = kTokensPerWarp * warp + lane / kThreadsPerToken;  // this thread's tile row
  const int sub = lane % kThreadsPerToken;

  const int part = static_cast<int>(blockIdx.x / params.num_m_blocks);
  const int32_t* meta = params.metadata + static_cast<int64_t>(part) * sched::kMetaInts;
  const int begin_req = meta[sched::kBeginReq];
  if (begin_req < 0 || begin_req >= params.batch) return;  // empty part
  const int last_req = min(meta[sched::kEndReq], params.batch - 1);
  const bool has_extra = params.extra.cache != nullptr;
  const float scale_log2 = params.softmax_scale_log2;  // > 0 (validated)
  const Storage* q_base = static_cast<const Storage*>(params.q);
  const ws::Coords coords = ws::coords_of(lane);  // ldmatrix coordinates

  for (int req = begin_req; req <= last_req; ++req) {
    Piece here;
    int num_sub;  // piece_of counts 16-position tiles
    if (!piece_of(params, meta, req, has_extra, kBlockM, here, num_sub)) continue;
    const int num_tiles = (num_sub + kSubTiles - 1) / kSubTiles;

    __syncthreads();  // every warp is done with the previous piece's shared memory
    if (tid == 0) *piece_smem = here;

    load_tile_async<kBlockM, kDimQK, kThreads>(
        q_smem,
        q_base + static_cast<int64_t>(req) * params.q_batch_stride +
            static_cast<int64_t>(here.query) * params.q_row_stride,
        params.q_head_stride, here.head0, min(kBlockM, params.h_q - here.head0), tid);

    // This thread's raw index value in `tile`, -1 where its row holds no token. Loaded a
    // tile ahead of its gather; issue_tile range-checks it.
    auto load_value = [&](const Piece& pc, int tile) -> int {
      if (tile >= num_tiles) return -1;
      int pos, limit;
      const CachePool& pool = row_pool(params, pc, tile, row, num_sub, has_extra, pos, limit);
      if (pos >= limit) return -1;
      return __ldg(pool.indices + static_cast<int64_t>(pc.req) * pool.indices_batch_stride +
                   static_cast<int64_t>(pc.query) * pool.indices_row_stride + pos);
    };
    // Raw tile `tile` into the raw stage, and its valid bytes into flag stage tile % 2.
    auto issue_tile = [&](const Piece& pc, int tile, int value) {
      if (tile >= num_tiles) return;  // uniform over the CTA
      int pos, limit;
      const CachePool& pool = row_pool(params, pc, tile, row, num_sub, has_extra, pos, limit);
      const int token = value >= 0 && static_cast<int64_t>(value) < pool.num_tokens ? value : -1;
      // Lane r < 8 takes token 8 warp + r's verdict from that token's first lane.
      const int ok = __shfl_sync(0xffffffffu, token >= 0 ? 1 : 0, (lane & 7) * kThreadsPerToken);
      const uint32_t bits = __ballot_sync(0xffffffffu, lane < kTokensPerWarp && ok != 0);
      if (lane == 0) {
        flag_smem[(tile % kFlagStages) * kNumWarps + warp] = static_cast<unsigned char>(bits);
      }
      with_format<kDimQK>(pool.format, [&](auto fmt) {
        using F = decltype(fmt);
        int64_t data = -1, scales = -1;
        if (token >= 0) token_offsets<F>(pool, token, data, scales);
        issue_raw_tile<F, kRawRowBytes, kThreadsPerToken>(pool, raw_smem, data, scales, row, sub);
      });
    };
    // This thread's part of raw tile `tile` -> the dequantised tile: chunks sub + 4 j of its row
    // (four consecutive lanes cover 32 consecutive dims, so a format's RoPE or scale-group
    // boundary, a multiple of 32 dims, is uniform over the warp).
    auto dequantise = [&](const Piece& pc, int tile) {
      int pos, limit;
      const CachePool& pool = row_pool(params, pc, tile, row, num_sub, has_extra, pos, limit);
      const unsigned char* raw_row = smem + L::kRawOffset + row * kRawRowBytes;
      unsigned char* dst = smem + L::kTileOffset;
      with_format<kDimQK>(pool.format, [&](auto fmt) {
        using F = decltype(fmt);
#pragma unroll 1
        for (int j0 = 0; j0 < kChunksPerThread; j0 += 2) {  // two at a time (dequant_chunks)
          dequant_chunks<F, kDimQK, 2>(
              raw_row, dst, row, [&](int j) { return 8 * (sub + kThreadsPerToken * (j0 + j)); });
        }
      });
    };

    issue_tile(here, 0, load_value(here, 0));
    cp_async_commit();
    int next_value = load_value(here, 1);

    // Softmax state of this lane's S rows 16 slab + g (0) and + 8 (1): the running max (the
    // same in both warps of the slab) and this warp's tokens' running sum.
    float row_max[2] = {ws::kNegInf, ws::kNegInf};
    float row_sum[2] = {0.f, 0.f};
    float o_acc[kSlabsO][kColsPerWarp / 8][4];
    ws::zero_o(o_acc);

    for (int i = 0; i < num_tiles; ++i) {
      cp_async_wait<0>();
      __syncthreads();  // B1
      {
        const Piece pc = *piece_smem;
        dequantise(pc, i);
        __syncwarp();  // the warp's raw rows are read: tile i + 1's gather may refill them
        issue_tile(pc, i + 1, next_value);
        cp_async_commit();
        next_value = load_value(pc, i + 2);
      }
      half_barrier(half);  // B2

      // ---- S for rows [16 slab, +16) x tokens [32 half, +32), all dims (P: the exchange) ----
      float s_acc[4][4];
      ws::s_tile<Elem, kDimQK>(s_acc, q_smem, tile_smem,
                               reinterpret_cast<float*>(smem + L::kPOffset), slab, half, lane,
                               coords);

      // ---- mask (positions without a token), then the softmax step (its __syncthreads) ----
      const uint32_t valid = *reinterpret_cast<const uint32_t*>(
          flag_smem + (i % kFlagStages) * kNumWarps + 4 * half);  // this half's 32 tokens
      ws::mask_tokens(s_acc, valid, t);
      ws::softmax_tile<Elem>(s_acc, row_max, row_sum, scale_log2, half_max_smem, rescale_smem,
                             smem + L::kPOffset, slab, half, g, t);
      __syncthreads();  // B3

      // ---- O = O * rescale + P V over this warp's 64 columns ----
      ws::pv_tile<Elem, kDimQK>(o_acc, rescale_smem, p_smem, tile_smem, warp, lane, g, coords);
    }
    cp_async_wait<0>();  // drain (a group past the last tile is empty)

    // ---- epilogue ----
    ws::store_half_sums(row_sum, half_sum_smem, slab, half, g, t);
    __syncthreads();
    const Piece pc = *piece_smem;
    const bool direct_out = pc.split < 0;
    const int valid_rows = min(kBlockM, params.h_q - pc.head0);
    if (half == 0 && t == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row_m = 16 * slab + g + 8 * r;
        const float sum = ws::row_total(half_sum_smem, row_m);
        float out_scale = sum > 0.f ? 1.f / sum : 0.f;
        if (row_m < valid_rows) {
          const int head = pc.head0 + row_m;
          const int64_t qh = static_cast<int64_t>(pc.query) * params.h_q + head;
          const float lse2 = row_max[r] * scale_log2 + __log2f(sum);
          if (direct_out) {
            const float lse = lse2 * kLn2;
            params.lse[static_cast<int64_t>(pc.req) * params.s_q * params.h_q + qh] =
                sum > 0.f ? lse : __int_as_float(0x7f800000);
            // out *= exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink - lse)): sink +inf
            // gives 0, -inf gives 1.
            if (sum > 0.f && params.attn_sink != nullptr) {
              out_scale *= 1.f / (1.f + expf(params.attn_sink[head] - lse));
            }
          } else {
            params.lse_accum[static_cast<int64_t>(pc.split) * params.s_q * params.h_q + qh] =
                sum > 0.f ? lse2 : ws::kNegInf;
          }
        }
        out_scale_smem[row_m] = out_scale;
      }
    }
    __syncthreads();

    const int col0 = warp * kColsPerWarp + 2 * t;
#pragma unroll
    for (int s = 0; s < kSlabsO; ++s) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row_m = 16 * s + g + 8 * r;
        if (row_m >= valid_rows) continue;
        const float scale = out_scale_smem[row_m];
        const int head = pc.head0 + row_m;
        if (direct_out) {
          store_row<Elem>(out_row<Storage>(params, pc.req, pc.query, head) + col0, o_acc[s], r,
                          scale);
        } else {
          store_row_f32(partial_row(params, pc.split, pc.query, head) + col0, o_acc[s], r, scale);
        }
      }
    }
  }
#endif
}

template <int kDimQK>
void launch(const SparseDecodeParams& params) {
  constexpr auto kernel = sparse_decode_64rows_kernel<kDimQK>;
  constexpr int kSmemBytes = Layout<kDimQK>::kSmemBytes;
  opt_in_smem<kernel, kSmemBytes, /*kMaxCarveout=*/true>();
  const int64_t ctas = static_cast<int64_t>(params.num_parts) * params.num_m_blocks;
  kernel<<<static_cast<unsigned>(ctas), kThreads, kSmemBytes, params.stream>>>(params);
}

}  // namespace rows64

template <int kDimQK>
void run_sparse_decode_64rows(const SparseDecodeParams& params) {
  rows64::launch<kDimQK>(params);
}

}  // namespace flash_mla::portable::sparse_decode
