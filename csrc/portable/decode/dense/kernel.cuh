// Portable dense MLA decode: mma.sync m16n8k16 + ldmatrix + cp.async only, so the same
// source runs on sm_80 .. sm_90 and sm_120/121. Design and arithmetic: docs/dense_decode.md.
// This 4-warp CTA serves blocks of 32 rows per kv head; kernel_wide.cuh's CTAs hold Q in
// registers (the narrow one for up to 16 rows; config.h choose_cta decides;
// run_dense_decode below dispatches). Its
// per-tile steps are csrc/portable/common/mla_row_block.cuh's (shared with sparse prefill).
//
// Work split. blockIdx.x = (part * h_k + kv_head) * num_m_blocks + m_block. The CTA serves
// rows [32 m_block, 32 m_block + 32) of the s_q * group rows of kv head `kv_head` (row r:
// query r / group, query head kv_head * group + r % group; group = h_q / h_k) for every
// piece of its schedule part (csrc/portable/decode/schedule): a run of 64-token blocks of
// one request. Warp w computes S for all 32 rows over dims [144w, 144w + 144) and owns
// output columns [128w, 128w + 128) (O: 2 slabs x 16 n-tiles x 4 fp32 per lane); warp 0
// also runs the online softmax (its lanes hold rows 16s + g and 16s + g + 8, g = lane / 4,
// of both slabs s), with running max / sum in shared memory (registers would be held by
// every thread of the CTA; the sm_120 build spilled with them).
//
// Global memory. q rows (576 elements, 16-byte aligned, any strides that are multiples of 8
// elements) and cache rows are read with 16-byte cp.async; a token's page id is read from
// block_table only for tokens below cache_seqlens, and a page id outside [0,
// num_cache_blocks) is never dereferenced (its rows read as zeros). Rows past the piece's
// end are zero-filled without a read. A piece of a request with one split writes out
// (q dtype, rounded to nearest) and lse (natural log) directly; otherwise it writes its
// normalised fp32 partial to o_accum[split] and its log2 lse to lse_accum[split] (the
// combine merges them). No atomics, fixed reduction order: bit-identical reruns.
//
// Shared memory (config.h has the offsets; 16-bit rows XOR-swizzled in 16-byte chunks,
// swizzle.cuh):
//   [0, 36864)          Q block [32][576]
//   [36864, +3*18432)   KV stage ring, tile i in stage i % 3: [16 tokens][576]
//   [92160, +6144)      S partial sums of warps 1..3: [warp-1][slab][n-tile][lane] float4
//   [98304, +1024)      P [32][16] in the input dtype (chunk ^= (row >> 2) & 1)
//   [99328, +128)       per-row rescale factor of the current tile, fp32
//   [99456, +128)       per-row 1 / sum for the epilogue, fp32
//   [99584, +384)       warp 0's softmax state: per row the visible-key bound and the running
//                       max, per (row, quad lane) the partial running sum
//
// Barrier / cp.async protocol per piece (T tiles of 16 tokens):
//   __syncthreads (the previous piece's readers are done); cp.async Q and tile 0 ->
//   commit; tile 1 -> commit.
//   iteration i: wait_group 1 (tile i landed, this thread's part); B1 __syncthreads (tile
//     i visible; every warp finished iteration i-1, so stage (i+2) % 3, the S partials, P
//     and the rescale factors are free); cp.async tile i+2 -> commit (an empty group past
//     the end keeps the count); S partial sums; warps 1..3 store theirs; B2 __syncthreads;
//     warp 0: add the partials (warp order 1, 2, 3), mask, online softmax, P and rescale
//     factors to shared memory; B3 __syncthreads; every warp: rescale O, O += P V.
//   epilogue: wait_group 0; warp 0 publishes 1 / sum and writes lse; __syncthreads; every
//     warp writes its columns.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include <cuda_runtime.h>

#include "../../../params.h"
#include "../../common/cp_async.cuh"
#include "../../common/element.cuh"
#include "../../common/ldmatrix.cuh"
#include "../../common/math.cuh"
#include "../../common/mla_row_block.cuh"
#include "../../common/mma.cuh"
#include "../../common/smem_opt_in.cuh"
#include "../../common/swizzle.cuh"
#include "config.h"
#include "piece.cuh"
#include "kernel.h"
#include "kernel_64rows.cuh"
#include "kernel_wide.cuh"

namespace flash_mla::portable::dense_decode {

// The kernel takes the params struct by value: its layout must be the same for the host
// compiler (MSVC or gcc) and the device pass.
static_assert(sizeof(DenseDecodeParams) == 216, "DenseDecodeParams layout changed");

namespace rb = ::flash_mla::portable::mla_row_block;

// The per-tile steps (S partials, their reduction, the softmax step, rescale + P V) are
// mla_row_block.cuh's, shared with the sparse prefill kernel; tile and shared-memory pieces
// must agree.
static_assert(rb::kThreads == kThreads && rb::kSlabs == kSlabs && rb::kBlockM == kBlockM &&
                  rb::kBlockN == kBlockN && rb::kHeadDimV == kHeadDimV &&
                  rb::kNTilesO == kNTilesO && rb::kSPartialBytes == kSPartialBytes &&
                  rb::kPBytes == kPBytes &&
                  rb::Dims<kHeadDimQK>::kKStepsPerWarp == kKStepsPerWarp,
              "the row-block steps and this kernel must agree on the tile");

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kChunksPerRow = kHeadDimQK / 8;  // 16-byte chunks per 576-element row

template <typename Elem, bool kIsCausal>
__global__ void __launch_bounds__(kThreads, 1)
    dense_decode_kernel(const __grid_constant__ DenseDecodeParams params) {
  using Storage = typename Elem::Storage;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = cvta_shared(smem);
  const uint32_t q_smem = smem_base;
  float4* s_partial = reinterpret_cast<float4*>(smem + kSPartialOffset);
  float* rescale_smem = reinterpret_cast<float*>(smem + kRescaleOffset);
  float* inv_sum_smem = reinterpret_cast<float*>(smem + kInvSumOffset);
  int* row_limit_smem = reinterpret_cast<int*>(smem + kRowLimitOffset);
  float* row_max_smem = reinterpret_cast<float*>(smem + kRowMaxOffset);
  float* row_sum_smem = reinterpret_cast<float*>(smem + kRowSumOffset);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;

  Work w;
  if (!work_of<kBlockM>(params, w)) return;  // empty part
  const float scale_log2 = params.softmax_scale_log2;  // > 0 (validated)
  const Storage* q_base = static_cast<const Storage*>(params.q);
  const Storage* k_base = static_cast<const Storage*>(params.k_cache);
  const Storage* k_head = k_base + static_cast<int64_t>(w.kv_head) * params.k_head_stride;

  // Per-lane ldmatrix coordinates (mla_row_block.cuh), computed once for the whole CTA.
  const rb::SCoords s_coords{lane & 15, (lane >> 4) * 8, (lane & 7) + ((lane >> 4) & 1) * 8,
                             ((lane >> 3) & 1) * 8};
  const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int v_col = (lane >> 4) * 8;

  for (int req = w.begin_req; req <= w.last_req; ++req) {
    Piece piece;
    if (!piece_of<kIsCausal, kBlockN>(params, w, req, piece)) continue;

    __syncthreads();  // every warp is done with the previous piece's shared memory

    // Warp 0's softmax state: row `lane` sees keys [0, limit); max -inf, sums 0.
    if (warp == 0) {
      const int bound = visible_bound<kIsCausal>(piece.tok_end_piece, piece.s_k, params.s_q,
                                                 (w.m0 + lane) / w.group);
      row_limit_smem[lane] = bound;
      row_max_smem[lane] = kNegInf;
#pragma unroll
      for (int k = 0; k < 4; ++k) row_sum_smem[lane * 4 + k] = 0.f;
      __syncwarp();
    }

    // ---- Q block: 32 rows x 72 chunks, gathered per row (row -> query, head) ----
    copy_q_block<Storage, kBlockM, kThreads, 2>(q_smem, q_base, params, w, req, tid);
    auto stage_addr = [&](int tile) -> uint32_t {
      return smem_base + kStagesOffset + static_cast<uint32_t>(tile % kStages) * kTileBytes;
    };
    // One 16-token tile: one page (a tile never straddles two), 9 chunks per thread.
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
      for (int j = 0; j < kBlockN * kChunksPerRow / kThreads; ++j) {
        const int idx = tid + j * kThreads;
        const int row = idx / kChunksPerRow;
        const int col = (idx % kChunksPerRow) * 8;
        const int tok = tok0 + row;
        const bool valid = page_ok && tok < piece.tok_end;
        const Storage* src =
            valid ? page_base + static_cast<int64_t>(tok % kPageSize) * params.k_token_stride + col
                  : k_base;
        cp_async_16_zfill(dst + swizzled_offset<kHeadDimQK>(row, col), src, valid);
      }
    };
    issue_tile(0);
    cp_async_commit();
    issue_tile(1);
    cp_async_commit();

    float o_acc[kSlabs][kNTilesO][4];
    rb::zero_o(o_acc);

    for (int i = 0; i < piece.num_tiles; ++i) {
      cp_async_wait<1>();
      __syncthreads();  // B1
      issue_tile(i + 2);
      cp_async_commit();
      const uint32_t tile_smem = stage_addr(i);

      float s_acc[kSlabs][2][4];
      rb::s_partial<Elem, kHeadDimQK, kSlabs, /*kPrefetch=*/false>(s_acc, q_smem, tile_smem, warp,
                                                                  s_coords);
      if (warp > 0) rb::store_s_partial(s_partial, s_acc, warp, lane);
      __syncthreads();  // B2

      if (warp == 0) {
        const int tok0 = piece.tok_begin + i * kBlockN;
        // The softmax state is loaded here with the row limits, not by
        // rb::load_softmax_state: each reduced fragment is masked as soon as it is summed.
        float row_max[kSlabs][2], row_sum[kSlabs][2];
        int lim[kSlabs][2];
#pragma unroll
        for (int s = 0; s < kSlabs; ++s) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int row = 16 * s + g + 8 * r;
            row_max[s][r] = row_max_smem[row];
            row_sum[s][r] = row_sum_smem[row * 4 + t];
            lim[s][r] = row_limit_smem[row];
          }
        }
        __syncwarp();  // every lane has read the old maxima before any is replaced
#pragma unroll
        for (int s = 0; s < kSlabs; ++s) {
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            rb::add_s_partial(s_acc, s_partial, s, n, lane);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int tok = tok0 + n * 8 + 2 * t + (e & 1);
              if (tok >= lim[s][e >> 1]) s_acc[s][n][e] = kNegInf;
            }
          }
        }
        rb::softmax_update<Elem>(s_acc, row_max, row_sum, scale_log2, row_max_smem, row_sum_smem,
                                 rescale_smem, smem + kPOffset, g, t);
      }
      __syncthreads();  // B3

      rb::rescale_o(o_acc, rescale_smem, lane);
      uint32_t p_frag[kSlabs][4];
      rb::load_p(p_frag, smem_base + kPOffset, lane);
      rb::pv<Elem, kHeadDimQK>(o_acc, p_frag, tile_smem, warp, v_row, v_col);
    }
    cp_async_wait<0>();  // drain (the groups past the last tile are empty)

    // ---- epilogue ----
    if (warp == 0) {
      __syncwarp();  // the last tile's state stores (or the initial ones) are visible
#pragma unroll
      for (int s = 0; s < kSlabs; ++s) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = 16 * s + g + 8 * r;
          const float sum = quad_sum(row_sum_smem[row * 4 + t]);
          const float row_max = row_max_smem[row];
          if (t == 0) {
            inv_sum_smem[row] = sum > 0.f ? 1.f / sum : 0.f;
            if (row < w.valid_rows) {
              store_lse(params, req, piece, row_pos(w, row), row_max, sum, scale_log2);
            }
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
        if (row >= w.valid_rows) continue;
        const float inv = inv_sum_smem[row];
        store_row<Elem>(params, req, piece, row_pos(w, row), warp * kColsPerWarp + 2 * t,
                        o_acc[s], r, inv);
      }
    }
  }
}

template <typename Elem, bool kIsCausal>
void launch_dense_decode(const DenseDecodeParams& params) {
  constexpr auto kernel = dense_decode_kernel<Elem, kIsCausal>;
  // The carveout asks for the largest shared-memory split, so two CTAs share an H100 SM.
  opt_in_smem<kernel, kSmemBytes, /*kMaxCarveout=*/true>();
  const int64_t ctas =
      static_cast<int64_t>(params.num_parts) * params.h_k * params.num_m_blocks;
  kernel<<<static_cast<unsigned>(ctas), kThreads, kSmemBytes, params.stream>>>(params);
}

template <DType kDType>
void run_dense_decode(const DenseDecodeParams& params, CtaShape cta) {
  using Elem = typename std::conditional<kDType == DType::kBF16, BF16, FP16>::type;
  if (cta == CtaShape::kWarps8Rows64) {
    if (params.is_causal) {
      rows64::launch<Elem, true>(params);
    } else {
      rows64::launch<Elem, false>(params);
    }
    return;
  }
  if (cta == CtaShape::kWarps8 || cta == CtaShape::kWarps4Rows16) {
    const bool narrow = cta == CtaShape::kWarps4Rows16;
    if (params.is_causal) {
      narrow ? wide::launch<Elem, true, 1>(params) : wide::launch<Elem, true, 2>(params);
    } else {
      narrow ? wide::launch<Elem, false, 1>(params) : wide::launch<Elem, false, 2>(params);
    }
    return;
  }
  if (params.is_causal) {
    launch_dense_decode<Elem, true>(params);
  } else {
    launch_dense_decode<Elem, false>(params);
  }
}

}  // namespace flash_mla::portable::dense_decode
