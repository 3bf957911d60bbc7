// The wide CTA of the portable sparse MLA prefill: 8 warps, 64 heads of one query, 64-token
// tiles, for GPUs whose blocks may opt in to config.h's wide::Layout (about 226 KB: H100/H200,
// B200). Same instructions as kernel.cuh (mma.sync m16n8k16, ldmatrix, cp.async); same
// results contract. Why it exists and what it measured: docs/sparse_prefill.md. Its S,
// softmax and P V steps are common/wide_steps.cuh's, shared with the dense decode's 64-row
// CTA; the gather, the valid mask, the barriers and the epilogue are its own.
//
// Roles of warp w (g = lane / 4, t = lane % 4):
//   S = Q K^T: warps w and w ^ 1 compute rows [32 (r / 2), +32) x tokens [32 h, +32) of the
//     tile (r = w % 4, h = w / 4), each over half of the d_qk dims, and add their partial sums
//     through the P buffer (wide_steps.cuh s_tile); w ends with rows [16 r, +16) x tokens
//     [32 h, +32) over all dims. Warps w and w ^ 4 share rows.
//   softmax: each S warp for its 16 rows x 32 tokens. The two warps of a row slab exchange
//     their tile maxima through shared memory (at a __syncthreads), so both hold the
//     same running max and rescale factor; each keeps its own running sum (its tokens'), the
//     two are added once in the epilogue. The h = 0 warp publishes the rescale factors.
//   O += P V: warp w owns output columns [64 w, 64 w + 64) for all 64 rows (4 slabs x 8
//     n-tiles x 4 fp32 = 128 accumulators), reading P [64][64] and V from shared memory.
//   gather: warp w copies tile rows [8 w, 8 w + 8); its lanes 0..7 hold their row's kv index
//     (loaded one tile ahead and range-checked when used, so the load's latency hides under
//     a tile of math) and the warp publishes a valid byte per stage.
//
// Shared memory (wide::Layout; 16-bit rows XOR-swizzled in 16-byte chunks): Q [64][d] | 2
//   KV stages [64][d] | P [64][64] | per-half row maxima [2][64] | per-half row sums [2][64]
//   | rescale [64] | output scale [64] | valid bytes [2][8].
//
// Barrier / cp.async protocol per work item (T tiles):
//   __syncthreads (the previous item's readers are done); Q and tile 0 -> commit.
//   iteration i: wait_group 0 (tile i landed, this thread's part); B1 __syncthreads (tile i
//     and its valid bytes visible; every warp finished iteration i - 1, so stage (i + 1) % 2,
//     its valid bytes, P, the rescale factors and the half maxima are free); issue tile
//     i + 1 -> commit; S (two 64-thread barriers of warps w and w ^ 1 around the exchange of
//     partial sums in P); store the half maxima; B2 __syncthreads (every exchange read);
//     softmax, P and (h = 0) the rescale factors; B3 __syncthreads; O *= rescale, O += P V.
//   epilogue: the half sums; __syncthreads; the h = 0 warps write max_logits and lse and the
//     output scale; __syncthreads; every warp writes its columns of out.
#pragma once

#include <cstdint>
#include <limits>

#include <cuda_runtime.h>

#include "../../common/cp_async.cuh"
#include "../../common/element.cuh"
#include "../../common/ldmatrix.cuh"
#include "../../common/math.cuh"
#include "../../common/mma.cuh"
#include "../../common/smem_opt_in.cuh"
#include "../../common/swizzle.cuh"
#include "../../common/tile_copy.cuh"
#include "../../common/wide_steps.cuh"
#include "config.h"
#include "epilogue.cuh"
#include "kernel.h"

namespace flash_mla::portable::sparse_prefill {

namespace ws = ::flash_mla::portable::wide_steps;
static_assert(wide::kThreads == ws::kThreads && wide::kBlockM == ws::kBlockM &&
                  wide::kBlockN == ws::kBlockN && wide::kSlabsO == ws::kSlabsO &&
                  wide::kColsPerWarp == ws::kColsPerWarp,
              "the wide CTA and wide_steps.cuh must agree on the tile");

template <int kDimQK>
__global__ void __launch_bounds__(wide::kThreads, 1)
    sparse_prefill_wide_kernel(const __grid_constant__ SparsePrefillParams params) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 900 || __CUDA_ARCH__ >= 1200)
  // sm_80 .. sm_89 and sm_120 / sm_121 cannot give a block wide::Layout's shared memory; the
  // entry never launches this CTA there (cta_for reads the device's opt-in limit). A launch
  // would be a bug: trap, and the code below is not emitted.
  __trap();
#else
  using L = wide::Layout<kDimQK>;
  using Elem = BF16;
  using Storage = typename Elem::Storage;
  constexpr int kChunksPerRow = kDimQK / 8;
  constexpr int kRowBytes = kDimQK * kElemBytes;
  // A gathered row's chunks past its last multiple of 32 (8 at d_qk 576), copied two per lane.
  constexpr int kTailChunks = kChunksPerRow % 32;
  constexpr int kTailChunksPerLane = wide::kRowsPerCopyWarp * kTailChunks / 32;
  static_assert(wide::kRowsPerCopyWarp * kTailChunks % 32 == 0, "whole tail chunks per lane");
  static_assert(wide::kRowsPerCopyWarp == 8, "a copy warp's valid mask is one byte");

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = cvta_shared(smem);
  const uint32_t q_smem = smem_base;
  const uint32_t p_smem = smem_base + L::kPOffset;
  float* half_max_smem = reinterpret_cast<float*>(smem + L::kHalfMaxOffset);
  float* half_sum_smem = reinterpret_cast<float*>(smem + L::kHalfSumOffset);
  float* rescale_smem = reinterpret_cast<float*>(smem + L::kRescaleOffset);
  float* out_scale_smem = reinterpret_cast<float*>(smem + L::kOutScaleOffset);
  uint8_t* valid_smem = smem + L::kValidOffset;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int slab = warp % 4;  // S rows [16 slab, 16 slab + 16)
  const int half = warp / 4;  // S tokens [32 half, 32 half + 32) of the tile

  const Storage* q_base = static_cast<const Storage*>(params.q);
  const Storage* kv_base = static_cast<const Storage*>(params.kv);
  const float scale_log2 = params.softmax_scale_log2;  // > 0 (validated)
  const int64_t num_items = static_cast<int64_t>(params.s_q) * params.num_head_blocks;

  const ws::Coords coords = ws::coords_of(lane);  // ldmatrix coordinates

  for (int64_t item = blockIdx.x; item < num_items; item += params.num_ctas) {
    const int query = static_cast<int>(item / params.num_head_blocks);
    const int hb = static_cast<int>(item % params.num_head_blocks);
    const int head0 = hb * wide::kBlockM;
    const int valid_rows = min(wide::kBlockM, params.h_q - head0);
    int limit = params.topk;
    if (params.topk_length != nullptr) limit = min(max(params.topk_length[query], 0), limit);
    const int num_tiles = (limit + wide::kBlockN - 1) / wide::kBlockN;
    const int32_t* idx_row = params.indices + static_cast<int64_t>(query) * params.indices_row_stride;

    // The raw index of this lane's tile row (lanes 0..7: row 8 warp + lane) of `tile`, or -1
    // past the limit (nothing there is read). Range checks wait for issue_tile: the value is
    // loaded a tile ahead and a check here would stall on the load at once.
    auto load_index = [&](int tile) -> int {
      const int pos = tile * wide::kBlockN + warp * wide::kRowsPerCopyWarp + (lane & 7);
      const bool inside = lane < wide::kRowsPerCopyWarp && tile < num_tiles && pos < limit;
      return inside ? __ldg(idx_row + pos) : -1;
    };
    auto stage_addr = [&](int tile) -> uint32_t {
      return smem_base + L::kStagesOffset +
             static_cast<uint32_t>(tile % wide::kStages) * L::kTileBytes;
    };
    // This warp's 8 rows of `tile` (raw: load_index's value in lanes 0..7). Row by row, the
    // lane's chunks lane + 32 k below the row's last multiple of 32 (one shuffle and one row
    // address per row); then the rows' remaining chunks (d_qk 576: chunks 64..71 of each of
    // the 8 rows, two per lane), so no lane idles in a divergent tail. Chunk c of tile row
    // 8 warp + row sits at c ^ row (swizzle.cuh).
    auto issue_tile = [&](int tile, int raw) {
      if (tile >= num_tiles) return;  // uniform over the CTA
      const int kv_row = raw >= 0 && raw < params.s_kv ? raw : -1;
      const uint32_t mask = __ballot_sync(0xffffffffu, kv_row >= 0) & 0xffu;
      if (lane == 0) valid_smem[(tile % wide::kStages) * wide::kNumWarps + warp] = mask;
      const uint32_t dst_warp = stage_addr(tile) + warp * wide::kRowsPerCopyWarp * kRowBytes;
      // An invalid row copies nothing (src-size 0); its address is kv's first row (never read).
      auto row_src = [&](int src_row) -> const Storage* {
        return kv_base + (src_row >= 0 ? static_cast<int64_t>(src_row) * params.kv_row_stride : 0);
      };
#pragma unroll 2
      for (int row = 0; row < wide::kRowsPerCopyWarp; ++row) {
        const int src_row = __shfl_sync(0xffffffffu, kv_row, row);
        const Storage* src = row_src(src_row) + lane * 8;
        // (lane + 32 k) ^ row = (lane ^ row) + 32 k: row < 8 flips only the low 3 bits.
        const uint32_t dst = dst_warp + row * kRowBytes + static_cast<uint32_t>((lane ^ row) * 16);
#pragma unroll
        for (int k = 0; k < kChunksPerRow / 32; ++k) {
          cp_async_16_zfill(dst + 512 * k, src + 256 * k, src_row >= 0);
        }
      }
      if constexpr (kTailChunks > 0) {
#pragma unroll
        for (int k = 0; k < kTailChunksPerLane; ++k) {
          const int at = lane + 32 * k;  // over (row, tail chunk), row-major
          const int row = at / kTailChunks;
          const int chunk = kChunksPerRow - kTailChunks + at % kTailChunks;
          const int src_row = __shfl_sync(0xffffffffu, kv_row, row);
          cp_async_16_zfill(dst_warp + row * kRowBytes + static_cast<uint32_t>((chunk ^ row) * 16),
                            row_src(src_row) + chunk * 8, src_row >= 0);
        }
      }
    };

    __syncthreads();  // every warp is done with the previous item's shared memory

    load_tile_async<wide::kBlockM, kDimQK, wide::kThreads>(
        q_smem, q_base + static_cast<int64_t>(query) * params.q_row_stride,
        params.q_head_stride, head0, valid_rows, tid);
    issue_tile(0, load_index(0));
    cp_async_commit();
    int next_index = load_index(1);

    // Softmax state of this lane's S rows 16 slab + g (0) and + 8 (1): the running max (raw
    // score units, the same in both warps of the slab) and this warp's tokens' running sum.
    float row_max[2] = {ws::kNegInf, ws::kNegInf};
    float row_sum[2] = {0.f, 0.f};
    float o_acc[wide::kSlabsO][wide::kColsPerWarp / 8][4];
    ws::zero_o(o_acc);

    for (int i = 0; i < num_tiles; ++i) {
      cp_async_wait<0>();
      __syncthreads();  // B1
      issue_tile(i + 1, next_index);
      cp_async_commit();
      next_index = load_index(i + 2);
      const uint32_t tile_smem = stage_addr(i);

      // ---- S for rows [16 slab, +16) x tokens [32 half, +32), all dims (P: the exchange) ----
      float s_acc[4][4];
      ws::s_tile<Elem, kDimQK>(s_acc, q_smem, tile_smem,
                               reinterpret_cast<float*>(smem + L::kPOffset), slab, half, lane,
                               coords);

      // ---- mask (invalid keys), then the softmax step (its __syncthreads is B2) ----
      const uint32_t valid = *reinterpret_cast<const uint32_t*>(
          valid_smem + (i % wide::kStages) * wide::kNumWarps + 4 * half);  // 32 tokens' bits
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
    if (half == 0 && t == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = 16 * slab + g + 8 * r;
        const float sum = ws::row_total(half_sum_smem, row);
        float out_scale = 0.f;
        if (row < valid_rows) out_scale = finish_row(params, query, head0 + row, row_max[r], sum);
        out_scale_smem[row] = out_scale;
      }
    }
    __syncthreads();

    store_out_rows(params, o_acc, query, head0, valid_rows, out_scale_smem,
                   warp * wide::kColsPerWarp, lane);
  }
#endif
}

template <int kDimQK>
void run_sparse_prefill_wide(const SparsePrefillParams& params) {
  constexpr auto kKernel = sparse_prefill_wide_kernel<kDimQK>;
  constexpr int kSmemBytes = wide::Layout<kDimQK>::kSmemBytes;
  opt_in_smem<kKernel, kSmemBytes, /*kMaxCarveout=*/true>();
  kKernel<<<static_cast<unsigned>(params.num_ctas), wide::kThreads, kSmemBytes, params.stream>>>(
      params);
}

}  // namespace flash_mla::portable::sparse_prefill
