// Portable sparse MLA decode, the narrow CTA: 4 warps, 16 rows (the heads [16 hb, 16 hb +
// 16) of one query), Q in registers, one barrier per 16-token tile. The CTA of the serving
// head counts (h_q <= 16, config.h choose_cta); kernel.cuh's row-block CTA serves the rest.
// Same work split (blockIdx.x = part * num_m_blocks + m_block, m_block = query *
// num_head_blocks + hb), key lists, gather, formats and output contract as kernel.cuh.
// Design and arithmetic: docs/sparse_decode.md ("The narrow CTA").
//
// Dims per warp. Warp w owns latent dims [128 w, 128 w + 128) and, for d_qk 576, RoPE dims
// [512 + 16 w, 512 + 16 w + 16): it dequantises exactly those dims of each tile, computes
// the S partial over them (9 or 8 k-steps, its Q fragments in registers) and accumulates O
// over output columns [128 w, 128 w + 128), which are among them. So no warp reads another
// warp's dequantised dims, and the only exchange is the four S partials, which meet in
// double-buffered shared memory and are added by every warp in the fixed order w = 0..3
// (its own from registers, the bits it stored): the four copies of the softmax agree bit
// for bit, and P stays in registers (the C fragments of S are the A fragment of P V).
//
// Shared memory (config.h NarrowLayout; bf16 rows XOR-swizzled in 16-byte chunks):
//   dequantised tiles, 2 buffers [16 tokens][d_qk] bf16 (tile i in buffer i % 2; at a
//   piece's start buffer 1 stages the Q block) | raw ring, 3 stages [16][raw row] (tile i
//   in stage i % 3) | S partials [2][warp][n-tile][lane] float4 | index ring [3][16] int32
//   (tile i's values in stage i % 3) | valid flags [4][4 warps] bytes (tile i's in stage
//   i % 4; bit k of warp w's byte: token 4 w + k) | the piece record.
//
// Barrier / cp.async protocol per piece (T tiles):
//   __syncthreads (the previous piece's readers are done); cp.async Q and the index values
//   of tiles 3 and 4 -> commit; raw tiles 0..2 (their index values read from global memory)
//   -> one commit each; wait_group 2 (Q and raw tile 0, this thread's part); __syncthreads;
//   ldmatrix the Q fragments; dequantise raw tile 0 -> buffer 0 (own dims); __syncwarp; S
//   partial of tile 0 -> partial buffer 0; tile 0's valid mask.
//   iteration i: wait_group 1 (raw tile i+1 and the index values of tile i+3 landed); B
//     __syncthreads (those and the partials of tile i visible; every warp finished
//     iteration i-1, so raw stage i % 3, index stage (i+5) % 3, tile buffer (i+1) % 2,
//     partial buffer (i+1) % 2 and flag stage (i+3) % 4 are free -- tile i-1's mask was
//     read in iteration i-2); issue raw tile i+3 and the index values of tile i+5 -> commit
//     (an empty group past the end keeps the count); sum tile i's partials; dequantise raw
//     tile i+1 -> buffer (i+1) % 2, __syncwarp, its S partial -> partial buffer (i+1) % 2
//     and its mask (these MMAs overlap what follows); mask, online softmax, rescale O,
//     O += P V of tile i.
//   epilogue: wait_group 0; __syncthreads (the piece record); quad sums; warp 0 writes lse
//     (or lse_accum); every warp writes its columns (direct output times the sink factor).
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include <cuda_runtime.h>

#include "../../common/cp_async.cuh"
#include "../../common/element.cuh"
#include "../../common/ldmatrix.cuh"
#include "../../common/math.cuh"
#include "../../common/mma.cuh"
#include "../../common/qreg_steps.cuh"
#include "../../common/smem_opt_in.cuh"
#include "../../common/swizzle.cuh"
#include "../schedule/config.h"
#include "config.h"
#include "formats.cuh"
#include "kernel.cuh"
#include "kernel.h"

namespace flash_mla::portable::sparse_decode {

namespace narrow {

namespace sched = ::flash_mla::portable::decode_schedule;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLn2 = 0.69314718055994530942f;
constexpr int kColsPerWarp = kHeadDimV / kNumWarps;  // 128
constexpr int kNTilesO = kColsPerWarp / 8;           // 16

// First dim of k-step kk (16 dims) of warp w: its latent dims, then its RoPE dims.
__device__ __forceinline__ int kstep_dim(int warp, int kk) {
  return kk < kColsPerWarp / 16 ? kColsPerWarp * warp + 16 * kk : 512 + 16 * warp;
}

// Raw tile (shared) -> warp `warp`'s dims of the bf16 tile (shared, swizzled). Lane l takes
// token l / 2; lane half h = l % 2 takes latent dims [128 warp + 64 h, +64) (8 chunks of 8) and,
// at d_qk 576, RoPE dims [512 + 16 warp + 8 h, +8): every lane the same work.
template <typename F, int kDimQK, int kRawRowBytes>
__device__ __forceinline__ void dequant_own_dims(const unsigned char* raw_stage,
                                                 unsigned char* tile, int warp, int lane) {
  static_assert(F::kDimQK == kDimQK, "format and kernel agree on d_qk");
  const int row = lane >> 1;
  const int half = lane & 1;
  const unsigned char* raw_row = raw_stage + row * kRawRowBytes;
  // warp & 3 == warp: it tells the compiler that these dims stay below 512 (no RoPE branch).
  const int latent0 = kColsPerWarp * (warp & (kNumWarps - 1)) + 64 * half;
#pragma unroll 1
  for (int j0 = 0; j0 < 8; j0 += 4) {
    dequant_chunks<F, kDimQK, 4>(raw_row, tile, row,
                                 [&](int j) { return latent0 + 8 * (j0 + j); });
  }
  if constexpr (kDimQK == 576) {
    const int dim0 = 512 + 16 * warp + 8 * half;
    *reinterpret_cast<uint4*>(tile + swizzled_offset<kDimQK>(row, dim0)) =
        F::dequant8(raw_row, dim0);
  }
}

// The launch bound: three CTAs per SM on sm_90 (228 KB of shared memory admit three); two
// elsewhere, where shared memory admits at most two (sm_80 .. sm_89) or one (sm_120), or where
// ptxas spills under three (sm_100: 4 bytes), so their registers stay less capped.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ == 900
constexpr int kNarrowMinCtas = kNarrowCtasPerSm90;
#else
constexpr int kNarrowMinCtas = 2;
#endif

template <int kDimQK>
__global__ void __launch_bounds__(kThreads, kNarrowMinCtas)
    sparse_decode_narrow_kernel(const __grid_constant__ SparseDecodeParams params) {
  using L = NarrowLayout<kDimQK>;
  using Elem = BF16;
  using Storage = typename Elem::Storage;
  constexpr int kRows = 16;
  constexpr int kKSteps = kDimQK / kNumWarps / 16;  // 9 or 8
  constexpr int kRawRowBytes = L::kRawRowBytes;
  constexpr int kRawStages = L::kRawStages;
  constexpr int kFlagStages = L::kFlagStages;
  constexpr int kIndexStages = L::kIndexStages;
  constexpr int kIndexLead = L::kIndexLead;
  static_assert(kIndexLead - 2 >= kRawStages && kIndexStages >= kIndexLead - kRawStages + 1,
                "an index copy lands two iterations before its gather, in a free stage");

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = cvta_shared(smem);
  float4* s_partial = reinterpret_cast<float4*>(smem + L::kPartialOffset);
  unsigned char* valid_smem = smem + L::kFlagOffset;  // [stage][warp]: 4 valid bits
  const int* index_smem = reinterpret_cast<const int*>(smem + L::kIndexOffset);
  Piece* piece_smem = reinterpret_cast<Piece*>(smem + L::kPieceOffset);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;

  const int part = static_cast<int>(blockIdx.x / params.num_m_blocks);

  const int32_t* meta = params.metadata + static_cast<int64_t>(part) * sched::kMetaInts;
  const int begin_req = meta[sched::kBeginReq];
  if (begin_req < 0 || begin_req >= params.batch) return;  // empty part
  const int last_req = min(meta[sched::kEndReq], params.batch - 1);
  const bool has_extra = params.extra.cache != nullptr;
  const float scale_log2 = params.softmax_scale_log2;  // > 0 (validated)
  const Storage* q_base = static_cast<const Storage*>(params.q);

  // Per-lane ldmatrix coordinates (mma.cuh / ldmatrix.cuh give the fragment orders). Q (A
  // of S): row lane & 15, chunk bit lane >> 4. K (B of S): token (lane & 7) + 8 * bit 4,
  // chunk bit (lane >> 3) & 1. V (B of O, transposed): token (lane & 7) + 8 * bit 3, chunk
  // bit lane >> 4.
  const int a_row = lane & 15;
  const int a_col = (lane >> 4) * 8;
  const int k_row = (lane & 7) + ((lane >> 4) & 1) * 8;
  const int k_col = ((lane >> 3) & 1) * 8;
  const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int v_col = (lane >> 4) * 8;
  const int col0 = warp * kColsPerWarp;
  const int token_row = tid / kThreadsPerToken;

  for (int req = begin_req; req <= last_req; ++req) {
    Piece here;
    int num_tiles;
    if (!piece_of(params, meta, req, has_extra, kRows, here, num_tiles)) continue;

    __syncthreads();  // every warp is done with the previous piece's shared memory
    if (tid == 0) *piece_smem = here;

    // Q block (16 rows: heads past h_q are zero rows) staged in tile buffer 1.
    load_tile_async<kRows, kDimQK, kThreads>(
        smem_base + L::kTileOffset + L::kTileBytes,
        q_base + static_cast<int64_t>(req) * params.q_batch_stride +
            static_cast<int64_t>(here.query) * params.q_row_stride,
        params.q_head_stride, here.head0, min(kRows, params.h_q - here.head0), tid);

    // The prologue passes `here`; the tile loop, the record it reads back after its barrier.
    // Index values and their ring: kernel.cuh's issue_index / tile_index.
    auto tile_pool = [&](const Piece& pc, int tile, int& pos, int& limit) -> const CachePool& {
      return sparse_decode::tile_pool(params, pc, tile, pos, limit);
    };
    auto issue_index = [&](const Piece& pc, int tile) {
      sparse_decode::issue_index<kIndexStages>(params, pc, tile, num_tiles, tid,
                                               smem_base + L::kIndexOffset);
    };
    auto tile_index = [&](const Piece& pc, int tile, bool ring) -> int {
      return sparse_decode::tile_index<kIndexStages>(params, pc, tile, num_tiles, token_row,
                                                     index_smem, ring);
    };
    // One raw tile into stage tile % 3 and its valid flags into flag stage tile % 4: byte w
    // holds bit k for token 4 w + k, the tokens whose first threads are warp w's lanes 8 k
    // (kernel.cuh's issue rules otherwise).
    auto issue_tile = [&](const Piece& pc, int tile, int value) {
      if (tile >= num_tiles) return;
      int pos0, limit;
      const CachePool& pool = tile_pool(pc, tile, pos0, limit);
      const int token = value >= 0 && static_cast<int64_t>(value) < pool.num_tokens ? value : -1;
      const uint32_t firsts = __ballot_sync(0xffffffffu, (lane & 7) == 0 && token >= 0);
      if (lane == 0) {
        valid_smem[(tile % kFlagStages) * kNumWarps + warp] = static_cast<unsigned char>(
            (firsts & 1u) | ((firsts >> 7) & 2u) | ((firsts >> 14) & 4u) | ((firsts >> 21) & 8u));
      }
      with_format<kDimQK>(pool.format, [&](auto fmt) {
        using F = decltype(fmt);
        int64_t data = -1, scales = -1;
        if (token >= 0) token_offsets<F>(pool, token, data, scales);
        issue_raw_tile<F, kRawRowBytes>(
            pool, smem_base + L::kRawOffset + static_cast<uint32_t>(tile % kRawStages) * L::kRawStageBytes,
            data, scales, token_row, tid % kThreadsPerToken);
      });
    };
    // The Q group also carries the index values of tiles 3 and 4 (iteration i gathers tile
    // i + 3 and copies the values of tile i + 5).
#pragma unroll 1
    for (int tile = kRawStages; tile < kIndexLead; ++tile) issue_index(here, tile);
    cp_async_commit();
#pragma unroll 1
    for (int tile = 0; tile < kRawStages; ++tile) {
      issue_tile(here, tile, tile_index(here, tile, /*ring=*/false));
      cp_async_commit();
    }

    uint32_t q_frag[kKSteps][4];  // this warp's Q dims, loaded once raw tile 0 has landed

    // Dequantise raw tile `tile` (own dims) into its bf16 buffer, then this warp's S partial
    // over them into s_acc and partial buffer tile % 2; returns the tile's valid mask (bit
    // j: token j). Needs the raw tile visible to the CTA.
    auto tile_s_partial = [&](const Piece& pc, int tile, float (&s_acc)[2][4]) -> uint32_t {
      int pos0, limit;
      const CachePool& pool = tile_pool(pc, tile, pos0, limit);
      const unsigned char* raw = smem + L::kRawOffset + (tile % kRawStages) * L::kRawStageBytes;
      unsigned char* buf = smem + L::kTileOffset + (tile & 1) * L::kTileBytes;
      with_format<kDimQK>(pool.format, [&](auto fmt) {
        dequant_own_dims<decltype(fmt), kDimQK, kRawRowBytes>(raw, buf, warp, lane);
      });
      const uint32_t flags =
          *reinterpret_cast<const uint32_t*>(valid_smem + (tile % kFlagStages) * kNumWarps);
      const uint32_t mask = (flags & 0xFu) | ((flags >> 4) & 0xF0u) | ((flags >> 8) & 0xF00u) |
                            ((flags >> 12) & 0xF000u);
      __syncwarp();  // this warp's dims of the tile, which its S partial reads
      qreg::s_partial<Elem, kDimQK>(s_acc, q_frag,
                                    smem_base + L::kTileOffset + (tile & 1) * L::kTileBytes,
                                    k_row, k_col, [&](int kk) { return kstep_dim(warp, kk); });
      qreg::store_partial<kNumWarps>(s_partial, s_acc, tile & 1, warp, lane);
      return mask;
    };

    float o_acc[kNTilesO][4];
#pragma unroll
    for (int n = 0; n < kNTilesO; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.f;
    // Online softmax state of this lane's rows g and g + 8: running max (raw score units,
    // the same in the four lanes of a quad) and this lane's part of the running sum.
    float row_max[2] = {kNegInf, kNegInf};
    float row_sum[2] = {0.f, 0.f};

    // Prologue: groups Q, raw 0..2 committed; Q and raw tile 0 must be done.
    cp_async_wait<kRawStages - 1>();
    __syncthreads();  // the Q block and raw tile 0 visible
    {
      const uint32_t q_smem = smem_base + L::kTileOffset + L::kTileBytes;
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        ldmatrix_x4(q_frag[kk],
                    q_smem + swizzled_offset<kDimQK>(a_row, kstep_dim(warp, kk) + a_col));
      }
    }
    float s_own[2][4];  // this warp's partial of the tile whose partials are read next
    uint32_t mask_cur = num_tiles > 0 ? tile_s_partial(here, 0, s_own) : 0u;

#pragma unroll 1
    for (int i = 0; i < num_tiles; ++i) {
      // Groups committed: Q, raw 0 .. i+2; raw tile i+1 must be done.
      cp_async_wait<kRawStages - 2>();
      __syncthreads();  // B (see the file comment)
      const Piece pc = *piece_smem;
      issue_tile(pc, i + kRawStages, tile_index(pc, i + kRawStages, /*ring=*/true));
      issue_index(pc, i + kIndexLead);
      cp_async_commit();

      // ---- tile i's S: the partials of warps 0..3 in that order (the same sums in every
      // warp); this warp's own from its registers. One code path per warp (a uniform branch):
      // with a select per term ptxas copied the own partial into every load's destination ----
      float sc[2][4];
      const float4* part = s_partial + (i & 1) * (kNumWarps * 2 * 32) + lane;
      auto add_partials = [&](auto own_warp) {
        constexpr int kOwn = decltype(own_warp)::value;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const float4 own = make_float4(s_own[n][0], s_own[n][1], s_own[n][2], s_own[n][3]);
          float4 v = kOwn == 0 ? own : part[n * 32];
#pragma unroll
          for (int k = 1; k < kNumWarps; ++k) {
            const float4 p = k == kOwn ? own : part[(k * 2 + n) * 32];
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
      };
      static_assert(kNumWarps == 4, "one path per warp below");
      switch (warp) {
        case 0: add_partials(std::integral_constant<int, 0>{}); break;
        case 1: add_partials(std::integral_constant<int, 1>{}); break;
        case 2: add_partials(std::integral_constant<int, 2>{}); break;
        default: add_partials(std::integral_constant<int, 3>{}); break;
      }
      // ---- tile i+1's dequantisation and S partial: they overlap this tile's softmax ----
      const uint32_t mask = mask_cur;
      if (i + 1 < num_tiles) mask_cur = tile_s_partial(pc, i + 1, s_own);

#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (((mask >> (n * 8 + 2 * t + (e & 1))) & 1u) == 0) sc[n][e] = kNegInf;
        }
      }
      float correction[2];
      qreg::softmax_step(sc, row_max, row_sum, correction, scale_log2);
      uint32_t p_frag[4];
      qreg::pack_p<Elem>(p_frag, sc);
      // ---- O = O * rescale + P V over this warp's 128 columns (its own dequantised dims) ----
      // Every factor exactly 1 (no row's max moved; exp2 of an exact 0) leaves O as it is: 64
      // multiplies saved per tile once the maxima settle. The same bits either way.
      if (!__all_sync(0xffffffffu, correction[0] == 1.f && correction[1] == 1.f)) {
        qreg::rescale_o(o_acc, correction);
      }
      const uint32_t tile_smem = smem_base + L::kTileOffset + (i & 1) * L::kTileBytes;
#pragma unroll
      for (int dp = 0; dp < kNTilesO / 2; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, tile_smem + swizzled_offset<kDimQK>(v_row, col0 + dp * 16 + v_col));
        const uint32_t b_lo[2] = {b[0], b[1]};
        const uint32_t b_hi[2] = {b[2], b[3]};
        mma_m16n8k16<Elem>(o_acc[2 * dp], p_frag, b_lo);
        mma_m16n8k16<Elem>(o_acc[2 * dp + 1], p_frag, b_hi);
      }
    }
    cp_async_wait<0>();  // drain (the groups past the last tile are empty)
    __syncthreads();     // the piece record is visible (also with no tile)
    // Read back rather than kept live through the tile loop (registers).
    const int out_split = piece_smem->split;
    const int query = piece_smem->query;
    const int head0 = piece_smem->head0;
    const int valid_rows = min(kRows, params.h_q - head0);

    // ---- epilogue: every lane of a quad holds the same row max; the sums are split ----
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = g + 8 * r;
      const float sum = quad_sum(row_sum[r]);
      if (row >= valid_rows) continue;
      const int head = head0 + row;
      const int64_t qh = static_cast<int64_t>(query) * params.h_q + head;
      const float lse2 = row_max[r] * scale_log2 + __log2f(sum);
      float out_scale = sum > 0.f ? 1.f / sum : 0.f;
      if (out_split < 0) {
        const float lse = lse2 * kLn2;
        if (warp == 0 && t == 0) {
          params.lse[static_cast<int64_t>(req) * params.s_q * params.h_q + qh] =
              sum > 0.f ? lse : __int_as_float(0x7f800000);
        }
        // out *= exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink - lse)): sink +inf
        // gives 0, -inf gives 1.
        if (sum > 0.f && params.attn_sink != nullptr) {
          out_scale *= 1.f / (1.f + expf(params.attn_sink[head] - lse));
        }
        store_row<Elem>(out_row<Storage>(params, req, query, head) + col0 + 2 * t, o_acc, r,
                        out_scale);
      } else {
        if (warp == 0 && t == 0) {
          params.lse_accum[static_cast<int64_t>(out_split) * params.s_q * params.h_q + qh] =
              sum > 0.f ? lse2 : kNegInf;
        }
        store_row_f32(partial_row(params, out_split, query, head) + col0 + 2 * t, o_acc, r,
                      out_scale);
      }
    }
  }
}

template <int kDimQK>
void launch(const SparseDecodeParams& params) {
  constexpr auto kernel = sparse_decode_narrow_kernel<kDimQK>;
  constexpr int kSmemBytes = NarrowLayout<kDimQK>::kSmemBytes;
  // The carveout asks for the largest shared-memory split, so two CTAs share an H100 SM.
  opt_in_smem<kernel, kSmemBytes, /*kMaxCarveout=*/true>();
  const int64_t ctas = static_cast<int64_t>(params.num_parts) * params.num_m_blocks;
  kernel<<<static_cast<unsigned>(ctas), kThreads, kSmemBytes, params.stream>>>(params);
}

}  // namespace narrow

template <int kDimQK>
void run_sparse_decode_narrow(const SparseDecodeParams& params) {
  narrow::launch<kDimQK>(params);
}

}  // namespace flash_mla::portable::sparse_decode
