// Portable dense MLA decode, the CTAs that hold Q in registers: 4 warps per m16 slab of
// query rows, one template over the slab count (config.h QRegCta): the wide CTA (2 slabs,
// 8 warps, 32 rows) and the narrow one (1 slab, 4 warps, 16 rows). mma.sync m16n8k16 +
// ldmatrix + cp.async only, like kernel.cuh, whose work split (blockIdx.x = (part * h_k +
// kv_head) * num_m_blocks + m_block, in blocks of 16 x kSlabs rows), global-memory rules and
// output contract they share. Design and arithmetic: docs/dense_decode.md.
//
// Warps. Warp w = kSlabs kg + s (kg = 0..3, s < kSlabs) holds the Q fragments of slab s (rows
// 16s .. 16s + 15 of the block) for dims [144 kg, 144 kg + 144) in registers and computes
// that slab's S partial over those dims (16 rows x 16 tokens). The four partials of a slab
// meet in shared memory; every warp of the slab adds them in the fixed order kg = 0, 1, 2,
// 3 (its own from its registers: the bits it stored) and runs the same online softmax on the same values, so the four copies of the row
// maxima, sums and P agree bit for bit. P then stays in registers (the C fragments of S
// are the A fragment of P V) and the warp accumulates O for slab s x output columns
// [128 kg, 128 kg + 128) (16 n-tiles x 4 fp32 per lane).
//
// Shared memory (config.h has the offsets; 16-bit rows XOR-swizzled in 16-byte chunks):
//   [0, 4 * 18432)      KV stage ring, tile i in stage i % 4: [16 tokens][576]; at the start
//                       of a piece stages 2.. stage the Q block [16 kSlabs][576]
//   [73728, +8192 kSlabs) S partials, double-buffered (tile i in buffer i % 2):
//                       [buffer][warp][n-tile][lane] float4
//
// Barrier / cp.async protocol per piece (T tiles of 16 tokens):
//   __syncthreads (the previous piece's readers are done); cp.async Q -> commit; tile 0 ->
//   commit; tile 1 -> commit; wait_group 2 (Q landed); __syncthreads; ldmatrix the Q
//   fragments into registers; __syncthreads (stages 2..3 are free); tile 2 -> commit.
//   prologue (T > 0): wait_group 2 (tile 0); __syncthreads; S partial of tile 0 -> buffer 0.
//   iteration i: wait_group 1 (tiles i and i+1 landed, this thread's part); B __syncthreads
//     (tile i+1 and the partials of tile i visible; every warp finished iteration i-1, so
//     stage (i+3) % 4 and partial buffer (i+1) % 2 are free); cp.async tile i+3 -> commit
//     (an empty group past the end keeps the count); sum the slab's partials of tile i;
//     S partial of tile i+1 -> buffer (i+1) % 2 (its MMAs overlap what follows); mask,
//     online softmax, rescale O, O += P V of tile i.
//   epilogue: wait_group 0; quad sums; warp kg = 0 of each slab writes lse; every warp
//     writes its columns.
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
#include "../../common/qreg_steps.cuh"
#include "../../common/smem_opt_in.cuh"
#include "../../common/swizzle.cuh"
#include "config.h"
#include "piece.cuh"

namespace flash_mla::portable::dense_decode {

namespace wide {


constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kChunksPerRow = kHeadDimQK / 8;                // 72 16-byte chunks per row
constexpr int kTileChunks = kBlockN * kChunksPerRow;         // 1152

// Two narrow CTAs share an SM where shared memory allows (H100: 2 x 81920 B); the bound
// only asks ptxas to keep 128 threads under 256 registers, which 64K registers allow.
template <int kSlabs>
constexpr int min_ctas_per_sm() { return kSlabs == 1 ? 2 : 1; }

template <typename Elem, bool kIsCausal, int kSlabs>
__global__ void __launch_bounds__(QRegCta<kSlabs>::kThreads, min_ctas_per_sm<kSlabs>())
    dense_decode_wide_kernel(const __grid_constant__ DenseDecodeParams params) {
  using Cta = QRegCta<kSlabs>;
  constexpr int kNumWarps = Cta::kNumWarps;
  constexpr int kThreads = Cta::kThreads;
  constexpr int kBlockM = Cta::kBlockM;
  constexpr int kKStepsPerWarp = Cta::kKStepsPerWarp;
  constexpr int kNTilesO = Cta::kNTilesO;
  constexpr int kStages = Cta::kStages;
  constexpr int kTileChunksPerThread = (kTileChunks + kThreads - 1) / kThreads;  // 9 or 5
  using Storage = typename Elem::Storage;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = cvta_shared(smem);
  float4* s_partial = reinterpret_cast<float4*>(smem + Cta::kSPartialOffset);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int slab = warp % kSlabs;
  const int kg = warp / kSlabs;

  Work w;
  if (!work_of<kBlockM>(params, w)) return;  // empty part
  const float scale_log2 = params.softmax_scale_log2;  // > 0 (validated)
  const Storage* k_base = static_cast<const Storage*>(params.k_cache);
  const Storage* q_base = static_cast<const Storage*>(params.q);
  const Storage* k_head = k_base + static_cast<int64_t>(w.kv_head) * params.k_head_stride;

  // Per-lane ldmatrix coordinates (mma.cuh / ldmatrix.cuh give the fragment orders), as in
  // kernel.cuh. Q (A of S): row (lane & 15) of the slab, chunk bit lane >> 4. K (B of S,
  // not transposed): token (lane & 7) + 8 * bit 4, chunk bit (lane >> 3) & 1. V (B of O,
  // transposed): token (lane & 7) + 8 * bit 3, chunk bit lane >> 4.
  const int a_row = 16 * slab + (lane & 15);
  const int a_col = (lane >> 4) * 8;
  const int k_row = (lane & 7) + ((lane >> 4) & 1) * 8;
  const int k_col = ((lane >> 3) & 1) * 8;
  const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int v_col = (lane >> 4) * 8;
  const int dim0 = kg * kKStepsPerWarp * 16;  // first S dim of this warp
  const int col0 = kg * Cta::kColsPerWarp;     // first output column of this warp
  // This lane's accumulator rows within the block: 16 slab + g and 16 slab + g + 8.
  const int row_lo = 16 * slab + g;

  for (int req = w.begin_req; req <= w.last_req; ++req) {
    Piece piece;
    if (!piece_of<kIsCausal, kBlockN>(params, w, req, piece)) continue;

    // Keys [0, lim[r]) that this lane's row r (row_lo + 8 r) sees.
    int lim[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int query = (w.m0 + row_lo + 8 * r) / w.group;
      lim[r] = visible_bound<kIsCausal>(piece.tok_end_piece, piece.s_k, params.s_q, query);
    }

    __syncthreads();  // every warp is done with the previous piece's shared memory

    auto stage_addr = [&](int tile) -> uint32_t {
      return smem_base + static_cast<uint32_t>(tile % kStages) * kTileBytes;
    };
    // One 16-token tile: one page (a tile never straddles two), 9 or 4.5 chunks per thread.
    auto issue_tile = [&](int tile) {
      const int tok0 = piece.tok_begin + tile * kBlockN;
      if (tile >= piece.num_tiles) return;
      const int page = params.block_table[static_cast<int64_t>(req) * params.block_table_stride +
                                          tok0 / kPageSize];
      const bool page_ok = page >= 0 && page < params.num_cache_blocks;
      const Storage* page_base =
          k_head + static_cast<int64_t>(page_ok ? page : 0) * params.k_block_stride;
      const uint32_t dst = stage_addr(tile);
#pragma unroll
      for (int j = 0; j < kTileChunksPerThread; ++j) {
        const int idx = tid + j * kThreads;
        if (kTileChunks % kThreads == 0 || idx < kTileChunks) {
          const int row = idx / kChunksPerRow;
          const int col = (idx % kChunksPerRow) * 8;
          const int tok = tok0 + row;
          const bool valid = page_ok && tok < piece.tok_end;
          const Storage* src =
              valid ? page_base + static_cast<int64_t>(tok % kPageSize) * params.k_token_stride + col
                    : k_base;
          cp_async_16_zfill(dst + swizzled_offset<kHeadDimQK>(row, col), src, valid);
        }
      }
    };

    // ---- Q block: 16 kSlabs rows x 72 chunks staged from stage 2 on while tiles 0 and 1
    // land in stages 0 and 1, then into registers ----
    copy_q_block<Storage, kBlockM, kThreads, 3>(smem_base + Cta::kQStageOffset, q_base, params,
                                                w, req, tid);
    cp_async_commit();
    issue_tile(0);
    cp_async_commit();
    issue_tile(1);
    cp_async_commit();
    cp_async_wait<2>();  // the Q group (tiles 0 and 1 may still be in flight)
    __syncthreads();     // the Q block is visible
    uint32_t q_frag[kKStepsPerWarp][4];
#pragma unroll
    for (int kk = 0; kk < kKStepsPerWarp; ++kk) {
      ldmatrix_x4(q_frag[kk], smem_base + Cta::kQStageOffset +
                                  swizzled_offset<kHeadDimQK>(a_row, dim0 + kk * 16 + a_col));
    }
    __syncthreads();  // every warp holds its Q fragments: the stages past tile 1 are free
    issue_tile(2);
    cp_async_commit();

    // This warp's S partial of one tile (slab rows x 16 tokens over its 9 k-steps), stored
    // to partial buffer `buf`.
    auto s_partial_to_smem = [&](int tile, int buf, float (&s_acc)[2][4]) {
      qreg::s_partial<Elem, kHeadDimQK>(s_acc, q_frag, stage_addr(tile), k_row, k_col,
                                        [&](int kk) { return dim0 + kk * 16; });
      qreg::store_partial<kNumWarps>(s_partial, s_acc, buf, warp, lane);
    };

    float o_acc[kNTilesO][4];
#pragma unroll
    for (int n = 0; n < kNTilesO; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.f;
    // Online softmax state of this lane's two rows: running max (raw score units, the same
    // in the four lanes of a quad) and this lane's part of the running sum.
    float row_max[2] = {kNegInf, kNegInf};
    float row_sum[2] = {0.f, 0.f};

    // Prologue: tile 0's S partial (groups after Q: tiles 0, 1, 2; tile 0 must be done).
    float s_own[2][4];  // this warp's partial of the tile whose partials are read next
    if (piece.num_tiles > 0) {
      cp_async_wait<2>();
      __syncthreads();  // tile 0 visible
      s_partial_to_smem(0, 0, s_own);
    }
    for (int i = 0; i < piece.num_tiles; ++i) {
      // Groups committed: tiles 0 .. i+2; tiles 0 .. i+1 must be done.
      cp_async_wait<1>();
      __syncthreads();  // B: tile i+1 and the partials of tile i visible; iteration i-1 done
      issue_tile(i + kStages - 1);  // into stage (i - 1) % 4, read last in iteration i-1
      cp_async_commit();

      // ---- the slab's S of tile i: partials of warps kg = 0..3 in that order (every
      // warp of the slab forms the same sums) ----
      // This warp's own partial comes from its registers (the same bits it stored).
      float sc[2][4];
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        float4 v = kg == 0 ? make_float4(s_own[n][0], s_own[n][1], s_own[n][2], s_own[n][3])
                           : s_partial[(((i & 1) * kNumWarps + slab) * 2 + n) * 32 + lane];
#pragma unroll
        for (int k = 1; k < Cta::kKGroups; ++k) {
          const float4 p =
              kg == k ? make_float4(s_own[n][0], s_own[n][1], s_own[n][2], s_own[n][3])
                      : s_partial[(((i & 1) * kNumWarps + k * kSlabs + slab) * 2 + n) * 32 + lane];
          v.x += p.x;
          v.y += p.y;
          v.z += p.z;
          v.w += p.w;
        }
        sc[n][0] = v.x;
        sc[n][1] = v.y;
        sc[n][2] = v.z;
        sc[n][3] = v.w;
      }
      // ---- tile i+1's S partial: its MMAs overlap this tile's softmax below ----
      if (i + 1 < piece.num_tiles) s_partial_to_smem(i + 1, (i + 1) & 1, s_own);

      const int tok0 = piece.tok_begin + i * kBlockN;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int tok = tok0 + n * 8 + 2 * t + (e & 1);
          if (tok >= lim[e >> 1]) sc[n][e] = kNegInf;
        }
      }
      float correction[2];
      qreg::softmax_step(sc, row_max, row_sum, correction, scale_log2);
      // P as the A fragment of P V (mma.cuh): a[0] row g tokens 2t.., a[1] row g+8 tokens
      // 2t.., a[2] row g tokens 8+2t.., a[3] row g+8 tokens 8+2t.. -- n-tile 0 then 1.
      uint32_t p_frag[4];
      qreg::pack_p<Elem>(p_frag, sc);

      // ---- O = O * rescale + P V over this warp's 128 columns ----
      qreg::rescale_o(o_acc, correction);
      const uint32_t tile_smem = stage_addr(i);
#pragma unroll
      for (int dp = 0; dp < kNTilesO / 2; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, tile_smem + swizzled_offset<kHeadDimQK>(v_row, col0 + dp * 16 + v_col));
        const uint32_t b_lo[2] = {b[0], b[1]};
        const uint32_t b_hi[2] = {b[2], b[3]};
        mma_m16n8k16<Elem>(o_acc[2 * dp], p_frag, b_lo);
        mma_m16n8k16<Elem>(o_acc[2 * dp + 1], p_frag, b_hi);
      }
    }
    cp_async_wait<0>();  // drain (the groups past the last tile are empty)

    // ---- epilogue: every lane of a quad holds the same row max; the sums are split ----
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row_lo + 8 * r;
      const float sum = quad_sum(row_sum[r]);
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      if (row >= w.valid_rows) continue;
      const RowPos pos = row_pos(w, row);
      if (kg == 0 && t == 0) store_lse(params, req, piece, pos, row_max[r], sum, scale_log2);
      store_row<Elem>(params, req, piece, pos, col0 + 2 * t, o_acc, r, inv);
    }
  }
}

template <typename Elem, bool kIsCausal, int kSlabs>
void launch(const DenseDecodeParams& params) {
  using Cta = QRegCta<kSlabs>;
  constexpr auto kernel = dense_decode_wide_kernel<Elem, kIsCausal, kSlabs>;
  opt_in_smem<kernel, Cta::kSmemBytes, /*kMaxCarveout=*/true>();
  const int64_t ctas =
      static_cast<int64_t>(params.num_parts) * params.h_k * params.num_m_blocks;
  kernel<<<static_cast<unsigned>(ctas), Cta::kThreads, Cta::kSmemBytes, params.stream>>>(params);
}

}  // namespace wide

}  // namespace flash_mla::portable::dense_decode
