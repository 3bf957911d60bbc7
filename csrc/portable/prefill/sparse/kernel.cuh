// Portable sparse MLA prefill: mma.sync m16n8k16 + ldmatrix + cp.async only, so the same
// source runs on sm_80 .. sm_90 and sm_120/121. Design and arithmetic: docs/sparse_prefill.md.
//
// Work split. Work item x = query * num_head_blocks + hb: the rows of the CTA are the heads
// [32 hb, 32 hb + 32) of one query (h_k = 1; heads past h_q are zero rows that are never
// written), its keys are the kv rows that query's indices name, 16 per tile. CTA x serves
// items x, x + gridDim.x, ... (s_q has no grid limit). The per-tile math is
// csrc/portable/common/mla_row_block.cuh: warp w computes S over dims [w d/4, (w+1) d/4),
// warp 0 reduces and runs the online softmax in base 2, warp w owns output columns
// [128w, 128w + 128).
//
// Global memory. Per tile, lane j (j < 16) of every warp reads index j of the tile (only
// positions below the query's limit: min(topk_length, topk)); an index outside [0, s_kv)
// becomes -1, and the copying threads take their row's index from that lane with a
// shuffle. An invalid row is zero-filled by cp.async without a read, and its scores are
// set to -inf from the tile's valid mask (warp 0 writes it to shared memory when it issues
// the tile). q and kv rows are read with 16-byte cp.async (strides multiples of 8 elements,
// 16-byte aligned bases: checked by the API).
//
// Shared memory (config.h, Layout<d>; 16-bit rows XOR-swizzled in 16-byte chunks):
//   Q block [32][d] | KV stage ring, tile i in stage i % 3: [16][d] | S partials of warps
//   1..3 | P [32][16] bf16 | per-row rescale | per-row output scale (epilogue) | warp 0's
//   softmax state (row max, per (row, quad lane) sums) | valid masks of the 3 stages.
//
// Barrier / cp.async protocol per work item (T tiles):
//   __syncthreads (the previous item's readers are done); warp 0 resets the softmax state;
//   cp.async Q and tile 0 -> commit; tile 1 -> commit.
//   iteration i: wait_group 1 (tile i landed, this thread's part); B1 __syncthreads (tile
//     i and its valid mask visible; every warp finished iteration i-1, so stage (i+2) % 3,
//     its mask, the S partials, P and the rescale factors are free); issue tile i+2 ->
//     commit (an empty group past the end keeps the count); S partial sums; warps 1..3
//     store theirs; B2 __syncthreads; warp 0: add the partials, mask, softmax step; B3
//     __syncthreads; every warp: rescale O, O += P V.
//   epilogue: wait_group 0; warp 0 writes max_logits and lse and publishes each row's
//     output scale (1 / sum, times the sink factor); __syncthreads; every warp writes its
//     columns of out.
#pragma once

#include <cstdint>
#include <limits>

#include <cuda_runtime.h>

#include "../../common/cp_async.cuh"
#include "../../common/element.cuh"
#include "../../common/ldmatrix.cuh"
#include "../../common/math.cuh"
#include "../../common/mla_row_block.cuh"
#include "../../common/swizzle.cuh"
#include "../../common/tile_copy.cuh"
#include "config.h"
#include "epilogue.cuh"
#include "kernel.h"

namespace flash_mla::portable::sparse_prefill {

namespace rb = ::flash_mla::portable::mla_row_block;

static_assert(rb::kThreads == kThreads && rb::kBlockM == kBlockM && rb::kBlockN == kBlockN &&
                  rb::kHeadDimV == kHeadDimV,
              "the row-block steps and this kernel must agree on the tile");

template <int kDimQK>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_prefill_kernel(const __grid_constant__ SparsePrefillParams params) {
  using L = Layout<kDimQK>;
  using Elem = BF16;
  using Storage = typename Elem::Storage;
  constexpr int kChunksPerRow = kDimQK / 8;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = cvta_shared(smem);
  const uint32_t q_smem = smem_base;
  float4* s_partials = reinterpret_cast<float4*>(smem + L::kSPartialOffset);
  float* rescale_smem = reinterpret_cast<float*>(smem + L::kRescaleOffset);
  float* out_scale_smem = reinterpret_cast<float*>(smem + L::kOutScaleOffset);
  float* row_max_smem = reinterpret_cast<float*>(smem + L::kRowMaxOffset);
  float* row_sum_smem = reinterpret_cast<float*>(smem + L::kRowSumOffset);
  uint32_t* valid_smem = reinterpret_cast<uint32_t*>(smem + L::kValidOffset);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;

  const Storage* q_base = static_cast<const Storage*>(params.q);
  const Storage* kv_base = static_cast<const Storage*>(params.kv);
  const float scale_log2 = params.softmax_scale_log2;  // > 0 (validated)
  const int64_t num_items = static_cast<int64_t>(params.s_q) * params.num_head_blocks;

  for (int64_t item = blockIdx.x; item < num_items; item += params.num_ctas) {
    const int query = static_cast<int>(item / params.num_head_blocks);
    const int hb = static_cast<int>(item % params.num_head_blocks);
    const int head0 = hb * kBlockM;
    const int valid_rows = min(kBlockM, params.h_q - head0);
    int limit = params.topk;
    if (params.topk_length != nullptr) limit = min(max(params.topk_length[query], 0), limit);
    const int num_tiles = (limit + kBlockN - 1) / kBlockN;
    const int32_t* idx_row = params.indices + static_cast<int64_t>(query) * params.indices_row_stride;

    __syncthreads();  // every warp is done with the previous item's shared memory

    if (warp == 0) {
      row_max_smem[lane] = rb::kNegInf;
#pragma unroll
      for (int k = 0; k < 4; ++k) row_sum_smem[lane * 4 + k] = 0.f;
    }

    // Q block: heads [head0, head0 + valid_rows) of this query; the other rows are zeros.
    load_tile_async<kBlockM, kDimQK, kThreads>(
        q_smem, q_base + static_cast<int64_t>(query) * params.q_row_stride,
        params.q_head_stride, head0, valid_rows, tid);

    auto stage_addr = [&](int tile) -> uint32_t {
      return smem_base + L::kStagesOffset + static_cast<uint32_t>(tile % kStages) * L::kTileBytes;
    };
    // One 16-token tile gathered by index; kChunksPerRow / 8 chunks per thread.
    auto issue_tile = [&](int tile) {
      if (tile >= num_tiles) return;  // uniform over the CTA
      const int pos = tile * kBlockN + (lane & 15);
      int kv_row = -1;
      if (pos < limit) {
        const int v = idx_row[pos];
        if (v >= 0 && v < params.s_kv) kv_row = v;
      }
      if (warp == 0) {
        const uint32_t mask = __ballot_sync(0xffffffffu, kv_row >= 0) & 0xffffu;
        if (lane == 0) valid_smem[tile % kStages] = mask;
      }
      const uint32_t dst = stage_addr(tile);
#pragma unroll
      for (int j = 0; j < kBlockN * kChunksPerRow / kThreads; ++j) {
        const int idx = tid + j * kThreads;
        const int row = idx / kChunksPerRow;
        const int col = (idx % kChunksPerRow) * 8;
        const int src_row = __shfl_sync(0xffffffffu, kv_row, row);
        const bool valid = src_row >= 0;
        const Storage* src =
            valid ? kv_base + static_cast<int64_t>(src_row) * params.kv_row_stride + col : kv_base;
        cp_async_16_zfill(dst + swizzled_offset<kDimQK>(row, col), src, valid);
      }
    };
    issue_tile(0);
    cp_async_commit();
    issue_tile(1);
    cp_async_commit();

    float o_acc[rb::kSlabs][rb::kNTilesO][4];
    rb::zero_o(o_acc);

    for (int i = 0; i < num_tiles; ++i) {
      cp_async_wait<1>();
      __syncthreads();  // B1
      issue_tile(i + 2);
      cp_async_commit();
      const uint32_t tile_smem = stage_addr(i);

      float s_acc[rb::kSlabs][2][4];
      rb::s_partial<Elem, kDimQK>(s_acc, q_smem, tile_smem, warp, lane);
      if (warp > 0) rb::store_s_partial(s_partials, s_acc, warp, lane);
      __syncthreads();  // B2

      if (warp == 0) {
        rb::add_s_partials(s_acc, s_partials, lane);
        const uint32_t mask = valid_smem[i % kStages];
        rb::mask_invalid_tokens<rb::kSlabs>(s_acc, mask, t);
        rb::softmax_step<Elem>(s_acc, scale_log2, row_max_smem, row_sum_smem, rescale_smem,
                               smem + L::kPOffset, lane);
      }
      __syncthreads();  // B3

      rb::rescale_and_pv<Elem, kDimQK>(o_acc, rescale_smem, smem_base + L::kPOffset, tile_smem,
                                       warp, lane);
    }
    cp_async_wait<0>();  // drain (the groups past the last tile are empty)

    // ---- epilogue ----
    if (warp == 0) {
      __syncwarp();  // the last tile's state stores (or the initial ones) are visible
#pragma unroll
      for (int s = 0; s < rb::kSlabs; ++s) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = 16 * s + g + 8 * r;
          const float sum = quad_sum(row_sum_smem[row * 4 + t]);
          const float row_max = row_max_smem[row];
          if (t == 0) {
            float out_scale = 0.f;
            if (row < valid_rows) out_scale = finish_row(params, query, head0 + row, row_max, sum);
            out_scale_smem[row] = out_scale;
          }
        }
      }
    }
    __syncthreads();

    store_out_rows(params, o_acc, query, head0, valid_rows, out_scale_smem,
                   warp * rb::kColsPerWarp, lane);
  }
}

template <int kDimQK>
void run_sparse_prefill(const SparsePrefillParams& params) {
  auto kernel = sparse_prefill_kernel<kDimQK>;
  constexpr int kSmemBytes = Layout<kDimQK>::kSmemBytes;
  // Per launch, not cached: the attributes belong to the current device.
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                       cudaSharedmemCarveoutMaxShared);
  kernel<<<static_cast<unsigned>(params.num_ctas), kThreads, kSmemBytes, params.stream>>>(params);
}

}  // namespace flash_mla::portable::sparse_prefill
