// Portable dense MHA prefill forward, 4 warps x 32 query rows ("4x32", FA2's
// layout). Included by kernel.cuh after the masking policies and tile copies it
// shares with the 16-rows-per-warp kernel; same instructions (mma.sync m16n8k16,
// ldmatrix, cp.async, shuffles), same numerics (base-2 online softmax on raw
// scores, P rounded to the input dtype, fixed reduction order: bit-identical
// reruns), same grid (x = query blocks of 128 rows, reversed when causal; y = query
// head; z = sequence) and the same bounds handling.
//
// Why: with 16 rows per warp every warp reads the whole K and V tile through
// ldmatrix for 8 MMAs per fragment pair; with 32 rows (two m16 slabs) each K/V
// fragment feeds both slabs, halving the K/V ldmatrix traffic per MMA. Q fragments
// are re-read from shared memory per k-step (2 ldmatrix.x4 per 16 MMAs) instead of
// being held in registers: O (2 x 16 x d_v fp32) alone takes 128 registers at
// d = 128. For the same reason each 64-key tile is softmaxed as two 32-key steps
// (S of both slabs: 32 registers instead of 64), so the running max moves per 32
// keys and the bits differ from kernel.cuh's (same contract; SPEC's tolerances).
//
// Shared memory (bytes, config.h WideConfig; rows XOR-swizzled in 16-byte chunks):
//   [0, 128*d_qk*2)          Q tile, read by every tile's S = Q K^T
//   [stage0, +stage)         stage 0: K tile [64][d_qk], V tile [64][d_v]
//   [stage1, +stage)         stage 1
//   [0, 128*d_v*2)           O staging, aliased on Q after the last tile
//   d = 128: 32768 + 2 x 32768 = 98304 B; d = 64: 16384 + 2 x 16384 = 49152 B.
//
// Barrier / cp.async protocol (key tiles from the last one down to 0):
//   prologue: cp.async Q -> commit; cp.async K,V of tile T-1 -> stage 0 -> commit;
//             if softmax_scale < 0: wait_group 1, then each thread negates the Q
//             chunks it copied itself (its own cp.async writes are visible to it).
//   iteration i (tile n = T-1-i, stage i % 2): wait_group 0; __syncthreads (tile n
//             and, at i == 0, Q visible to all; every warp done with iteration
//             i-1, so stage (i+1) % 2 is free); cp.async K,V of tile n-1 -> stage
//             (i+1) % 2 -> commit; then for keys [0, 32) and [32, 64) of the tile:
//             S = Q K^T (both slabs), mask, softmax, O += P V.
//   epilogue: __syncthreads (no warp reads Q/K/V any more, no copy in flight);
//             each warp stages its own 32 rows of O, __syncwarp, 16-byte stores.
#pragma once

namespace flash_mla::portable::dense_fwd {

template <typename Elem, int kDQK, int kDV, bool kIsCausal>
__global__ void __launch_bounds__(128, 2)
    dense_prefill_fwd_4x32_kernel(const __grid_constant__ DensePrefillFwdParams params) {
  using Cfg = WideConfig<kDQK, kDV>;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kSlabs = Cfg::kSlabs;
  using Storage = typename Elem::Storage;
  using Mask = typename std::conditional<kIsCausal, CausalMask, NoMask>::type;
  constexpr int kKSteps = kDQK / 16;
  constexpr int kNTilesO = kDV / 8;
  constexpr int kHalfN = kBlockN / 2;          // keys per online-softmax step
  constexpr int kHalfNTiles = kHalfN / 8;      // n-tiles of S per step
  constexpr int kHalfPSteps = kHalfN / 16;     // k-steps of O += P V per step

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = cvta_shared(smem);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  // Sequence bounds, clamped to the tensors (as in kernel.cuh).
  const int seq = blockIdx.z;
  const int q_start = min(max(params.cu_seqlens_q[seq], 0), params.total_q);
  const int s_q = min(max(params.cu_seqlens_q[seq + 1], q_start), params.total_q) - q_start;
  const int m_block = kIsCausal ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : blockIdx.x;
  const int m0 = m_block * kBlockM;
  if (m0 >= s_q) return;
  const int k_start = min(max(params.cu_seqlens_k[seq], 0), params.total_k);
  const int s_k = min(max(params.cu_seqlens_k[seq + 1], k_start), params.total_k) - k_start;

  const int head = blockIdx.y;
  const int kv_head = head / (params.h_q / params.h_k);
  const Storage* k_head = static_cast<const Storage*>(params.k) +
                          static_cast<int64_t>(k_start) * params.k_row_stride +
                          static_cast<int64_t>(kv_head) * params.k_head_stride;
  const Storage* v_head = static_cast<const Storage*>(params.v) +
                          static_cast<int64_t>(k_start) * params.v_row_stride +
                          static_cast<int64_t>(kv_head) * params.v_head_stride;
  const Storage* q_head = static_cast<const Storage*>(params.q) +
                          static_cast<int64_t>(q_start + m0) * params.q_row_stride +
                          static_cast<int64_t>(head) * params.q_head_stride;

  const Mask mask(s_q, s_k, m0, kBlockM);
  const int num_tiles = mask.num_tiles();
  const int num_masked = mask.num_masked();

  // Negative scale: Q negated once (in shared memory here), |c| used; see kernel.cuh.
  const bool negate_q = params.softmax_scale_log2 < 0.f;
  const float scale_log2 = fmaxf(fabsf(params.softmax_scale_log2), 1.17549435e-38f);
  const int g = lane / 4;
  const int t = lane % 4;
  // Accumulator rows of this thread in slab m: row0 + 16 m and row0 + 16 m + 8,
  // row0 = m0 + 32 warp + g (computed where used, to keep it out of the loop's registers).

  float o_acc[kSlabs][kNTilesO][4];
#pragma unroll
  for (int m = 0; m < kSlabs; ++m) {
#pragma unroll
    for (int i = 0; i < kNTilesO; ++i) {
      o_acc[m][i][0] = o_acc[m][i][1] = o_acc[m][i][2] = o_acc[m][i][3] = 0.f;
    }
  }
  float row_max[kSlabs][2], row_sum[kSlabs][2];
#pragma unroll
  for (int m = 0; m < kSlabs; ++m) {
    row_max[m][0] = row_max[m][1] = kNegInf;
    row_sum[m][0] = row_sum[m][1] = 0.f;
  }

  if (num_tiles > 0) {
    auto stage_addr = [&](int stage) -> uint32_t {
      return smem_base + Cfg::kStage0Offset + stage * Cfg::kStageBytes;
    };
    // K/V tile copies: load_tile_async's chunk mapping, but walking one pointer per
    // tensor (rows tid / chunks_per_row + 8j / 4j), so the compiler does not hoist
    // one 64-bit address per chunk out of the tile loop (32 registers at d = 128).
    auto copy_rows = [&](uint32_t dst, const Storage* base, int64_t stride, int first, int s_k,
                         auto dim_tag) {
      constexpr int kDim = decltype(dim_tag)::value;
      constexpr int kChunksPerRow = kDim / 8;
      constexpr int kRowsPerStep = kThreads / kChunksPerRow;
      const int row = tid / kChunksPerRow;
      const int col = (tid % kChunksPerRow) * 8;
      const Storage* src = base + static_cast<int64_t>(first + row) * stride + col;
      const uint32_t dst_row = dst + swizzled_offset<kDim>(row, col);
#pragma unroll
      for (int j = 0; j < kBlockN / kRowsPerStep; ++j) {
        const bool valid = first + row + j * kRowsPerStep < s_k;
        // kRowsPerStep is a multiple of 8: the swizzle of every row is the same.
        cp_async_16_zfill(dst_row + j * kRowsPerStep * (kDim * 2),
                          valid ? src + static_cast<int64_t>(j * kRowsPerStep) * stride : base,
                          valid);
      }
    };
    auto issue_kv = [&](int tile, int stage) {
      const int first = tile * kBlockN;
      copy_rows(stage_addr(stage), k_head, params.k_row_stride, first, s_k,
                std::integral_constant<int, kDQK>{});
      copy_rows(stage_addr(stage) + Cfg::kKTileBytes, v_head, params.v_row_stride, first, s_k,
                std::integral_constant<int, kDV>{});
      cp_async_commit();
    };

    // ---- prologue ----
    load_tile_async<kBlockM, kDQK, kThreads>(smem_base, q_head, params.q_row_stride, 0, s_q - m0,
                                             tid);
    cp_async_commit();
    issue_kv(num_tiles - 1, 0);
    if (negate_q) {
      cp_async_wait<1>();
      // The same chunk mapping as load_tile_async: each thread flips the sign bits
      // of the chunks it copied (zero-filled rows become -0, never read as output).
      constexpr int kChunksPerRow = kDQK / 8;
#pragma unroll
      for (int j = 0; j < kBlockM * kChunksPerRow / kThreads; ++j) {
        const int idx = tid + j * kThreads;
        uint4* chunk = reinterpret_cast<uint4*>(
            smem + swizzled_offset<kDQK>(idx / kChunksPerRow, (idx % kChunksPerRow) * 8));
        uint4 v = *chunk;
        v.x ^= 0x80008000u;
        v.y ^= 0x80008000u;
        v.z ^= 0x80008000u;
        v.w ^= 0x80008000u;
        *chunk = v;
      }
    }

    // ldmatrix lane offsets (see kernel.cuh). Q: slab 0 rows 32w + (lane & 15);
    // slab 1 is 16 rows further, which leaves the swizzle (row % 8) unchanged.
    // Chunk 2j + bit of a lane's row sits at ((2j) ^ x) * 16 with x = bit ^ (lane & 7)
    // (2j's low bit is 0, so this equals kernel.cuh's off[j % 4] + (j / 4) * 128).
    // Only a row base and x are kept per operand, not four offsets: at 32 rows per
    // warp every register counts (four offsets per operand spilled on sm_90).
    const uint32_t q_row = smem_base + (warp * 32 + (lane & 15)) * (kDQK * 2);
    const uint32_t k_row = ((lane & 7) + ((lane >> 4) & 1) * 8) * (kDQK * 2);
    const uint32_t v_row = ((lane & 7) + ((lane >> 3) & 1) * 8) * (kDV * 2);
    const uint32_t x_qv = (lane >> 4) ^ (lane & 7);
    const uint32_t x_k = ((lane >> 3) & 1) ^ (lane & 7);

    for (int i = 0; i < num_tiles; ++i) {
      const int tile = num_tiles - 1 - i;
      const int stage = i & 1;
      cp_async_wait<0>();
      __syncthreads();
      if (tile > 0) issue_kv(tile - 1, stage ^ 1);
      const uint32_t k_smem = stage_addr(stage);
      const uint32_t v_smem = k_smem + Cfg::kKTileBytes;

      // The 64-key tile is processed as two 32-key halves, each a full online-
      // softmax step (S, mask, max, exp, P, O += P V): S of both slabs for 32 keys
      // is 32 registers, for 64 keys it was 64, and 2 x 16 x 64 scores next to the
      // 2 x 16 x 128 O accumulator spilled on sm_90 and sm_120. Every K/V fragment
      // still feeds both slabs.
#pragma unroll 1
      for (int half = 0; half < 2; ++half) {
        float s[kSlabs][kHalfNTiles][4];
#pragma unroll
        for (int m = 0; m < kSlabs; ++m) {
#pragma unroll
          for (int nt = 0; nt < kHalfNTiles; ++nt) {
            s[m][nt][0] = s[m][nt][1] = s[m][nt][2] = s[m][nt][3] = 0.f;
          }
        }
        const uint32_t k_half = k_smem + k_row + half * kHalfN * (kDQK * 2);
#pragma unroll 4
        for (int ks = 0; ks < kKSteps; ++ks) {
          uint32_t a[kSlabs][4];
#pragma unroll
          for (int m = 0; m < kSlabs; ++m) {
            ldmatrix_x4(a[m], q_row + ((2 * ks) ^ x_qv) * 16 + m * 16 * (kDQK * 2));
          }
#pragma unroll
          for (int np = 0; np < kHalfNTiles / 2; ++np) {
            uint32_t b[4];
            ldmatrix_x4(b, k_half + ((2 * ks) ^ x_k) * 16 + np * 16 * (kDQK * 2));
            const uint32_t b_lo[2] = {b[0], b[1]};
            const uint32_t b_hi[2] = {b[2], b[3]};
#pragma unroll
            for (int m = 0; m < kSlabs; ++m) {
              mma_m16n8k16<Elem>(s[m][2 * np], a[m], b_lo);
              mma_m16n8k16<Elem>(s[m][2 * np + 1], a[m], b_hi);
            }
          }
        }

        // Mask, online softmax (base 2, raw-score maxima, one FFMA per score), P
        // packed as the A fragments of P.V, O rescaled: kernel.cuh's steps per slab.
        uint32_t p_frag[kSlabs][kHalfPSteps][4];
#pragma unroll
        for (int m = 0; m < kSlabs; ++m) {
          if (i < num_masked) {
            const int row0 = m0 + warp * 32 + g;
#pragma unroll
            for (int nt = 0; nt < kHalfNTiles; ++nt) {
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int col = tile * kBlockN + half * kHalfN + nt * 8 + 2 * t + (e & 1);
                const int row = row0 + m * 16 + (e >> 1) * 8;
                if (!mask.visible(row, col)) s[m][nt][e] = kNegInf;
              }
            }
          }
          float ref[2], correction[2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float tile_max = row_max[m][r];
#pragma unroll
            for (int nt = 0; nt < kHalfNTiles; ++nt) {
              tile_max = fmaxf(tile_max, fmaxf(s[m][nt][2 * r], s[m][nt][2 * r + 1]));
            }
            tile_max = quad_max(tile_max);
            ref[r] = tile_max == kNegInf ? 0.f : tile_max * scale_log2;
            // Exactly 1 when the max did not move. The exponent below is contracted
            // to FFMA(row_max, c, -ref), i.e. the rounding residual of ref, not 0, so
            // every step would scale row_sum by the same 2^residual (~1 + 1e-7); with
            // one step per 32 keys that drift reached 3.2e-5 relative in lse over
            // 70000 keys (past SPEC's 2.01/65536; H100, before this select).
            correction[r] = tile_max == row_max[m][r]
                                ? 1.f
                                : exp2_approx(row_max[m][r] * scale_log2 - ref[r]);
            row_max[m][r] = tile_max;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < kHalfNTiles; ++nt) {
              s[m][nt][2 * r] = exp2_approx(fmaf(s[m][nt][2 * r], scale_log2, -ref[r]));
              s[m][nt][2 * r + 1] = exp2_approx(fmaf(s[m][nt][2 * r + 1], scale_log2, -ref[r]));
              sum += s[m][nt][2 * r] + s[m][nt][2 * r + 1];
            }
            row_sum[m][r] = row_sum[m][r] * correction[r] + sum;
          }
#pragma unroll
          for (int nt = 0; nt < kNTilesO; ++nt) {
            o_acc[m][nt][0] *= correction[0];
            o_acc[m][nt][1] *= correction[0];
            o_acc[m][nt][2] *= correction[1];
            o_acc[m][nt][3] *= correction[1];
          }
#pragma unroll
          for (int kk = 0; kk < kHalfPSteps; ++kk) {
            p_frag[m][kk][0] = pack_float2<Elem>(s[m][2 * kk][0], s[m][2 * kk][1]);
            p_frag[m][kk][1] = pack_float2<Elem>(s[m][2 * kk][2], s[m][2 * kk][3]);
            p_frag[m][kk][2] = pack_float2<Elem>(s[m][2 * kk + 1][0], s[m][2 * kk + 1][1]);
            p_frag[m][kk][3] = pack_float2<Elem>(s[m][2 * kk + 1][2], s[m][2 * kk + 1][3]);
          }
        }

        // O += P V over this half's 32 keys; each V fragment feeds both slabs.
        const uint32_t v_half = v_smem + v_row + half * kHalfN * (kDV * 2);
#pragma unroll
        for (int kk = 0; kk < kHalfPSteps; ++kk) {
#pragma unroll
          for (int dp = 0; dp < kNTilesO / 2; ++dp) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, v_half + ((2 * dp) ^ x_qv) * 16 + kk * 16 * (kDV * 2));
            const uint32_t b_lo[2] = {b[0], b[1]};
            const uint32_t b_hi[2] = {b[2], b[3]};
#pragma unroll
            for (int m = 0; m < kSlabs; ++m) {
              mma_m16n8k16<Elem>(o_acc[m][2 * dp], p_frag[m][kk], b_lo);
              mma_m16n8k16<Elem>(o_acc[m][2 * dp + 1], p_frag[m][kk], b_hi);
            }
          }
        }
      }
    }
    __syncthreads();  // nobody reads Q/K/V any more: staging may overwrite Q
  }

  // ---- epilogue: rows that saw no key get out = 0 and lse = +inf ----
  // Sequence start and length re-read (cached loads) rather than kept live through
  // the tile loop: registers are the limit of this layout.
  {
    const int q_start = min(max(params.cu_seqlens_q[seq], 0), params.total_q);
    const int s_q = min(max(params.cu_seqlens_q[seq + 1], q_start), params.total_q) - q_start;
    const int m0 = (kIsCausal ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : blockIdx.x) * kBlockM;
    const int row0 = m0 + warp * 32 + g;
  Storage* out_head = static_cast<Storage*>(params.out) +
                      static_cast<int64_t>(q_start + m0) * params.out_row_stride +
                      static_cast<int64_t>(head) * params.out_head_stride;
  float* lse_head = params.lse + static_cast<int64_t>(head) * params.lse_head_stride + q_start;
#pragma unroll
  for (int m = 0; m < kSlabs; ++m) {
    float inv_sum[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(row_sum[m][r]);
      inv_sum[r] = sum > 0.f ? 1.f / sum : 0.f;
      constexpr float kLn2 = 0.69314718055994530942f;
      const float lse = sum > 0.f ? (row_max[m][r] * scale_log2 + __log2f(sum)) * kLn2
                                  : __int_as_float(0x7f800000);
      const int row = row0 + m * 16 + 8 * r;
      if (t == 0 && row < s_q) lse_head[row] = lse;
    }
#pragma unroll
    for (int nt = 0; nt < kNTilesO; ++nt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const uint32_t packed = pack_float2<Elem>(o_acc[m][nt][2 * r] * inv_sum[r],
                                                  o_acc[m][nt][2 * r + 1] * inv_sum[r]);
        const int row = warp * 32 + m * 16 + g + 8 * r;
        *reinterpret_cast<uint32_t*>(smem + swizzled_offset<kDV>(row, nt * 8 + 2 * t)) = packed;
      }
    }
  }
  __syncwarp();

  constexpr int kChunksPerRow = kDV / 8;
#pragma unroll
  for (int j = 0; j < 32 * kChunksPerRow / 32; ++j) {
    const int idx = lane + 32 * j;
    const int row = warp * 32 + idx / kChunksPerRow;
    const int col = (idx % kChunksPerRow) * 8;
    if (m0 + row < s_q) {
      const uint4 value = *reinterpret_cast<const uint4*>(smem + swizzled_offset<kDV>(row, col));
      *reinterpret_cast<uint4*>(out_head + static_cast<int64_t>(row) * params.out_row_stride + col) =
          value;
    }
  }
  }
}

template <typename Elem, int kDQK, int kDV, bool kIsCausal>
void launch_dense_prefill_fwd_4x32(const DensePrefillFwdParams& params) {
  using Cfg = WideConfig<kDQK, kDV>;
  auto kernel = dense_prefill_fwd_4x32_kernel<Elem, kDQK, kDV, kIsCausal>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  const dim3 grid(num_m_blocks(params.max_seqlen_q, Cfg::kBlockM), params.h_q, params.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, params.stream>>>(params);
}

}  // namespace flash_mla::portable::dense_fwd
