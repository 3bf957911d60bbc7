// The 64-row CTA of the portable dense MLA decode: 8 warps, 64 rows of one kv head, one
// 64-token page per tile, for GPUs whose blocks may opt in to config.h's rows64::kSmemBytes
// (H100/H200, B200), where it takes more than 32 rows per kv head (config.h choose_cta;
// FLASH_MLA_DENSE_DECODE_WARPS=8x64 forces it). The sparse prefill's wide CTA applied to
// paged dense keys: its S, softmax and P V steps are common/wide_steps.cuh's (the roles of
// each warp are described there); the work split, pieces, causal bounds and split-KV
// outputs are every dense-decode CTA's (piece.cuh). Design: docs/dense_decode.md.
//
// Here: the S step is masked per row (a token at or past the row's visible bound, kept in
// shared memory); warp w copies tokens [8 w, 8 w + 8) of the tile's page, row by row.
//
// Barrier / cp.async protocol per piece (T tiles): __syncthreads; Q and tile 0 -> commit.
//   iteration i: wait_group 0; B1 __syncthreads (tile i visible; stage (i + 1) % 2, P, the
//   rescale factors and the half maxima free); issue tile i + 1 -> commit; S (its partial
//   sums meet in P at two 64-thread barriers); half maxima; B2 __syncthreads; softmax, P,
//   rescale factors (half 0); B3 __syncthreads; O *= rescale,
//   O += P V. Epilogue: half sums; __syncthreads; lse and 1 / sum (half 0); __syncthreads;
//   every warp writes its columns (out, or the fp32 split partial).
#pragma once

#include <cstdint>
#include <limits>

#include <cuda_runtime.h>

#include "../../../params.h"
#include "../../common/cp_async.cuh"
#include "../../common/element.cuh"
#include "../../common/ldmatrix.cuh"
#include "../../common/math.cuh"
#include "../../common/mma.cuh"
#include "../../common/smem_opt_in.cuh"
#include "../../common/swizzle.cuh"
#include "../../common/wide_steps.cuh"
#include "config.h"
#include "piece.cuh"

namespace flash_mla::portable::dense_decode::rows64 {

namespace ws = ::flash_mla::portable::wide_steps;
static_assert(kThreads == ws::kThreads && kBlockM == ws::kBlockM && kBlockN == ws::kBlockN &&
                  kSlabsO == ws::kSlabsO && kColsPerWarp == ws::kColsPerWarp &&
                  kPBytes == ws::kPBytes,
              "the 64-row CTA and wide_steps.cuh must agree on the tile");

template <typename Elem, bool kIsCausal>
__global__ void __launch_bounds__(kThreads, 1)
    dense_decode_64rows_kernel(const __grid_constant__ DenseDecodeParams params) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 900 || __CUDA_ARCH__ >= 1200)
  // Never launched here (cta_for checks rows64::fits): trap, and the code below is not emitted.
  __trap();
#else
  using Storage = typename Elem::Storage;
  constexpr int kChunksPerRow = kHeadDimQK / 8;  // 72
  constexpr int kRowBytes = kHeadDimQK * kElemBytes;
  constexpr int kTailChunks = kChunksPerRow % 32;  // 8: copied two per lane
  static_assert(kRowsPerCopyWarp * kTailChunks == 64, "two tail chunks per lane");

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = cvta_shared(smem);
  const uint32_t q_smem = smem_base;
  const uint32_t p_smem = smem_base + kPOffset;
  float* half_max_smem = reinterpret_cast<float*>(smem + kHalfMaxOffset);
  float* half_sum_smem = reinterpret_cast<float*>(smem + kHalfSumOffset);
  float* rescale_smem = reinterpret_cast<float*>(smem + kRescaleOffset);
  float* inv_sum_smem = reinterpret_cast<float*>(smem + kInvSumOffset);
  int* row_limit_smem = reinterpret_cast<int*>(smem + kRowLimitOffset);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int slab = warp % 4;
  const int half = warp / 4;

  Work w;
  if (!work_of<kBlockM>(params, w)) return;  // empty part
  const float scale_log2 = params.softmax_scale_log2;  // > 0 (validated)
  const Storage* q_base = static_cast<const Storage*>(params.q);
  const Storage* k_base = static_cast<const Storage*>(params.k_cache);
  const Storage* k_head = k_base + static_cast<int64_t>(w.kv_head) * params.k_head_stride;

  const ws::Coords coords = ws::coords_of(lane);  // ldmatrix coordinates

  for (int req = w.begin_req; req <= w.last_req; ++req) {
    Piece piece;
    if (!piece_of<kIsCausal, kBlockN>(params, w, req, piece)) continue;
    __syncthreads();  // every warp is done with the previous piece's shared memory

    // Row r sees keys [0, bound) of the request (causal: bottom-right aligned).
    if (tid < kBlockM) {
      const int query = (w.m0 + tid) / w.group;
      row_limit_smem[tid] =
          visible_bound<kIsCausal>(piece.tok_end_piece, piece.s_k, params.s_q, query);
    }

    // ---- Q block: 64 rows x 72 chunks, row r -> (query r / group, head kv_head group + r % group)
    copy_q_block<Storage, kBlockM, kThreads, 2>(q_smem, q_base, params, w, req, tid);
    auto stage_addr = [&](int tile) -> uint32_t {
      return smem_base + kStagesOffset + static_cast<uint32_t>(tile % kStages) * kTileBytes;
    };
    // Tile `tile` = page lo + tile of the request: this warp's tokens [8 warp, 8 warp + 8),
    // row by row (tokens past tok_end, or a page id outside the cache, read as zeros).
    auto issue_tile = [&](int tile) {
      if (tile >= piece.num_tiles) return;  // uniform over the CTA
      const int tok0 = piece.tok_begin + tile * kBlockN;
      const int page = params.block_table[static_cast<int64_t>(req) * params.block_table_stride +
                                          tok0 / kPageSize];
      const bool page_ok = page >= 0 && page < params.num_cache_blocks;
      const Storage* page_base =
          k_head + static_cast<int64_t>(page_ok ? page : 0) * params.k_block_stride;
      const uint32_t dst_warp = stage_addr(tile) + warp * kRowsPerCopyWarp * kRowBytes;
      auto row_src = [&](int row) -> const Storage* {
        return page_base + static_cast<int64_t>(warp * kRowsPerCopyWarp + row) * params.k_token_stride;
      };
      // Not unrolled: unrolled by 2, the causal sm_100f build spilled 4 bytes.
#pragma unroll 1
      for (int row = 0; row < kRowsPerCopyWarp; ++row) {
        const bool valid = page_ok && tok0 + warp * kRowsPerCopyWarp + row < piece.tok_end;
        const Storage* src = valid ? row_src(row) + lane * 8 : k_base;
        const uint32_t dst = dst_warp + row * kRowBytes + static_cast<uint32_t>((lane ^ row) * 16);
#pragma unroll
        for (int k = 0; k < kChunksPerRow / 32; ++k) {
          cp_async_16_zfill(dst + 512 * k, valid ? src + 256 * k : k_base, valid);
        }
      }
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int at = lane + 32 * k;  // over (row, tail chunk), row-major
        const int row = at / kTailChunks;
        const int chunk = kChunksPerRow - kTailChunks + at % kTailChunks;
        const bool valid = page_ok && tok0 + warp * kRowsPerCopyWarp + row < piece.tok_end;
        cp_async_16_zfill(dst_warp + row * kRowBytes + static_cast<uint32_t>((chunk ^ row) * 16),
                          valid ? row_src(row) + chunk * 8 : k_base, valid);
      }
    };
    issue_tile(0);
    cp_async_commit();

    float row_max[2] = {ws::kNegInf, ws::kNegInf};
    float row_sum[2] = {0.f, 0.f};
    float o_acc[kSlabsO][kColsPerWarp / 8][4];
    ws::zero_o(o_acc);

    for (int i = 0; i < piece.num_tiles; ++i) {
      cp_async_wait<0>();
      __syncthreads();  // B1
      issue_tile(i + 1);
      cp_async_commit();
      const uint32_t tile_smem = stage_addr(i);

      // ---- S: rows [16 slab, +16) x tokens [32 half, +32), all dims (P: the exchange) ----
      float s_acc[4][4];
      ws::s_tile<Elem, kHeadDimQK>(s_acc, q_smem, tile_smem,
                                   reinterpret_cast<float*>(smem + kPOffset), slab, half, lane,
                                   coords);

      // ---- mask (keys at or past a row's bound), then the softmax step (B2 inside) ----
      const int tok_half = piece.tok_begin + i * kBlockN + 32 * half;
      const int lim[2] = {row_limit_smem[16 * slab + g], row_limit_smem[16 * slab + g + 8]};
#pragma unroll
      for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (tok_half + n * 8 + 2 * t + (e & 1) >= lim[e >> 1]) s_acc[n][e] = ws::kNegInf;
        }
      ws::softmax_tile<Elem>(s_acc, row_max, row_sum, scale_log2, half_max_smem, rescale_smem,
                             smem + kPOffset, slab, half, g, t);
      __syncthreads();  // B3

      // ---- O = O * rescale + P V over this warp's 64 columns ----
      ws::pv_tile<Elem, kHeadDimQK>(o_acc, rescale_smem, p_smem, tile_smem, warp, lane, g,
                                    coords);
    }
    cp_async_wait<0>();  // drain (a group past the last tile is empty)

    // ---- epilogue: lse (direct: natural log; split: log2) and 1 / sum, then the rows ----
    ws::store_half_sums(row_sum, half_sum_smem, slab, half, g, t);
    __syncthreads();
    if (half == 0 && t == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = 16 * slab + g + 8 * r;
        const float sum = ws::row_total(half_sum_smem, row);
        inv_sum_smem[row] = sum > 0.f ? 1.f / sum : 0.f;
        if (row < w.valid_rows) {
          store_lse(params, req, piece, row_pos(w, row), row_max[r], sum, scale_log2);
        }
      }
    }
    __syncthreads();

#pragma unroll
    for (int s = 0; s < kSlabsO; ++s) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = 16 * s + g + 8 * r;
        if (row >= w.valid_rows) continue;
        const float inv = inv_sum_smem[row];
        store_row<Elem>(params, req, piece, row_pos(w, row), warp * kColsPerWarp + 2 * t,
                        o_acc[s], r, inv);
      }
    }
  }
#endif
}

template <typename Elem, bool kIsCausal>
void launch(const DenseDecodeParams& params) {
  constexpr auto kernel = dense_decode_64rows_kernel<Elem, kIsCausal>;
  opt_in_smem<kernel, kSmemBytes, /*kMaxCarveout=*/true>();
  const int64_t ctas = static_cast<int64_t>(params.num_parts) * params.h_k * params.num_m_blocks;
  kernel<<<static_cast<unsigned>(ctas), kThreads, kSmemBytes, params.stream>>>(params);
}

}  // namespace flash_mla::portable::dense_decode::rows64
