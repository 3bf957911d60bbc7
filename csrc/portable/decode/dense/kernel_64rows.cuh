// The 64-row CTA of the portable dense MLA decode: 8 warps, 64 rows of one kv head, one
// 64-token page per tile, for GPUs whose blocks may opt in to config.h's rows64::kSmemBytes
// (H100/H200, B200), where it takes more than 32 rows per kv head (config.h choose_cta;
// FLASH_MLA_DENSE_DECODE_WARPS=8x64 forces it). The sparse prefill's wide CTA
// (csrc/portable/prefill/sparse/kernel_wide.cuh) applied to paged dense keys: same roles,
// same instructions; the work split, pieces, causal bounds and split-KV outputs are the
// 4-warp kernel's (kernel.cuh). Design: docs/dense_decode.md.
//
// Roles of warp w (g = lane / 4, t = lane % 4):
//   S: rows [16 slab, +16) (slab = w % 4) x tokens [32 half, +32) (half = w / 4) of the
//     tile, all 576 dims. Masked per row: a token at or past the row's visible bound.
//   softmax: each S warp for its rows and tokens; the two warps of a slab exchange tile
//     maxima at a 64-thread named barrier (both then hold the same running max); each keeps
//     its tokens' running sum, the two are added in the epilogue.
//   O += P V: warp w owns columns [64 w, 64 w + 64) for all 64 rows (128 fp32).
//   copy: warp w copies tokens [8 w, 8 w + 8) of the tile's page, row by row.
//
// Barrier / cp.async protocol per piece (T tiles): __syncthreads; Q and tile 0 -> commit.
//   iteration i: wait_group 0; B1 __syncthreads (tile i visible; stage (i + 1) % 2, P, the
//   rescale factors and the half maxima free); issue tile i + 1 -> commit; S; half maxima;
//   B2 (pair barrier); softmax, P, rescale factors (half 0); B3 __syncthreads; O *= rescale,
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
#include "../schedule/config.h"
#include "config.h"

namespace flash_mla::portable::dense_decode::rows64 {

namespace sched = ::flash_mla::portable::decode_schedule;

constexpr float kNegInfR = -std::numeric_limits<float>::infinity();
constexpr float kLn2R = 0.69314718055994530942f;

// P [64 rows][64 tokens]: chunk c of row r at c ^ (r % 8) (conflict-free ldmatrix and stores).
__device__ __forceinline__ uint32_t p_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) * 16));
}

// Rendezvous of the two S warps of row slab r (64 threads); barrier 0 is __syncthreads.
__device__ __forceinline__ void pair_barrier(int r) {
  asm volatile("bar.sync %0, 64;\n" ::"r"(1 + r) : "memory");
}

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
  constexpr int kKSteps = kHeadDimQK / 16;       // 36
  constexpr int kTailChunks = kChunksPerRow % 32;  // 8: copied two per lane
  static_assert(kRowsPerCopyWarp * kTailChunks == 64, "two tail chunks per lane");
  static_assert(kKSteps % 4 == 0, "k-steps come in groups of 4 (one 128-byte swizzle span)");

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

  const int m_block = static_cast<int>(blockIdx.x % params.num_m_blocks);
  const int rest = static_cast<int>(blockIdx.x / params.num_m_blocks);
  const int kv_head = rest % params.h_k;
  const int part = rest / params.h_k;

  const int32_t* meta = params.metadata + static_cast<int64_t>(part) * sched::kMetaInts;
  const int begin_req = meta[sched::kBeginReq];
  const int begin_block = meta[sched::kBeginBlock];
  const int end_req = meta[sched::kEndReq];
  const int end_block = meta[sched::kEndBlock];
  const int first_split = meta[sched::kFirstSplit];
  if (begin_req < 0 || begin_req >= params.batch) return;  // empty part
  const int last_req = min(end_req, params.batch - 1);

  const int group = params.h_q / params.h_k;
  const int rows = params.s_q * group;
  const int m0 = m_block * kBlockM;
  const int valid_rows = min(kBlockM, rows - m0);
  const float scale_log2 = params.softmax_scale_log2;  // > 0 (validated)
  const Storage* q_base = static_cast<const Storage*>(params.q);
  const Storage* k_base = static_cast<const Storage*>(params.k_cache);
  const Storage* k_head = k_base + static_cast<int64_t>(kv_head) * params.k_head_stride;

  const int a_row = lane & 15;
  const int a_col = (lane >> 4) * 8;
  const int k_row = (lane & 7) + ((lane >> 4) & 1) * 8;
  const int k_col = ((lane >> 3) & 1) * 8;
  const int v_row = lane & 15;
  const int v_col = (lane >> 4) * 8;

  for (int req = begin_req; req <= last_req; ++req) {
    const int s_k = max(params.seqlens[req], 0);
    const int n_blocks = static_cast<int>((static_cast<int64_t>(s_k) + kPageSize - 1) / kPageSize);
    const int lo = req == begin_req ? begin_block : 0;
    const int hi = min(req == end_req ? end_block : n_blocks, n_blocks);
    const int sched_hi = req == end_req ? end_block : n_blocks;
    if (lo >= sched_hi) continue;
    const int total_splits = params.num_splits_total;
    const int off_begin = min(max(params.split_offsets[req], 0), total_splits);
    const int off_end = min(max(params.split_offsets[req + 1], off_begin), total_splits);
    const bool direct = off_end - off_begin == 1;
    const int split = req == begin_req ? first_split : off_begin;
    if (!direct && (split < 0 || split >= total_splits)) continue;  // stale schedule

    const int tok_begin = lo * kPageSize;
    int tok_end = static_cast<int>(min(static_cast<int64_t>(max(hi, lo)) * kPageSize,
                                       static_cast<int64_t>(s_k)));
    const int tok_end_piece = tok_end;
    if (kIsCausal) {
      const int last_query = (m0 + valid_rows - 1) / group;
      tok_end = min(tok_end, s_k - params.s_q + last_query + 1);
    }
    const int num_tiles = tok_end > tok_begin ? (tok_end - tok_begin + kBlockN - 1) / kBlockN : 0;
    __syncthreads();  // every warp is done with the previous piece's shared memory

    // Row r sees keys [0, bound) of the request (causal: bottom-right aligned).
    if (tid < kBlockM) {
      const int query = (m0 + tid) / group;
      row_limit_smem[tid] =
          kIsCausal ? min(tok_end_piece, s_k - params.s_q + query + 1) : tok_end_piece;
    }

    // ---- Q block: 64 rows x 72 chunks, row r -> (query r / group, head kv_head group + r % group)
    {
      const Storage* q_req = q_base + static_cast<int64_t>(req) * params.q_batch_stride;
#pragma unroll 2
      for (int j = 0; j < kBlockM * kChunksPerRow / kThreads; ++j) {
        const int idx = tid + j * kThreads;
        const int row = idx / kChunksPerRow;
        const int col = (idx % kChunksPerRow) * 8;
        const bool valid = row < valid_rows;
        const Storage* src = q_base;
        if (valid) {
          const int r = m0 + row;
          const int head = kv_head * group + r % group;
          src = q_req + static_cast<int64_t>(r / group) * params.q_row_stride +
                static_cast<int64_t>(head) * params.q_head_stride + col;
        }
        cp_async_16_zfill(q_smem + swizzled_offset<kHeadDimQK>(row, col), src, valid);
      }
    }
    auto stage_addr = [&](int tile) -> uint32_t {
      return smem_base + kStagesOffset + static_cast<uint32_t>(tile % kStages) * kTileBytes;
    };
    // Tile `tile` = page lo + tile of the request: this warp's tokens [8 warp, 8 warp + 8),
    // row by row (tokens past tok_end, or a page id outside the cache, read as zeros).
    auto issue_tile = [&](int tile) {
      if (tile >= num_tiles) return;  // uniform over the CTA
      const int tok0 = tok_begin + tile * kBlockN;
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
        const bool valid = page_ok && tok0 + warp * kRowsPerCopyWarp + row < tok_end;
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
        const bool valid = page_ok && tok0 + warp * kRowsPerCopyWarp + row < tok_end;
        cp_async_16_zfill(dst_warp + row * kRowBytes + static_cast<uint32_t>((chunk ^ row) * 16),
                          valid ? row_src(row) + chunk * 8 : k_base, valid);
      }
    };
    issue_tile(0);
    cp_async_commit();

    float row_max[2] = {kNegInfR, kNegInfR};
    float row_sum[2] = {0.f, 0.f};
    float o_acc[kSlabsO][kColsPerWarp / 8][4];
#pragma unroll
    for (int s = 0; s < kSlabsO; ++s)
#pragma unroll
      for (int n = 0; n < kColsPerWarp / 8; ++n)
        o_acc[s][n][0] = o_acc[s][n][1] = o_acc[s][n][2] = o_acc[s][n][3] = 0.f;

    for (int i = 0; i < num_tiles; ++i) {
      cp_async_wait<0>();
      __syncthreads();  // B1
      issue_tile(i + 1);
      cp_async_commit();
      const uint32_t tile_smem = stage_addr(i);

      // ---- S: rows [16 slab, +16) x tokens [32 half, +32), all dims (kernel_wide.cuh's loop)
      float s_acc[4][4];
#pragma unroll
      for (int n = 0; n < 4; ++n) s_acc[n][0] = s_acc[n][1] = s_acc[n][2] = s_acc[n][3] = 0.f;
      {
        uint32_t a_base[4], k_off[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          a_base[j] = q_smem + (16 * slab + a_row) * kRowBytes +
                      static_cast<uint32_t>(((2 * j + a_col / 8) ^ (a_row & 7)) * 16);
          k_off[j] = static_cast<uint32_t>(((2 * j + k_col / 8) ^ (k_row & 7)) * 16);
        }
        const uint32_t k_rows = tile_smem + (32 * half + k_row) * kRowBytes;
        uint32_t frag[2][3][4];
        auto load = [&](int kk, uint32_t (&f)[3][4]) {
          const uint32_t step = 128u * static_cast<uint32_t>(kk / 4);
          ldmatrix_x4(f[0], a_base[kk % 4] + step);
          ldmatrix_x4(f[1], k_rows + k_off[kk % 4] + step);
          ldmatrix_x4(f[2], k_rows + k_off[kk % 4] + 16 * kRowBytes + step);
        };
        load(0, frag[0]);
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
          if (kk + 1 < kKSteps) load(kk + 1, frag[(kk + 1) % 2]);
          const uint32_t(&f)[3][4] = frag[kk % 2];
          const uint32_t b00[2] = {f[1][0], f[1][1]}, b01[2] = {f[1][2], f[1][3]};
          const uint32_t b10[2] = {f[2][0], f[2][1]}, b11[2] = {f[2][2], f[2][3]};
          mma_m16n8k16<Elem>(s_acc[0], f[0], b00);
          mma_m16n8k16<Elem>(s_acc[1], f[0], b01);
          mma_m16n8k16<Elem>(s_acc[2], f[0], b10);
          mma_m16n8k16<Elem>(s_acc[3], f[0], b11);
        }
      }

      // ---- mask (per-row bounds), tile maxima, exchange with the other half ----
      const int tok_half = tok_begin + i * kBlockN + 32 * half;
      const int lim[2] = {row_limit_smem[16 * slab + g], row_limit_smem[16 * slab + g + 8]};
      float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
      for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (tok_half + n * 8 + 2 * t + (e & 1) >= lim[e >> 1]) s_acc[n][e] = kNegInfR;
          tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s_acc[n][e]);
        }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = quad_max(tile_max[r]);
        if (t == 0) half_max_smem[half * kBlockM + 16 * slab + g + 8 * r] = tile_max[r];
      }
      pair_barrier(slab);  // B2
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = 16 * slab + g + 8 * r;
        const float m = fmaxf(tile_max[r], half_max_smem[(1 - half) * kBlockM + row]);
        const float ref = m == kNegInfR ? 0.f : __fmul_rn(m, scale_log2);
        const float correction = exp2_approx(__fmul_rn(row_max[r], scale_log2) - ref);
        row_max[r] = m;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          s_acc[n][2 * r] = exp2_approx(fmaf(s_acc[n][2 * r], scale_log2, -ref));
          s_acc[n][2 * r + 1] = exp2_approx(fmaf(s_acc[n][2 * r + 1], scale_log2, -ref));
          sum += s_acc[n][2 * r] + s_acc[n][2 * r + 1];
          *reinterpret_cast<uint32_t*>(smem + kPOffset + p_offset(row, 4 * half + n) + 4 * t) =
              pack_float2<Elem>(s_acc[n][2 * r], s_acc[n][2 * r + 1]);
        }
        row_sum[r] = row_sum[r] * correction + sum;
        if (half == 0 && t == 0) rescale_smem[row] = correction;
      }
      __syncthreads();  // B3

      // ---- O = O * rescale + P V over this warp's 64 columns ----
#pragma unroll
      for (int s = 0; s < kSlabsO; ++s) {
        const float c0 = rescale_smem[16 * s + g];
        const float c1 = rescale_smem[16 * s + g + 8];
#pragma unroll
        for (int n = 0; n < kColsPerWarp / 8; ++n) {
          o_acc[s][n][0] *= c0;
          o_acc[s][n][1] *= c0;
          o_acc[s][n][2] *= c1;
          o_acc[s][n][3] *= c1;
        }
      }
#pragma unroll
      for (int kt = 0; kt < kBlockN / 16; ++kt) {
        uint32_t p_frag[kSlabsO][4];
#pragma unroll
        for (int s = 0; s < kSlabsO; ++s) {
          ldmatrix_x4(p_frag[s], p_smem + p_offset(16 * s + a_row, 2 * kt + (lane >> 4)));
        }
#pragma unroll
        for (int dp = 0; dp < kColsPerWarp / 16; ++dp) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, tile_smem + swizzled_offset<kHeadDimQK>(
                                               16 * kt + v_row, warp * kColsPerWarp + 16 * dp + v_col));
          const uint32_t b_lo[2] = {b[0], b[1]};
          const uint32_t b_hi[2] = {b[2], b[3]};
#pragma unroll
          for (int s = 0; s < kSlabsO; ++s) {
            mma_m16n8k16<Elem>(o_acc[s][2 * dp], p_frag[s], b_lo);
            mma_m16n8k16<Elem>(o_acc[s][2 * dp + 1], p_frag[s], b_hi);
          }
        }
      }
    }
    cp_async_wait<0>();  // drain (a group past the last tile is empty)

    // ---- epilogue: lse (direct: natural log; split: log2) and 1 / sum, then the rows ----
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(row_sum[r]);
      if (t == 0) half_sum_smem[half * kBlockM + 16 * slab + g + 8 * r] = sum;
    }
    __syncthreads();
    if (half == 0 && t == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = 16 * slab + g + 8 * r;
        const float sum = half_sum_smem[row] + half_sum_smem[kBlockM + row];
        inv_sum_smem[row] = sum > 0.f ? 1.f / sum : 0.f;
        if (row < valid_rows) {
          const int rr = m0 + row;
          const int head = kv_head * group + rr % group;
          const int64_t hs = static_cast<int64_t>(head) * params.s_q + rr / group;
          const float lse2 = row_max[r] * scale_log2 + __log2f(sum);
          if (direct) {
            params.lse[static_cast<int64_t>(req) * params.h_q * params.s_q + hs] =
                sum > 0.f ? lse2 * kLn2R : __int_as_float(0x7f800000);
          } else {
            params.lse_accum[static_cast<int64_t>(split) * params.h_q * params.s_q + hs] =
                sum > 0.f ? lse2 : kNegInfR;
          }
        }
      }
    }
    __syncthreads();

#pragma unroll
    for (int s = 0; s < kSlabsO; ++s) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = 16 * s + g + 8 * r;
        if (row >= valid_rows) continue;
        const float inv = inv_sum_smem[row];
        const int rr = m0 + row;
        const int head = kv_head * group + rr % group;
        const int query = rr / group;
        if (direct) {
          Storage* dst = static_cast<Storage*>(params.out) +
                         static_cast<int64_t>(req) * params.out_batch_stride +
                         static_cast<int64_t>(query) * params.out_row_stride +
                         static_cast<int64_t>(head) * params.out_head_stride +
                         warp * kColsPerWarp + 2 * t;
#pragma unroll
          for (int n = 0; n < kColsPerWarp / 8; ++n) {
            *reinterpret_cast<uint32_t*>(dst + n * 8) =
                pack_float2<Elem>(o_acc[s][n][2 * r] * inv, o_acc[s][n][2 * r + 1] * inv);
          }
        } else {
          float* dst = params.o_accum +
                       ((static_cast<int64_t>(split) * params.h_q + head) * params.s_q + query) *
                           kHeadDimV +
                       warp * kColsPerWarp + 2 * t;
#pragma unroll
          for (int n = 0; n < kColsPerWarp / 8; ++n) {
            *reinterpret_cast<float2*>(dst + n * 8) =
                make_float2(o_acc[s][n][2 * r] * inv, o_acc[s][n][2 * r + 1] * inv);
          }
        }
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
